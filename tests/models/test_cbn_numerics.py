"""Numerics of CrossIterationBatchNorm2d: fp32 precision with |mu| >> sigma, low precision and autocast against fp32,
channels_last against contiguous, and host synchronisations. Each tolerance is derived in its test's docstring."""
import contextlib
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from cbn_mmdet.models.cbn import CrossIterationBatchNorm2d as CBN
from cbn_mmdet.ops import batch_moments

from .common import DEVICES, no_tf32, sgd_step


@contextlib.contextmanager
def _cuda_sync_errors(device):
    """On CUDA, any synchronising call raises (torch's sync debug mode); elsewhere nothing."""
    if device != 'cuda':
        yield
        return
    torch.cuda.set_sync_debug_mode('error')
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize('device', DEVICES)
def test_stable_for_large_mean_small_std_fp32(device):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 1, bias=True).to(device)
    with torch.no_grad():
        conv.weight.fill_(0.01)
        conv.bias.fill_(100.0)
    layer = CBN(3, window_size=4).to(device)
    for _ in range(5):
        inp = torch.randn(4, 2, 8, 8).to(device)
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


@pytest.mark.parametrize('device', DEVICES)
def test_large_mean_with_compensation_fp32_matches_fp64(device):
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
    with no_tf32():  # the claim is about fp32 arithmetic
        _large_mean_steps(device)


def _large_mean_steps(device):
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1).to(device)
    with torch.no_grad():
        conv.weight.mul_(0.01)
        conv.bias.fill_(100.0)
    conv64 = copy.deepcopy(conv).double()
    layer, layer64 = CBN(3, window_size=4).to(device), CBN(3, window_size=4).to(device, torch.float64)
    e_x = e_red = 0.0
    unit = 2.0**-24  # fp32 unit roundoff
    for _ in range(6):
        inp = torch.randn(2, 2, 8, 8).to(device)
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


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_low_precision_inputs_keep_fp32_statistics(dtype, device):
    conv, layer = nn.Conv2d(3, 4, 3, padding=1).to(device, dtype), CBN(4, window_size=3).to(device, dtype)
    for _ in range(3):
        y = layer(conv(torch.randn(2, 3, 6, 6, dtype=dtype, device=device)))
        assert y.dtype == dtype and torch.isfinite(y).all()
        y.float().square().mean().backward()
        sgd_step([*conv.parameters(), *layer.parameters()])
    assert layer.window_at(0).gp.dtype == torch.float32


def test_autocast_uses_fp32_kernel():
    conv, layer = nn.Conv2d(3, 4, 3, padding=1), CBN(4, window_size=3)
    for _ in range(3):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = layer(conv(torch.randn(2, 3, 6, 6)))
        assert torch.isfinite(y).all()
        y.float().square().mean().backward()
        assert layer.last_conv[0] is conv.weight
        sgd_step([*conv.parameters(), *layer.parameters()])
    assert layer.window_length == 2


def _low_precision_error_scale(conv, inp):
    """``S / sigma``: the largest sum of |kernel| * |input| over a conv output position, in units of the smallest
    channel std. A low-precision conv rounds each input and kernel entry (relative u) and its output (u |x|), so
    its output error is at most ``3 u S`` (fp32 accumulation adds far less)."""
    with torch.no_grad():
        x = F.conv2d(inp, conv.weight, conv.bias, conv.stride, conv.padding)
        s = F.conv2d(inp.abs(), conv.weight.abs(), None if conv.bias is None else conv.bias.abs(), conv.stride,
                     conv.padding)
        return (s.amax((0, 2, 3)) / x.std((0, 2, 3))).max().item(), x


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('backward', ['exact', 'authors'])
def test_autocast_matches_fp32_within_derived_bound(dtype, backward, device):
    """Autocast (fp16 with a GradScaler, bf16 without) against the fp32 layer, step by step from shared parameters.

    With ``u`` the format's unit roundoff (2**-11 fp16, 2**-8 bf16) and ``r = S / sigma`` from
    :func:`_low_precision_error_scale`, the conv output errs by ``<= 3 u r`` in units of sigma; the window's means
    and variances are averages of such outputs, kept in fp32 by the layer (``<= 3 u r`` each, relative to sigma);
    the normalized output is ``gamma (x - mu_bar) / sigma_bar``, so
    ``|y - y32| <= |gamma| 3 u r (2 + |x_hat|) + u |y|`` (the last term: y is returned in the low precision).
    Gradients: the conv's backward rounds its inputs (dy, the saved input) to the format (2u relative) and the
    layer's backward reads the low-precision x, whose normalized value errs by the bound above: normwise the kernel
    and gamma gradients stay within ``2u + 3 u r (2 + max |x_hat|)`` relative. Measured on one x86 CPU: at most 0.05
    of the output bound and 0.02 of the gradient bound."""
    unit = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    torch.manual_seed(0)
    conv, layer = nn.Conv2d(3, 8, 3, padding=1).to(device), CBN(8, window_size=3, backward=backward).to(device)
    conv_a, layer_a = copy.deepcopy(conv), copy.deepcopy(layer)
    use_scaler = dtype == torch.float16
    # a small scale: these gradients are O(10), so 2**3 keeps the scaled fp16 backward far from overflow
    scaler = torch.amp.GradScaler(device, init_scale=2.0**3) if use_scaler else None
    gen = torch.Generator().manual_seed(1)
    for it in range(6):
        inp = torch.randn(2, 3, 8, 8, generator=gen).to(device)
        r, x32 = _low_precision_error_scale(conv, inp)
        y = layer(conv(inp))
        with torch.autocast(device, dtype=dtype):
            y_a = layer_a(conv_a(inp))
        assert y_a.dtype == dtype
        g = torch.randn(y.shape, generator=gen).to(device)
        (y * g).sum().backward()
        loss_a = (y_a.float() * g).sum()
        (scaler.scale(loss_a) if use_scaler else loss_a).backward()
        if use_scaler:
            scaler.unscale_(torch.optim.SGD([*conv_a.parameters(), *layer_a.parameters()], lr=0.0))
        x_hat = ((x32 - x32.mean((0, 2, 3), keepdim=True)) / x32.std((0, 2, 3), keepdim=True)).abs().max().item()
        gamma = layer.weight.abs().max().item()
        bound_y = gamma * 3 * unit * r * (2 + x_hat) + unit * y.abs().max().item()
        assert (y_a.float() - y).abs().max().item() <= bound_y, it
        bound_g = 2 * unit + 3 * unit * r * (2 + x_hat)
        for a, b in ((conv_a.weight.grad, conv.weight.grad), (layer_a.weight.grad, layer.weight.grad)):
            assert ((a - b).norm() / b.norm()).item() <= bound_g, it
        with torch.no_grad():  # the same step from the fp32 gradients: both start the next iteration equal
            for p, q in zip([*conv.parameters(), *layer.parameters()], [*conv_a.parameters(), *layer_a.parameters()]):
                p.sub_(0.05 * p.grad)
                q.copy_(p)
                p.grad = q.grad = None
        if use_scaler:
            scaler.update()
    assert layer_a.window_length == 2 and layer_a.window_at(0).gp.dtype == torch.float32


class SyncCounter:
    """Counts the Python-visible calls that make the host wait for a device value: reading a tensor as a Python
    number or bool, and boolean-mask indexing (its result's shape depends on the data).

    It patches those methods on ``torch.Tensor`` (and the module functions) for the whole process while active, so
    it also sees what runs inside the autograd engine: a custom Function's backward and checkpoint recomputation,
    which a TorchFunctionMode on the calling thread would miss."""
    METHODS = ('__bool__', 'item', '__float__', '__int__', '__index__', 'tolist', 'nonzero', 'masked_select', 'numpy')
    FUNCTIONS = ('allclose', 'equal', 'nonzero', 'masked_select', 'is_nonzero')

    def __init__(self):
        self.calls = []
        self._saved = []

    def _wrap(self, owner, name, fn):
        def counted(*args, **kwargs):
            self.calls.append(name)
            return fn(*args, **kwargs)

        self._saved.append((owner, name, fn))
        setattr(owner, name, counted)

    def __enter__(self):
        for name in self.METHODS:
            self._wrap(torch.Tensor, name, getattr(torch.Tensor, name))
        for name in self.FUNCTIONS:
            self._wrap(torch, name, getattr(torch, name))
        getitem = torch.Tensor.__getitem__

        def indexed(tensor, index):
            items = index if isinstance(index, tuple) else (index, )
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items):
                self.calls.append('__getitem__')
            return getitem(tensor, index)

        self._saved.append((torch.Tensor, '__getitem__', getitem))
        torch.Tensor.__getitem__ = indexed
        return self

    def __exit__(self, *exc):
        for owner, name, fn in reversed(self._saved):
            setattr(owner, name, fn)
        self._saved = []


class _ReadsInBackward(torch.autograd.Function):
    """A Function whose backward reads a value on the host (what the counter must see)."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * float(grad.sum() > 0)


def test_sync_counter_sees_syncs():
    t = torch.randn(4)
    with SyncCounter() as counter:
        bool(t.sum() > 0), t.max().item(), t[t > 0], float(t[0])
    assert counter.calls == ['__bool__', 'item', '__getitem__', '__float__']
    x = torch.randn(3, requires_grad=True)
    with SyncCounter() as counter:
        _ReadsInBackward.apply(x).sum().backward()  # inside the autograd engine
    assert counter.calls == ['__float__']
    assert torch.Tensor.item.__name__ == 'item'  # restored


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('momentum', [0.1, None])
@pytest.mark.parametrize('checkpointed', [False, True])
@pytest.mark.parametrize('backward', ['exact', 'authors'])
@pytest.mark.parametrize('sizes', [[6], [6, 4, 3], [4, 4]], ids=['one_call', 'levels', 'one_shape'])
@pytest.mark.parametrize('second_order', [0, 4])
def test_training_iteration_makes_no_host_sync(sizes, backward, checkpointed, momentum, device, second_order):
    """Burn-in (k=1 use, collecting), open windows, and checkpoint replay: no Python-visible host sync; on CUDA also
    none that torch's sync debug mode sees. Also for a layer called once per input size in each iteration (a head
    shared across FPN levels; with one shape for all calls, a replay picks its call on the device)."""
    conv = nn.Conv2d(3, 4, 3, padding=1).to(device)
    layer = CBN(4, window_size=3, backward=backward, momentum=momentum, second_order=second_order).to(device)
    forward = (lambda t: checkpoint(lambda u: layer(conv(u)), t, use_reentrant=False)) if checkpointed else (
        lambda t: layer(conv(t)))
    for it in range(5):
        layer.begin_iteration(it, use_window=it >= 2, collect=it >= 1)
        inputs = [torch.randn(2, 3, s, s, device=device, requires_grad=True) for s in sizes]
        with SyncCounter() as counter, _cuda_sync_errors(device):
            sum(forward(inp).square().mean() for inp in inputs).backward()
            sgd_step([*conv.parameters(), *layer.parameters()])
        assert counter.calls == [], (it, counter.calls)
    assert layer.window_lengths == [2] * len(sizes)


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('backward', ['exact', 'authors'])
@pytest.mark.parametrize('input_cl, kernel_cl', [(True, False), (False, True), (True, True)])
def test_channels_last_equals_contiguous(input_cl, kernel_cl, backward, device):
    """Outputs, gradients and running statistics match the contiguous layer to 1e-5 relative in fp32.

    The two layouts reduce in different orders, so they agree to the rounding of their sums, not bit for bit: a sum
    of m terms in fp32 is off by at most ~log2(m) u (pairwise/blocked reductions, which every CPU and GPU backend
    uses) relative to the sum of the magnitudes; with m <= 2*7*5*36 and u = 6e-8 that is < 1e-6, and the
    normalization and the window add a few roundings more. 1e-5 leaves a factor ~10 for them. TF32 is off.
    "Relative" is to the size of what is summed: the conv bias's gradient is ``sum dL/dx`` over N*H*W positions,
    which nearly cancels (it is 0 for BN), so its scale is ``sum |dL/dx|``, not its own value."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3, padding=1).to(device)
    layer = CBN(8, window_size=3, backward=backward).to(device)
    conv_cl, layer_cl = copy.deepcopy(conv), copy.deepcopy(layer)
    if kernel_cl:
        conv_cl.to(memory_format=torch.channels_last)
    fmt = torch.channels_last if input_cl else torch.contiguous_format
    with no_tf32():
        _channels_last_steps(conv, layer, conv_cl, layer_cl, fmt, device)
    assert layer_cl.window_length == 2


def _channels_last_steps(conv, layer, conv_cl, layer_cl, fmt, device):
    for _ in range(4):
        inp = torch.randn(2, 4, 7, 5).to(device)
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

