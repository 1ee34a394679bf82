"""The statistics' gradients with respect to the producing convolution's kernel, in closed form (Appendix B).

With the convolution's kernel ``W`` (C, C_in/g, kh, kw), its input ``u`` and output ``x``:

* ``dmu_j/dW_j``  = the mean input patch ``P`` (identical for all ``j`` of a group)           (Eq. 15)
* ``dnu_j/dW_j``  = (2/m) sum_i x_ij patch_i = ``ds_j/dW_j + 2 mu_j P``                         (App. B)
* ``ds_j/dW_j``   = (2/m) sum_i (x_ij - mu_j) patch_i = ``dnu_j/dW_j - 2 mu_j P``   (one weight-gradient)
* ``dmu_j/db_j = 1``, ``ds_j/db_j = 0``  (``dnu_j/db_j = 2 mu_j``)
"""
import functools
import math
from typing import NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._common import autocast_off

__all__ = ['ConvSpec', 'StatGrads', 'subsample_plan', 'weight_grad', 'conv_stat_grads', 'channel_dots',
           'kernel_products', 'patch_positions', 'sample_patches']


class ConvSpec(NamedTuple):
    """What the statistics' gradients need to know about the convolution that produced x."""
    weight: Tensor  # (C, C_in/g, kh, kw), the parameter itself (fp32 even under autocast)
    bias: Optional[Tensor]  # (C,) or None
    input: Tensor  # (N, C_in, H_in, W_in), as the convolution saw it
    stride: Sequence[int]
    padding: Sequence[int]
    dilation: Sequence[int]
    groups: int
    # the convolution adds a bias; with ``bias`` None it is one whose value is not in the graph (frozen or derived)
    has_bias: bool = False


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


def weight_grad(u: Tensor, kernel: Tensor, grad_out: Tensor, stride, padding, dilation, groups: int) -> Tensor:
    """A convolution's weight-gradient: ``torch.nn.grad.conv2d_weight``'s aten op, called directly. That wrapper
    allocates a dummy weight and normalizes its arguments in Python (about 20 us of host time per call, as much as
    the op itself at small shapes); ``kernel`` supplies the shape, dtype and device, its values are not read."""
    return torch.ops.aten.convolution_backward(grad_out, u, kernel, None, stride, padding, dilation, False, [0],
                                               groups, (False, True, False))[1]


@functools.lru_cache(maxsize=512)
def _tap_matrix_cached(size: int, out: int, k: int, stride: int, padding: int, dilation: int, scale: float,
                       dtype: torch.dtype, device: torch.device) -> Tensor:
    rows = torch.arange(size, device=device)
    taps = torch.arange(out, device=device)[None, :] * stride - padding + (
        torch.arange(k, device=device) * dilation)[:, None]  # (k, out): the input row tap a reads at output row i
    # a comparison instead of boolean-mask indexing: no data-dependent shape, so no device-to-host copy
    return (taps[:, :, None] == rows).any(1).to(dtype).mul_(scale)  # (k, size)


def _tap_matrix(size: int, out: int, k: int, stride: int, padding: int, dilation: int, like: Tensor,
                scale: float = 1.0) -> Tensor:
    """(k, size) matrix along one axis: entry ``[a, r]`` is ``scale`` when input row ``r`` is read by kernel tap ``a``
    at some output row (``r = i * stride + a * dilation - padding``; rows in the zero padding read nothing), else 0.
    Cached per shape, scale, dtype and device: a detection model sees a handful of map sizes."""
    return _tap_matrix_cached(size, out, k, stride, padding, dilation, scale, like.dtype, like.device)


# the patch-sum matrix R (x) C of a map is cached when it has at most this many elements (4 MiB in fp32): 3x3
# convolutions of maps up to ~340x340; larger maps take the two small products of _mean_patch instead. 16 of them
# at most (64 MiB in fp32): a detector sees a handful of map sizes per batch shape; a miss costs a few host ops
KRON_MAX = 1 << 20


@functools.lru_cache(maxsize=16)
def _patch_sum_matrix(h: int, out_h: int, kh: int, stride_h: int, pad_h: int, dil_h: int, w: int, out_w: int, kw: int,
                      stride_w: int, pad_w: int, dil_w: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(H * W, kh * kw): entry ``[(r, c), (a, b)]`` is 1 when input pixel ``(r, c)`` is read by kernel tap ``(a, b)``
    at some output position, i.e. ``(R_a (x) C_b)`` of :func:`_tap_matrix`, transposed for the product."""
    rows = _tap_matrix_cached(h, out_h, kh, stride_h, pad_h, dil_h, 1.0, dtype, device)  # (kh, H)
    cols = _tap_matrix_cached(w, out_w, kw, stride_w, pad_w, dil_w, 1.0, dtype, device)  # (kw, W)
    return torch.kron(rows, cols).t()


def _mean_patch_kron(u: Tensor, conv: 'ConvSpec', out_h: int, out_w: int, count: int, out: Tensor) -> bool:
    """The mean input patch in two ops, ``(1/count) (sum_n U_n) (R (x) C)^T``, written into ``out`` (g, C_in/g, kh,
    kw); False (nothing written) when the map is too large for the cached matrix (:data:`KRON_MAX`)."""
    n, c_in, h, w = u.shape
    kh, kw = conv.weight.shape[2:]
    if h * w * kh * kw > KRON_MAX:
        return False
    k = _patch_sum_matrix(h, out_h, kh, conv.stride[0], conv.padding[0], conv.dilation[0], w, out_w, kw,
                          conv.stride[1], conv.padding[1], conv.dilation[1], u.dtype, u.device)
    flat = out.view(c_in, kh * kw)
    # beta=0: the input operand is not read; alpha applies 1/count, so the matrix is cached per shape alone
    torch.addmm(flat, u.sum(0).view(c_in, h * w), k, beta=0, alpha=1.0 / count, out=flat)
    return True


def _column_sums(u: Tensor, conv: 'ConvSpec', out_w: int, stride_w: int) -> Tensor:
    """``(sum_n U_n) C_b``: for every input row, the batch sum of what each kernel column tap ``b`` reads, over the
    output columns: (C_in, H, kw). The one read of ``u`` behind :func:`_mean_patch`."""
    n, c_in, h, w = u.shape
    kw = conv.weight.shape[3]
    cols = _tap_matrix(w, out_w, kw, stride_w, conv.padding[1], conv.dilation[1], u)  # (kw, W)
    return torch.mm(u.sum(0).view(c_in * h, w), cols.t()).view(c_in, h, kw)


def _mean_patch(by_col: Tensor, conv: 'ConvSpec', out_h: int, stride_h: int, count: int,
                out: Optional[Tensor] = None) -> Tensor:
    """``(1/count) sum_i patch_i`` over the output positions of a conv with row stride ``stride_h``:
    (g, C_in/g, kh, kw), written into ``out`` (same shape, contiguous) when given.

    The patch sum separates into rows and columns: ``sum_i patch_i[c, a, b] = R_a^T U_c C_b`` with ``U_c`` the
    batch-summed input channel and ``R`` (``C``) the rows (columns) each kernel tap reads (:func:`_tap_matrix`).
    ``by_col`` is the column part (:func:`_column_sums`, a single read of the input); what remains here is one small
    product, with ``1/count`` folded into the cached row taps. A weight-gradient against a ones map would instead
    build the (C_in * K, H * W) patch matrix.
    """
    c_in, h, kw = by_col.shape
    kh = conv.weight.shape[2]
    rows = _tap_matrix(h, out_h, kh, stride_h, conv.padding[0], conv.dilation[0], by_col, 1.0 / count)  # (kh, H)
    shape = (conv.groups, c_in // conv.groups, kh, kw)
    if out is None:
        out = by_col.new_empty(shape)
    torch.matmul(rows, by_col, out=out.view(c_in, kh, kw))  # (kh, H) @ (C_in, H, kw) -> (C_in, kh, kw)
    return out


@autocast_off
def conv_stat_grads(conv: ConvSpec, x: Tensor, mu: Tensor, subsample: int = 1,
                    centre_first: Optional[bool] = None, out: Optional[Tensor] = None) -> StatGrads:
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
        out (Tensor, optional): a contiguous (C + g, C_in/g * kh * kw) buffer in the statistics dtype: ``ds/dW`` is
            written into its first C rows and ``dmu/dW`` into the last g (the window bank's push entry).

    Returns:
        StatGrads: both gradients, in the dtype of ``mu`` (views of ``out`` when given).
    """
    dtype = mu.dtype
    n, c, h, w = x.shape
    groups = conv.groups
    shape = conv.weight.shape
    if out is None:
        out = mu.new_empty(c + groups, shape[1] * shape[2] * shape[3])
    g_s_out, g_mu_out = out[:c], out[c:].view(groups, *shape[1:])
    u = conv.input if conv.input.dtype == dtype else conv.input.to(dtype)
    how, step = subsample_plan(n, h, subsample)
    # d mu / dW: the mean input patch, one per group                                        (Eq. 15)
    g_mu = g_mu_out
    by_col = _column_sums(u, conv, w, conv.stride[1]) if how == 'rows' else None
    if not _mean_patch_kron(u, conv, h, w, n * h * w, g_mu_out):
        by_col = _column_sums(u, conv, w, conv.stride[1]) if by_col is None else by_col
        g_mu = _mean_patch(by_col, conv, h, conv.stride[0], n * h * w, out=g_mu_out)  # -> (g, C_in/g, kh, kw)
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
    grad_out = x if x.dtype == dtype else x.to(dtype)
    if centre_first:
        grad_out = grad_out - mu.view(1, c, 1, 1)
    kernel = conv.weight if conv.weight.dtype == dtype else conv.weight.to(dtype)
    # a channels_last input gives a channels_last weight-gradient: made contiguous (a no-op otherwise) for the view
    g_s = weight_grad(u, kernel.detach(), grad_out, stride, conv.padding, conv.dilation, groups).contiguous()
    if centre_first:  # (2/m) sum_i (x_i - mu) patch_i directly
        torch.mul(g_s.view(c, -1), 2.0 / m, out=g_s_out)
        return StatGrads(g_mu, g_s_out.view(shape))
    # g_s = (2/m) g_s - 2 mu_j patch, one fused pass: a rank-1 update per group (C/g, 1) x (1, C_in/g * K)
    if groups == 1:
        torch.addmm(g_s.view(c, -1), mu.view(c, 1), patch.view(1, -1), beta=2.0 / m, alpha=-2.0, out=g_s_out)
    else:
        torch.baddbmm(g_s.view(groups, c // groups, -1), mu.view(groups, c // groups, 1),
                      patch.view(groups, 1, -1), beta=2.0 / m, alpha=-2.0, out=g_s_out.view(groups, c // groups, -1))
    return StatGrads(g_mu, g_s_out.view(shape))


_GOLDEN = (math.sqrt(5) - 1) / 2


def patch_positions(count: int, r: int) -> list:
    """The ``r`` output positions (flat indices over ``N * H_out * W_out``) whose input patches a window slot keeps
    for the second-order term: ``floor(frac((i + 1/2) phi) count)`` with ``phi`` the golden ratio's fraction, a
    low-discrepancy sequence. Deterministic, so that a reference can take the same patches, and spread over the
    images, rows and columns alike (equal strata of the flat index would fall on one column when the row length
    divides their width). A batch with few positions (``count`` near or below ``r``) repeats some of them."""
    return [int(math.fmod((i + 0.5) * _GOLDEN, 1.0) * count) for i in range(r)]


@functools.lru_cache(maxsize=256)
def _patch_index_cached(shape: Tuple[int, ...], out_hw: Tuple[int, int], kernel: Tuple[int, int], stride, padding,
                        dilation, r: int, dtype: torch.dtype, device: torch.device) -> Tuple[Tensor, Tensor]:
    n, c_in, h, w = shape
    out_h, out_w = out_hw
    kh, kw = kernel
    pos = torch.tensor(patch_positions(n * out_h * out_w, r), device=device)  # built once per shape
    img, rest = pos // (out_h * out_w), pos % (out_h * out_w)
    rows = (rest // out_w)[:, None] * stride[0] - padding[0] + torch.arange(kh, device=device)[None] * dilation[0]
    cols = (rest % out_w)[:, None] * stride[1] - padding[1] + torch.arange(kw, device=device)[None] * dilation[1]
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]  # (r, kh, kw)
    chan = torch.arange(c_in, device=device)
    flat = (((img[:, None] * c_in + chan[None]) * h)[:, :, None, None] + rows.clamp(0, h - 1)[:, None, :, None]) * w \
        + cols.clamp(0, w - 1)[:, None, None, :]  # (r, C_in, kh, kw): logical (row-major) index into the input
    mask = inside[:, None].expand(r, c_in, kh, kw).to(dtype)
    return flat.reshape(r, -1), mask.reshape(r, -1)


def sample_patches(conv: ConvSpec, out_hw: Tuple[int, int], r: int, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """The input patches of ``conv`` at the :func:`patch_positions` of its output: (r, C_in * kh * kw) values (0
    where a patch reads the zero padding) and the 0/1 mask of what is inside the input, both in ``dtype``. The
    gather index is built on the device once per input shape and cached; one ``take`` per call, no host sync.
    Channel order is the kernel's ``(C_in, kh, kw)``, so group ``j``'s patch is the ``j``-th block of
    ``C_in/g * kh * kw``."""
    u = conv.input
    kernel = tuple(conv.weight.shape[2:])
    index, mask = _patch_index_cached(tuple(u.shape), tuple(out_hw), kernel, tuple(conv.stride), tuple(conv.padding),
                                      tuple(conv.dilation), r, dtype, u.device)
    values = torch.take(u, index)  # padding positions read a clamped element; the mask zeroes them
    return (values if values.dtype == dtype else values.to(dtype)), mask


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


@autocast_off
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
