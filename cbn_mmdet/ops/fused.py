"""The layer's hot path: Eq. 7-11 over a static window bank in a few packed ops.

On a GPU a layer's cost is set by how many kernels it launches, not by its arithmetic. So the window is one static
bank of stacked tensors per call position, and every step below is one op over all of it: no Python loop over the
window, no op per statistic, and nothing that changes shape between iterations (the code is safe to capture in a
CUDA graph). :mod:`cbn_mmdet.ops.compensation` has the same mathematics in reference form.

Layout of a bank with ``T = k - 1`` stored iterations (:class:`cbn_mmdet.models.window.WindowBank` owns it):

* ``stats`` (T, F, C), one row of F fields per stored iteration and channel:

  - ``A = mu - <P, W_tau> - b_tau``: the mean's intercept, so that ``mu_tau(theta_t) = A + <P, W_t> + b_t``;
  - ``R = s - <G, W_tau>``: the centred moment's, so that ``s_tau(theta_t) = R + <G, W_t> - dmu^2`` (Eq. 8);
  - ``S = s`` and ``MU = mu`` as measured;
  - ``E`` and ``Q``, scratch of each forward: the compensated mean, and ``s_c + (mu_c - mu_t)^2``. Naive CBN keeps
    ``E = mu`` (its mean is not moved);
  - ``ONE = w`` (1, or 0 for a skipped or empty slot) and ``M = m`` (values per channel), constant over C.

  A skipped (non-finite) or empty slot holds zeros: no NaN is ever stored, and a zero row is finite under any kernel.
* ``gp`` (C + g, T, D): ``G = ds/dW`` (C rows) and ``P = dmu/dW`` (g rows, one per group), with
  ``D = C_in/g * kh * kw``; channel-major, so that the per-channel products are batched matrix products.
* ``work``, one flat buffer ``[entry (F, C) | gp entry (C + g, D) | sums (4, C)]``: the current iteration's fields,
  its kernel gradients, and the window's sums. One reduction over it decides, on the device, whether everything this
  forward computed is finite.

With the current iteration as an extra row of weight 1 (``E = mu_t``, ``Q = s_t``, ``ONE = 1``, ``M = m_t``), one
matrix product gives ``sum w mu_c``, ``sum w Q``, ``n = sum w`` and the count ``sum w m``; the window's variance is
then the shifted two-pass form ``sum w Q / n - (mu_bar - mu_t)^2``, which does not cancel when ``|mu| >> sigma``.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from .conv_grads import ConvSpec, conv_stat_grads
from .normalize import HistoryGrad

__all__ = ['FIELDS', 'A', 'R', 'S', 'MU', 'E', 'Q', 'ONE', 'M', 'fill_entry', 'compensate_bank', 'window_sums',
           'all_finite', 'history_terms', 'store_entry', 'running_update']

A, R, S, MU, E, Q, ONE, M = range(8)
FIELDS = 8


def fill_entry(entry: Tensor, gp_entry: Optional[Tensor], conv: Optional[ConvSpec], x: Tensor, mu_t: Tensor,
               s_t: Tensor, subsample: int = 1) -> None:
    """Write the current iteration into the bank's entry: its moments, and with ``gp_entry`` (compensation) its
    kernel gradients (Appendix B, the floor's one weight-gradient) and intercepts ``A``, ``R``.

    ``entry``'s ``ONE`` and ``M`` rows are set by the bank when the input's shape changes, not here.
    """
    if gp_entry is not None:
        c = mu_t.shape[0]
        groups = conv.groups
        conv_stat_grads(conv, x, mu_t, subsample, out=gp_entry)
        kernel = conv.weight.detach().to(mu_t.dtype).reshape(c, -1)  # (C, D)
        d = kernel.shape[1]
        patch = gp_entry[c:]  # (g, D)
        base = mu_t if conv.bias is None else mu_t - conv.bias.detach().to(mu_t.dtype)
        if groups == 1:  # A = mu - <P, W> - b                                                (Eq. 7 at tau)
            torch.addmm(base.view(1, c), patch, kernel.t(), alpha=-1, out=entry[A:A + 1])
        else:
            torch.baddbmm(base.view(groups, 1, c // groups), patch.view(groups, 1, d),
                          kernel.view(groups, c // groups, d).transpose(1, 2), alpha=-1,
                          out=entry[A].view(groups, 1, c // groups))
        # R = s - <G_j, W_j>: C dot products in one batched product                              (Eq. 8 at tau)
        torch.baddbmm(s_t.view(c, 1, 1), gp_entry[:c].view(c, 1, d), kernel.view(c, d, 1), alpha=-1,
                      out=entry[R].view(c, 1, 1))
    torch.stack([s_t, mu_t, mu_t, s_t], out=entry[S:Q + 1])


def compensate_bank(stats: Tensor, gp: Optional[Tensor], kernel: Optional[Tensor], conv_bias: Optional[Tensor],
                    groups: int, mu_t: Tensor, inside: Optional[Tensor] = None) -> Optional[Tensor]:
    """Move every stored iteration to the current kernel (Eq. 7-8, 10) and fill the scratch fields ``E``, ``Q``.

    Without ``gp`` (Naive CBN) nothing is moved. With it, ``E = A + <P, W_t> + b_t = mu_tau(theta_t)`` and
    ``s_tau(theta_t) = max(R + <G, W_t> - dmu^2, 0)`` with ``dmu = E - mu_tau``. ``inside`` (T, C), if given, gets
    Eq. 10's clamp mask as 0/1 (the exact backward's).

    Returns:
        Tensor | None: ``dmu`` (T, C), or None for Naive CBN.
    """
    t, _, c = stats.shape
    mu_c = stats[:, E]
    if gp is None:
        dev = mu_c - mu_t
        torch.addcmul(stats[:, S], dev, dev, out=stats[:, Q])
        return None
    w = kernel.detach().to(stats.dtype).reshape(c, -1)  # (C, D)
    d = w.shape[1]
    patch = gp[c:]  # (g, T, D)
    if groups == 1:  # <P_tau, W_t> for every tau and channel, plus A                         (Eq. 7)
        torch.addmm(stats[:, A], patch[0], w.t(), out=mu_c)
    else:
        moved = torch.baddbmm(stats[:, A].view(t, groups, c // groups).transpose(0, 1), patch,
                              w.view(groups, c // groups, d).transpose(1, 2))  # (g, T, C/g)
        mu_c.view(t, groups, c // groups).copy_(moved.transpose(0, 1))
    if conv_bias is not None:
        mu_c.add_(conv_bias.detach().to(stats.dtype))
    # R + <G_tau,j, W_t,j>: one batched product over the channels                             (Eq. 8)
    s_c = torch.baddbmm(stats[:, R].t().unsqueeze(-1), gp[:c], w.view(c, d, 1)).view(c, t).t()
    delta = mu_c - stats[:, MU]
    s_c = torch.addcmul(s_c, delta, delta, value=-1)  # nu_tau(t) - mu_tau(t)^2
    if inside is not None:
        torch.gt(s_c, 0, out=inside)
    dev = mu_c - mu_t
    torch.addcmul(s_c.clamp_(min=0), dev, dev, out=stats[:, Q])  # Eq. 10's clamp, then the shifted spread
    return delta


def window_sums(stats: Tensor, entry: Tensor, sums: Tensor, mu_t: Tensor) -> None:
    """The window's weighted sums, the current iteration included, and from them its statistics (Eq. 9-11).

    Fills ``sums`` (4, C) with ``[mu_bar, var_bar, n, m_total]`` (``n`` and ``m_total`` constant over C).
    """
    t = stats.shape[0]
    weights = stats[:, ONE, :1].t()  # (1, T)
    torch.addmm(entry[E:].reshape(1, -1), weights, stats[:, E:].reshape(t, -1), out=sums.view(1, -1))
    sums[:2].div_(sums[2, :1])  # mu_bar, and sum w Q / n                                        (Eq. 9)
    shift = sums[0] - mu_t
    sums[1].addcmul_(shift, shift, value=-1)  # var_bar = nu_bar - mu_bar^2, centred             (Eq. 10-11)


def all_finite(t: Tensor) -> Tensor:
    """A 0-dim bool, True when every element of ``t`` is finite, in three ops (``isfinite().all()`` takes five):
    ``x * 0`` is 0 for a finite x and NaN for inf and NaN, and the sum keeps a NaN."""
    return t.mul(0).sum().eq(0)


def history_terms(stats: Tensor, gp: Tensor, hbuf: Tensor, delta: Tensor, mu_bar: Tensor, n: Tensor, groups: int,
                  has_bias: bool) -> HistoryGrad:
    """The exact backward's terms (:func:`cbn_mmdet.ops.compensation.history_grad`) from the bank, in five ops.

    With ``w_n = w / n``, ``[inside]`` Eq. 10's clamp mask (written into ``hbuf[:, :C]`` by :func:`compensate_bank`)
    and ``u = mu_c - [inside] dmu - mu_bar``:
    ``mean_patch = sum w_n P``, ``var_kernel = 2 sum w_n u P + sum w_n [inside] G``, ``mean_bias = sum w_n``,
    ``var_bias = 2 sum w_n u``. ``hbuf`` is (T, 2C + 1) with its last column 1, so that one product by ``w_n`` gives
    all three coefficient blocks and one matrix product both patch sums.
    """
    t, _, c = stats.shape
    base = torch.addcmul(stats[:, E], hbuf[:, :c], delta, value=-1)  # mu_tau(t) - [inside] dmu
    torch.sub(base, mu_bar, out=hbuf[:, c:2 * c])
    coef = hbuf * (stats[:, ONE, :1] / n)  # (T, 2C + 1): w_n [inside] | w_n u | w_n
    patch = gp[c:]  # (g, T, D)
    d = patch.shape[2]
    if groups == 1:
        sums = torch.mm(coef[:, c:].t(), patch[0])  # (C + 1, D): sum w_n u P, and sum w_n P
        part, mean_patch = sums[:c], sums[c:]
    else:
        part = torch.bmm(coef[:, c:2 * c].t().reshape(groups, c // groups, t), patch)  # (g, C/g, D)
        mean_patch = torch.bmm(coef[:, 2 * c:].t().expand(groups, 1, t), patch).view(groups, d)
    var_kernel = torch.baddbmm(part.reshape(c, 1, d), coef[:, :c].t().unsqueeze(1), gp[:c], beta=2).view(c, d)
    if not has_bias:
        return HistoryGrad(mean_patch, var_kernel, None, None)
    bias_sums = coef[:, c:].sum(0)
    return HistoryGrad(mean_patch, var_kernel, bias_sums[c], bias_sums[:c] * 2)


def store_entry(stats_slot: Tensor, gp_slot: Optional[Tensor], entry: Tensor, gp_entry: Optional[Tensor], ok: Tensor,
                zero: Tensor) -> None:
    """Write the entry into a bank slot; where ``ok`` is False (decided on the device), zeros: weight 0, no NaN."""
    torch.where(ok, entry, zero, out=stats_slot)
    if gp_slot is not None:
        torch.where(ok, gp_entry, zero, out=gp_slot)


def running_update(pair: Tensor, sums: Tensor, ok: Tensor, factor) -> None:
    """The running statistics' EMA step (BN's, with the window's statistics), where ``ok``; two ops on the packed
    ``pair`` (2, C) of running mean and variance. ``sums`` comes from :func:`window_sums`; its variance row becomes
    the unbiased one, ``var_bar * M / (M - 1)`` with ``M`` the number of values averaged."""
    sums[1].addcdiv_(sums[1], sums[3] - 1)  # var * (1 + 1/(M - 1))
    pair.lerp_(torch.where(ok, sums[:2], pair).to(pair.dtype), factor)
