"""Normalization with window statistics (Eq. 12, 4) and its backward, exact or the authors'."""
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ['HistoryGrad', 'cbn_normalize']


class HistoryGrad(NamedTuple):
    """What the exact backward needs of the window, reduced in the forward (the window changes afterwards).

    With ``a = dL/dmu_bar`` and ``c = dL/dvar_bar`` (per channel, known only in the backward), the kernel's gradient
    through the compensated history is ``a_j * mean_patch[g(j)] + c_j * var_kernel[j]``, and the conv bias's
    ``a_j * mean_bias + c_j * var_bias[j]`` (see :func:`cbn_mmdet.ops.compensation.history_grad`). The normalize
    op takes these terms summed with the weights ``w`` rather than ``w/n`` (``n`` times them): its backward divides
    by ``n`` through the ``gamma/n`` it already has.
    """
    mean_patch: Tensor  # (g, C_in/g * kh * kw): sum_tau (w_tau/n) P_tau
    var_kernel: Tensor  # (C, C_in/g * kh * kw)
    mean_bias: Optional[Tensor]  # (): sum_tau w_tau / n; None when the conv has no bias
    var_bias: Optional[Tensor]  # (C,); None when the conv has no bias


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


class _CBNNormalize(torch.autograd.Function):
    """y = gamma * (x - mu_bar) / sqrt(var_bar + eps) + beta.

    ``mu_bar`` and ``var_bar`` average ``n`` iterations of which only the current one depends on x. Differentiating
    Eq. 9-12 through the current ``mu_t`` and ``s_t`` gives BN's backward with the count ``n*m`` in place of
    ``m``:  ``dx = r*gamma*(dy - sum(dy)/(n m) - (x - mu_bar) r^2 sum(dy (x - mu_bar))/(n m))``, ``r`` the inverse
    std. We evaluate it as ``dx_BN(weight=gamma/n) + (1 - 1/n) r gamma dy`` with torch's fused BN backward kernel.

    With ``hist`` (:class:`HistoryGrad`), the compensated history's dependence on the current conv kernel and bias
    is differentiated too (the exact backward): ``a = dL/dmu_bar = -r gamma sum(dy)`` and
    ``c = dL/dvar_bar = -(1/2) gamma r^2 sum(dy x_hat)`` come from the same fused kernel's sums, and the kernel gets
    ``a_j mean_patch + c_j var_kernel_j`` as an ordinary autograd edge (DDP buckets and autocast see it). Where the
    window fell back to the batch (``ok`` False, decided on the device) the history terms are not used: their
    gradient is zero, selected with ``torch.where``, so no NaN of a diverged window reaches the kernel.
    ``n`` may be a device tensor (skipped iterations weigh 0), so nothing here reads a value on the host.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, kernel, conv_bias, mu_bar, var_bar, n_iters, eps, hist, ok, zero):
        # fp16/bf16 x with fp32 gamma, beta and statistics is a supported mixed-precision BN call
        dtype = mu_bar.dtype
        gamma = weight if weight is None or weight.dtype == dtype else weight.to(dtype)
        beta = bias if bias is None or bias.dtype == dtype else bias.to(dtype)
        # the ATen kernel itself: torch.batch_norm would first allocate cuDNN's (unused) reserve, one more op
        y = torch.native_batch_norm(x, gamma, beta, mu_bar, var_bar, False, 0.0, eps)[0]
        n_t = n_iters if isinstance(n_iters, Tensor) else None
        ctx.save_for_backward(x, weight)
        # the statistics and history terms are the layer's detached results, not touched again: kept as plain
        # attributes, which saves a saved-variable round trip each (host time)
        ctx.stats = (mu_bar, var_bar, n_t, ok, zero)
        ctx.hist = hist
        ctx.n_iters = None if n_t is not None else n_iters
        ctx.exact = hist is not None
        ctx.kernel_meta = None if kernel is None else (kernel.shape, kernel.dtype)
        ctx.conv_bias_dtype = None if conv_bias is None else conv_bias.dtype
        ctx.beta_dtype = None if bias is None else bias.dtype
        ctx.eps = eps
        return y

    @staticmethod
    @once_differentiable  # no double backward: a second-order gradient would be silently wrong
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        mu_bar, var_bar, n_t, ok, zero = ctx.stats
        n = n_t if n_t is not None else ctx.n_iters
        windowed = n_t is not None or n != 1
        invstd = torch.rsqrt(var_bar + ctx.eps)
        c = x.shape[1]
        if weight is not None:
            gamma = weight if weight.dtype == invstd.dtype else weight.to(invstd.dtype)
            w_eff = gamma / n if windowed else gamma
        else:
            gamma = None
            w_eff = (1.0 / n if n_t is None else n_t.reciprocal()).expand(c) if windowed else None
        # the same memory format as x: the fused kernel then reads both in one layout (channels_last stays so)
        channels_last = not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        grad_out = grad_out.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        want_kernel = ctx.exact and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
        mask = [ctx.needs_input_grad[0], want_kernel or (weight is not None and ctx.needs_input_grad[1]),
                want_kernel or ctx.needs_input_grad[2]]
        gx, gw, gb = torch.ops.aten.native_batch_norm_backward(grad_out, x, w_eff, None, None, mu_bar, invstd,
                                                               True, ctx.eps, mask)
        rw = invstd * w_eff if want_kernel or (windowed and gx is not None) else None  # r gamma / n
        if gx is not None and windowed:
            # - (1 - 1/n) r gamma = r gamma / n - r gamma
            coef = torch.addcmul(rw, invstd, gamma, value=-1) if gamma is not None else rw - invstd
            gx = gx.addcmul_(grad_out, (coef if coef.dtype == gx.dtype else coef.to(gx.dtype))[:, None, None],
                             value=-1)
        g_kernel = g_conv_bias = None
        if want_kernel:
            mean_patch, var_kernel, mean_bias, var_bias = ctx.hist
            # the history terms are n times the derivative's (HistoryGrad): gamma/n brings the 1/n back
            # with a = dL/dmu_bar = -rw gb and c = dL/dvar_bar = -(1/2) rw r gw (gb = sum dy, gw = sum dy x_hat,
            # rw = r gamma / n), the kernel gets a P + c V = -rw (gb P + (1/2) y V), y = r gw: the per-channel
            # factor rw is applied once, to the result
            y = invstd * gw
            shape, dtype = ctx.kernel_meta
            if ctx.needs_input_grad[3]:
                groups = mean_patch.shape[0]
                g_kernel = torch.baddbmm(var_kernel.view(groups, c // groups, -1) * y.view(groups, -1, 1),
                                         gb.view(groups, -1, 1), mean_patch.view(groups, 1, -1), beta=-0.5, alpha=-1)
                g_kernel = g_kernel.mul_(rw.view(groups, -1, 1))
                if ok is not None:
                    g_kernel = torch.where(ok, g_kernel, zero)
                g_kernel = g_kernel.view(shape) if g_kernel.dtype == dtype else g_kernel.view(shape).to(dtype)
            if ctx.needs_input_grad[4]:
                g_conv_bias = torch.addcmul(gb * mean_bias, y, var_bias, value=0.5).mul_(rw).neg_()
                if ok is not None:
                    g_conv_bias = torch.where(ok, g_conv_bias, zero)
                g_conv_bias = g_conv_bias.to(ctx.conv_bias_dtype)
        gw = _as(gw, weight.dtype) if gw is not None and weight is not None and ctx.needs_input_grad[1] else None
        gb = _as(gb, ctx.beta_dtype) if gb is not None and ctx.needs_input_grad[2] else None
        return gx, gw, gb, g_kernel, g_conv_bias, None, None, None, None, None, None, None


def cbn_normalize(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mu_bar: Tensor, var_bar: Tensor,
                  n_iters: Union[int, Tensor], eps: float, kernel: Optional[Tensor] = None,
                  conv_bias: Optional[Tensor] = None, hist: Optional[HistoryGrad] = None, ok: Optional[Tensor] = None,
                  zero: Optional[Tensor] = None) -> Tensor:
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
        kernel, conv_bias (Tensor, optional): the producing conv's parameters (exact backward only).
        hist (HistoryGrad, optional): the history terms; None for the authors' backward.
        ok (Tensor, optional): 0-dim bool, False where the window fell back to the batch: the history's gradient is
            then zero. ``zero`` (a 0-dim tensor of the statistics dtype) is what it is replaced with.
    """
    if hist is None:
        kernel = conv_bias = None
        ok = None
    elif ok is not None and zero is None:
        zero = mu_bar.new_zeros(())
    return _CBNNormalize.apply(x, weight, bias, kernel, conv_bias, mu_bar, var_bar, n_iters, eps, hist, ok, zero)
