"""The layer's hot path: Eq. 7-11 over a static window bank in a few packed ops.

On a GPU a layer's cost is set by how many kernels it launches, not by its arithmetic. So the window is one static
bank of stacked tensors per call position, and every step below is one op over all of it: no Python loop over the
window, no op per statistic, and nothing that changes shape between iterations (the ring's slot is still chosen on
the host, so the path is not yet capturable in a CUDA graph). :mod:`cbn_mmdet.ops.compensation` has the same
mathematics in reference form.

Layout of a bank with ``T = k - 1`` stored iterations (:class:`cbn_mmdet.models.window.WindowBank` owns it):

* ``stats`` (T, F, C), one row of F fields per stored iteration and channel:

  - ``R = s - <G, W_tau>``: the centred moment's intercept, so that ``s_tau(theta_t) = R + <G, W_t> - dmu^2``
    (Eq. 8). The mean needs none: it is linear in the kernel, ``mu_tau(theta_t) = <P, W_t> + b_t`` exactly (Eq. 7;
    Euler's identity ``<P, W_tau> + b_tau = mu_tau``), except for a conv whose bias is not in the graph (frozen or
    derived: its value is unknown), where ``A = mu - <P, W_tau>`` holds it and ``mu_tau(theta_t) = A + <P, W_t>``;
    ``A`` is 0 for every other conv;
  - ``MU = mu`` and ``S = s`` as measured;
  - ``E`` and ``Q``, scratch of each forward: ``mu_c - mu_t`` (the compensated mean, shifted by the current one),
    and ``s_c + (mu_c - mu_t)^2``. Naive CBN's ``mu_c`` is ``mu`` (its mean is not moved);
  - ``ONE = w`` (1, or 0 for a skipped or empty slot) and ``M = m`` (values per channel), constant over C;
  - ``E2, Q2, ONE2, M2`` and ``ONE3, M3``: fields of the scratch entry (the current iteration), stored with it and
    never read from a slot (see below).

  A skipped (non-finite) or empty slot holds zeros: no NaN is ever stored, and a zero row is finite under any kernel.
* ``gp`` (C + g, T, D): ``G = ds/dW`` (C rows) and ``P = dmu/dW`` (g rows, one per group), with
  ``D = C_in/g * kh * kw``; channel-major, so that the per-channel products are batched matrix products.
* ``qs`` (g, T, r, D + C/g), only with ``second_order = r > 0``: per slot, ``r`` centred input patches
  ``X' = P - x_i`` and their outputs ``Y' = W_tau X'``, from which :func:`compensate_bank` adds the second-order
  term ``mean_i ((W_t - W_tau) . (P - x_i))^2`` to the centred moment.
* ``work``, one flat buffer ``[q entry (g, r, D + C/g) | gp entry (C + g, D) | entry (F, C) | sums (4, C)]``: the
  current iteration's patches, kernel gradients, fields and the window's sums. One reduction over it decides, on the
  device, whether everything this forward computed is finite. A push copies ``[gp entry | entry]`` into a slot.

The current iteration enters the sums as the entry's ``[E2, Q2, ONE2, M2] = [0, s_t, 1, m_t - 1]``, so that one
matrix product over the slots' ``[E, Q, ONE, M]`` gives ``n * (mu_bar - mu_t)``, ``sum w Q``, ``n = sum w`` and
``M - 1`` (``M = sum w m``, for the running variance's ``M / (M - 1)``); the window's variance is then the shifted
two-pass form ``sum w Q / n - (mu_bar - mu_t)^2``, which does not cancel when ``|mu| >> sigma``. The entry's
``[MU, S, ONE3, M3] = [mu_t, s_t, 1, m_t]`` is the batch's own statistics in the sums' layout: what a forward that
falls back normalizes with. One op writes all of the entry's fields but ``R``.
"""
from typing import Optional

import torch
from torch import Tensor

from .conv_grads import ConvSpec, conv_stat_grads, sample_patches
from .normalize import HistoryGrad

__all__ = ['FIELDS', 'A', 'R', 'S', 'MU', 'E', 'Q', 'ONE', 'M', 'BankViews', 'ScratchViews', 'KernelViews',
           'fill_entry', 'compensate_bank', 'window_sums', 'finish_mean', 'all_finite', 'history_terms',
           'store_entry', 'running_update', 'ema_step', 'lerp_pair']

A, R, E, Q, ONE, M, E2, Q2, ONE2, M2, MU, S, ONE3, M3 = range(14)
FIELDS = 14


class BankViews:
    """The views of a bank's ``stats`` (T, F, C) and ``gp`` (C + g, T, D) that the ops below use, made once: on the
    host a view costs about as much as launching a small kernel. ``flat`` (T, L) holds both, slot by slot: row
    ``tau`` is ``[gp[:, tau] | stats[tau]]``, laid out as the scratch's ``[gp entry | entry]``, so that a push is one
    copy."""

    def __init__(self, stats: Tensor, gp: Optional[Tensor], groups: int, qs: Optional[Tensor] = None,
                 flat: Optional[Tensor] = None):
        t, _, c = stats.shape
        self.stats, self.gp, self.groups, self.qs = stats, gp, groups, qs
        self.a, self.r, self.s, self.mu, self.e, self.q = (stats[:, f] for f in (A, R, S, MU, E, Q))
        self.weights = stats[:, ONE, :1].t()  # (1, T)
        self.w_col = stats[:, ONE, :1]  # (T, 1)
        self.tail = stats[:, E:M + 1].reshape(t, -1)  # (T, 4C): E, Q, ONE, M
        self.r_col = self.r.t().unsqueeze(-1)  # (C, T, 1)
        if groups > 1:
            self.e_g = self.e.view(t, groups, c // groups)
        self.g_rows = gp[:c] if gp is not None else None  # (C, T, D)
        self.p_rows = gp[c:] if gp is not None else None  # (g, T, D)
        self.r = 0
        if qs is not None:  # (g, T, r, D + C/g): the second-order term's patches X' and their outputs Y'
            g, _, self.r, e = qs.shape
            d = e - c // g
            self.xq = qs[..., :d].view(g, t * self.r, d)  # (g, Tr, D), row tau * r + i
            self.xq_t = self.xq.transpose(1, 2)  # (g, D, Tr)
            self.yq_t = qs[..., d:].view(g, t * self.r, c // g).transpose(1, 2)  # (g, C/g, Tr)
        self.slots = [(flat[i], None if qs is None else qs[:, i]) for i in range(t)]


class ScratchViews:
    """Views of a layer's scratch ``work = [q entry (g, r, D + C/g) | gp entry (C + g, D) | entry (F, C) |
    sums (4, C)]`` and of ``hbuf`` (T, 2C + 1), made once. ``slot_entry``, ``[gp entry | entry]``, is what a push
    copies into a bank slot."""

    def __init__(self, work: Tensor, hbuf: Tensor, channels: int, groups: int, d: int, patches: int = 0,
                 zeros: Optional[Tensor] = None, intercept: bool = False):
        c = channels
        self.intercept = intercept  # the conv's bias is not in its graph: the mean keeps its intercept A
        rows = (c + groups) if d else 0
        qsize = groups * patches * (d + c // groups) if rows else 0
        g = rows * d + qsize
        self.work, self.hbuf = work, hbuf
        self.gp_entry = work[qsize:g].view(rows, d) if rows else None
        self.q_entry = self.xq_entry = self.yq_entry = None
        if qsize:
            self.q_entry = work[:qsize].view(groups, patches, d + c // groups)
            self.xq_entry, self.yq_entry = self.q_entry[..., :d], self.q_entry[..., d:]
        self.entry = work[g:g + FIELDS * c].view(FIELDS, c)
        self.slot_entry = work[qsize:g + FIELDS * c]
        self.sums = work[g + FIELDS * c:].view(4, c)
        self.entry_r3 = self.entry[R].view(c, 1, 1)
        self.entry_a = self.entry[A:A + 1]  # (1, C)
        self.entry_a_g = self.entry[A].view(groups, 1, c // groups)
        self.entry_fields = self.entry[Q:M3 + 1]  # all but A, R and E: what fill_entry's one op writes
        self.fallback = self.entry[MU:M3 + 1]  # (mu_t, s_t, 1, m): the batch's own, as the sums' rows
        self.entry_tail = self.entry[E2:M2 + 1].reshape(1, -1)  # (0, s_t, 1, m - 1), the sums' addend
        self.sums_row = self.sums.view(1, -1)
        self.sums_moments = self.sums[:2]
        self.sums_n = self.sums[2, :1]
        # sums[0] is mu_bar - mu_t between window_sums and finish_mean, mu_bar after it
        self.mean_row, self.var_bar, self.n, self.m_less = self.sums[0], self.sums[1], self.sums[2, 0], self.sums[3]
        self.inside = hbuf[:, :c]
        self.dev = hbuf[:, c:2 * c]
        if rows:
            self.g_entry3 = self.gp_entry[:c].view(c, 1, d)
            self.p_entry = self.gp_entry[c:]
            self.p_entry3 = self.p_entry.view(groups, 1, d)
        s_start = g + Q * c  # the fields every forward writes (R only with kernel gradients)
        end = g + FIELDS * c
        # the part of work a forward wrote, for its one finiteness check: (kernel gradients?, sums?) -> the view,
        # and the same part of ``zeros`` (a zero vector as long as work) for all_finite's one product
        parts = {(True, True): slice(None), (True, False): slice(None, end), (False, True): slice(s_start, None),
                 (False, False): slice(s_start, end)}
        self.fresh = {key: (work[part], None if zeros is None else zeros[part]) for key, part in parts.items()}


class KernelViews:
    """The current kernel (C, C_in/g, kh, kw), detached and in the statistics dtype, as the products use it."""

    def __init__(self, kernel: Tensor, dtype: torch.dtype, groups: int):
        w = kernel.detach()
        w = w if w.dtype == dtype else w.to(dtype)
        c = w.shape[0]
        self.source, self.version = kernel, kernel._version
        self.w = w.reshape(c, -1)  # (C, D)
        d = self.w.shape[1]
        self.wt = self.w.t()  # (D, C)
        self.w3 = self.w.view(c, d, 1)
        self.w_g = self.w.view(groups, c // groups, d)  # (g, C/g, D)
        self.wg_t = self.w_g.transpose(1, 2)  # (g, D, C/g)

    def valid_for(self, kernel: Tensor, dtype: torch.dtype) -> bool:
        """Still the views of ``kernel`` (an optimizer's in-place step keeps them valid; a cast does not)."""
        # views of the kernel's own storage stay valid under in-place steps; a converted copy (a kernel in another
        # dtype) is made afresh at every forward: a write through .data would not tell it
        return self.source is kernel and kernel.dtype == dtype and self.w.data_ptr() == kernel.data_ptr()


def fill_entry(sv: ScratchViews, kv: Optional[KernelViews], conv: Optional[ConvSpec], x: Tensor, mu_t: Tensor,
               s_t: Tensor, consts: Tensor, subsample: int = 1) -> None:
    """Write the current iteration into the scratch entry: its fields (one op, with ``consts`` (4, C), the rows
    ``[1, m, m - 1, 0]`` of :class:`cbn_mmdet.models.window.Workspace`), and with ``kv`` (a push with
    compensation) its kernel gradients (Appendix B: the floor's one weight-gradient) and the intercept ``R`` (and
    ``A`` for a conv whose bias is not in its graph, ``sv.intercept``); with a
    second-order scratch (``sv.q_entry``) also ``r`` centred input patches ``X' = P - x_i`` (negated, which saves an
    op and changes no square) and their outputs ``Y' = W_tau X'``.
    """
    if kv is not None:
        groups = conv.groups
        conv_stat_grads(conv, x, mu_t, subsample, out=sv.gp_entry)
        if sv.intercept:  # A = mu - <P, W>: the unknown bias, and the conv's rounding            (Eq. 7 at tau)
            if groups == 1:
                torch.addmm(mu_t.view(1, -1), sv.p_entry, kv.wt, alpha=-1, out=sv.entry_a)
            else:
                torch.baddbmm(mu_t.view(groups, 1, -1), sv.p_entry3, kv.wg_t, alpha=-1, out=sv.entry_a_g)
        # R = s - <G_j, W_j>: C dot products in one batched product                              (Eq. 8 at tau)
        torch.baddbmm(s_t.view(-1, 1, 1), sv.g_entry3, kv.w3, alpha=-1, out=sv.entry_r3)
        if sv.q_entry is not None:
            r, d = sv.xq_entry.shape[1:]
            values, mask = sample_patches(conv, x.shape[2:], r, mu_t.dtype)  # (r, g * D)
            torch.addcmul(sv.p_entry3, values.view(r, groups, d).transpose(0, 1),
                          mask.view(r, groups, d).transpose(0, 1), value=-1,
                          out=sv.xq_entry)  # P - x_i: zero padding reads 0, as the conv does
            torch.bmm(sv.xq_entry, kv.wg_t, out=sv.yq_entry)  # (g, r, C/g)
    one, m, m_less, zero = consts
    #                  Q    ONE  M  E2    Q2   ONE2 M2      MU    S    ONE3 M3
    torch.stack([s_t, one, m, zero, s_t, one, m_less, mu_t, s_t, one, m], out=sv.entry_fields)


def compensate_bank(bv: BankViews, kv: Optional[KernelViews], conv_bias: Optional[Tensor], mu_t: Tensor,
                    inside: Optional[Tensor] = None, intercept: bool = False) -> Optional[Tensor]:
    """Move every stored iteration to the current kernel (Eq. 7-8, 10) and fill the scratch fields ``E``, ``Q``.

    Without ``kv`` (Naive CBN) nothing is moved: ``E = mu - mu_t``. With it, ``E = <P, W_t> + b_t - mu_t``, the
    compensated mean ``mu_tau(theta_t)`` shifted by the current one, and ``s_tau(theta_t) = max(R + <G, W_t> - dmu^2,
    0)`` with ``dmu = <P, W_t> + b_t - mu_tau`` (Eq. 8: ``nu`` to first order); each of ``E`` and ``dmu`` is one
    product (``beta=-1`` subtracts its shift). With a second-order bank (``bv.qs``) the centred moment is moved to
    second order instead: ``s_tau(theta_t) = max(R + <G, W_t> + mean_i ((W_t - W_tau) . (P - x_i))^2, 0)``, exact for
    a convolution when the ``r`` stored patches are all of iteration tau's (``s`` is quadratic in the kernel); its
    last term is ``e = W_t X'^T - Y'`` squared and averaged. ``inside`` (T, C), if given, gets Eq. 10's clamp mask as
    0/1 (the exact backward's). ``intercept``: the conv's bias is not in its graph; ``A`` is added to the mean.

    Returns:
        Tensor | None: ``dmu`` (T, C); ``e`` (g, C/g, Tr) for a second-order bank; None for Naive CBN.
    """
    dev = bv.e
    if kv is None:
        torch.sub(bv.mu, mu_t, out=dev)
        torch.addcmul(bv.s, dev, dev, out=bv.q)
        return None
    bias = None if conv_bias is None else conv_bias.detach().to(dev.dtype)
    if bv.groups == 1:  # <P_tau, W_t> - mu_t for every tau and channel                        (Eq. 7)
        torch.addmm(mu_t, bv.p_rows[0], kv.wt, beta=-1, out=dev)
    else:
        bv.e_g.copy_(torch.bmm(bv.p_rows, kv.wg_t).transpose(0, 1))
        dev.sub_(mu_t)
    if bias is not None:
        dev.add_(bias)
    if intercept:
        dev.add_(bv.a)
    # R + <G_tau,j, W_t,j>: one batched product over the channels                             (Eq. 8)
    s_c = torch.baddbmm(bv.r_col, bv.g_rows, kv.w3)  # (C, T, 1)
    if bv.qs is None:
        s_c = s_c.squeeze(-1).t()
        if bv.groups == 1:  # <P_tau, W_t> + b_t - mu_tau
            delta = torch.addmm(bv.mu, bv.p_rows[0], kv.wt, beta=-1)
            if bias is not None:
                delta.add_(bias)
            if intercept:
                delta.add_(bv.a)
        else:  # from E, which holds the bias (or the intercept) already
            delta = (dev + mu_t).sub_(bv.mu)
        s_c = torch.addcmul(s_c, delta, delta, value=-1)  # nu_tau(t) - mu_tau(t)^2
    else:  # + (W_t - W_tau)' C_tau (W_t - W_tau), C_tau from the slot's r patches: e e^T / r per (channel, tau)
        t, c = dev.shape
        delta = torch.baddbmm(bv.yq_t, kv.w_g, bv.xq_t, beta=-1)  # e: (g, C/g, Tr), column tau * r + i
        e3 = delta.view(c * t, 1, bv.r)
        s_c = torch.baddbmm(s_c.view(c * t, 1, 1), e3, e3.transpose(1, 2), alpha=1.0 / bv.r).view(c, t).t()
    if inside is not None:
        torch.gt(s_c, 0, out=inside)
    torch.addcmul(s_c.clamp_(min=0), dev, dev, out=bv.q)  # Eq. 10's clamp, then the shifted spread
    return delta


def window_sums(bv: BankViews, sv: ScratchViews) -> None:
    """The window's weighted sums, the current iteration included, and from them its variance (Eq. 9-11).

    Fills ``sums`` (4, C) with ``[mu_bar - mu_t, var_bar, n, M - 1]`` (``n`` and ``M - 1`` constant over C);
    :func:`finish_mean` then makes the first row ``mu_bar``.
    """
    torch.addmm(sv.entry_tail, bv.weights, bv.tail, out=sv.sums_row)
    sv.sums_moments.div_(sv.sums_n)  # mu_bar - mu_t, and sum w Q / n                            (Eq. 9)
    shift = sv.mean_row
    sv.var_bar.addcmul_(shift, shift, value=-1)  # var_bar = nu_bar - mu_bar^2, centred         (Eq. 10-11)


def finish_mean(sv: ScratchViews, mu_t: Tensor) -> None:
    """The sums' first row, ``mu_bar - mu_t`` after :func:`window_sums` (which :func:`history_terms` reads),
    becomes ``mu_bar``."""
    sv.mean_row.add_(mu_t)


def all_finite(t: Tensor, zeros: Optional[Tensor] = None) -> Tensor:
    """A 0-dim bool, True when every element of ``t`` is finite (``isfinite().all()`` takes five ops).

    ``x * 0`` is 0 for a finite x and NaN for inf and NaN (IEEE 754), and a sum keeps a NaN. With ``zeros`` (a
    zero vector shaped like a 1-D ``t``) the products and their sum are one inner product, two ops in all; without
    it, three. No term can overflow (each is 0 or NaN), so a finite ``t`` never reads as non-finite."""
    if zeros is not None:
        return torch.dot(t, zeros).eq(0)
    return t.mul(0).sum().eq(0)


def history_terms(bv: BankViews, sv: ScratchViews, delta: Tensor, has_bias: bool) -> HistoryGrad:
    """The exact backward's terms (:func:`cbn_mmdet.ops.compensation.history_grad`) from the bank, ``n`` times
    them (as :class:`HistoryGrad` is passed to the normalize op), in four ops (one more with a conv bias, two more
    for a second-order bank, whose ``delta`` is :func:`compensate_bank`'s ``e``). Call it between
    :func:`window_sums` and :func:`finish_mean`: it reads the sums' first row as ``mu_bar - mu_t``.

    With ``[inside]`` Eq. 10's clamp mask (written into ``hbuf[:, :C]`` by :func:`compensate_bank`) and
    ``u = mu_c - [inside] dmu - mu_bar``: ``mean_patch = sum w P``, ``var_kernel = 2 sum w u P + sum w [inside] G``,
    ``mean_bias = sum w``, ``var_bias = 2 sum w u``. ``hbuf`` is (T, 2C + 1) with its last column 1, so that one
    matrix product gives both patch sums; the weights ``w`` (0 or 1) need no product there, as a slot of weight 0
    holds zero P and G (only the bias terms, which have no P, take them). A second-order
    bank's ``s_tau(theta_t)`` does not depend on ``mu_tau(theta_t)``: ``u = mu_c - mu_bar``, and its last term adds
    ``(2/r) sum w [inside] sum_i e_i X'_i`` to ``var_kernel``.
    """
    t, c = bv.e.shape
    groups = bv.groups
    # bv.e is mu_c - mu_t and the sums' first row mu_bar - mu_t (before finish_mean): their difference is mu_c - mu_bar
    if bv.qs is None:
        base = torch.addcmul(bv.e, sv.inside, delta, value=-1)  # mu_tau(t) - [inside] dmu - mu_t
        torch.sub(base, sv.mean_row, out=sv.dev)
    else:
        torch.sub(bv.e, sv.mean_row, out=sv.dev)
    # the weights need no product: every slot of weight 0 (skipped or empty) holds zero P, G and patches, and the
    # others weigh 1, so sum_tau w_tau f_tau P_tau = sum_tau f_tau P_tau for any coefficients f (the bias terms,
    # which have no P, take w below)
    coef = sv.hbuf  # (T, 2C + 1): [inside] | u | 1
    patch = bv.p_rows  # (g, T, D)
    d = patch.shape[2]
    if groups == 1:
        sums = torch.mm(coef[:, c:].t(), patch[0])  # (C + 1, D): sum w u P, and sum w P
        part, mean_patch = sums[:c], sums[c:]
    else:
        part = torch.bmm(coef[:, c:2 * c].t().reshape(groups, c // groups, t), patch)  # (g, C/g, D)
        mean_patch = torch.bmm(coef[:, 2 * c:].t().expand(groups, 1, t), patch).view(groups, d)
    var_kernel = torch.baddbmm(part.reshape(c, 1, d), coef[:, :c].t().unsqueeze(1), bv.g_rows, beta=2).view(c, d)
    if bv.qs is not None:
        cg = c // groups
        scaled = delta.view(groups, cg, t, bv.r) * coef[:, :c].t().reshape(groups, cg, t, 1)  # [inside] e
        var_kernel.view(groups, cg, d).baddbmm_(scaled.view(groups, cg, t * bv.r), bv.xq, alpha=2.0 / bv.r)
    if not has_bias:
        return HistoryGrad(mean_patch, var_kernel, None, None)
    bias_sums = torch.mv(coef[:, c:].t(), bv.w_col[:, 0])  # (C + 1,): sum w u, and sum w
    return HistoryGrad(mean_patch, var_kernel, bias_sums[c], bias_sums[:c] * 2)


def store_entry(bv: BankViews, slot: int, sv: ScratchViews, ok: Tensor, zero: Tensor) -> None:
    """Write the entry into a bank slot, in one op (two with second-order patches); where ``ok`` is False (decided
    on the device), zeros: weight 0, no NaN."""
    flat_slot, q_slot = bv.slots[slot]
    torch.where(ok, sv.slot_entry, zero, out=flat_slot)
    if q_slot is not None:
        torch.where(ok, sv.q_entry, zero, out=q_slot)


def running_update(mean: Tensor, var: Tensor, sv: ScratchViews, ok: Tensor, factor, single: bool = False,
                   packed: Optional[Tensor] = None) -> None:
    """The running statistics' EMA step (BN's, with the window's statistics), where ``ok``. The sums come from
    :func:`window_sums`; their variance row becomes the unbiased one, ``var_bar * M / (M - 1)`` with ``M`` the number
    of values averaged (``var_bar`` itself for ``M = 1``, a single value, as BN's update has it). ``single``: the
    current batch may hold a single value per channel (the host knows it), so ``M`` may be 1; otherwise ``M >= 2``
    and ``M - 1`` needs no clamp. ``packed``: the (2, C) tensor whose rows are ``mean`` and ``var``
    (:func:`cbn_mmdet.models.running.packed_running`): then the step is one select and one lerp."""
    m_less = sv.m_less
    sv.var_bar.addcdiv_(sv.var_bar, m_less.clamp_(min=1) if single else m_less)  # var * (1 + 1/(M - 1))
    ema_step(mean, var, sv.sums[:2], ok, factor, packed)  # mu_bar and the unbiased var_bar: adjacent sums rows


def ema_step(mean: Tensor, var: Tensor, new: Tensor, ok: Tensor, factor, packed: Optional[Tensor] = None) -> None:
    """``buf += factor * (new - buf)`` for the running mean and variance, where ``ok`` (decided on the device; no
    NaN of ``new`` reaches them). ``new`` (2, C): the mean and variance rows, in any float dtype (a ``.half()``
    module's running statistics follow the cast, as BN's do). ``packed``: the (2, C) tensor whose rows are ``mean``
    and ``var`` (:func:`cbn_mmdet.models.running.packed_running`): then the step is one select and one lerp."""
    if new.dtype != mean.dtype:
        new = new.to(mean.dtype)
        factor = factor.to(mean.dtype) if isinstance(factor, Tensor) else factor
    if packed is not None:
        packed.lerp_(torch.where(ok, new, packed), factor)  # a float or a device factor alike
    else:
        lerp_pair(mean, var, (torch.where(ok, new[0], mean), torch.where(ok, new[1], var)), factor)


def lerp_pair(mean: Tensor, var: Tensor, new, factor) -> None:
    """``buf += factor * (new - buf)`` for both buffers: one multi-tensor op for a float ``factor``; two lerps for a
    device ``factor`` (``momentum=None``), which not every torch's multi-tensor lerp takes."""
    if isinstance(factor, Tensor):
        mean.lerp_(new[0], factor)
        var.lerp_(new[1], factor)
    else:
        torch._foreach_lerp_([mean, var], list(new), factor)
