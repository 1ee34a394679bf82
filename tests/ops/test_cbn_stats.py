"""The closed-form statistics gradients against brute-force autograd, exact and subsampled."""
import pytest
import torch
import torch.nn.functional as F

from cbn_mmdet.ops import ConvSpec, channel_dots, conv_stat_grads, kernel_products, subsample_plan

from ..models.test_cbn_reference import CONV_VARIANTS as CONVS


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
def test_conv_stat_grads_match_autograd(variant, n, h, ratio, select):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, bias=False, **CONVS[variant]).double()
    u = torch.randn(n, 4, h, h + 1, dtype=torch.float64)
    x, mu, g_mu_ref, g_s_ref = brute_force(u, conv, select)
    how = subsample_plan(x.shape[0], x.shape[2], ratio)[0]
    assert how == {1: 'all'}.get(ratio, 'samples' if n >= 8 * ratio else 'rows')
    spec = ConvSpec(conv.weight.detach(), None, u, conv.stride, conv.padding, conv.dilation, conv.groups)
    grads = conv_stat_grads(spec, x, mu, subsample=ratio)
    groups = conv.groups
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
    with torch.autocast('cpu', dtype=torch.bfloat16):
        mixed = conv_stat_grads(spec, x, mu)
        mixed_products = kernel_products(mixed.g_mu, mixed.g_s, spec.weight)
    for a, b in zip((*exact, *products), (*mixed, *mixed_products)):
        assert b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0, atol=0)
