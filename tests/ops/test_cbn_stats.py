"""The closed-form statistics gradients against brute-force autograd, exact and subsampled."""
import pytest
import torch
import torch.nn.functional as F

from cbn_mmdet.ops import (ConvSpec, channel_dots, compensate, conv_stat_grads, history_grad, kernel_products,
                           subsample_plan, window_moments)

from cbn_mmdet.ops import conv_grads

from ..models.common import CONV_VARIANTS as CONVS


def test_subsample_plan():
    assert subsample_plan(1024, 7, 1) == ('all', 1)
    assert subsample_plan(1024, 7, 4) == ('samples', 4)  # RoIs
    assert subsample_plan(31, 16, 4) == ('rows', 4)  # just below 8r samples
    assert subsample_plan(32, 7, 4) == ('samples', 4)
    assert subsample_plan(2, 64, 4) == ('rows', 4)  # a few images, a large map
    assert subsample_plan(2, 7, 4) == ('all', 1)  # nothing sensible to subsample: exact


def brute_force(u, conv, select):
    """d mu/dW over all positions, and d(nu_S)/dW - 2 mu d(mu_S)/dW over the positions ``select`` keeps."""
    args = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
    x = F.conv2d(u, conv.weight, None, **args)
    mu = x.mean((0, 2, 3))

    def stats(w):
        xx = F.conv2d(u, w, None, **args)
        xs = select(xx)
        return xx.mean((0, 2, 3)), xs.mean((0, 2, 3)), (xs * xs).mean((0, 2, 3))

    j_mu, j_mu_s, j_nu_s = torch.autograd.functional.jacobian(stats, conv.weight.detach())  # (C, C, Cin/g, kh, kw)
    c = x.shape[1]
    own = torch.arange(c)
    g_mu, g_mu_s, g_nu_s = j_mu[own, own], j_mu_s[own, own], j_nu_s[own, own]  # channel j depends on W_j only
    return x.detach(), mu.detach(), g_mu, g_nu_s - 2 * mu.detach().view(c, 1, 1, 1) * g_mu_s


@pytest.mark.parametrize('variant', list(CONVS))
@pytest.mark.parametrize('n, h, ratio, select', [
    (2, 12, 1, lambda x: x),
    (16, 6, 2, lambda x: x[::2]),  # samples
    (2, 12, 2, lambda x: x[:, :, ::2]),  # rows
    (3, 13, 3, lambda x: x[:, :, ::3]),  # rows, a remainder
])
@pytest.mark.parametrize('kron', [True, False])
def test_conv_stat_grads_match_autograd(variant, n, h, ratio, select, kron, monkeypatch):
    # fp64 closed forms against brute-force Jacobians of the same fp64 convs: a few roundings of O(1) values
    # (u = 1.1e-16) per sum of <= 2*12*13 terms, far below 1e-10 relative / 1e-12 absolute. Both ways of the mean
    # patch: the cached patch-sum matrix, and the two small products that maps too large for it take
    if not kron:
        monkeypatch.setattr(conv_grads, 'KRON_MAX', 0)
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, bias=False, **CONVS[variant]).double()
    u = torch.randn(n, 4, h, h + 1, dtype=torch.float64)
    x, mu, g_mu_ref, g_s_ref = brute_force(u, conv, select)
    how = subsample_plan(x.shape[0], x.shape[2], ratio)[0]
    assert how == {1: 'all'}.get(ratio, 'samples' if n >= 8 * ratio else 'rows')
    spec = ConvSpec(conv.weight.detach(), None, u, conv.stride, conv.padding, conv.dilation, conv.groups)
    grads = conv_stat_grads(spec, x, mu, subsample=ratio)
    # the CUDA/TF32 path: the weight-gradient of the centred x, the same result in exact arithmetic
    centred = conv_stat_grads(spec, x, mu, subsample=ratio, centre_first=True)
    groups = conv.groups
    torch.testing.assert_close(centred.g_s, g_s_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads.g_mu, g_mu_ref.view(groups, 6 // groups, *g_mu_ref.shape[1:])[:, 0],
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads.g_s, g_s_ref, rtol=1e-10, atol=1e-12)
    if ratio > 1:  # a real approximation: not the exact gradient
        exact = conv_stat_grads(spec, x, mu).g_s
        assert not torch.allclose(grads.g_s, exact, rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(grads.g_mu, conv_stat_grads(spec, x, mu).g_mu, rtol=0, atol=0)


@pytest.mark.parametrize('lead', [(), (3, ), (2, 3), (0, )])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_channel_dots(lead, dtype):
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(*lead, 5, 7, generator=gen, dtype=dtype)
    b = torch.randn(5, 7, generator=gen, dtype=dtype)
    out = channel_dots(a, b)
    assert out.shape == (*lead, 5) and out.dtype == dtype
    torch.testing.assert_close(out, (a.double() * b.double()).sum(-1).to(dtype))
    torch.testing.assert_close(channel_dots(a.transpose(-1, -2).contiguous().transpose(-1, -2), b), out)


def test_autocast_does_not_lower_the_statistics_precision():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, bias=False)
    u = torch.randn(2, 4, 9, 9)
    x = conv(u).detach()
    spec = ConvSpec(conv.weight.detach(), None, u, conv.stride, conv.padding, conv.dilation, conv.groups)
    mu = x.mean((0, 2, 3))
    exact = conv_stat_grads(spec, x, mu)
    products = kernel_products(exact.g_mu, exact.g_s, spec.weight)
    comp = compensate(mu[None], x.var((0, 2, 3), unbiased=False)[None], exact.g_mu[None], exact.g_s[None],
                      products[0][None], products[1][None], None, spec.weight * 1.1, None)
    rows = torch.ones(1)
    history = history_grad(comp, mu, exact.g_mu[None], exact.g_s[None], rows, rows.sum() + 1)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        mixed = conv_stat_grads(spec, x, mu)
        mixed_products = kernel_products(mixed.g_mu, mixed.g_s, spec.weight)
        mixed_history = history_grad(comp, mu, mixed.g_mu[None], mixed.g_s[None], rows, rows.sum() + 1)
    for a, b in zip((*exact, *products, *history), (*mixed, *mixed_products, *mixed_history)):
        assert b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize('groups', [1, 2])
@pytest.mark.parametrize('with_bias', [True, False])
@pytest.mark.parametrize('ratio', [1, 2])
def test_history_grad_is_the_derivative_of_the_forward(groups, with_bias, ratio):
    """The exact backward's history terms against autograd through ``compensate`` and ``window_moments`` with the
    current kernel and bias live, on a real window (stored P and G from earlier kernels, one skipped row of weight
    0, a clamp active on some entries). With ``stat_grad_subsample > 1`` the stored G is an estimate, and the
    exact backward is the exact derivative of the forward that uses it: the check is the same."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, padding=1, groups=groups, bias=with_bias).double()
    entries = []
    for tau in range(3):  # three past iterations, each at its own kernel
        with torch.no_grad():
            conv.weight.add_(0.2 * torch.randn_like(conv.weight))
            if with_bias:
                conv.bias.add_(0.2 * torch.randn_like(conv.bias))
        u = torch.randn(16, 4, 6, 7, dtype=torch.float64)
        x = conv(u).detach()
        mu, s = x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)
        spec = ConvSpec(conv.weight.detach(), None, u, conv.stride, conv.padding, conv.dilation, groups)
        g = conv_stat_grads(spec, x, mu, subsample=ratio)
        p_mu, p_s = kernel_products(g.g_mu, g.g_s, conv.weight.detach())
        bias = conv.bias.detach().clone() if with_bias else torch.zeros_like(mu)
        entries.append(dict(mu=mu, s=s, g_mu=g.g_mu, g_s=g.g_s, p_mu=p_mu, p_s=p_s, bias=bias))
    h = {k: torch.stack([e[k] for e in entries]) for k in entries[0]}
    h['s'][1, :2] = 1e-4  # nearly empty variances: the compensation drives them below 0 and Eq. 10 clamps them
    weight = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)  # the last row was skipped
    kernel = (conv.weight.detach() + 0.3 * torch.randn_like(conv.weight)).requires_grad_()
    bias_t = (conv.bias.detach() + 0.3).requires_grad_() if with_bias else None
    mu_t, s_t = torch.randn(6, dtype=torch.float64), torch.rand(6, dtype=torch.float64) + 0.5

    def forward(kernel, bias_t):  # Eq. 7-11 in plain differentiable torch (compensate's kernels are not)
        c = kernel.shape[0]
        w_g = kernel.reshape(groups, c // groups, -1)
        q_mu = torch.einsum('tgd,gcd->tgc', h['g_mu'].reshape(3, groups, -1), w_g).reshape(3, c)
        q_s = (h['g_s'] * kernel).flatten(2).sum(-1)
        d_mu = q_mu - h['p_mu'] + ((bias_t - h['bias']) if bias_t is not None else 0)
        mu_c = h['mu'] + d_mu
        s_c = (h['s'] + q_s - h['p_s'] - d_mu * d_mu).clamp(min=0)
        rows = torch.cat([weight.new_ones(1), weight])[:, None]
        mus, ss = torch.cat([mu_t[None], mu_c]), torch.cat([s_t[None], s_c])
        mu_bar = (rows * mus).sum(0) / rows.sum()
        var_bar = (rows * (ss + (mus - mu_bar) ** 2)).sum(0) / rows.sum()
        return mu_bar, var_bar

    mu_bar, var_bar = forward(kernel, bias_t)
    a, c = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    ((a * mu_bar).sum() + (c * var_bar).sum()).backward()
    with torch.no_grad():  # what the layer does
        comp = compensate(h['mu'], h['s'], h['g_mu'], h['g_s'], h['p_mu'], h['p_s'], h['bias'], kernel.detach(),
                          None if bias_t is None else bias_t.detach())
        rows = torch.cat([weight.new_ones(1), weight])
        mu_bar2, var_bar2 = window_moments(torch.cat([mu_t[None], comp.mu]), torch.cat([s_t[None], comp.s]), rows)
        torch.testing.assert_close(mu_bar2, mu_bar, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(var_bar2, var_bar, rtol=1e-12, atol=1e-12)
        assert not comp.inside.all()  # the clamp is active somewhere
        hist = history_grad(comp, mu_bar2, h['g_mu'], h['g_s'], weight, weight.sum() + 1)
    d = hist.mean_patch.shape[1]
    g_kernel = (a.view(groups, -1, 1) * hist.mean_patch.view(groups, 1, d)
                + c.view(groups, -1, 1) * hist.var_kernel.view(groups, -1, d)).reshape(kernel.shape)
    # fp64, the same sums in another order: a few roundings (u = 1.1e-16) of O(1) values
    torch.testing.assert_close(g_kernel, kernel.grad, rtol=1e-10, atol=1e-12)
    if with_bias:
        torch.testing.assert_close(a * hist.mean_bias + c * hist.var_bias, bias_t.grad, rtol=1e-10, atol=1e-12)
