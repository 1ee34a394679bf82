"""Tests of CrossIterationBatchNorm2d: errors first, then the reference comparison, then the behaviour."""
import copy
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from cbn_mmdet.models.cbn import CrossIterationBatchNorm2d as CBN
from cbn_mmdet.models.cbn import resolve_auto_window
from cbn_mmdet.ops.cbn_stats import batch_moments

from .reference import ReferenceCBN


def sgd_step(params, lr=0.05):
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.sub_(lr * p.grad)
                p.grad = None


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize('kwargs, match', [
    (dict(window_size=0), 'window_size.*0'),
    (dict(window_size=-2), 'window_size.*-2'),
    (dict(window_size=2.0), 'window_size.*2.0'),
    (dict(window_size=True), 'window_size.*True'),
    (dict(window_size='big'), "window_size.*'big'"),
    (dict(eps=0), 'eps.*0'),
    (dict(eps=-1e-5), 'eps.*-1e-05'),
    (dict(momentum=1.5), 'momentum.*1.5'),
    (dict(momentum=-0.1), 'momentum.*-0.1'),
    (dict(compensate='yes'), "compensate.*'yes'"),
    (dict(stat_grad_subsample=0), 'stat_grad_subsample.*0'),
    (dict(stat_grad_subsample=2.0), 'stat_grad_subsample.*2.0'),
    (dict(stat_grad_subsample=True), 'stat_grad_subsample.*True'),
])
def test_invalid_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CBN(8, **kwargs)


@pytest.mark.parametrize('num_features', [0, -3, 2.5, True])
def test_invalid_num_features(num_features):
    with pytest.raises(ValueError, match=f'num_features.*{num_features}'):
        CBN(num_features)


def test_window_size_setter_validates():
    layer = CBN(4)
    with pytest.raises(ValueError, match='window_size.*0'):
        layer.window_size = 0
    with pytest.raises(ValueError, match='stat_grad_subsample.*0'):
        layer.stat_grad_subsample = 0
    layer.stat_grad_subsample = 3
    assert layer.stat_grad_subsample == 3


def test_not_4d_input():
    with pytest.raises(ValueError, match=r'expected 4D input \(got 3D input\)'):
        CBN(4)(torch.randn(2, 4, 5))


def test_auto_window_without_hook_raises_at_first_training_forward():
    layer = CBN(4, window_size='auto')
    conv = nn.Conv2d(3, 4, 1)
    layer.eval()
    layer(conv(torch.randn(2, 3, 4, 4)))  # eval is fine
    layer.train()
    with pytest.raises(RuntimeError, match="window_size='auto'.*CBNBurnInHook"):
        layer(conv(torch.randn(2, 3, 4, 4)))


def test_auto_window_rule():
    assert [resolve_auto_window(b) for b in (1, 2, 3, 4, 8, 16, 32)] == [8, 8, 6, 4, 2, 1, 1]
    with pytest.raises(ValueError, match='images_per_gpu.*0'):
        resolve_auto_window(0)


def test_shared_layer_called_twice_in_one_iteration_raises():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    model = nn.Sequential()
    model.add_module('head', nn.Module())
    model.head.norm = CBN(4, window_size=2)
    model.head.norm(conv(torch.randn(2, 3, 6, 6)))
    with pytest.raises(RuntimeError, match=r"called twice in one training iteration") as err:
        model.head.norm(conv(torch.randn(2, 3, 6, 6)))
    assert "'head.norm'" in str(err.value)


# ----------------------------------------------------------------------------- reference comparison
CONV_VARIANTS = {
    '3x3': dict(kernel_size=3, padding=1),
    '1x1': dict(kernel_size=1),
    'stride2': dict(kernel_size=3, padding=1, stride=2),
    'dilation2': dict(kernel_size=3, padding=2, dilation=2),
    'groups2': dict(kernel_size=3, padding=1, groups=2),
    # every geometric argument different along the two axes (the maps are non-square too)
    'nonsquare': dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
}
# layer mode -> (compensate, backward): Naive CBN, the authors' backward and the exact backward
MODES = {'naive': (False, 'authors'), 'authors': (True, 'authors'), 'exact': (True, 'exact')}


def build_pair(variant, bias, k, mode, dtype, affine=True):
    torch.manual_seed(0)
    compensate, backward = MODES[mode]
    conv1 = nn.Conv2d(4, 8, bias=bias, **CONV_VARIANTS[variant]).to(dtype)
    conv2 = nn.Conv2d(8, 8, bias=bias, **CONV_VARIANTS[variant]).to(dtype)
    cbn1, cbn2 = (CBN(8, window_size=k, compensate=compensate, backward=backward, affine=affine).to(dtype)
                  for _ in range(2))
    ref_convs = copy.deepcopy(conv1), copy.deepcopy(conv2)
    refs = tuple(ReferenceCBN(8, k, compensate, dtype=dtype, exact=backward == 'exact', affine=affine)
                 for _ in range(2))
    return (conv1, conv2, cbn1, cbn2), (ref_convs, refs)


class Momentum:
    """SGD with momentum on a list of tensors (one instance per model, the same rule for both)."""

    def __init__(self, params, lr=0.05, momentum=0.9):
        self.params, self.lr, self.mom = list(params), lr, momentum
        self.buf = [torch.zeros_like(p) for p in self.params]

    def step(self):
        with torch.no_grad():
            for p, b in zip(self.params, self.buf):
                assert p.grad is not None, p.shape
                b.mul_(self.mom).add_(p.grad)
                p.sub_(self.lr * b)
                p.grad = None


def run_against_reference(variant, bias, k, mode, dtype, iters=20, affine=True, lr=0.05, size=(9, 7)):
    """Both models over ``iters`` SGD-momentum steps on the same data; the worst relative difference of outputs,
    input gradients, running statistics and every parameter's gradient."""
    (conv1, conv2, cbn1, cbn2), ((rconv1, rconv2), (ref1, ref2)) = build_pair(variant, bias, k, mode, dtype, affine)
    params = [*conv1.parameters(), *conv2.parameters(), *cbn1.parameters(), *cbn2.parameters()]
    rparams = [*rconv1.parameters(), *rconv2.parameters()] + ([ref1.weight, ref1.bias, ref2.weight, ref2.bias]
                                                              if affine else [])
    opt, ropt = Momentum(params, lr=lr), Momentum(rparams, lr=lr)
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for it in range(iters):
        inp = (torch.randn(2, 4, *size, generator=gen, dtype=dtype) * 2 + 0.5).requires_grad_()
        target = torch.randn(1, generator=gen, dtype=dtype)
        out = cbn2(conv2(F.relu(cbn1(conv1(inp)))))
        rinp = inp.detach().clone().requires_grad_()
        rout = ref2(rconv2, F.relu(ref1(rconv1, rinp)))
        proj = torch.randn(out.shape, generator=gen, dtype=dtype)
        ((out * proj).sum() + target * out.square().mean()).backward()
        ((rout * proj).sum() + target * rout.square().mean()).backward()
        pairs = [(out, rout), (inp.grad, rinp.grad), (cbn1.running_mean, ref1.running_mean),
                 (cbn1.running_var, ref1.running_var), (cbn2.running_mean, ref2.running_mean),
                 (cbn2.running_var, ref2.running_var)] + [(p.grad, q.grad) for p, q in zip(params, rparams)]
        for a, b in pairs:
            worst = max(worst, (a.detach() - b.detach()).abs().max().item() / (1 + b.detach().abs().max().item()))
        opt.step()
        ropt.step()
    assert cbn1.window_length == min(k - 1, iters)
    return worst


@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('variant', list(CONV_VARIANTS))
@pytest.mark.parametrize('mode, k', [('exact', 1)] + [(mode, k) for mode in MODES for k in (2, 4, 8)])
def test_matches_reference_fp64(k, mode, variant, bias):
    assert run_against_reference(variant, bias, k, mode, torch.float64) < 1e-8


@pytest.mark.parametrize('mode', list(MODES))
def test_matches_reference_without_affine_fp64(mode):
    assert run_against_reference('nonsquare', True, 4, mode, torch.float64, affine=False) < 1e-8


@pytest.mark.parametrize('mode', list(MODES))
@pytest.mark.parametrize('k', [2, 4])
def test_matches_reference_fp32(k, mode):
    assert run_against_reference('3x3', True, k, mode, torch.float32) < 1e-4


def test_compensation_matters():
    """Naive and compensated CBN differ on the same trajectory (so the reference test can tell them apart)."""
    (conv1, _, cbn1, _), _ = build_pair('3x3', True, 4, 'exact', torch.float64)
    naive = CBN(8, window_size=4, compensate=False).double()
    conv_n = copy.deepcopy(conv1)
    diffs = []
    for it in range(6):
        inp = torch.randn(2, 4, 10, 10, dtype=torch.float64)
        y = cbn1(conv1(inp))
        yn = naive(conv_n(inp))
        diffs.append((y - yn).abs().max().item())
        y.square().mean().backward()
        yn.square().mean().backward()
        sgd_step([*conv1.parameters(), *cbn1.parameters()], lr=0.5)
        sgd_step([*conv_n.parameters(), *naive.parameters()], lr=0.5)
    assert diffs[0] == 0 and max(diffs[2:]) > 1e-3


# ----------------------------------------------------------------------------- BN equivalence
@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize('momentum', [0.1, None])
def test_k1_is_batchnorm_in_training(dtype, tol, momentum):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1).to(dtype)
    conv_bn = copy.deepcopy(conv)
    cbn = CBN(6, window_size=1, momentum=momentum).to(dtype)
    bn = nn.BatchNorm2d(6, momentum=momentum).to(dtype)
    with torch.no_grad():
        cbn.weight.uniform_(0.5, 1.5)
        cbn.bias.uniform_(-1, 1)
    bn.load_state_dict(cbn.state_dict())
    for it in range(5):
        inp = torch.randn(2, 3, 7, 7, dtype=dtype) * 3 + 1
        a, b = inp.clone().requires_grad_(), inp.clone().requires_grad_()
        y, yb = cbn(conv(a)), bn(conv_bn(b))
        g = torch.randn_like(y)
        (y * g).sum().backward()
        (yb * g).sum().backward()
        torch.testing.assert_close(y, yb, rtol=tol, atol=tol)
        torch.testing.assert_close(a.grad, b.grad, rtol=tol, atol=tol)
        torch.testing.assert_close(cbn.weight.grad, bn.weight.grad, rtol=tol, atol=tol)
        torch.testing.assert_close(cbn.bias.grad, bn.bias.grad, rtol=tol, atol=tol)
        torch.testing.assert_close(cbn.running_mean, bn.running_mean, rtol=tol, atol=tol)
        torch.testing.assert_close(cbn.running_var, bn.running_var, rtol=tol, atol=tol)
        assert cbn.num_batches_tracked == bn.num_batches_tracked
        sgd_step([*conv.parameters(), *cbn.parameters()])
        sgd_step([*conv_bn.parameters(), *bn.parameters()])


def test_eval_is_batchnorm():
    cbn, bn = CBN(6, window_size=4), nn.BatchNorm2d(6)
    with torch.no_grad():
        cbn.running_mean.uniform_(-1, 1)
        cbn.running_var.uniform_(0.5, 2)
        cbn.weight.uniform_(0.5, 1.5)
    bn.load_state_dict(cbn.state_dict())
    cbn.eval()
    bn.eval()
    x = torch.randn(3, 6, 5, 5)
    assert torch.equal(cbn(x), bn(x))


# ----------------------------------------------------------------------------- robustness
def trained_layer(k=3, iters=4, c=4, **kwargs):
    conv = nn.Conv2d(3, c, 3, padding=1)
    layer = CBN(c, window_size=k, **kwargs)
    for _ in range(iters):
        layer(conv(torch.randn(2, 3, 6, 6))).square().mean().backward()
        sgd_step([*conv.parameters(), *layer.parameters()])
    return conv, layer


def test_empty_batch_keeps_graph_and_state():
    conv, layer = trained_layer()
    before = (layer.running_mean.clone(), layer.running_var.clone(), layer.num_batches_tracked.clone(),
              layer.window_length)
    y = layer(conv(torch.randn(0, 3, 6, 6)))
    assert y.shape == (0, 4, 6, 6) and y.grad_fn is not None
    y.sum().backward()
    assert layer.weight.grad is not None
    assert torch.equal(before[0], layer.running_mean) and torch.equal(before[1], layer.running_var)
    assert before[2] == layer.num_batches_tracked and before[3] == layer.window_length
    # the empty call did not count as an iteration: the next real one is accepted
    layer(conv(torch.randn(2, 3, 6, 6)))


def test_single_value_per_channel():
    conv, layer = trained_layer()
    y = layer(conv(torch.randn(1, 3, 1, 1)))
    assert torch.isfinite(y).all()
    fresh = CBN(4, window_size=3)
    with pytest.raises(ValueError, match='Expected more than 1 value per channel'):
        fresh(conv(torch.randn(1, 3, 1, 1)))
    with pytest.raises(ValueError, match='Expected more than 1 value per channel'):
        nn.BatchNorm2d(4)(conv(torch.randn(1, 3, 1, 1)))


def test_non_finite_iteration_is_dropped():
    """A non-finite batch uses its own statistics, leaves the running statistics alone, and takes a window slot with
    weight 0 stored as zeros (decided on the device): no NaN enters the history, and it is not averaged in."""
    conv, layer = trained_layer(k=4, iters=2)  # window: 2 of 3 slots filled
    state = layer.get_window_state()
    rm, rv, nbt = layer.running_mean.clone(), layer.running_var.clone(), layer.num_batches_tracked.clone()
    bad = torch.randn(2, 3, 6, 6)
    bad[0, 0, 0, 0] = float('nan')
    y = layer(conv(bad))
    assert not torch.isfinite(y).all()
    assert torch.equal(rm, layer.running_mean) and torch.equal(rv, layer.running_var)
    assert torch.equal(nbt, layer.num_batches_tracked)
    after = layer.get_window_state()
    assert after['count'] == 3 and all(torch.isfinite(v).all() for v in after['tensors'].values())
    assert after['tensors']['w'].tolist() == [1.0, 1.0, 0.0]
    assert all(torch.equal(state['tensors'][k][:2], after['tensors'][k][:2]) for k in state['tensors'])
    assert all(not after['tensors'][k][2].any() for k in after['tensors'])
    y.sum().backward()  # a new iteration (its gradients are NaN: the kernel is not stepped)
    x = conv(torch.randn(2, 3, 6, 6))
    twin = copy.deepcopy(layer)  # the same window with the skipped slot removed
    twin.set_window_state(dict(state, window_size=3, count=2, next=0,
                               tensors={k: v[:2] for k, v in state['tensors'].items()}))
    y = layer(x)
    torch.testing.assert_close(y, twin(x), rtol=1e-6, atol=1e-6)  # weight 0 is the same as absent
    assert torch.isfinite(y).all() and torch.isfinite(layer.running_var).all()


def test_non_finite_compensation_falls_back_to_the_batch():
    conv, layer = trained_layer(k=3, iters=3)
    layer._window.tensors['p_mu'].fill_(3e38)  # as if the kernel had diverged: the mean's delta overflows
    x = conv(torch.randn(2, 3, 6, 6))
    bn = nn.BatchNorm2d(4)
    bn.load_state_dict(layer.state_dict())
    y = layer(x)
    assert torch.isfinite(layer.running_mean).all() and torch.isfinite(layer.running_var).all()
    with torch.no_grad():
        torch.testing.assert_close(y, bn(x), rtol=1e-5, atol=1e-5)


def test_stable_for_large_mean_small_std_fp32():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 1, bias=True)
    with torch.no_grad():
        conv.weight.fill_(0.01)
        conv.bias.fill_(100.0)
    layer = CBN(3, window_size=4)
    for _ in range(5):
        inp = torch.randn(4, 2, 8, 8)
        x = conv(inp)
        y = layer(x)
        # the window holds near-identical iterations: the output must be close to BN in fp64
        xd = x.detach().double()
        ref = (xd - xd.mean((0, 2, 3), keepdim=True)) / torch.sqrt(xd.var((0, 2, 3), unbiased=False,
                                                                          keepdim=True) + 1e-5)
        assert y.std().item() == pytest.approx(ref.std().item(), rel=0.3)
        assert y.abs().max() < 10
        y.sum().backward()
        with torch.no_grad():
            conv.weight.add_(1e-4)


def test_large_mean_with_compensation_fp32_matches_fp64():
    """fp32 with |mu| = 100 >> std ~ 0.002 stays within a derived bound of the fp64 layer, on any CPU or GPU.

    Error model, in units of the channel's std sigma (fp64). fp32 cannot hold mu better than one rounding,
    ``eps = u |mu| / sigma`` with ``u = 2**-24`` (here eps ~ 3e-3); an uncentred second moment would instead lose
    ``u mu^2 / sigma^2 ~ 1e2``, i.e. everything. Two measured terms cover what depends on the backend's kernels:
    ``e_x``, the fp32 conv's own output error (max over the trajectory, since past iterations' means carry theirs),
    and ``e_red``, the error of the fp32 mean reduction of the same fp32 x (CPU accumulates in fp64, CUDA's
    Welford in fp32: each backend pays what it pays, and the test measures it). The rest are IEEE elementwise
    roundings, each <= eps, counted:
      * the window mean mu_bar: compensation ``mu + dmu`` (1), the mean of T <= 4 rows (<= T), and the
        normalization, which some backends evaluate as ``x * a + (beta - mu_bar * a)`` (4): 9 eps.
        With the inputs' errors: ``|y - y64| <= 2 e_x + e_red + 9 eps`` through the mean.
      * the std sigma_bar, whose relative error multiplies ``|x_hat| <= X`` (measured): the input's error moves s
        by <= 2 e_x relative (sigma by e_x), and the compensated variances carry <= 6 roundings of size eps
        relative to s (the centring of ds/dW and of s_c cancels terms of size |mu|), so sigma <= 3 eps.
    Hence ``2 e_x + e_red + 9 eps + X (e_x + 3 eps)``. Measured on one x86 CPU: at most 0.09 of this bound.
    """
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    with torch.no_grad():
        conv.weight.mul_(0.01)
        conv.bias.fill_(100.0)
    conv64 = copy.deepcopy(conv).double()
    layer, layer64 = CBN(3, window_size=4), CBN(3, window_size=4).double()
    e_x = e_red = 0.0
    unit = 2.0**-24  # fp32 unit roundoff
    for _ in range(6):
        inp = torch.randn(2, 2, 8, 8)
        x, x64 = conv(inp), conv64(inp.double())
        y, y64 = layer(x), layer64(x64)
        assert y.std() > 0.5  # really normalized, not flattened by cancellation
        mu64 = x64.mean((0, 2, 3))
        sd64 = x64.std((0, 2, 3), unbiased=False)
        e_x = max(e_x, ((x.double() - x64).abs().amax((0, 2, 3)) / sd64).max().item())
        e_red = max(e_red, ((batch_moments(x.detach())[0].double() - x.detach().double().mean(
            (0, 2, 3))).abs() / sd64).max().item())
        eps = (unit * mu64.abs() / sd64).max().item()
        x_hat = ((x64 - mu64.view(1, -1, 1, 1)).abs().amax((0, 2, 3)) / sd64).max().item()
        bound = 2 * e_x + e_red + 9 * eps + x_hat * (e_x + 3 * eps)
        assert (y.double() - y64).abs().max().item() <= bound
        y.square().mean().backward()
        y64.square().mean().backward()
        with torch.no_grad():
            for p, p64 in zip(conv.parameters(), conv64.parameters()):
                p.sub_(1e-3 * p.grad.sign())
                p64.copy_(p)
                p.grad = p64.grad = None
    assert layer.window_length == 3


def test_no_conv_warns_once_and_acts_as_bn():
    layer, bn = CBN(4, window_size=4), nn.BatchNorm2d(4)
    conv = nn.Conv2d(3, 4, 3)
    with pytest.warns(UserWarning, match='ReluBackward0.*plain BatchNorm'):
        y = layer(F.relu(conv(torch.randn(2, 3, 6, 6))))
    x = F.relu(conv(torch.randn(2, 3, 6, 6)))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        y = layer(x)
    torch.testing.assert_close(y, bn(x), rtol=1e-5, atol=1e-5)
    assert layer.window_length == 0
    with pytest.warns(UserWarning, match='no autograd graph'):
        CBN(4)(torch.randn(2, 4, 3, 3))
    lin = nn.Linear(3, 4)
    with pytest.warns(UserWarning, match='AddmmBackward0|ViewBackward0'):
        CBN(4)(lin(torch.randn(8, 3)).view(2, 4, 2, 2))


def test_finds_conv_without_common_parent_and_in_sequential():
    conv, layer = nn.Conv2d(3, 4, 3), CBN(4, window_size=3)
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), CBN(4, window_size=3))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        for _ in range(3):
            layer(conv(torch.randn(2, 3, 6, 6))).sum().backward()
            seq(torch.randn(2, 3, 6, 6)).sum().backward()
    assert layer.window_length == 2 and seq[1].window_length == 2


def test_iterations_advance_on_kernel_change_without_backward():
    conv, layer = nn.Conv2d(3, 4, 3), CBN(4, window_size=4)
    with torch.no_grad():
        pass
    for _ in range(3):
        layer(conv(torch.randn(2, 3, 6, 6)))
        with torch.no_grad():
            conv.weight.add_(0.01)
    assert layer.window_length == 3


def test_gradient_checkpointing_replays(use_reentrant=True):
    for reentrant in (True, False):
        torch.manual_seed(0)
        conv, layer = nn.Conv2d(3, 4, 3, padding=1), CBN(4, window_size=3)
        conv_p, layer_p = copy.deepcopy(conv), copy.deepcopy(layer)
        for it in range(5):
            inp = torch.randn(2, 3, 6, 6, requires_grad=True)
            inp_p = inp.detach().clone().requires_grad_()
            y = checkpoint(lambda t: layer(conv(t)), inp, use_reentrant=reentrant)
            y_p = layer_p(conv_p(inp_p))
            g = torch.randn_like(y)
            (y * g).sum().backward()
            (y_p * g).sum().backward()
            torch.testing.assert_close(y, y_p)
            torch.testing.assert_close(inp.grad, inp_p.grad)
            torch.testing.assert_close(layer.running_var, layer_p.running_var)
            assert layer.window_length == layer_p.window_length == min(it + 1, 2)
            sgd_step([*conv.parameters(), *layer.parameters()])
            sgd_step([*conv_p.parameters(), *layer_p.parameters()])


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_low_precision_inputs_keep_fp32_statistics(dtype):
    conv, layer = nn.Conv2d(3, 4, 3, padding=1).to(dtype), CBN(4, window_size=3).to(dtype)
    for _ in range(3):
        y = layer(conv(torch.randn(2, 3, 6, 6, dtype=dtype)))
        assert y.dtype == dtype and torch.isfinite(y).all()
        y.float().square().mean().backward()
        sgd_step([*conv.parameters(), *layer.parameters()])
    assert layer._window.tensors['g_s'].dtype == torch.float32


def test_autocast_uses_fp32_kernel():
    conv, layer = nn.Conv2d(3, 4, 3, padding=1), CBN(4, window_size=3)
    for _ in range(3):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = layer(conv(torch.randn(2, 3, 6, 6)))
        assert torch.isfinite(y).all()
        y.float().square().mean().backward()
        assert layer._conv_params[0] is conv.weight
        sgd_step([*conv.parameters(), *layer.parameters()])
    assert layer.window_length == 2


def test_frozen_affine_still_trains_window():
    conv, layer = nn.Conv2d(3, 4, 3), CBN(4, window_size=3)
    layer.weight.requires_grad_(False)
    layer.bias.requires_grad_(False)
    for _ in range(3):
        layer(conv(torch.randn(2, 3, 6, 6))).sum().backward()
        sgd_step(conv.parameters())
    assert layer.window_length == 2


def test_deepcopy_pickle_and_device_move_keep_window():
    conv, layer = trained_layer()
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer).to('cpu')):
        assert clone.window_length == layer.window_length
        assert torch.equal(clone._window.tensors['g_s'], layer._window.tensors['g_s'])
    moved = copy.deepcopy(layer).to(torch.float64)
    assert moved._window.tensors['g_s'].dtype == torch.float32  # statistics keep their dtype


def test_state_dict_is_batchnorm():
    conv, layer = trained_layer()
    bn = nn.BatchNorm2d(4)
    assert set(layer.state_dict()) == set(bn.state_dict())
    bn.load_state_dict(layer.state_dict(), strict=True)
    fresh = CBN(4)
    fresh.load_state_dict(bn.state_dict(), strict=True)
    assert torch.equal(fresh.running_var, layer.running_var)


def test_window_state_round_trip():
    conv, layer = trained_layer(k=4, iters=5)
    state = layer.get_window_state()
    fresh = CBN(4, window_size=4)
    fresh.set_window_state(pickle.loads(pickle.dumps(state)))
    assert fresh.window_length == 3
    with pytest.raises(ValueError, match='window state holds'):
        CBN(5, window_size=4).set_window_state(state)
    with pytest.raises(ValueError, match='not a CBN window state'):
        fresh.set_window_state({'count': 1})


def test_naive_window_keeps_no_gradients_and_switching_mode_is_safe():
    conv, layer = trained_layer(k=3, compensate=False)
    assert layer.window_length == 2 and layer._window.tensors['g_s'] is None
    layer.compensate = True
    y = layer(conv(torch.randn(2, 3, 6, 6)))  # restarts its window instead of compensating without gradients
    assert torch.isfinite(y).all() and layer.window_length == 1


def test_extra_repr():
    assert 'window_size=4, compensate=taylor' in repr(CBN(4))
    assert 'compensate=naive' in repr(CBN(4, compensate=False))
    assert 'stat_grad_subsample' not in repr(CBN(4)) and 'stat_grad_subsample=4' in repr(CBN(4, stat_grad_subsample=4))


@pytest.mark.parametrize('n, h', [(32, 7), (2, 16)])  # RoI-like (every 2nd RoI), map-like (every 2nd row)
def test_stat_grad_subsample_approximates_only_dnu(n, h):
    """Over SGD steps: the subsampled layer's mean is exactly the exact layer's (dmu/dW is kept exact), its
    variance is close but not equal, and of what it stores only ds/dW differs."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1).double()
    conv_s = copy.deepcopy(conv)
    exact, approx = CBN(8, window_size=3).double(), CBN(8, window_size=3, stat_grad_subsample=2).double()
    gen = torch.Generator().manual_seed(1)
    for it in range(6):
        u = torch.randn(n, 4, h, h, dtype=torch.float64, generator=gen) + 0.5
        x, x_s = conv(u), conv_s(u)
        y, y_s = exact(x), approx(x_s)
        if it >= 2:  # windows full, kernels differ between iterations: compensation at work
            torch.testing.assert_close(approx.running_mean, exact.running_mean, rtol=1e-12, atol=1e-12)
            assert not torch.allclose(approx.running_var, exact.running_var, rtol=1e-9, atol=0)
            torch.testing.assert_close(approx.running_var, exact.running_var, rtol=2e-2, atol=0)
        g = torch.randn(y.shape, dtype=torch.float64, generator=gen)
        (y * g).sum().backward()
        (y_s * g).sum().backward()
        with torch.no_grad():  # the same step for both: their kernels stay equal
            for p, q in zip(conv.parameters(), conv_s.parameters()):
                p.sub_(0.05 * p.grad)
                q.copy_(p)
                p.grad = q.grad = None
    t_e, t_a = exact._window.tensors, approx._window.tensors
    torch.testing.assert_close(t_a['g_mu'], t_e['g_mu'], rtol=0, atol=0)
    assert not torch.allclose(t_a['g_s'], t_e['g_s'])


def test_history_memory_is_one_kernel_per_stored_iteration():
    conv, layer = trained_layer(k=4, iters=5, c=8)
    t = layer._window.tensors
    kernel = conv.weight.numel()
    big = [k for k, v in t.items() if v is not None and v[0].numel() >= kernel]
    assert big == ['g_s']
    assert t['g_mu'][0].numel() == conv.weight[0].numel()  # one patch (groups=1)


# ----------------------------------------------------------------------------- host syncs and memory formats
class SyncCounter(TorchFunctionMode):
    """Counts the Python-visible calls that make the host wait for a device value: reading a tensor as a Python
    number or bool, and indexing with a boolean mask (its result's shape depends on the data)."""
    READS = {'__bool__', 'item', '__float__', '__int__', '__index__', 'tolist', 'allclose', 'equal', 'nonzero',
             'masked_select', 'numpy'}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, '__name__', '')
        if name in self.READS or (name == '__getitem__' and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool
                for i in (args[1] if isinstance(args[1], tuple) else (args[1], )))):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def test_sync_counter_sees_syncs():
    t = torch.randn(4)
    with SyncCounter() as counter:
        bool(t.sum() > 0), t.max().item(), t[t > 0], float(t[0])
    assert counter.calls == ['__bool__', 'item', '__getitem__', '__float__']


@pytest.mark.parametrize('momentum', [0.1, None])
@pytest.mark.parametrize('checkpointed', [False, True])
@pytest.mark.parametrize('backward', ['exact', 'authors'])
def test_training_iteration_makes_no_host_sync(backward, checkpointed, momentum):
    """Burn-in (k=1 use, collecting), open windows, and checkpoint replay: no Python-visible host sync."""
    conv = nn.Conv2d(3, 4, 3, padding=1)
    layer = CBN(4, window_size=3, backward=backward, momentum=momentum)
    forward = (lambda t: checkpoint(lambda u: layer(conv(u)), t, use_reentrant=False)) if checkpointed else (
        lambda t: layer(conv(t)))
    for it in range(5):
        layer.begin_iteration(it, use_window=it >= 2, collect=it >= 1)
        inp = torch.randn(2, 3, 6, 6, requires_grad=True)
        with SyncCounter() as counter:
            forward(inp).square().mean().backward()
            sgd_step([*conv.parameters(), *layer.parameters()])
        assert counter.calls == [], (it, counter.calls)
    assert layer.window_length == 2


@pytest.mark.parametrize('backward', ['exact', 'authors'])
@pytest.mark.parametrize('input_cl, kernel_cl', [(True, False), (False, True), (True, True)])
def test_channels_last_equals_contiguous(input_cl, kernel_cl, backward):
    """Outputs, gradients and running statistics match the contiguous layer to 1e-5 relative in fp32.

    The two layouts reduce in different orders, so they agree to a few fp32 roundings of the summands, not bit for
    bit. "Relative" is to the size of what is summed: the conv bias's gradient is ``sum dL/dx`` over N*H*W
    positions, which nearly cancels (it is 0 for BN), so its scale is ``sum |dL/dx|``, not its own value."""
    torch.manual_seed(0)
    conv, layer = nn.Conv2d(4, 8, 3, padding=1), CBN(8, window_size=3, backward=backward)
    conv_cl, layer_cl = copy.deepcopy(conv), copy.deepcopy(layer)
    if kernel_cl:
        conv_cl.to(memory_format=torch.channels_last)
    fmt = torch.channels_last if input_cl else torch.contiguous_format
    for _ in range(4):
        inp = torch.randn(2, 4, 7, 5)
        a, b = inp.clone().requires_grad_(), inp.to(memory_format=fmt).requires_grad_()
        x, x_cl = conv(a), conv_cl(b)
        x.retain_grad()
        y, y_cl = layer(x), layer_cl(x_cl)
        g = torch.randn_like(y)
        (y * g).sum().backward()
        (y_cl * g).sum().backward()
        pairs = [(y, y_cl), (a.grad, b.grad), (layer.running_var, layer_cl.running_var)] + [
            (p.grad, q.grad) for p, q in zip([conv.weight, *layer.parameters()],
                                             [conv_cl.weight, *layer_cl.parameters()])]
        for u, v in pairs:
            torch.testing.assert_close(v, u, rtol=1e-5, atol=1e-5 * u.abs().max().item())
        bias_scale = x.grad.abs().sum((0, 2, 3)).max().item()
        torch.testing.assert_close(conv_cl.bias.grad, conv.bias.grad, rtol=0, atol=1e-5 * bias_scale)
        sgd_step([*conv.parameters(), *layer.parameters()])
        sgd_step([*conv_cl.parameters(), *layer_cl.parameters()])
    assert layer_cl.window_length == 2
