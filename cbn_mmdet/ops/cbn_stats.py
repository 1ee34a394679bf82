"""The mathematics of Cross-Iteration Batch Normalization, in plain torch.

Everything here follows Yao et al., "Cross-Iteration Batch Normalization" (CVPR 2021), and cites the equation it
implements. Nothing in this module imports mmcv or mmdet, and nothing here keeps state: the layer
(:mod:`cbn_mmdet.models.cbn`) owns the policy and the window, this module owns the formulas.

Notation (per CBN layer, output channel ``j``): the preceding convolution has kernel ``W`` of shape
``(C, C_in/g, kh, kw)`` and an optional bias ``b``; its input is ``u`` and its output ``x`` of shape ``(N, C, H, W)``;
``m = N*H*W``. Instead of the paper's raw second moment ``nu = mean(x^2)`` we carry the centred moment
``s = mean((x - mu)^2) = nu - mu^2``, which is the same quantity in exact arithmetic but does not cancel
catastrophically in fp32 when ``|mu| >> std``. Every formula below is Eq. 7-11 rewritten in ``(mu, s)``:

* ``dmu_j/dW_j``  = the mean input patch ``P`` (identical for all ``j`` of a group)           (Eq. 15)
* ``dnu_j/dW_j``  = (2/m) sum_i x_ij patch_i = ``ds_j/dW_j + 2 mu_j P``                         (App. B)
* ``ds_j/dW_j``   = (2/m) sum_i (x_ij - mu_j) patch_i = ``dnu_j/dW_j - 2 mu_j P``   (one weight-gradient)
* ``dmu_j/db_j = 1``, ``ds_j/db_j = 0``  (``dnu_j/db_j = 2 mu_j``)
* compensation (Eq. 7-8): with ``dmu = <P, W_t - W_tau> + (b_t - b_tau)``,
  ``mu_tau(t) = mu_tau + dmu`` and ``s_tau(t) = s_tau + <ds/dW, W_t - W_tau> - dmu^2``,
  which is exactly ``nu_tau(t) - mu_tau(t)^2`` for the first-order ``nu_tau(t)`` of Eq. 8.
* the clamp ``nu >= mu^2`` of Eq. 10 is ``s >= 0``.
* averaging (Eq. 9-11): ``mu_bar = mean(mu)``, ``var_bar = nu_bar - mu_bar^2 = mean(s) + mean((mu - mu_bar)^2)``.
"""
import functools
from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.nn.grad import conv2d_weight

__all__ = [
    'stat_dtype', 'batch_moments', 'ConvSpec', 'StatGrads', 'subsample_plan', 'conv_stat_grads', 'channel_dots',
    'kernel_products', 'Compensated', 'compensate', 'window_moments', 'HistoryGrad', 'history_grad',
    'relative_stat_errors', 'cbn_normalize'
]


def _autocast_off(fn: Callable) -> Callable:
    """Run ``fn`` with autocast disabled on its tensors' device: the statistics' matrix products stay in the
    statistics dtype (fp32/fp64) inside a mixed-precision forward."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next(a.device.type for a in args if isinstance(a, Tensor))
        with torch.autocast(device_type=device, enabled=False):
            return fn(*args, **kwargs)

    return wrapper


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics are kept in: fp64 stays fp64, everything else is fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def batch_moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and centred second moment of ``x`` over (N, H, W) (Eq. 2-3).

    Args:
        x (Tensor): (N, C, H, W), any floating dtype; reduced in :func:`stat_dtype`.

    Returns:
        tuple[Tensor, Tensor]: ``mu`` (C,) and ``s = mean((x - mu)^2)`` (C,), in fp32 (fp64 for fp64 input).
    """
    x = x.to(stat_dtype(x.dtype))
    # torch's BN statistics kernel (stable, and faster than var_mean); None: no running statistics touched
    mu, s = torch.batch_norm_update_stats(x, None, None, 0.0)  # (N, C, H, W) -> (C,), (C,)
    return mu, s


class ConvSpec(NamedTuple):
    """What the statistics' gradients need to know about the convolution that produced x."""
    weight: Tensor  # (C, C_in/g, kh, kw), the parameter itself (fp32 even under autocast)
    bias: Optional[Tensor]  # (C,) or None
    input: Tensor  # (N, C_in, H_in, W_in), as the convolution saw it
    stride: Sequence[int]
    padding: Sequence[int]
    dilation: Sequence[int]
    groups: int


class StatGrads(NamedTuple):
    """Closed-form gradients of one iteration's statistics w.r.t. its own conv kernel (Appendix B)."""
    g_mu: Tensor  # (g, C_in/g, kh, kw): d mu_j / d W_j, shared by the channels of a group (Eq. 15)
    g_s: Tensor  # (C, C_in/g, kh, kw): d s_j / d W_j


def subsample_plan(n: int, h: int, ratio: int) -> Tuple[str, int]:
    """Which output positions estimate ``ds/dW`` when only ``1/ratio`` of them are to be used.

    Every ``ratio``-th sample when the batch has at least ``8 * ratio`` samples (RoI heads: RoIs are many and
    independent), otherwise every ``ratio``-th row of every sample (backbone and neck maps: few images, many rows).
    ``('all', 1)`` when ``ratio`` is 1 or the map has too few rows to subsample.

    Returns:
        tuple[str, int]: ``('samples' | 'rows' | 'all', step)``.
    """
    if ratio <= 1:
        return 'all', 1
    if n >= 8 * ratio:
        return 'samples', ratio
    if h >= 2 * ratio:
        return 'rows', ratio
    return 'all', 1


@functools.lru_cache(maxsize=512)
def _tap_matrix_cached(size: int, out: int, k: int, stride: int, padding: int, dilation: int, dtype: torch.dtype,
                       device: torch.device) -> Tensor:
    rows = torch.arange(size, device=device)
    taps = torch.arange(out, device=device)[None, :] * stride - padding + (
        torch.arange(k, device=device) * dilation)[:, None]  # (k, out): the input row tap a reads at output row i
    # a comparison instead of boolean-mask indexing: no data-dependent shape, so no device-to-host copy
    return (taps[:, :, None] == rows).any(1).to(dtype)  # (k, size)


def _tap_matrix(size: int, out: int, k: int, stride: int, padding: int, dilation: int, like: Tensor) -> Tensor:
    """(k, size) 0/1 matrix along one axis: entry ``[a, r]`` is 1 when input row ``r`` is read by kernel tap ``a`` at
    some output row (``r = i * stride + a * dilation - padding``; rows in the zero padding read nothing).
    Cached per shape, dtype and device: a detection model sees a handful of map sizes."""
    return _tap_matrix_cached(size, out, k, stride, padding, dilation, like.dtype, like.device)


def _column_sums(u: Tensor, conv: 'ConvSpec', out_w: int, stride_w: int) -> Tensor:
    """``sum_n U_n C_b``: for every input row, the batch sum of what each kernel column tap ``b`` reads, over the
    output columns: (C_in, H, kw). The one read of ``u`` behind :func:`_mean_patch`."""
    n, c_in, h, w = u.shape
    kw = conv.weight.shape[3]
    cols = _tap_matrix(w, out_w, kw, stride_w, conv.padding[1], conv.dilation[1], u)  # (kw, W)
    return (u.reshape(n, c_in * h, w) @ cols.t()).sum(0).view(c_in, h, kw)


def _mean_patch(by_col: Tensor, conv: 'ConvSpec', out_h: int, stride_h: int, count: int) -> Tensor:
    """``(1/count) sum_i patch_i`` over the output positions of a conv with row stride ``stride_h``:
    (g, C_in/g, kh, kw).

    The patch sum separates into rows and columns: ``sum_i patch_i[c, a, b] = R_a^T U_c C_b`` with ``U_c`` the
    batch-summed input channel and ``R`` (``C``) the rows (columns) each kernel tap reads (:func:`_tap_matrix`).
    ``by_col`` is the column part (:func:`_column_sums`, a single read of the input); what remains here is small.
    A weight-gradient against a ones map would instead build the (C_in * K, H * W) patch matrix.
    """
    c_in, h, kw = by_col.shape
    kh = conv.weight.shape[2]
    rows = _tap_matrix(h, out_h, kh, stride_h, conv.padding[0], conv.dilation[0], by_col)  # (kh, H)
    patch = torch.matmul(rows, by_col)  # (kh, H) @ (C_in, H, kw) -> (C_in, kh, kw)
    return patch.div_(count).view(conv.groups, c_in // conv.groups, kh, kw)


@_autocast_off
def conv_stat_grads(conv: ConvSpec, x: Tensor, mu: Tensor, subsample: int = 1,
                    centre_first: Optional[bool] = None) -> StatGrads:
    """``dmu/dW`` and ``ds/dW`` of the current iteration, in closed form (Appendix B, Eq. 13-15).

    ``dmu_j/dW_j`` is the mean input patch, shared by the channels of a group; it costs one read of the input
    (:func:`_mean_patch`). ``ds_j/dW_j`` is one full convolution
    weight-gradient with grad_output ``x``, centred afterwards on the kernel-sized result (``- 2 mu dmu/dW``); the
    ``2/m`` factor is applied to the small result, not to x.

    With ``subsample = r > 1`` (an opt-in approximation), ``ds/dW`` is estimated from ``1/r`` of the output
    positions chosen by :func:`subsample_plan`: ``(2/m') sum_{i in S} (x_i - mu) patch_i`` over the subset ``S`` of
    ``m'`` positions, which costs ``1/r`` of the weight-gradient. Rows are taken by running the weight-gradient with
    the row stride multiplied by ``r``, so no patch is gathered. ``dmu/dW`` stays exact.

    Args:
        conv (ConvSpec): the producing convolution.
        x (Tensor): its output (N, C, H, W).
        mu (Tensor): the per-channel mean of x (C,), in the statistics dtype.
        subsample (int): use every ``subsample``-th sample or row for ``ds/dW``. Default: 1 (exact).
        centre_first (bool, optional): run the weight-gradient on ``x - mu`` instead of ``x`` (one more pass over
            x). Needed where the weight-gradient rounds its operands, as cuDNN's TF32 does (10-bit mantissa): on
            the uncentred x, whose |mu| may be >> std, that rounding would swamp the centred result. Default: on
            CUDA while ``torch.backends.cudnn.allow_tf32`` is set, off otherwise (fp32 accumulates exactly enough).

    Returns:
        StatGrads: both gradients, in the dtype of ``mu``.
    """
    dtype = mu.dtype
    n, c, h, w = x.shape
    groups = conv.groups
    u = conv.input.to(dtype)
    # d mu / dW: the mean input patch, one per group                                        (Eq. 15)
    by_col = _column_sums(u, conv, w, conv.stride[1])
    g_mu = _mean_patch(by_col, conv, h, conv.stride[0], n * h * w)  # -> (g, C_in/g, kh, kw)
    how, step = subsample_plan(n, h, subsample)
    stride = tuple(conv.stride)
    if how == 'samples':
        u, x = u[::step].contiguous(), x[::step]
    elif how == 'rows':
        x = x[:, :, ::step]
        stride = (stride[0] * step, stride[1])  # output row i of this conv is row i*step of the original one
    m = x.shape[0] * x.shape[2] * x.shape[3]
    # the mean patch over the positions that enter ds/dW; a row subset reads the same columns
    if how == 'all':
        patch = g_mu
    elif how == 'samples':
        patch = _mean_patch(_column_sums(u, conv, w, stride[1]), conv, h, stride[0], m)
    else:
        patch = _mean_patch(by_col, conv, x.shape[2], stride[0], m)
    # d s / dW = (2/m) sum_i (x_i - mu) patch_i = (2/m) sum_i x_i patch_i - 2 mu dmu/dW      (App. B)
    # The centring is applied to the (C, C_in/g, kh, kw) result, which saves a full pass over x. Its cancellation
    # touches only this first-order term: s itself comes from batch_moments, centred.
    if centre_first is None:
        centre_first = x.is_cuda and torch.backends.cudnn.allow_tf32
    grad_out = x.to(dtype) - mu.view(1, c, 1, 1) if centre_first else x.to(dtype)
    # a channels_last input gives a channels_last weight-gradient: made contiguous (a no-op otherwise) for the view
    g_s = conv2d_weight(u, conv.weight.shape, grad_out, stride, conv.padding, conv.dilation, groups).contiguous()
    if centre_first:  # (2/m) sum_i (x_i - mu) patch_i directly
        return StatGrads(g_mu, g_s.mul_(2.0 / m))
    # g_s = (2/m) g_s - 2 mu_j patch, one fused pass: a rank-1 update per group (C/g, 1) x (1, C_in/g * K)
    g_s.view(groups, c // groups, -1).baddbmm_(mu.view(groups, c // groups, 1), patch.view(groups, 1, -1),
                                               beta=2.0 / m, alpha=-2.0)
    return StatGrads(g_mu, g_s)


def channel_dots(a: Tensor, b: Tensor) -> Tensor:
    """Per-channel inner products ``sum_d a[..., c, d] * b[c, d]``: (..., C, D) and (C, D) -> (..., C).

    Computed with torch's fused BN-backward reduction (``sum dy * (x - mean) * invstd`` over the positions, with
    ``mean = 0`` and ``invstd = 1``): one pass over both tensors. ``einsum`` and ``bmm`` turn this into C tiny
    matrix products and take about 4x as long on the CPU, which matters for the 1x1 convolutions of a backbone,
    whose kernels are as large as their outputs.
    """
    c, d = b.shape
    lead = a.shape[:-2]
    rows = a.reshape(-1, c, d)
    if rows.shape[0] == 0:
        return a.new_zeros(*lead, c)
    zeros, ones = b.new_zeros(c), b.new_ones(c)
    # weight=ones, not None: CUDA's reduce path allocates the weight-gradient with the weight's options
    out = [torch.ops.aten.native_batch_norm_backward(row.reshape(1, c, d), b.view(1, c, d), ones, None, None, zeros,
                                                     ones, True, 0.0, [False, True, False])[1] for row in rows]
    return torch.stack(out).reshape(*lead, c)


@_autocast_off
def kernel_products(g_mu: Tensor, g_s: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel inner products ``<g_mu, W_j>`` and ``<g_s_j, W_j>`` for one or many iterations.

    They let the window store no copy of past kernels: ``<g, W_t - W_tau> = <g, W_t> - <g, W_tau>``, and the
    second term is a number per channel known at time tau.

    Args:
        g_mu (Tensor): (..., g, C_in/g, kh, kw).
        g_s (Tensor): (..., C, C_in/g, kh, kw).
        weight (Tensor): (C, C_in/g, kh, kw).

    Returns:
        tuple[Tensor, Tensor]: (..., C) and (..., C).
    """
    groups = g_mu.shape[-4]
    c = weight.shape[0]
    lead = g_mu.shape[:-4]
    w = weight.to(g_s.dtype)
    w_g = w.reshape(groups, c // groups, -1)  # (g, C/g, D)
    p_mu = torch.einsum('...gd,gcd->...gc', g_mu.reshape(*lead, groups, -1), w_g).reshape(*lead, c)
    p_s = channel_dots(g_s.reshape(*lead, c, -1), w.reshape(c, -1))
    return p_mu, p_s


class Compensated(NamedTuple):
    """Past statistics moved to the current kernel (Eq. 7-8, 10), with what their exact derivative needs."""
    mu: Tensor  # (T, C) mu_tau(theta_t)
    s: Tensor  # (T, C) s_tau(theta_t) >= 0
    d_mu: Tensor  # (T, C) the mean's compensation delta = <dmu/dW, W_t - W_tau> + (b_t - b_tau)
    inside: Tensor  # (T, C) bool: Eq. 10's clamp inactive (s_tau(theta_t) > 0 before the clamp)


def compensate(mu: Tensor, s: Tensor, g_mu: Tensor, g_s: Tensor, p_mu: Tensor, p_s: Tensor,
               bias: Optional[Tensor], weight_t: Tensor, bias_t: Optional[Tensor]) -> Compensated:
    """Move past iterations' statistics to the current kernel by a first-order Taylor term (Eq. 7-8, 10).

    Args:
        mu, s (Tensor): (T, C) statistics of T past iterations at their own weights.
        g_mu (Tensor): (T, g, C_in/g, kh, kw) and g_s (Tensor): (T, C, C_in/g, kh, kw), their kernel gradients.
        p_mu, p_s (Tensor): (T, C), ``<g_mu, W_tau>`` and ``<g_s, W_tau>`` recorded at time tau.
        bias (Tensor | None): (T, C), the conv bias at time tau.
        weight_t (Tensor): (C, C_in/g, kh, kw), the current kernel. bias_t (Tensor | None): (C,).

    Returns:
        Compensated: ``mu_tau(theta_t)``, ``s_tau(theta_t) >= 0``, the mean's delta and the clamp mask.
    """
    q_mu, q_s = kernel_products(g_mu, g_s, weight_t)  # (T, C): <g, W_t>
    d_mu = q_mu - p_mu  # <dmu/dW, W_t - W_tau>                     (Eq. 7)
    if bias_t is not None and bias is not None:
        d_mu = d_mu + (bias_t.to(mu.dtype) - bias)  # dmu/db = 1
    mu_c = mu + d_mu
    # nu_tau(t) - mu_tau(t)^2 with nu from Eq. 8, clamped at 0 (Eq. 10: nu >= mu^2)
    s_c = s + (q_s - p_s) - d_mu * d_mu
    inside = s_c > 0
    return Compensated(mu_c, s_c.clamp_(min=0), d_mu, inside)


def window_moments(mu: Tensor, s: Tensor, weight: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Average a window's (compensated) statistics, current iteration included (Eq. 9-11).

    Args:
        mu, s (Tensor): (T, C), one row per iteration of the window.
        weight (Tensor, optional): (T,) per-row weights (1 for an iteration that counts, 0 for a skipped one);
            all ones by default. Rows of weight 0 must be finite: they are multiplied, not masked.

    Returns:
        tuple[Tensor, Tensor]: ``mu_bar`` (C,) and ``var_bar = nu_bar - mu_bar^2 >= 0`` (C,).
    """
    if weight is None:
        mu_bar = mu.mean(0)  # (T, C) -> (C,)                                (Eq. 9)
        spread = (mu - mu_bar).square_().mean(0)  # mean(mu^2) - mu_bar^2, without cancellation
        return mu_bar, s.mean(0) + spread  # nu_bar - mu_bar^2              (Eq. 10-11)
    w = weight.to(mu.dtype)[:, None]
    n = w.sum()
    mu_bar = (w * mu).sum(0) / n
    spread = (w * (mu - mu_bar).square_()).sum(0) / n
    return mu_bar, (w * s).sum(0) / n + spread


class HistoryGrad(NamedTuple):
    """What the exact backward needs of the window, reduced in the forward (the window may change afterwards).

    With ``a = dL/dmu_bar`` and ``c = dL/dvar_bar`` (per channel, known only in the backward), the kernel's gradient
    through the compensated history is ``a_j * mean_patch[g(j)] + c_j * var_kernel[j]``, and the conv bias's
    ``a_j * mean_bias + c_j * var_bias[j]`` (see :func:`history_grad`).
    """
    mean_patch: Tensor  # (g, C_in/g * kh * kw): sum_tau (w_tau/n) P_tau
    var_kernel: Tensor  # (C, C_in/g * kh * kw)
    mean_bias: Tensor  # (): sum_tau w_tau / n
    var_bias: Tensor  # (C,)


@_autocast_off
def history_grad(comp: Compensated, mu_bar: Tensor, g_mu: Tensor, g_s: Tensor, weight: Tensor,
                 n: Tensor) -> HistoryGrad:
    """The derivative of the window statistics w.r.t. the current kernel through the compensation (Eq. 7-11).

    Every compensated statistic is a function of theta_t: ``dmu_tau/dW = P_tau`` and, where Eq. 10's clamp is
    inactive, ``ds_tau/dW = G_tau - 2 delta_tau P_tau``. With ``mu_bar = (1/n) sum w mu`` and
    ``var_bar = (1/n) sum w (s + (mu - mu_bar)^2)`` (the current row included, weight 1),
    ``dmu_bar/dmu_tau = w_tau/n``, ``dvar_bar/dmu_tau = 2 w_tau (mu_tau - mu_bar)/n`` and
    ``dvar_bar/ds_tau = w_tau/n``. Hence, per channel j,

        dL/dW_j = sum_tau alpha_tau,j P_tau,g(j) + beta_tau,j G_tau,j,
        alpha = (w/n) (a + 2c (mu_tau - mu_bar) - 2c [inside] delta_tau),   beta = (w/n) c [inside],

    and ``dL/db_j = sum_tau alpha_tau,j``. Both are linear in ``(a, c)``: this returns their coefficients, so the
    backward costs one kernel-sized pass. Cost here: O(T * C * C_in/g * kh * kw), no convolution.

    Args:
        comp (Compensated): the window's compensated statistics (T rows).
        mu_bar (Tensor): (C,) the window mean, current iteration included.
        g_mu (Tensor): (T, g, C_in/g, kh, kw) and g_s (Tensor): (T, C, C_in/g, kh, kw): P and G.
        weight (Tensor): (T,) the rows' weights (0 for skipped iterations). n (Tensor): ``1 + sum(weight)``.
    """
    t, groups = g_mu.shape[0], g_mu.shape[1]
    c = g_s.shape[1]
    scale = (weight.to(mu_bar.dtype) / n)[:, None]  # (T, 1): w_tau / n
    inside = comp.inside.to(mu_bar.dtype)
    # (T, C): alpha without a, and beta without c. A row of weight 0 may hold a huge finite fallback value:
    # torch.where, not a product, keeps 0 * inf out
    coef_p = torch.where(scale > 0, scale * 2 * ((comp.mu - mu_bar) - inside * comp.d_mu), 0)
    coef_g = scale * inside
    patches = g_mu.reshape(t, groups, -1)  # (T, g, D)
    mean_patch = (scale[:, :, None] * patches).sum(0)  # (g, D)
    var_kernel = torch.einsum('tgc,tgd->gcd', coef_p.view(t, groups, c // groups), patches).reshape(c, -1)
    for tau in range(t):  # one fused multiply-add per stored iteration over the kernel-sized G
        var_kernel.addcmul_(g_s[tau].reshape(c, -1), coef_g[tau][:, None])
    return HistoryGrad(mean_patch, var_kernel, scale.sum(), coef_p.sum(0))


def relative_stat_errors(mu: Tensor, var: Tensor, mu_pop: Tensor, var_pop: Tensor) -> Tuple[float, float]:
    """How far estimated statistics are from population ones, relative to the population's spread.

    Returns:
        tuple[float, float]: ``||mu - mu_pop|| / ||sd_pop||`` and ``||sd - sd_pop|| / ||sd_pop||`` (L2 norms over
        the C channels, ``sd = sqrt(var)``), computed in fp64.
    """
    mu, var, mu_pop, var_pop = (t.detach().double() for t in (mu, var, mu_pop, var_pop))
    sd, sd_pop = var.clamp(min=0).sqrt(), var_pop.clamp(min=0).sqrt()
    scale = sd_pop.norm().clamp(min=torch.finfo(torch.float64).tiny)
    return ((mu - mu_pop).norm() / scale).item(), ((sd - sd_pop).norm() / scale).item()


class _CBNNormalize(torch.autograd.Function):
    """y = gamma * (x - mu_bar) / sqrt(var_bar + eps) + beta.

    ``mu_bar`` and ``var_bar`` average ``n`` iterations of which only the current one depends on x. Differentiating
    Eq. 9-12 through the current ``mu_t`` and ``s_t`` gives BN's backward with the count ``n*m`` in place of
    ``m``:  ``dx = r*gamma*(dy - sum(dy)/(n m) - (x - mu_bar) r^2 sum(dy (x - mu_bar))/(n m))``, ``r`` the inverse
    std. We evaluate it as ``dx_BN(weight=gamma/n) + (1 - 1/n) r gamma dy`` with torch's fused BN backward kernel.

    With ``hist`` (:class:`HistoryGrad`), the compensated history's dependence on the current conv kernel and bias
    is differentiated too (the exact backward): ``a = dL/dmu_bar = -r gamma sum(dy)`` and
    ``c = dL/dvar_bar = -(1/2) gamma r^2 sum(dy x_hat)`` come from the same fused kernel's sums, and the kernel gets
    ``a_j mean_patch + c_j var_kernel_j`` as an ordinary autograd edge (DDP buckets and autocast see it).
    ``n`` may be a device tensor (skipped iterations weigh 0), so nothing here reads a value on the host.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, kernel, conv_bias, mu_bar, var_bar, n_iters, eps, on_backward, hist):
        # fp16/bf16 x with fp32 gamma, beta and statistics is a supported mixed-precision BN call
        dtype = mu_bar.dtype
        y = torch.batch_norm(x, None if weight is None else weight.to(dtype), None if bias is None else bias.to(dtype),
                             mu_bar, var_bar, False, 0.0, eps, torch.backends.cudnn.enabled)
        n_t = n_iters if isinstance(n_iters, Tensor) else None
        ctx.save_for_backward(x, weight, mu_bar, var_bar, n_t, *(hist or ()))
        ctx.n_iters = None if n_t is not None else n_iters
        ctx.exact = hist is not None
        ctx.kernel_meta = None if kernel is None else (kernel.shape, kernel.dtype)
        ctx.conv_bias_dtype = None if conv_bias is None else conv_bias.dtype
        ctx.beta_dtype = None if bias is None else bias.dtype
        ctx.eps = eps
        ctx.on_backward = on_backward
        return y

    @staticmethod
    @once_differentiable  # no double backward: a second-order gradient would be silently wrong
    def backward(ctx, grad_out):
        if ctx.on_backward is not None:
            ctx.on_backward()
        x, weight, mu_bar, var_bar, n_t, *hist = ctx.saved_tensors
        n = n_t if n_t is not None else ctx.n_iters
        invstd = torch.rsqrt(var_bar + ctx.eps)
        c = x.shape[1]
        gamma = weight.to(invstd.dtype) if weight is not None else invstd.new_ones(c)
        w_eff = gamma / n
        # the same memory format as x: the fused kernel then reads both in one layout (channels_last stays so)
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        grad_out = grad_out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        want_kernel = ctx.exact and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
        mask = [ctx.needs_input_grad[0], want_kernel or (weight is not None and ctx.needs_input_grad[1]),
                want_kernel or ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(grad_out, x, w_eff, None, None, mu_bar, invstd,
                                                               True, ctx.eps, mask)
        if gx is not None and (n_t is not None or n > 1):
            coef = (invstd * w_eff * (n - 1)).to(gx.dtype).view(1, c, 1, 1)  # (1 - 1/n) r gamma
            gx = gx.addcmul_(grad_out, coef)
        g_kernel = g_conv_bias = None
        if want_kernel:
            mean_patch, var_kernel, mean_bias, var_bias = hist
            a = -invstd * gamma * gb  # dL/dmu_bar                       (gb = sum dy)
            cc = -0.5 * gamma * invstd * invstd * gw  # dL/dvar_bar        (gw = sum dy * x_hat)
            shape, dtype = ctx.kernel_meta
            if ctx.needs_input_grad[3]:
                groups = mean_patch.shape[0]
                g_kernel = torch.baddbmm(var_kernel.view(groups, c // groups, -1) * cc.view(groups, -1, 1),
                                         a.view(groups, -1, 1), mean_patch.view(groups, 1, -1))
                g_kernel = g_kernel.reshape(shape).to(dtype)
            if ctx.needs_input_grad[4]:
                g_conv_bias = (a * mean_bias + cc * var_bias).to(ctx.conv_bias_dtype)
        gw = gw.to(weight.dtype) if gw is not None and weight is not None and ctx.needs_input_grad[1] else None
        gb = gb.to(ctx.beta_dtype) if gb is not None and ctx.needs_input_grad[2] else None
        return gx, gw, gb, g_kernel, g_conv_bias, None, None, None, None, None, None


def cbn_normalize(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mu_bar: Tensor, var_bar: Tensor,
                  n_iters: Union[int, Tensor], eps: float, on_backward: Optional[Callable[[], None]] = None,
                  kernel: Optional[Tensor] = None, conv_bias: Optional[Tensor] = None,
                  hist: Optional[HistoryGrad] = None) -> Tensor:
    """Normalize with window statistics (Eq. 12) and the affine transform (Eq. 4).

    Gradients reach x, weight and bias, with ``mu_bar`` and ``var_bar`` functions of x through the current
    iteration's moments. Without ``hist`` the history is constant, as in the authors' release; with it (the exact
    backward) the current conv ``kernel`` and ``conv_bias`` also get the derivative through the compensated history.

    Args:
        x (Tensor): (N, C, H, W).
        weight, bias (Tensor | None): gamma and beta (C,).
        mu_bar, var_bar (Tensor): (C,) window statistics, detached.
        n_iters (int | Tensor): iterations averaged into them, the current one included (a 0-dim tensor when
            skipped iterations weigh 0).
        eps (float): added inside the square root.
        on_backward (callable, optional): called with no argument when the backward pass reaches this op.
        kernel, conv_bias (Tensor, optional): the producing conv's parameters (exact backward only).
        hist (HistoryGrad, optional): from :func:`history_grad`; None for the authors' backward.
    """
    if hist is None:
        kernel = conv_bias = None
    return _CBNNormalize.apply(x, weight, bias, kernel, conv_bias, mu_bar, var_bar, n_iters, eps, on_backward, hist)
