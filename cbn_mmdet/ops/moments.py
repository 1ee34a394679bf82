"""Per-channel moments of a batch and of a window of iterations (Eq. 2-3, 9-11).

Notation: ``x`` is (N, C, H, W), ``m = N*H*W``. Instead of the paper's raw second moment ``nu = mean(x^2)`` the
layer carries the centred moment ``s = mean((x - mu)^2) = nu - mu^2``: the same quantity in exact arithmetic, which
does not cancel catastrophically in fp32 when ``|mu| >> std``.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ['stat_dtype', 'batch_moments', 'window_moments', 'relative_stat_errors']


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
    dtype = stat_dtype(x.dtype)
    x = x if x.dtype == dtype else x.to(dtype)
    # torch's BN statistics kernel (stable, and faster than var_mean); None: no running statistics touched
    mu, s = torch.batch_norm_update_stats(x, None, None, 0.0)  # (N, C, H, W) -> (C,), (C,)
    return mu, s


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
