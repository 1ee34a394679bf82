"""CBN on a device against CBN on the CPU in fp64: a 20-iteration conv -> CBN training trajectory, step by step.

    python tools/gpu_trajectory.py [--device cuda|cpu] [--iters 20] [--out FILE] [--no-fp16]

A conv (8 -> 16 channels, 3x3, with bias) followed by ``CrossIterationBatchNorm2d(16, window_size=4)`` takes
``--iters`` SGD steps on CPU in fp64 (the reference). At every step the same parameters and the same batch go
through two followers on ``--device``:

* **fp32**, with TF32 off (``torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False``):
  every compared quantity within ``--fp32-tol`` (1e-4) relative of the fp64 reference;
* **fp16 autocast**, with a ``torch.amp.GradScaler`` (on the CPU stand-in too, so the rehearsal runs the same
  code): within a tolerance derived below from fp16's unit roundoff.

Compared at every step: the output, the gradient of the conv's input, the gradient of the conv's kernel, and the
layer's running mean and running variance. The error of a quantity is normwise, ``||dev - ref|| / ||ref||`` over
all its elements, computed in fp64; the check reports the worst step. The gradients of gamma, beta and the conv bias
are reported too, for information (the conv bias's relative to ``max(||ref||, ||dL/dbeta||)``: it is 0 in
exact arithmetic at a BN step).

Design: one trajectory, shared parameters. Only the fp64 reference takes SGD steps; before every step its parameters
are copied into the followers, and each follower's CBN keeps its *own* window and running statistics, which it
built from its own forwards at those same parameters. Independent trajectories from one initialisation would let
fp32 rounding grow through 20 optimizer steps and measure the drift of SGD, not the layer. Here every step's error
is the error of one forward and backward of the layer, with the window (and its Taylor compensation to the current
kernel) computed on the device at the device's precision. The window fills at step k-1 = 3, so 17 of the 20 steps
normalize with a full, compensated window.

Inputs are the same on every device: every batch, upstream gradient and the initial parameters are drawn on the CPU
from a seeded generator, rounded to fp32, and moved. Writes a JSON (``--out``) and exits 1 when a check fails.
"""
import argparse
import copy
import json
import math
import os
import os.path as osp
import platform
import sys
import time

import torch
import torch.nn as nn

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)

from cbn_mmdet.models.cbn import CrossIterationBatchNorm2d  # noqa: E402

QUANTITIES = ('output', 'input_grad', 'kernel_grad', 'running_mean', 'running_var')
INFO_QUANTITIES = ('gamma_grad', 'beta_grad', 'conv_bias_grad')
FP16_EPS = 2.0**-11  # fp16 unit roundoff: round-to-nearest with an 11-bit significand
FP16_MAX = 65504.0
# Roundings of size FP16_EPS on the way to each quantity under autocast (conv in fp16, CBN statistics in fp32):
#   output        u -> fp16, W -> fp16, conv output x -> fp16, y -> fp16                                       4
#   input_grad    u, W, x (forward, through x_hat), dL/dy -> fp16, dL/dx -> fp16, dL/du -> fp16                  6
#   kernel_grad   u, W, x, dL/dy, dL/dx, dL/dW -> fp16 (conv weight-gradient output)                             6
#   running_mean  u, W, x: the statistics are fp32 (the layer keeps them fp32 for fp16 input), averaged in fp32  3
#   running_var   as running_mean, doubled: var = mean((x - mu)^2), d var / var = 2 d sd / sd                      6
# Every other operation (moments, window, Taylor compensation, BN backward sums, the GradScaler's power-of-two
# scaling) is fp32, whose roundings (2^-24) are negligible against 2^-11.
FP16_ROUNDINGS = dict(output=4, input_grad=6, kernel_grad=6, running_mean=3, running_var=6)
# Amplification. A rounding of x_ij by FP16_EPS |x_ij| moves x_hat_ij by FP16_EPS |x_ij| / sd_j, so every error on
# the conv's output reaches the normalized values, and through them y and the gradients, amplified by
# A_norm = max_j rms(x_j) / sd_j = max_j sqrt(1 + mu_j^2 / sd_j^2), measured on the reference at every step.
# The running mean's error is a mean of those roundings, relative to ||mu||: amplified by
# A_mean = ||rms(x)|| / ||mu|| (vectors over channels). Rounding errors of independent values mostly cancel, so
# ROUNDINGS * A * FP16_EPS is a worst-case linear sum; SAFETY = 2 covers implementation details that the count
# does not see (the order of the fp32 accumulations inside fp16 kernels, and fp16 accumulation in some CPU kernels).
FP16_SAFETY = 2.0


def relative(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """``||a - b|| / max(||b||, floor)`` in fp64 on the CPU (inf for a non-finite a)."""
    a, b = a.detach().to('cpu', torch.float64), b.detach().to('cpu', torch.float64)
    if not bool(torch.isfinite(a).all()):
        return math.inf
    return ((a - b).norm() / b.norm().clamp(min=max(floor, 1e-300))).item()


def set_tf32_off() -> dict:
    """Switch TF32 off for matmuls and cuDNN convolutions; return the flags in force afterwards."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision('highest')
    flags = dict(matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                 cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                 float32_matmul_precision=torch.get_float32_matmul_precision())
    for name, obj in (('matmul_fp32_precision', torch.backends.cuda.matmul),
                      ('cudnn_conv_fp32_precision', getattr(torch.backends.cudnn, 'conv', None))):
        value = getattr(obj, 'fp32_precision', None) if obj is not None else None
        if value is not None:
            flags[name] = value
    return flags


class Model:
    """conv -> CBN, its parameters in a fixed order."""

    def __init__(self, conv: nn.Conv2d, cbn: CrossIterationBatchNorm2d):
        self.conv, self.cbn = conv, cbn

    def params(self):
        return [self.conv.weight, self.conv.bias, self.cbn.weight, self.cbn.bias]

    def load_from(self, other: 'Model') -> None:
        with torch.no_grad():
            for p, q in zip(self.params(), other.params()):
                p.copy_(q)

    def zero_grad(self) -> None:
        for p in self.params():
            p.grad = None

    def __call__(self, u):
        return self.cbn(self.conv(u))


def make_data(iters, n, c_in, c, size, gen):
    """Batches (mean 0.5, so that the conv's outputs have means comparable to their spread) and upstream grads."""
    inputs = [(torch.randn(n, c_in, size, size, generator=gen) + 0.5).float() for _ in range(iters)]
    grads = [torch.randn(n, c, size, size, generator=gen).float() for _ in range(iters)]
    return inputs, grads


def amplifications(x: torch.Tensor) -> dict:
    """A_norm and A_mean of the conv output ``x`` (fp64), see FP16_ROUNDINGS."""
    x = x.detach().double()
    mu = x.mean((0, 2, 3))
    rms = x.square().mean((0, 2, 3)).sqrt()
    sd = x.var((0, 2, 3), unbiased=False).sqrt()
    return dict(norm=(rms / sd).max().item(), mean=(rms.norm() / mu.norm()).item())


def run(args) -> dict:
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('gpu_trajectory: --device cuda but torch.cuda.is_available() is False')
    flags = set_tf32_off()
    n, c_in, c, size, k = 2, 8, 16, 16, args.window
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    conv = nn.Conv2d(c_in, c, 3, padding=1, bias=True)
    cbn = CrossIterationBatchNorm2d(c, window_size=k)
    with torch.no_grad():  # gamma, beta away from 1, 0 so that their gradients matter
        cbn.weight.copy_(1 + 0.2 * torch.randn(c, generator=gen))
        cbn.bias.copy_(0.2 * torch.randn(c, generator=gen))
    ref = Model(copy.deepcopy(conv).double(), copy.deepcopy(cbn).double())
    naive = Model(copy.deepcopy(conv).double(), CrossIterationBatchNorm2d(c, window_size=k, compensate=False).double())
    followers = {'fp32': Model(copy.deepcopy(conv).to(device), copy.deepcopy(cbn).to(device))}
    if args.fp16:
        followers['fp16'] = Model(copy.deepcopy(conv).to(device), copy.deepcopy(cbn).to(device))
        scaler = torch.amp.GradScaler(device.type, init_scale=args.init_scale)
        zero_lr = torch.optim.SGD(followers['fp16'].params(), lr=0.0)  # the scaler's bookkeeping; never moves
    inputs, grads = make_data(args.iters, n, c_in, c, size, gen)
    m = n * size * size

    errors = {name: {q: [] for q in QUANTITIES + INFO_QUANTITIES} for name in followers}
    amp = dict(norm=[], mean=[])
    fp16_peak = dict(input_grad=0.0, kernel_grad=0.0)
    fp16_overflow_steps, scales, compensation_effect, kernel_step = [], [], [], []
    start = time.perf_counter()
    for it in range(args.iters):
        for follower in (*followers.values(), naive):
            follower.load_from(ref)
        # reference, fp64 on the CPU
        u_ref = inputs[it].double().requires_grad_()
        x_ref = ref.conv(u_ref)
        amps = amplifications(x_ref)
        amp['norm'].append(amps['norm'])
        amp['mean'].append(amps['mean'])
        y_ref = ref.cbn(x_ref)
        (y_ref * grads[it].double()).sum().div(m).backward()
        # forward only, with a graph: the layer reads its conv from the graph, and without one it pushes nothing
        compensation_effect.append(relative(naive(inputs[it].double()), y_ref))
        ref_vals = dict(output=y_ref, input_grad=u_ref.grad, kernel_grad=ref.conv.weight.grad,
                        running_mean=ref.cbn.running_mean, running_var=ref.cbn.running_var,
                        gamma_grad=ref.cbn.weight.grad, beta_grad=ref.cbn.bias.grad, conv_bias_grad=ref.conv.bias.grad)
        for name, model in followers.items():
            u = inputs[it].to(device, copy=True).requires_grad_()
            g = grads[it].to(device)
            if name == 'fp32':
                y = model(u)
                (y * g).sum().div(m).backward()
                u_grad = u.grad
            else:
                with torch.autocast(device.type, dtype=torch.float16):
                    y = model(u)
                loss = (y.float() * g).sum().div(m)
                scale = scaler.get_scale()
                scales.append(scale)
                scaler.scale(loss).backward()
                fp16_peak['input_grad'] = max(fp16_peak['input_grad'], u.grad.abs().max().item())
                fp16_peak['kernel_grad'] = max(fp16_peak['kernel_grad'], model.conv.weight.grad.abs().max().item())
                u_grad = u.grad / scale
                scaler.unscale_(zero_lr)
                if not all(bool(torch.isfinite(p.grad).all()) for p in model.params()):
                    fp16_overflow_steps.append(it)
                scaler.step(zero_lr)
                scaler.update()
            vals = dict(output=y, input_grad=u_grad, kernel_grad=model.conv.weight.grad,
                        running_mean=model.cbn.running_mean, running_var=model.cbn.running_var,
                        gamma_grad=model.cbn.weight.grad, beta_grad=model.cbn.bias.grad,
                        conv_bias_grad=model.conv.bias.grad)
            for q in QUANTITIES + INFO_QUANTITIES:
                # the conv bias's gradient is 0 in exact arithmetic at a BN step (step 0): measured against
                # beta's gradient there
                floor = ref_vals['beta_grad'].norm().item() if q == 'conv_bias_grad' else 0.0
                errors[name][q].append(relative(vals[q], ref_vals[q], floor))
            model.zero_grad()
        with torch.no_grad():  # SGD on the reference only
            before = ref.conv.weight.detach().clone()
            for p in ref.params():
                p.sub_(args.lr * p.grad)
            kernel_step.append(((ref.conv.weight - before).norm() / before.norm()).item())
        ref.zero_grad()
        naive.zero_grad()
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start

    a_norm, a_mean = max(amp['norm']), max(amp['mean'])
    tolerances = {'fp32': {q: args.fp32_tol for q in QUANTITIES}}
    if args.fp16:
        tolerances['fp16'] = {
            q: args.fp16_safety * FP16_ROUNDINGS[q] * (a_mean if q == 'running_mean' else a_norm) * FP16_EPS
            for q in QUANTITIES
        }
    result = dict(
        device=str(device), torch=torch.__version__, python=platform.python_version(),
        gpu=torch.cuda.get_device_name(device) if device.type == 'cuda' else None,
        cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if device.type == 'cuda' else None,
        tf32=flags, layer=repr(ref.cbn),
        setup=dict(iters=args.iters, batch=[n, c_in, size, size], conv=f'Conv2d({c_in}, {c}, 3, padding=1, bias=True)',
                   window_size=k, lr=args.lr, seed=args.seed, loss='sum(y * g) / (N*H*W), g ~ N(0, 1)',
                   design='one fp64 trajectory; followers get its parameters before every step and keep their own '
                   'windows and running statistics', error='||dev - ref|| / ||ref||, worst step'),
        seconds=seconds,
        reference=dict(kernel_step=dict(median=sorted(kernel_step)[len(kernel_step) // 2], max=max(kernel_step)),
                       compensation_effect=dict(
                           doc='||y(Naive CBN) - y(CBN)|| / ||y(CBN)|| in fp64 at the same parameters and data: '
                           'what a broken compensation would cost, against the tolerances',
                           max=max(compensation_effect), per_step=compensation_effect),
                       amplification=dict(norm=a_norm, mean=a_mean, per_step=amp)),
        checks={}, passed=True)
    for name in followers:
        worst = {q: max(errors[name][q]) for q in QUANTITIES + INFO_QUANTITIES}
        tol = tolerances[name]
        check = dict(tolerance=tol, worst=worst, per_step=errors[name],
                     window_length=followers[name].cbn.window_length,
                     failed=[q for q in QUANTITIES if not worst[q] <= tol[q]])
        window = followers[name].cbn.window_at(0)
        check['window_dtype'] = str(window.dtype) if window is not None else None
        if check['window_length'] != min(k - 1, args.iters):
            check['failed'].append(f"window_length {check['window_length']} != {min(k - 1, args.iters)}")
        if name == 'fp16':
            check.update(
                derivation=dict(
                    formula='SAFETY * ROUNDINGS[q] * A * 2^-11 (A = A_mean for running_mean, A_norm otherwise)',
                    fp16_unit_roundoff=FP16_EPS, safety=args.fp16_safety, roundings=FP16_ROUNDINGS,
                    a_norm=a_norm, a_mean=a_mean),
                grad_scaler=dict(init_scale=args.init_scale, scales=scales, overflow_steps=fp16_overflow_steps,
                                 peak_scaled_grad=fp16_peak, fp16_max=FP16_MAX))
            if fp16_overflow_steps:
                check['failed'].append(f'GradScaler found inf/nan at steps {fp16_overflow_steps}')
            if check['window_dtype'] not in (None, 'torch.float32'):
                check['failed'].append(f"window kept in {check['window_dtype']}, not fp32")
        check['passed'] = not check['failed']
        result['checks'][name] = check
        result['passed'] = result['passed'] and check['passed']
    return result


def report(result) -> None:
    print(f"CBN trajectory on {result['device']}"
          f"{' (' + result['gpu'] + ')' if result['gpu'] else ''} against CPU fp64: "
          f"{result['setup']['iters']} steps, k={result['setup']['window_size']}, {result['seconds']:.1f} s")
    ref = result['reference']
    print(f"  reference: kernel moves {ref['kernel_step']['median']:.2%} per step (median); Naive CBN differs by "
          f"{ref['compensation_effect']['max']:.2e}; A_norm {ref['amplification']['norm']:.2f}, "
          f"A_mean {ref['amplification']['mean']:.2f}")
    for name, check in result['checks'].items():
        print(f"  {name}: {'PASS' if check['passed'] else 'FAIL ' + '; '.join(map(str, check['failed']))}")
        for q in QUANTITIES:
            print(f"    {q:<14} worst {check['worst'][q]:.3e}   tolerance {check['tolerance'][q]:.3e}")
        print('    ' + ', '.join(f"{q} {check['worst'][q]:.1e}" for q in INFO_QUANTITIES) + ' (information)')
    print(f"trajectory check: {'PASS' if result['passed'] else 'FAIL'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--iters', type=int, default=20)
    parser.add_argument('--window', type=int, default=4, help='k of the layer')
    parser.add_argument('--lr', type=float, default=0.05, help='SGD step of the fp64 reference')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--fp32-tol', type=float, default=1e-4)
    parser.add_argument('--fp16-safety', type=float, default=FP16_SAFETY)
    parser.add_argument('--init-scale', type=float, default=2.0**12, help="the GradScaler's scale (a power of 2)")
    parser.add_argument('--no-fp16', dest='fp16', action='store_false')
    parser.add_argument('--out', default=osp.join(os.environ.get('OUT') or osp.join(ROOT, 'work_dirs'),
                                                  'trajectory.json'))
    args = parser.parse_args(argv)
    if args.iters < 1 or args.window < 2:
        parser.error('--iters must be >= 1 and --window >= 2')
    result = run(args)
    report(result)
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)
    print(f'written {args.out}')
    return 0 if result['passed'] else 1


if __name__ == '__main__':
    sys.exit(main())
