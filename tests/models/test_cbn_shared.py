"""A CBN layer called several times per training iteration (a head shared across FPN levels): the c-th call of an
iteration keeps the c-th window. Checked against C independent single-call layers fed the same per-position inputs,
over real SGD steps, managed (begin_iteration) and unmanaged (iterations found by the backward)."""
import copy
import pickle

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from cbn_mmdet.models.cbn import CrossIterationBatchNorm2d as CBN

from .common import sgd_step

C = 3
SIZES = [(8, 8), (6, 5), (4, 4)]  # one per call position, as FPN levels differ in size
MODES = {'naive': dict(compensate=False), 'authors': dict(backward='authors'), 'exact': dict(backward='exact')}


def tie(layers):
    """Independent layers that share gamma, beta and the running statistics, as the calls of one shared layer do:
    gamma's gradient is the sum over the calls and the running statistics take one update per call, in order."""
    first = layers[0]
    for layer in layers[1:]:
        layer.weight, layer.bias = first.weight, first.bias
        for name in ('running_mean', 'running_var', 'num_batches_tracked'):
            setattr(layer, name, getattr(first, name))
    return layers


def make_models(mode, k=3):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1).double()
    shared = CBN(8, window_size=k, **MODES[mode]).double()
    with torch.no_grad():
        shared.weight.uniform_(0.5, 1.5)
        shared.bias.uniform_(-0.5, 0.5)
    return (conv, shared), (copy.deepcopy(conv), tie([copy.deepcopy(shared) for _ in range(C)]))


def data(it, c, special, gen, sizes=SIZES):
    h, w = sizes[c]
    u = torch.randn(2, 4, h, w, generator=gen, dtype=torch.float64) * (1 + c) + 0.3 * c
    kind = special.get((it, c))
    if kind == 'nan':
        u[0, 0, 0, 0] = float('nan')
    elif kind == 'empty':
        u = u[:0]
    return u, torch.randn(2, 8, h, w, generator=gen, dtype=torch.float64)[:u.shape[0]], kind


def run_pair(mode, managed, iters=7, special=(), checkpointed=False, sizes=SIZES, k=3):
    """Both models over ``iters`` SGD steps; the worst relative difference of outputs, gradients and running
    statistics, and the models. ``special`` maps (iteration, call) to 'nan' or 'empty'."""
    special = dict(special)
    (conv, shared), (conv_i, layers) = make_models(mode, k)
    params = [*conv.parameters(), *shared.parameters()]
    params_i = [*conv_i.parameters(), *layers[0].parameters()]
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for it in range(iters):
        if managed:  # burn-in: plain BN at it 0, collecting from it 1, windows open from it 2
            for layer in (shared, *layers):
                layer.begin_iteration(it, use_window=it >= 2, collect=it >= 1)
        loss = loss_i = 0
        pairs = []
        for c in range(C):
            u, proj, kind = data(it, c, special, gen, sizes)
            if checkpointed:
                y = checkpoint(lambda t: shared(conv(t)), u.requires_grad_(), use_reentrant=checkpointed == 'reentrant')
            else:
                y = shared(conv(u))
            y_i = layers[c](conv_i(u.detach()))
            pairs.append((y, y_i))
            if kind != 'nan':  # a non-finite call's output stays out of the loss (its gradients would be NaN)
                loss = loss + (y * proj).sum() + y.square().mean()
                loss_i = loss_i + (y_i * proj).sum() + y_i.square().mean()
            else:
                assert not torch.isfinite(y).all()
        loss.backward()
        loss_i.backward()
        pairs += [(shared.running_mean, layers[0].running_mean), (shared.running_var, layers[0].running_var)]
        pairs += [(p.grad, q.grad) for p, q in zip(params, params_i)]
        for a, b in pairs:
            a, b = a.detach(), b.detach()
            finite = torch.isfinite(b)
            assert torch.equal(finite, torch.isfinite(a))
            if finite.any():
                worst = max(worst, ((a - b)[finite].abs().max() / (1 + b[finite].abs().max())).item())
        assert shared.num_batches_tracked == layers[0].num_batches_tracked
        sgd_step(params)
        sgd_step(params_i)
    return worst, shared, layers


# Both models run the same fp64 operations in the same order, call position by call position; only the sums of the
# shared parameters' gradients may associate differently. Exact up to fp64 rounding (u = 1.1e-16) of values of
# size <= ~1e2 over 7 steps: 1e-10 relative leaves a factor of >1e3.
TOL = 1e-10


@pytest.mark.parametrize('managed', [True, False])
@pytest.mark.parametrize('mode', list(MODES))
def test_each_call_position_matches_an_independent_layer(mode, managed):
    worst, shared, layers = run_pair(mode, managed)
    assert worst <= TOL
    assert shared.window_lengths == [2] * C and shared.calls_per_iteration == C
    for c, layer in enumerate(layers):
        mine, theirs = layer.window_at(0).tensors(), shared.window_at(c).tensors()
        assert set(mine) == set(theirs)
        for key, value in mine.items():
            torch.testing.assert_close(theirs[key], value, rtol=TOL, atol=TOL)


@pytest.mark.parametrize('managed', [True, False])
@pytest.mark.parametrize('kind', ['nan', 'empty'])
def test_non_finite_and_empty_calls_advance_the_position(kind, managed):
    """A non-finite or empty call in the middle still takes its position: the later calls land in their own
    windows (they keep matching their independent layers), and the call's own window gets a weight-0 slot (nan)
    or nothing (empty)."""
    worst, shared, layers = run_pair('exact', managed, iters=6, special={(3, 1): kind, (4, 1): kind})
    assert worst <= TOL
    assert shared.window_lengths == [layer.window_length for layer in layers]
    if kind == 'nan':
        assert shared.window_lengths == [2, 2, 2]
        assert sorted(shared.window_at(1).view()['w'].tolist()) == [0.0, 1.0]  # iterations 4 (nan) and 5
        assert shared.window_at(2).view()['w'].tolist() == [1.0, 1.0]
    else:
        assert shared.window_lengths == [2, 2, 2]  # position 1: iterations 1, 2 and 5, minus the oldest
        assert shared.calls_per_iteration == C


@pytest.mark.parametrize('how', ['nonreentrant', 'reentrant'])
@pytest.mark.parametrize('sizes', [SIZES, [(6, 6)] * C], ids=['levels', 'one_shape'])
@pytest.mark.parametrize('mode, k, managed', [('exact', 3, True), ('naive', 3, True), ('exact', 1, False)])
def test_checkpoint_replays_each_call(mode, k, managed, sizes, how):
    """Checkpointing (recomputation during backward, in the autograd engine's order) replays each call's own
    statistics and pushes nothing twice: the same trajectory as without it. Calls of one input shape are told apart
    by their batch means on the device, or, with reentrant checkpointing (whose first forward records no graph, so
    nothing is pushed until the recomputation), by the engine's latest-first order. Also with k=1 and no hook (BN in
    a shared, checkpointed head)."""
    worst_cp, shared_cp, _ = run_pair(mode, managed, iters=5, checkpointed=how, sizes=sizes, k=k)
    worst, shared, _ = run_pair(mode, managed, iters=5, sizes=sizes, k=k)
    assert worst_cp <= TOL and worst <= TOL
    assert shared_cp.window_lengths == shared.window_lengths == ([2] * C if k > 1 else [])


def test_window_state_round_trip_per_call_and_old_single_window_state():
    _, shared, layers = run_pair('exact', True, iters=5)
    state = pickle.loads(pickle.dumps(shared.get_window_state()))
    assert state['calls'] == C and len(state['later_calls']) == C - 1 and state['count'] == 2
    fresh = CBN(8, window_size=3).double()
    fresh.load_state_dict(shared.state_dict())
    fresh.set_window_state(state)
    assert fresh.window_lengths == [2] * C and fresh.calls_per_iteration == C

    # the next iteration: identical outputs from the resumed layer
    conv = nn.Conv2d(4, 8, 3, padding=1).double()
    gen = torch.Generator().manual_seed(5)
    for layer in (shared, fresh, *layers):
        layer.begin_iteration(10)
    inputs = [data(10, c, {}, gen)[0] for c in range(C)]
    for c, u in enumerate(inputs):
        x = conv(u)
        y, y_fresh = shared(x), fresh(x)
        assert torch.equal(y, y_fresh)

    # a state written by a single-call layer (no per-call fields) restores call position 0; the others start empty
    old = layers[0].get_window_state()
    assert 'later_calls' not in old and 'calls' not in old
    restored = CBN(8, window_size=3).double()
    restored.set_window_state(old)
    assert restored.window_lengths == [2] and restored.calls_per_iteration is None
    twin = copy.deepcopy(layers[0])
    twin.load_state_dict(restored.state_dict())
    restored.load_state_dict(twin.state_dict())
    restored.begin_iteration(11)
    twin.begin_iteration(11)
    x = conv(inputs[0])
    assert torch.equal(restored(x), twin(x))
    restored(conv(inputs[1]))
    restored(conv(inputs[2]))
    assert restored.window_lengths == [3 - 1, 1, 1]


def test_managed_layer_refuses_a_change_of_calls():
    conv, layer = nn.Conv2d(3, 4, 3, padding=1), CBN(4, window_size=2)
    layer.module_path = 'bbox_head.cls_convs.0.bn'
    for it, calls in enumerate([5, 5]):
        layer.begin_iteration(it)
        for _ in range(calls):
            layer(conv(torch.randn(2, 3, 6, 6)))
    assert layer.window_lengths == [1] * 5
    layer.begin_iteration(2)
    for _ in range(4):
        layer(conv(torch.randn(2, 3, 6, 6)))
    layer.begin_iteration(3)
    with pytest.raises(RuntimeError, match=r"'bbox_head.cls_convs.0.bn' was called 4 times in the last training "
                                           r"iteration, but 5 times"):
        layer(conv(torch.randn(2, 3, 6, 6)))


def test_unmanaged_boundaries_by_backward_and_by_kernel_change():
    conv, layer = nn.Conv2d(3, 4, 3, padding=1), CBN(4, window_size=3)
    for _ in range(2):  # iterations ended by a backward
        sum(layer(conv(torch.randn(2, 3, 6, 6))).sum() for _ in range(2)).backward()
    assert layer.window_lengths == [2, 2]
    for _ in range(2):  # iterations ended by an optimizer step (the kernel's version), without backward
        with torch.no_grad():
            conv.weight.add_(0.01)
        layer(conv(torch.randn(2, 3, 6, 6)))
        layer(conv(torch.randn(2, 3, 6, 6)))
    assert layer.window_lengths == [2, 2] and layer.calls_per_iteration == 2
    assert layer.call_position == 1


def test_eval_forwards_do_not_advance_the_position():
    conv, layer = nn.Conv2d(3, 4, 3, padding=1), CBN(4, window_size=3)
    layer.begin_iteration(0)
    layer(conv(torch.randn(2, 3, 6, 6)))
    layer.eval()
    layer(conv(torch.randn(2, 3, 6, 6)))
    layer.train()
    layer(conv(torch.randn(2, 3, 6, 6)))
    assert layer.call_position == 1 and layer.window_lengths == [1, 1]


def test_loading_a_state_into_a_layer_that_already_trained_starts_a_fresh_iteration():
    """set_window_state resets the call position: a layer that ran once per iteration, loaded with a state of C
    calls per iteration, takes its next C calls as one iteration (it used to compare the count of the iteration
    before the load, 1, with the restored C, and refuse)."""
    _, shared, _ = run_pair('exact', True, iters=4)
    state = shared.get_window_state()
    conv = nn.Conv2d(4, 8, 3, padding=1).double()
    gen = torch.Generator().manual_seed(3)
    layer = CBN(8, window_size=3).double()
    for it in range(3):  # one call per iteration
        layer.begin_iteration(it)
        layer(conv(data(it, 0, {}, gen)[0]))
    layer.set_window_state(state)
    for it in (3, 4):
        layer.begin_iteration(it)
        for c in range(C):
            layer(conv(data(it, c, {}, gen)[0]))
    assert layer.calls_per_iteration == C and layer.window_lengths == [2] * C
