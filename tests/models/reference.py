"""A slow, independent reference of CBN, written straight from the paper's equations.

It keeps full copies of past kernels, full Jacobians of the statistics from brute-force autograd
(``torch.autograd.functional.jacobian``), the raw second moment ``nu`` (Eq. 3), and differentiates the output by
plain autograd. None of it shares code with ``cbn_mmdet``.

``exact=True`` keeps the current kernel theta_t a live autograd variable inside the compensation (Eq. 7-8), so
plain autograd gives the exact derivative of the forward; ``exact=False`` detaches it (the authors' backward).

``second_order=r > 0`` moves the centred moment ``s = nu - mu^2`` instead, to second order:
``s_tau(theta_t) = s_tau + (ds/dtheta) dtheta + (1/r) sum_i (dW . (x_i - P_tau))^2`` over the input patches ``x_i``
of iteration tau at ``r`` output positions ``floor(frac((i + 1/2) phi) * count)`` (``phi`` the golden ratio's
fraction), taken here by ``F.unfold`` of the stored input.
"""
import math

import torch
import torch.nn.functional as F

GOLDEN = (math.sqrt(5) - 1) / 2


def _padded(conv, u):
    """``u`` padded as ``conv`` pads it, and the zero padding left to unfold: ``(u, padding)``."""
    if isinstance(conv.padding, str):
        raise NotImplementedError(f'the reference unfolds no string padding, got padding={conv.padding!r}')
    if conv.padding_mode == 'zeros':
        return u, conv.padding
    pads = [p for p in reversed(conv.padding) for _ in range(2)]  # F.pad's order: last axis first
    return F.pad(u, pads, mode=conv.padding_mode), 0


class ReferenceCBN:

    def __init__(self, num_features, window_size, compensate, eps=1e-5, momentum=0.1, dtype=torch.float64,
                 exact=True, affine=True, device='cpu', second_order=0):
        self.k = window_size
        self.second_order = second_order
        self.compensate = compensate
        self.exact = exact
        self.eps = eps
        self.momentum = momentum
        self.history = []
        self.running_mean = torch.zeros(num_features, dtype=dtype, device=device)
        self.running_var = torch.ones(num_features, dtype=dtype, device=device)
        self.weight = torch.ones(num_features, dtype=dtype, device=device, requires_grad=affine)
        self.bias = torch.zeros(num_features, dtype=dtype, device=device, requires_grad=affine)

    def __call__(self, conv, conv_input):
        """Apply ``conv`` to ``conv_input``, then CBN (Eq. 2-12) to its output."""
        x = conv(conv_input)
        has_bias = conv.bias is not None
        theta_live = torch.cat([conv.weight.flatten()] + ([conv.bias] if has_bias else []))
        theta_t = theta_live.detach()
        n_w = conv.weight.numel()
        u = conv_input.detach()

        def stats(theta):  # Eq. 2-3 as a function of the layer's own kernel (Eq. 14)
            params = dict(weight=theta[:n_w].view_as(conv.weight))
            if has_bias:
                params['bias'] = theta[n_w:]
            xx = torch.func.functional_call(conv, params, (u, ))  # the module's own forward: its padding mode too
            return xx.mean((0, 2, 3)), (xx * xx).mean((0, 2, 3))

        j_mu, j_nu = torch.autograd.functional.jacobian(stats, theta_t, vectorize=True)  # (C, P) each, brute force
        mu_t = x.mean((0, 2, 3))
        nu_t = (x * x).mean((0, 2, 3))
        mus, nus = [mu_t], [nu_t]
        window = self.history[max(0, len(self.history) - (self.k - 1)):] if self.k > 1 else []
        for past in window:
            if self.compensate and self.second_order:
                delta = (theta_live if self.exact else theta_t) - past['theta']
                mu = past['mu'] + past['j_mu'] @ delta
                j_s = past['j_nu'] - 2 * past['mu'][:, None] * past['j_mu']  # d(nu - mu^2)/dtheta at tau
                dw = delta[:n_w].view(conv.weight.shape[0], -1)  # (C, C_in/g * K)
                u_tau, pad = _padded(conv, past['u'])
                cols = F.unfold(u_tau, conv.kernel_size, conv.dilation, pad, conv.stride)
                patches = cols.transpose(1, 2).reshape(-1, cols.shape[1])  # (N * L, C_in * K)
                centred = patches - patches.mean(0)
                count = patches.shape[0]
                pick = [int(math.fmod((i + 0.5) * GOLDEN, 1.0) * count) for i in range(self.second_order)]
                chosen = centred[pick].view(self.second_order, conv.groups, -1)  # (r, g, C_in/g * K)
                group = torch.arange(conv.weight.shape[0]) // (conv.weight.shape[0] // conv.groups)
                proj = torch.einsum('cd,rcd->rc', dw, chosen[:, group])  # (r, C): dW_c . (x_i - P)
                s = past['nu'] - past['mu'] ** 2 + j_s @ delta + proj.square().mean(0)
                mus.append(mu)
                nus.append(mu * mu + s.clamp(min=0))  # Eq. 10: nu >= mu^2 is s >= 0
                continue
            if self.compensate:  # Eq. 7-8
                delta = (theta_live if self.exact else theta_t) - past['theta']
                mu = past['mu'] + past['j_mu'] @ delta
                nu = past['nu'] + past['j_nu'] @ delta
            else:
                mu, nu = past['mu'], past['nu']
            mus.append(mu)
            nus.append(torch.maximum(nu, mu * mu))  # Eq. 10
        mu_bar = torch.stack(mus).mean(0)  # Eq. 9
        nu_bar = torch.stack(nus).mean(0)  # Eq. 10
        var_bar = (nu_bar - mu_bar * mu_bar).clamp(min=0)  # Eq. 11
        shape = (1, -1, 1, 1)
        y = (x - mu_bar.view(shape)) / torch.sqrt(var_bar.view(shape) + self.eps)  # Eq. 12
        y = y * self.weight.view(shape) + self.bias.view(shape)  # Eq. 4
        m = x.numel() // x.shape[1]
        n = m + sum(p['m'] for p in window)
        with torch.no_grad():
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mu_bar)
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * var_bar * n / (n - 1))
        self.history.append(dict(mu=mu_t.detach(), nu=nu_t.detach(), j_mu=j_mu, j_nu=j_nu, theta=theta_t.clone(),
                                 m=m, u=u))
        return y
