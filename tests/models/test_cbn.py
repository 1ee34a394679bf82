"""Tests of CrossIterationBatchNorm2d's behaviour: errors, BN equivalence, robustness, state.

The comparison with the independent reference is in test_cbn_reference.py; numerics (precision, autocast, memory
formats, host syncs) are in test_cbn_numerics.py."""
import copy
import os.path as osp
import pickle
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cbn_mmdet.models.cbn import CrossIterationBatchNorm2d as CBN
from cbn_mmdet.models.running import packed_running
from cbn_mmdet import resolve_auto_window
from cbn_mmdet.ops import compensate, fused

from .common import DEVICES, sgd_step


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
    (dict(backward='autograd'), "backward must be one of \\('exact', 'authors'\\), got 'autograd'"),
    (dict(second_order=-1), 'second_order.*-1'),
    (dict(second_order=4.0), 'second_order.*4.0'),
    (dict(second_order=True), 'second_order.*True'),
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
    with pytest.raises(ValueError, match="backward must be one of.*got None"):
        layer.backward = None
    layer.backward = 'authors'
    assert layer.backward == 'authors' and "backward='authors'" in repr(layer)


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


def test_shared_layer_refuses_a_change_of_calls_per_iteration():
    """An unmanaged layer finds its iterations by the backward; the calls per iteration are fixed by the first, and
    a later iteration with more (at once) or fewer (when the next one begins) calls raises, naming the layer and
    both counts. Positions per call and their windows: tests/models/test_cbn_shared.py."""
    conv = nn.Conv2d(3, 4, 3, padding=1)
    model = nn.Sequential()
    model.add_module('head', nn.Module())
    model.head.norm = CBN(4, window_size=2)

    def iteration(calls):
        sum(model.head.norm(conv(torch.randn(2, 3, 6, 6))).sum() for _ in range(calls)).backward()

    iteration(2)
    iteration(2)
    assert model.head.norm.window_lengths == [1, 1] and model.head.norm.calls_per_iteration == 2
    with pytest.raises(RuntimeError, match=r"'head.norm' was called 3 times in this training iteration, but 2 "
                                           r"times in each earlier one"):
        iteration(3)
    model.head.norm.reset_window()
    iteration(2)
    iteration(1)
    with pytest.raises(RuntimeError, match=r"'head.norm' was called 1 times in the last training iteration, but 2 "
                                           r"times in each earlier one") as err:
        iteration(1)
    # the likely causes besides a shared head: a pass whose count follows the batch, or a forgotten model.eval()
    assert "OHEM's hard mining" in str(err.value) and 'forgot model.eval()' in str(err.value)


# ----------------------------------------------------------------------------- BN equivalence
# k=1 runs the same formulas as BN through other kernels (our moments, then batch_norm with them): they differ by a few
# roundings of values of size <= ~10 per step (fp32 u = 6e-8, fp64 1.1e-16), so 1e-5 / 1e-10 hold on any backend
@pytest.mark.parametrize('dtype, tol', [(torch.float32, 1e-5), (torch.float64, 1e-10)])
@pytest.mark.parametrize('momentum', [0.1, None])
@pytest.mark.parametrize('device', DEVICES)
def test_k1_is_batchnorm_in_training(dtype, tol, momentum, device):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1).to(device, dtype)
    conv_bn = copy.deepcopy(conv)
    cbn = CBN(6, window_size=1, momentum=momentum).to(device, dtype)
    bn = nn.BatchNorm2d(6, momentum=momentum).to(device, dtype)
    with torch.no_grad():
        cbn.weight.uniform_(0.5, 1.5)
        cbn.bias.uniform_(-1, 1)
    bn.load_state_dict(cbn.state_dict())
    for it in range(5):
        inp = (torch.randn(2, 3, 7, 7, dtype=dtype) * 3 + 1).to(device)
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


@pytest.mark.parametrize('device', DEVICES)
def test_eval_is_batchnorm(device):
    """After real training steps, eval mode is ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``."""
    conv, layer = trained_layer(k=3, iters=5, device=device)
    layer.eval()
    x = torch.randn(3, 4, 5, 5, device=device) * 2 + 1
    shape = (1, -1, 1, 1)
    expected = ((x - layer.running_mean.view(shape)) / torch.sqrt(layer.running_var.view(shape) + layer.eps)
                * layer.weight.view(shape) + layer.bias.view(shape))
    assert not torch.allclose(layer.running_var, torch.ones_like(layer.running_var))  # really trained
    # a few fp32 roundings of values of size |x_hat| <= ~10: 1e-5 relative holds on any backend
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- robustness
def trained_layer(k=3, iters=4, c=4, device='cpu', **kwargs):
    conv = nn.Conv2d(3, c, 3, padding=1).to(device)
    layer = CBN(c, window_size=k, **kwargs).to(device)
    for _ in range(iters):
        (layer(conv(torch.randn(2, 3, 6, 6, device=device))) - 1).square().mean().backward()
        sgd_step([*conv.parameters(), *layer.parameters()])
    return conv, layer


@pytest.mark.parametrize('second_order', [0, 4])
def test_double_mid_run_keeps_the_window(second_order):
    """model.double() after some iterations: the statistics turn fp64 and the stored fp32 iterations follow them
    (exactly: fp64 holds every fp32 value), instead of being dropped for k - 1 iterations of BN."""
    conv, layer = trained_layer(second_order=second_order)
    stored = {k: v.clone() for k, v in layer.window_at(0).tensors().items()}
    conv.double(), layer.double()
    twin = copy.deepcopy(layer)  # the same window, read before the fp64 call
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    layer(conv(x)).sum().backward()
    assert layer.window_at(0).dtype == torch.float64 and layer.window_length == 2
    for key, value in twin.window_at(0).tensors().items():
        assert torch.equal(value, stored[key])  # nothing of the window was touched by the cast itself
    slot = (layer.window_at(0).next - 1) % 2  # the other slot still holds an fp32 iteration, now in fp64
    assert torch.equal(layer.window_at(0).tensors()['mu'][1 - slot], stored['mu'][1 - slot].double())


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
    # the empty call was this iteration's call, and the backward through it ended the iteration: the next real
    # call starts a new one
    layer(conv(torch.randn(2, 3, 6, 6)))
    assert layer.calls_per_iteration == 1 and layer.window_lengths == [2]


def test_single_value_per_channel():
    conv, layer = trained_layer()
    y = layer(conv(torch.randn(1, 3, 1, 1)))
    assert torch.isfinite(y).all()
    fresh = CBN(4, window_size=3)
    with pytest.raises(ValueError, match='Expected more than 1 value per channel'):
        fresh(conv(torch.randn(1, 3, 1, 1)))
    with pytest.raises(ValueError, match='Expected more than 1 value per channel'):
        nn.BatchNorm2d(4)(conv(torch.randn(1, 3, 1, 1)))


@pytest.mark.parametrize('device', DEVICES)
def test_non_finite_iteration_is_dropped(device):
    """A non-finite batch uses its own statistics, leaves the running statistics alone, and takes a window slot with
    weight 0 stored as zeros (decided on the device): no NaN enters the history, and it is not averaged in."""
    conv, layer = trained_layer(k=4, iters=2, device=device)  # window: 2 of 3 slots filled
    state = layer.get_window_state()
    rm, rv, nbt = layer.running_mean.clone(), layer.running_var.clone(), layer.num_batches_tracked.clone()
    bad = torch.randn(2, 3, 6, 6, device=device)
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
    x = conv(torch.randn(2, 3, 6, 6, device=device))
    twin = copy.deepcopy(layer)  # the same window with the skipped slot removed
    twin.set_window_state(dict(state, window_size=3, count=2, next=0,
                               tensors={k: v[:2] for k, v in state['tensors'].items()}))
    y = layer(x)
    # weight 0 is the same as absent: the same values summed with one more exact zero term, up to the order of the
    # fp32 sums over <= 3 rows (a few u = 6e-8 of values of size <= ~3)
    torch.testing.assert_close(y, twin(x), rtol=1e-6, atol=1e-6)
    assert torch.isfinite(y).all() and torch.isfinite(layer.running_var).all()


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('how', ['compensation', 'average'])
def test_non_finite_compensation_falls_back_to_the_batch(how, device):
    """A diverged kernel: either the compensated statistics themselves are not finite, or they are finite but huge
    and their average overflows. Both fall back to the batch's own statistics (BN), decided on the device, and the
    gradients and running statistics stay finite."""
    conv, layer = trained_layer(k=3, iters=3, device=device)
    # as if recorded against a kernel that has since diverged: p_s = -inf (R = s - p_s = inf), or mean patches P
    # with <P, W_t,0> = -1e37, a finite compensated mean whose square (the spread) overflows
    bank = layer.window_at(0)
    if how == 'compensation':
        bank.stats[:, fused.R].fill_(float('inf'))
    else:
        w = conv.weight.detach()[0].reshape(-1)  # channel 0's mean is moved to -1e37
        bank.gp[layer.num_features:] = w * (-1e37 / w.square().sum())
    h = layer.window_at(0).view()
    comp = compensate(h['mu'], h['s'], h['g_mu'], h['g_s'], h['p_mu'], h['p_s'], h['bias'], conv.weight.detach(),
                      conv.bias.detach())
    finite = bool(torch.isfinite(comp.mu).all() & torch.isfinite(comp.s).all())
    assert finite == (how == 'average')  # each case reaches its own fallback
    x = conv(torch.randn(2, 3, 6, 6, device=device))
    bn = nn.BatchNorm2d(4).to(device)
    bn.load_state_dict(layer.state_dict())
    y = layer(x)
    y.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in [*conv.parameters(), *layer.parameters()])
    assert torch.isfinite(layer.running_mean).all() and torch.isfinite(layer.running_var).all()
    with torch.no_grad():
        # the same formulas through other kernels: a few fp32 roundings of values of size <= ~3 (1e-5 is ~100 u)
        torch.testing.assert_close(y, bn(x), rtol=1e-5, atol=1e-5)


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
            # the exact backward's edge to the kernel and bias survives the recomputation
            torch.testing.assert_close(conv.weight.grad, conv_p.weight.grad)
            torch.testing.assert_close(conv.bias.grad, conv_p.bias.grad)
            torch.testing.assert_close(layer.running_var, layer_p.running_var)
            assert layer.window_length == layer_p.window_length == min(it + 1, 2)
            sgd_step([*conv.parameters(), *layer.parameters()])
            sgd_step([*conv_p.parameters(), *layer_p.parameters()])


@pytest.mark.parametrize('reentrant', [True, False])
def test_two_layers_in_one_checkpointed_segment(reentrant):
    """conv -> CBN -> ReLU -> conv -> CBN in one segment, as in a checkpointed ResNet block. Non-reentrant
    checkpointing keeps no activation: the second layer's reading of its conv's input recomputes the segment during
    the forward, which calls the first layer again; that call must replay, not count as a call of its own."""
    torch.manual_seed(0)
    net = nn.ModuleList([nn.Conv2d(3, 4, 3, padding=1), CBN(4, window_size=3), nn.Conv2d(4, 4, 3, padding=1),
                         CBN(4, window_size=3)]).double()
    plain = copy.deepcopy(net)

    def run(m, t):
        return m[3](m[2](torch.relu(m[1](m[0](t)))))

    for it in range(5):
        inp = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
        inp_p = inp.detach().clone().requires_grad_()
        y = checkpoint(lambda t: run(net, t), inp, use_reentrant=reentrant)
        y_p = run(plain, inp_p)
        g = torch.randn_like(y)
        (y * g).sum().backward()
        (y_p * g).sum().backward()
        # the same ops on the same values, recomputed: bit-identical on a deterministic CPU; 1e-12 leaves room for
        # nothing but a reordered fp64 sum (u = 1.1e-16 times a few hundred terms)
        for a, b in [(y, y_p), (inp.grad, inp_p.grad)] + [(p.grad, q.grad) for p, q in
                                                          zip(net.parameters(), plain.parameters())]:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        for layer, ref in ((net[1], plain[1]), (net[3], plain[3])):
            assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked) == it + 1
            torch.testing.assert_close(layer.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
            assert layer.window_lengths == ref.window_lengths == [min(it + 1, 2)]
        sgd_step(list(net.parameters()))
        sgd_step(list(plain.parameters()))


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
        assert torch.equal(clone.window_at(0).gp, layer.window_at(0).gp)
        assert torch.equal(clone.window_at(0).stats, layer.window_at(0).stats)
    # and each trains on as the original does: the bank's views still alias the bank after a round trip
    x = conv(torch.randn(2, 3, 6, 6))
    clones = [copy.deepcopy(layer), pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)]
    outputs = [clone(x) for clone in clones]
    for clone, y in zip(clones[1:], outputs[1:]):
        assert torch.equal(y, outputs[0]) and torch.equal(clone.window_at(0).stats, clones[0].window_at(0).stats)
    moved = copy.deepcopy(layer).to(torch.float64)
    assert moved.window_at(0).gp.dtype == torch.float32  # statistics keep their dtype


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
    assert layer.window_length == 2 and not layer.window_at(0).compensating
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
    t_e, t_a = exact.window_at(0).view(), approx.window_at(0).view()
    torch.testing.assert_close(t_a['g_mu'], t_e['g_mu'], rtol=0, atol=0)
    assert not torch.allclose(t_a['g_s'], t_e['g_s'])


def test_history_memory_is_one_kernel_per_stored_iteration():
    conv, layer = trained_layer(k=4, iters=5, c=8)
    bank = layer.window_at(0)
    kernel = conv.weight.numel()
    # per stored iteration: one kernel-sized G, one patch (groups=1) and 8 per-channel fields
    assert bank.gp.shape == (8 + 1, 3, kernel // 8)
    assert bank.nbytes == 3 * (kernel + kernel // 8 + fused.FIELDS * 8) * 4
    # one layer's scratch: one entry, its zero twin (all_finite's one product) and a few per-channel rows
    assert layer.workspace_nbytes < 3 * (kernel + kernel // 8 + 16 * 8) * 4

def test_configured_window_size_wins_over_a_checkpoint():
    """A k=4 window state loaded into a k=2 layer: the layer stays k=2 and keeps the newest stored iteration; the
    other way round the three stored iterations fit the larger window, newest last."""
    conv, big = trained_layer(k=4, iters=5)  # 3 stored iterations, the ring wrapped once
    state = big.get_window_state()
    newest = big.window_at(0).view()['mu'][(big.window_at(0).next - 1) % 3]
    small = CBN(4, window_size=2)
    note = small.set_window_state(state)
    assert small.window_size == 2 and small.window_length == 1
    assert 'k=4' in note and 'k=2' in note
    assert torch.equal(small.window_at(0).view()['mu'][0], newest)
    y = small(conv(torch.randn(2, 3, 6, 6)))  # and it trains as a k=2 layer
    assert torch.isfinite(y).all() and small.window_length == 1
    larger = CBN(4, window_size=6)
    larger.set_window_state(state)
    assert larger.window_size == 6 and larger.window_length == 3
    assert torch.equal(larger.window_at(0).view()['mu'][2], newest)
    same = CBN(4, window_size=4)
    assert same.set_window_state(state) is None
    for key, value in big.window_at(0).tensors().items():  # a round trip is exact
        assert torch.equal(same.window_at(0).tensors()[key], value), key


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_module_dtype_cast_keeps_the_window_bit_for_bit(dtype):
    conv, layer = trained_layer(k=4, iters=5)
    before = layer.window_at(0).tensors()
    cast = copy.deepcopy(layer).to(dtype)
    after = cast.window_at(0).tensors()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    half = copy.deepcopy(layer).half()
    assert torch.equal(half.window_at(0).stats, layer.window_at(0).stats)
    assert half.running_mean.dtype == torch.float16  # the running statistics follow the cast, as BN's do


def test_window_state_written_before_the_bank_loads():
    """Window states written before the static bank kept no intercepts: ``p_mu``, ``p_s`` and the conv bias at
    tau instead. Such a state (here the same window, with the bias split out of ``p_mu``) loads and normalizes as
    the original layer does."""
    conv, layer = trained_layer(k=4, iters=5)
    state = layer.get_window_state()
    old = copy.deepcopy(state)
    t = old['tensors']
    del t['a_mu'], t['a_s']
    t['bias'] = torch.randn_like(t['mu'])
    t['p_mu'] = t['p_mu'] - t['bias']  # the same compensation: p_mu + bias is what it subtracts
    fresh = CBN(4, window_size=4)
    fresh.load_state_dict(layer.state_dict())
    fresh.set_window_state(old)
    x = conv(torch.randn(2, 3, 6, 6))
    # R = s - p_s is recomputed from two stored values (the mean needs no intercept): a few fp32 roundings
    # (u = 6e-8) of values of size <= ~10, against outputs of size ~3
    torch.testing.assert_close(fresh(x), layer(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('bias', ['frozen', 'derived', 'trainable', 'none'])
@pytest.mark.parametrize('groups', [1, 2])
def test_a_bias_outside_the_graph_keeps_the_window_mean_exact(bias, groups):
    """The compensated mean is <P, W_t> + b_t; a conv bias that is not in the graph (frozen, or computed from another
    tensor) has no readable value, and the window keeps the mean's intercept for it instead. Same input and kernel
    at every iteration: every stored iteration equals the current one, so the window is the batch (BN), exactly."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=groups, bias=bias != 'none')
    scale = nn.Parameter(torch.tensor(2.0))
    if bias != 'none':
        with torch.no_grad():
            conv.bias.fill_(5.0)  # a bias far from 0: missing it would move the window mean by (k-1)/k * 5
        conv.bias.requires_grad_(bias == 'trainable')
    layer = CBN(4, window_size=4)
    u = torch.randn(2, 4, 8, 8)
    for _ in range(5):
        b = None if bias == 'none' else (conv.bias * scale / 2 if bias == 'derived' else conv.bias)
        x = F.conv2d(u, conv.weight, b, padding=1, groups=groups)
        y = layer(x)
        y.square().sum().backward()
    st = layer.last_call.stats
    assert int(st.n_iters) == 4
    # fp32 roundings of the conv and of <P, W> (u = 6e-8) on means of size ~5 and spreads of ~1: far below 1e-4
    torch.testing.assert_close(st.mu_bar, x.detach().mean((0, 2, 3)), rtol=0, atol=1e-4)
    ref = F.batch_norm(x.detach(), None, None, layer.weight, layer.bias, True, 0.0, layer.eps)
    torch.testing.assert_close(y.detach(), ref, rtol=1e-4, atol=1e-4)


def test_a_low_precision_conv_moves_the_window_mean_by_its_own_rounding_only():
    """The compensated mean is <P, W_t> + b_t in fp32, while a bf16 conv (autocast) rounds W_t and its outputs. Same
    input and kernel at every iteration: the window mean may then differ from the batch's by that rounding only,
    |<P, W - bf16(W)>| + |mean(x) - mean(bf16 x)| <= u (<|P|, |W|> + mean|x|), u = 2^-8 (bf16's unit roundoff,
    rounding to nearest; the conv accumulates in fp32). A missing term (a wrong bias, patch or kernel) is O(1)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    layer = CBN(4, window_size=4)
    u = torch.randn(2, 3, 8, 8) + 2  # |mu| well above sigma: the rounding's share grows with it
    for _ in range(5):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            x = conv(u)
            y = layer(x)
        y.float().square().sum().backward()
    st = layer.last_call.stats
    assert int(st.n_iters) == 4 and x.dtype == torch.bfloat16
    patch = F.unfold(u.bfloat16().float(), 3, padding=1).mean((0, 2))  # the mean input patch the conv saw
    w = conv.weight.detach().reshape(4, -1)
    bound = 2 ** -8 * (w.abs() @ patch.abs() + x.detach().float().abs().mean((0, 2, 3)))
    err = (st.mu_bar - x.detach().float().mean((0, 2, 3))).abs()
    assert (err <= bound).all() and err.max() > 0, (err, bound)


def test_a_layer_pickled_before_the_flat_bank_loads_and_trains_on():
    """A whole module pickled (torch.save) by the layer of 64b83cd, whose bank kept 8 fields apart from its
    gradients and whose scratch had another layout, loads and continues exactly as that layer did: the fixture holds
    the next output and window mean the old code computed."""
    path = osp.join(osp.dirname(__file__), 'fixtures', 'cbn_layer_pickled_at_64b83cd.pt')
    saved = torch.load(path, weights_only=False)
    layer, conv = saved['cbn'], saved['conv']
    y = layer(conv(saved['u']))
    # the old code's fp32 result through other ops (intercept-free mean, one product per field): a few roundings
    # (u = 6e-8) of values of size <= ~3
    torch.testing.assert_close(layer.last_call.stats.mu_bar, saved['mu_bar'], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y.detach(), saved['y'], rtol=1e-5, atol=1e-5)
    assert layer.window_length == 2 and packed_running(layer) is not None


def test_a_loaded_slot_of_weight_zero_holds_no_gradients():
    """The exact backward's history sums weigh no slot (history_terms): a slot of weight 0 must hold zero kernel
    gradients, as a skipped push stores it, also when a window state says so."""
    conv, layer = trained_layer(k=4, iters=5)
    state = layer.get_window_state()
    state['tensors']['w'][0] = 0
    fresh = CBN(4, window_size=4)
    fresh.set_window_state(state)
    gp = fresh.window_at(0).gp
    assert not gp[:, 0].any() and gp[:, 1:].abs().min() > 0


def test_running_statistics_stay_one_tensor_through_moves_casts_and_loads():
    """running_mean and running_var are the two rows of one tensor (a one-op EMA step); a move, cast, copy or load
    keeps them so, and buffers replaced from outside take the per-buffer path with the same numbers."""
    conv, layer = trained_layer(k=3, iters=4)
    for other in (layer, copy.deepcopy(layer).double(), copy.deepcopy(layer).half(), pickle.loads(pickle.dumps(layer))):
        packed = packed_running(other)
        assert packed is not None and torch.equal(packed, torch.stack([other.running_mean, other.running_var]))
    fresh = CBN(4, window_size=3)
    fresh.load_state_dict(layer.state_dict())
    assert packed_running(fresh) is not None and torch.equal(fresh.running_var, layer.running_var)
    same, apart = copy.deepcopy(layer), copy.deepcopy(layer)
    apart.load_state_dict({k: v.clone() for k, v in layer.state_dict().items()}, assign=True)
    assert packed_running(apart) is None and packed_running(same) is not None
    x = conv(torch.randn(2, 3, 6, 6))
    assert torch.equal(same(x), apart(x))
    assert torch.equal(same.running_mean, apart.running_mean) and torch.equal(same.running_var, apart.running_var)


@pytest.mark.parametrize('momentum', [0.1, None])
def test_a_non_finite_batch_without_a_window_keeps_the_running_statistics(momentum):
    """Burn-in and k=1 normalize as BN, but unlike BN their running statistics skip a non-finite batch."""
    conv, layer = trained_layer(k=1, iters=3, momentum=momentum)
    rm, rv, nbt = layer.running_mean.clone(), layer.running_var.clone(), layer.num_batches_tracked.clone()
    bad = torch.randn(2, 3, 6, 6)
    bad[0, 0, 0, 0] = float('inf')
    assert not torch.isfinite(layer(conv(bad))).all()
    assert torch.equal(rm, layer.running_mean) and torch.equal(rv, layer.running_var)
    assert torch.equal(nbt, layer.num_batches_tracked)
    good = conv(torch.randn(2, 3, 6, 6))
    bn = nn.BatchNorm2d(4, momentum=momentum)
    bn.load_state_dict(layer.state_dict())
    bn.train()
    with torch.no_grad():
        torch.testing.assert_close(layer(good), bn(good))
    # the same update as BN's (fp32 roundings of one EMA step)
    torch.testing.assert_close(layer.running_var, bn.running_var, rtol=1e-6, atol=1e-7)


def test_half_module_with_cumulative_running_statistics_trains():
    conv, layer = nn.Conv2d(3, 4, 3, padding=1).half(), CBN(4, window_size=3, momentum=None).half()
    for _ in range(4):
        y = layer(conv(torch.randn(2, 3, 6, 6).half()))
        y.float().square().mean().backward()
    assert layer.window_at(0).stats.dtype == torch.float32 and layer.running_var.dtype == torch.float16
    assert torch.isfinite(layer.running_var).all() and int(layer.num_batches_tracked) == 4


# ----------------------------------------------------------------------------- the second-order term (second_order=r)
def test_second_order_state_round_trip_dtype_cast_and_pickle():
    """The r patches and their outputs travel with the window: a restored, cast, pickled or copied layer trains on
    exactly as the original; a state without them (second_order=0) loads with zero patches."""
    conv, layer = trained_layer(k=4, iters=5, second_order=6)
    bank = layer.window_at(0)
    assert bank.qs.shape == (1, 3, 6, 27 + 4) and bank.qs.abs().sum() > 0
    state = layer.get_window_state()
    assert state['tensors']['q'].shape == (3, 1, 6, 31)
    fresh = CBN(4, window_size=4, second_order=6)
    fresh.load_state_dict(layer.state_dict())
    fresh.set_window_state(pickle.loads(pickle.dumps(state)))
    half = copy.deepcopy(layer).half()
    assert torch.equal(half.window_at(0).qs, bank.qs)  # fp32 bit for bit under a module cast
    x = conv(torch.randn(2, 3, 6, 6))
    clones = [fresh, pickle.loads(pickle.dumps(layer)), copy.deepcopy(layer)]
    y = layer(x)
    for clone in clones:
        assert torch.equal(clone(x), y)
    old = CBN(4, window_size=4, second_order=6)
    old.set_window_state(dict(state, tensors={k: v for k, v in state['tensors'].items() if k != 'q'}))
    assert old.window_length == 3 and not old.window_at(0).qs.any()
    plain = CBN(4, window_size=4)  # a first-order layer ignores the patches
    plain.set_window_state(state)
    assert plain.window_at(0).qs is None


def test_second_order_non_finite_slot_is_zero_and_switching_restarts():
    conv, layer = trained_layer(k=4, iters=2, second_order=5)
    bad = torch.randn(2, 3, 6, 6)
    bad[0, 0, 0, 0] = float('nan')
    layer(conv(bad)).sum().backward()
    bank = layer.window_at(0)
    assert bank.count == 3 and not bank.qs[:, 2].any() and torch.isfinite(bank.qs).all()
    layer.second_order = 0  # another bank layout: the window starts afresh (BN meanwhile)
    x = conv(torch.randn(2, 3, 6, 6))
    y = layer(x)
    bn = nn.BatchNorm2d(4)
    bn.load_state_dict(layer.state_dict())
    # fp32 roundings of values of size <= ~3 through the same formulas (1e-5 is ~100 u)
    torch.testing.assert_close(y, F.batch_norm(x, None, None, layer.weight, layer.bias, True, 0.0, layer.eps),
                               rtol=1e-5, atol=1e-5)
    assert layer.window_at(0).qs is None and layer.window_length == 1
    with pytest.raises(ValueError, match='second_order.*-2'):
        layer.second_order = -2


def _window_after_a_turn(second_order):
    """A 1x1 conv on 1x1 maps of 8 images (8 positions per iteration), turned by a large random step each iteration:
    what a k=3 layer normalizes with at the third, and the stored images rerun through the current kernel."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 1, bias=False).double()
    layer = CBN(4, window_size=3, second_order=second_order).double()
    inputs = [torch.randn(8, 3, 1, 1, dtype=torch.float64) + 1 for _ in range(3)]
    for u in inputs[:2]:
        layer(conv(u)).square().mean().backward()
        with torch.no_grad():
            conv.weight.add_(torch.randn_like(conv.weight) * 0.3)
            conv.weight.grad = None
    layer(conv(inputs[2]))
    var, mu = torch.var_mean(torch.cat([conv(u) for u in inputs]).detach(), dim=(0, 2, 3), correction=0)
    return layer.last_call.stats, mu, var


def test_second_order_makes_a_convolution_window_exact():
    """With every position of each stored iteration among its r patches (8 positions, r = 8), the second-order term
    is the whole remainder: the window statistics equal the stored images rerun through the current kernel. Eq. 8's
    first order misses ``dW' M2 dW`` on the same trajectory."""
    stats, mu, var = _window_after_a_turn(8)
    # fp64 (u = 1.1e-16) over a few dozen terms of size ~10: 1e-12 absolute is far above their rounding
    torch.testing.assert_close(stats.mu_bar, mu, rtol=0, atol=1e-12)
    torch.testing.assert_close(stats.var_bar, var, rtol=0, atol=1e-12)
    first, mu1, var1 = _window_after_a_turn(0)
    torch.testing.assert_close(first.mu_bar, mu1, rtol=0, atol=1e-12)  # the mean is linear in the kernel
    assert ((first.var_bar - var1).abs() / var1).max() > 1e-2  # the variance is not
