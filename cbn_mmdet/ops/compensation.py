"""Compensation (Eq. 7-8, 10) and its derivative with respect to the current kernel, in reference form.

These are the per-iteration formulas, written for clarity: tests, analysis tools and the statistics-error hook use
them. The layer's hot path computes the same quantities over a static window bank in a few packed ops
(:mod:`cbn_mmdet.ops.fused`).

* compensation (Eq. 7-8): with ``dmu = <P, W_t - W_tau> + (b_t - b_tau)``,
  ``mu_tau(t) = mu_tau + dmu`` and ``s_tau(t) = s_tau + <ds/dW, W_t - W_tau> - dmu^2``,
  which is exactly ``nu_tau(t) - mu_tau(t)^2`` for the first-order ``nu_tau(t)`` of Eq. 8.
* the clamp ``nu >= mu^2`` of Eq. 10 is ``s >= 0``.
"""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._common import autocast_off
from .conv_grads import kernel_products
from .normalize import HistoryGrad

__all__ = ['Compensated', 'compensate', 'HistoryGrad', 'history_grad']


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


@autocast_off
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
