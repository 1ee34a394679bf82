"""Benchmarks of CBN: launches and host time, layer cost against its floor, model step time, cost against the
window size, memory.

    python tools/benchmark.py [--cases launch,layer,window,model,model_noops] [--reps 7] [--device cpu|cuda]
                              [--out FILE]

The ``launch`` case counts the non-view aten ops of one windowed forward+backward of conv -> norm (each is a kernel
launch on a GPU, where a layer's time is set by its launches, not its FLOPs) with a ``TorchDispatchMode``, and times
the same step at a tiny shape (2x8x8x8, one thread), where the arithmetic is near zero: the host time per
layer-iteration. Both are the CPU stand-ins for the GPU's cost.

The ``model`` case builds mmdet's Faster R-CNN, whose RoIAlign and nms are mmcv's compiled ops. ``model_noops``
(not in the default ``--cases``) needs no ops, so it runs where mmcv is pure Python (``tools/gpu_check.sh``): mmdet's
R50 + FPN on an image batch and the 4conv1fc head stack on RoI-shaped tensors, forward+backward+SGD, with BN
everywhere, CBN in FPN and head ('CBN heads') and CBN everywhere ('CBN all'); it reports their step-time ratios.

Every case runs in this one process, with warm-up, the variants interleaved in each repetition (this machine is
shared and noisy), and the median of the repetitions. CPU cases are timed in process CPU time, CUDA cases in wall
time. Ratios of two variants are taken per repetition and their
median and inter-quartile range are reported. Writes a JSON (default ``work_dirs/benchmark/benchmark.json``) and
prints a table.

The floor of exact CBN is one extra convolution weight-gradient per layer and iteration (``dnu/dW`` of Eq. 8 with
grad_output ``2x/m``); everything else is O(C*C_in*K) or elementwise.

On Linux the script re-executes itself with glibc's allocator told to keep freed memory (``STEADY_MALLOC``) unless
``--system-malloc`` is given. With glibc's defaults every tensor above the mmap threshold is returned to the
kernel when freed and faulted in again at its next use: about a million page faults per Faster R-CNN step here,
10% of the step in kernel time, and the largest part of the step-to-step spread. Every variant runs under the same
allocator. The peak-memory case always runs its child processes with the system defaults.
"""
import argparse
import json
import os
import os.path as osp
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import torch
import torch.nn as nn
from torch.nn.grad import conv2d_weight
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)

from cbn_mmdet.models.cbn import CrossIterationBatchNorm2d  # noqa: E402


# ----------------------------------------------------------------------------- the authors' algorithm (baseline)
class AuthorsCBN(nn.Module):
    """A re-implementation of the authors' published ``CBatchNorm2d`` as the speed baseline.

    Like the release it takes ``forward(x, conv_weight)``, gets ``dmu/dW`` and ``dmeanx2/dW`` from two
    ``autograd.grad`` passes, keeps Python lists of past statistics, gradients and weight copies (three kernel-sized
    tensors per stored iteration), and normalizes with autograd over hand-written ops.
    """

    def __init__(self, num_features, window_size=4, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.k, self.eps = window_size, eps
        self.pre_mu, self.pre_meanx2, self.pre_dmudw, self.pre_dmeanx2dw, self.pre_weight = [], [], [], [], []

    def forward(self, x, conv_weight):
        n, c, h, w = x.shape
        y = x.transpose(0, 1).contiguous().view(c, -1)
        cur_mu = y.mean(dim=1)
        cur_meanx2 = y.pow(2).mean(dim=1)
        ones = torch.ones_like(cur_mu)
        dmudw = torch.autograd.grad(cur_mu, conv_weight, ones, retain_graph=True)[0]
        dmeanx2dw = torch.autograd.grad(cur_meanx2, conv_weight, ones, retain_graph=True)[0]
        wd = conv_weight.data
        mu_all = torch.stack([cur_mu] + [m + (d * (wd - pw)).sum((1, 2, 3))
                                         for m, d, pw in zip(self.pre_mu, self.pre_dmudw, self.pre_weight)])
        meanx2_all = torch.stack([cur_meanx2] + [
            m + (d * (wd - pw)).sum((1, 2, 3)) for m, d, pw in zip(self.pre_meanx2, self.pre_dmeanx2dw, self.pre_weight)
        ])
        sigma2_all = meanx2_all - mu_all.pow(2)
        valid = (sigma2_all >= 0).to(mu_all.dtype)
        count = valid.sum(dim=0)
        mu = (mu_all * valid).sum(dim=0) / count
        sigma2 = (meanx2_all * valid).sum(dim=0) / count - mu.pow(2)
        keep = self.k - 2
        self.pre_mu = [cur_mu.detach()] + self.pre_mu[:keep]
        self.pre_meanx2 = [cur_meanx2.detach()] + self.pre_meanx2[:keep]
        self.pre_dmudw = [dmudw.detach()] + self.pre_dmudw[:keep]
        self.pre_dmeanx2dw = [dmeanx2dw.detach()] + self.pre_dmeanx2dw[:keep]
        self.pre_weight = [wd.clone()] + self.pre_weight[:keep]
        y = (y - mu.view(-1, 1)) / (sigma2.view(-1, 1) + self.eps).sqrt()
        y = self.weight.view(-1, 1) * y + self.bias.view(-1, 1)
        return y.view(c, n, h, w).transpose(0, 1)


# ----------------------------------------------------------------------------- timing
# glibc: never serve allocations by mmap, never trim the heap: freed memory is reused without page faults
STEADY_MALLOC = {'MALLOC_MMAP_MAX_': '0', 'MALLOC_TRIM_THRESHOLD_': str(2**60)}


def allocator_settings() -> Dict[str, str]:
    """The glibc allocator settings in force in this process (empty: the system defaults)."""
    return {k: os.environ[k] for k in STEADY_MALLOC if k in os.environ}


def sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def interleaved(cases: Dict[str, Callable[[], None]], reps: int, warmup: int, device) -> Dict[str, List[float]]:
    """Run every case ``warmup`` times, then ``reps`` rounds of all cases (rotating the order); seconds per call.

    On CUDA the clock is wall time after a synchronize. On the CPU it is the process's CPU time
    (``time.process_time``): on a shared machine it does not count the time this process waits for a core, which
    wall time does, and it is the same quantity for one thread or several (their sum).
    """
    clock = time.perf_counter if device.type == 'cuda' else time.process_time
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    times = {name: [] for name in names}
    for r in range(reps):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            sync(device)
            start = clock()
            cases[name]()
            sync(device)
            times[name].append(clock() - start)
    return times


def summary(values: List[float]) -> Dict[str, float]:
    """Median, quartiles, and a bootstrap 95% confidence interval of the median (the spread that matters when
    a median is compared with a bar)."""
    qs = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    gen = torch.Generator().manual_seed(0)
    v = torch.tensor(values, dtype=torch.float64)
    boot = v[torch.randint(len(values), (2000, len(values)), generator=gen)].median(dim=1).values
    return dict(median=statistics.median(values), q1=qs[0], q3=qs[2], ci95=[boot.quantile(0.025).item(),
                                                                           boot.quantile(0.975).item()],
                n=len(values), values=list(values))


def paired(times, a, b, scale=None):
    """Per-repetition (a - b) / scale_r, or a / b when scale is None."""
    if scale is not None:
        vals = [(x - y) / s for x, y, s in zip(times[a], times[b], times[scale])]
    else:
        vals = [x / y for x, y in zip(times[a], times[b])]
    return summary(vals)


# ----------------------------------------------------------------------------- launch case
class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active, view ops excluded (they launch nothing)."""

    def __init__(self):
        super().__init__()
        self.counts: Dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            name = func.overloadpacket.__name__
            self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.counts.values())


LAUNCH_VARIANTS = ('BN', 'CBN k=4', 'CBN k=8', 'CBN k=4 authors bw', 'CBN k=4 r=16', 'Naive CBN k=4', 'authors k=4')


def launch_norm(variant, c):
    if variant == 'BN':
        return nn.BatchNorm2d(c)
    if variant == 'authors k=4':
        return AuthorsCBN(c, 4)
    k = int(variant.split('k=')[1].split()[0])
    options = dict(backward='authors') if 'authors bw' in variant else {}
    if ' r=' in variant:  # the second-order term from r patches per slot
        options['second_order'] = int(variant.split(' r=')[1].split()[0])
    if variant.startswith('Naive'):
        options = dict(compensate=False)
    return CrossIterationBatchNorm2d(c, window_size=k, **options)


def count_launches(variant, shape=(2, 8, 8, 8), device='cpu'):
    """Non-view aten ops of one forward+backward of conv -> norm with the window full, and their histogram."""
    torch.manual_seed(0)
    n, c, h, w = shape
    conv = nn.Conv2d(c, c, 3, padding=1, bias=False).to(device)
    norm = launch_norm(variant, c).to(device)
    u = torch.randn(shape, device=device, requires_grad=True)
    grad = torch.randn(shape, device=device)
    step = conv_norm_step(conv, norm, u, grad)
    for _ in range(9):  # windows full (k <= 8)
        step()
    counter = OpCounter()
    with counter:
        step()
    return counter.total, dict(sorted(counter.counts.items(), key=lambda kv: -kv[1]))


def run_launch(args, device):
    shape = (2, 8, 8, 8)
    out = dict(shape=list(shape), ops={}, histogram={})
    for v in LAUNCH_VARIANTS:
        out['ops'][v], out['histogram'][v] = count_launches(v, shape, device)
    out['extra_ops_over_bn'] = {v: n - out['ops']['BN'] for v, n in out['ops'].items()}
    # host time: each case is 20 steps, so a repetition is long enough for the clock
    torch.manual_seed(0)
    n, c, h, w = shape
    conv = nn.Conv2d(c, c, 3, padding=1, bias=False).to(device)
    u = torch.randn(shape, device=device, requires_grad=True)
    grad = torch.randn(shape, device=device)
    cases = {}
    for v in LAUNCH_VARIANTS:
        step = conv_norm_step(conv, launch_norm(v, c).to(device), u, grad)

        def many(step=step):
            for _ in range(20):
                step()

        cases[v] = many
    bn_step = conv_norm_step(conv, nn.BatchNorm2d(c).to(device), u, grad)
    xs = conv(u).detach()

    def floor_many():  # BN plus the mathematics' one extra op: the weight-gradient of Eq. 8
        for _ in range(20):
            bn_step()
            conv2d_weight(u.detach(), conv.weight.shape, xs, 1, 1)

    cases['BN + 1 weight-grad'] = floor_many
    times = interleaved(cases, args.reps * 3, args.warmup + 1, device)
    times = {k: [t / 20 for t in v] for k, v in times.items()}
    out['host_time'] = {k: summary(v) for k, v in times.items()}
    out['over_bn'] = {v: paired(times, v, 'BN') for v in (*LAUNCH_VARIANTS, 'BN + 1 weight-grad') if v != 'BN'}
    print(f'\n[launch] conv3x3 + norm at {shape}, forward+backward, window full: non-view aten ops, host time')
    for v in (*LAUNCH_VARIANTS, 'BN + 1 weight-grad'):
        t = out['host_time'][v]
        ratio = '' if v == 'BN' else (f"  x{out['over_bn'][v]['median']:.2f} BN  95% CI "
                                      f"[{out['over_bn'][v]['ci95'][0]:.2f}, {out['over_bn'][v]['ci95'][1]:.2f}]")
        ops = f"{out['ops'][v]:5d} ops ({out['extra_ops_over_bn'][v]:+d} over BN)" if v in out['ops'] else ' ' * 24
        print(f"  {v:<20}{ops}  {1e6 * t['median']:8.0f} us{ratio}")
    return out


# ----------------------------------------------------------------------------- layer case
def conv_norm_step(conv, norm, u, grad):

    def step():
        x = conv(u)
        y = norm(x, conv.weight) if isinstance(norm, AuthorsCBN) else norm(x)
        y.backward(grad)
        conv.weight.grad = None
        u.grad = None
        for p in norm.parameters():
            p.grad = None

    return step


def layer_cases(shape, device, windows=(4, ), naive=True, authors=True, others=True, subsample=0, second_order=0):
    torch.manual_seed(0)
    n, c, h, w = shape
    u = torch.randn(shape, device=device, requires_grad=True)
    conv = nn.Conv2d(c, c, 3, padding=1, bias=False).to(device)
    grad = torch.randn(shape, device=device)
    cases = {}
    if others:
        cases['BN'] = conv_norm_step(conv, nn.BatchNorm2d(c).to(device), u, grad)
        cases['GN'] = conv_norm_step(conv, nn.GroupNorm(32, c).to(device), u, grad)
    for k in windows:
        cases[f'CBN k={k}'] = conv_norm_step(conv, CrossIterationBatchNorm2d(c, window_size=k).to(device), u, grad)
    if subsample > 1:  # the opt-in approximation of dnu/dW
        cases[f'CBN k=4 r={subsample}'] = conv_norm_step(
            conv, CrossIterationBatchNorm2d(c, window_size=4, stat_grad_subsample=subsample).to(device), u, grad)
    if second_order:  # the second-order term from r stored patches per slot
        cases[f'CBN k=4 second_order={second_order}'] = conv_norm_step(
            conv, CrossIterationBatchNorm2d(c, window_size=4, second_order=second_order).to(device), u, grad)
    if authors:  # the same layer with the authors' backward: what the exact backward costs on top
        cases['CBN k=4 authors bw'] = conv_norm_step(
            conv, CrossIterationBatchNorm2d(c, window_size=4, backward='authors').to(device), u, grad)
    if naive:
        cases['Naive CBN k=4'] = conv_norm_step(conv, CrossIterationBatchNorm2d(c, window_size=4,
                                                                               compensate=False).to(device), u, grad)
    if authors:
        cases['authors k=4'] = conv_norm_step(conv, AuthorsCBN(c, 4).to(device), u, grad)
    xs = conv(u).detach()

    def floor():
        conv2d_weight(u.detach(), conv.weight.shape, xs, 1, 1)

    cases['floor: 1 weight-grad'] = floor
    return cases


def history_bytes(shape, k=4, device='cpu', second_order=0):
    """Bytes of the window of one CBN layer (full, k) against the authors' 3(k-1) kernels + 2(k-1) vectors."""
    n, c, h, w = shape
    conv = nn.Conv2d(c, c, 3, padding=1, bias=False).to(device)
    layer = CrossIterationBatchNorm2d(c, window_size=k, second_order=second_order).to(device)
    u = torch.randn(shape, device=device)
    for _ in range(k):
        layer(conv(u)).sum().backward()
    ours = layer.window_nbytes
    kernel = conv.weight.numel() * 4
    authors = 3 * (k - 1) * kernel + 2 * (k - 1) * c * 4
    return dict(ours=ours, authors=authors, kernel=kernel, k=k)


def run_layer(args, device):
    out = {}
    for shape in ((2, 256, 64, 64), (512, 256, 7, 7)):
        times = interleaved(layer_cases(shape, device, subsample=args.subsample, second_order=args.second_order),
                            args.reps, args.warmup, device)
        key = 'x'.join(map(str, shape))
        out[key] = dict(
            times={k: summary(v) for k, v in times.items()},
            cbn_minus_bn_over_floor=paired(times, 'CBN k=4', 'BN', scale='floor: 1 weight-grad'),
            naive_minus_bn_over_floor=paired(times, 'Naive CBN k=4', 'BN', scale='floor: 1 weight-grad'),
            authors_bw_minus_bn_over_floor=paired(times, 'CBN k=4 authors bw', 'BN', scale='floor: 1 weight-grad'),
            exact_minus_authors_bw_over_floor=paired(times, 'CBN k=4', 'CBN k=4 authors bw',
                                                     scale='floor: 1 weight-grad'),
            cbn_over_bn=paired(times, 'CBN k=4', 'BN'),
            authors_over_bn=paired(times, 'authors k=4', 'BN'),
            history=history_bytes(shape, device=device))
        if args.second_order:
            out[key]['second_order_minus_bn_over_floor'] = paired(times, f'CBN k=4 second_order={args.second_order}',
                                                                  'BN', scale='floor: 1 weight-grad')
            out[key]['history_second_order'] = history_bytes(shape, device=device, second_order=args.second_order)
        if args.subsample > 1:
            out[key]['subsampled_minus_bn_over_floor'] = paired(times, f'CBN k=4 r={args.subsample}', 'BN',
                                                                scale='floor: 1 weight-grad')
        print_layer(key, out[key])
    return out


def run_window(args, device):
    out = {}
    for shape in ((2, 256, 64, 64), (512, 256, 7, 7)):
        cases = layer_cases(shape, device, windows=(1, 2, 4, 8), naive=False, authors=False, others=False)
        times = interleaved(cases, args.reps, args.warmup, device)
        key = 'x'.join(map(str, shape))
        out[key] = dict(times={k: summary(v) for k, v in times.items()},
                        k8_over_k2=paired(times, 'CBN k=8', 'CBN k=2'))
        print(f'\n[window] {key}: ' + ', '.join(f"{k} {1e3 * v['median']:.0f} ms"
                                                for k, v in out[key]['times'].items()) +
              f"; t(k=8)/t(k=2) = {out[key]['k8_over_k2']['median']:.3f} "
              f"95% CI [{out[key]['k8_over_k2']['ci95'][0]:.3f}, {out[key]['k8_over_k2']['ci95'][1]:.3f}]")
    return out


def print_layer(key, r):
    print(f'\n[layer] conv3x3 256->256 + norm, forward+backward, input {key}')
    for name, s in r['times'].items():
        print(f"  {name:<22}{1e3 * s['median']:9.1f} ms  [{1e3 * s['q1']:.1f}, {1e3 * s['q3']:.1f}]")
    for label, field in (('(CBN - BN) / floor', 'cbn_minus_bn_over_floor'),
                         ('(authors bw - BN)/floor', 'authors_bw_minus_bn_over_floor'),
                         ('(exact - authors bw)/fl', 'exact_minus_authors_bw_over_floor'),
                         ('(Naive - BN) / floor', 'naive_minus_bn_over_floor'), ('CBN / BN', 'cbn_over_bn'),
                         ('authors / BN', 'authors_over_bn'),
                         ('(CBN r - BN) / floor', 'subsampled_minus_bn_over_floor'),
                         ('(2nd order - BN)/floor', 'second_order_minus_bn_over_floor')):
        if field not in r:
            continue
        s = r[field]
        print(f"  {label:<22}{s['median']:9.3f}     IQR [{s['q1']:.3f}, {s['q3']:.3f}]  "
              f"95% CI of median [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]")
    h = r['history']
    print(f"  history per layer (k={h['k']}): {h['ours'] / 2**20:.2f} MiB vs authors' {h['authors'] / 2**20:.2f} MiB "
          f"(one kernel = {h['kernel'] / 2**20:.2f} MiB)")


# ----------------------------------------------------------------------------- model case
MODEL_VARIANTS = ('BN heads', 'GN heads', 'CBN heads', 'CBN heads r=4', 'CBN heads authors', 'BN all', 'CBN all')


def build_detector(variant, device):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.hub import get_config
    from mmengine.registry import DefaultScope

    import cbn_mmdet  # noqa: F401
    register_all_modules()
    norm = {'BN': dict(type='BN', requires_grad=True), 'GN': dict(type='GN', num_groups=32, requires_grad=True),
            'CBN': dict(type='CBN', window_size=4, requires_grad=True)}[variant.split()[0]]
    if ' r=' in variant:  # the opt-in approximation of dnu/dW
        norm['stat_grad_subsample'] = int(variant.split(' r=')[1])
    if variant.endswith(' authors'):  # the authors' backward (history constant), against the exact default
        norm['backward'] = 'authors'
    cfg = get_config('mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py').model
    cfg.backbone.init_cfg = None
    cfg.neck.norm_cfg = norm
    cfg.roi_head.bbox_head.update(type='Shared4Conv1FCBBoxHead', conv_out_channels=256, norm_cfg=norm)
    if variant.endswith('all'):
        cfg.backbone.update(norm_cfg=norm, norm_eval=False, frozen_stages=1)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg)
    torch.manual_seed(0)
    model.init_weights()
    return model.to(device)


def detection_batch(device, size=512):
    from mmdet.testing import demo_mm_inputs
    torch.manual_seed(0)
    return demo_mm_inputs(2, [[3, size, size], [3, size, size]], num_items=[5, 5], num_classes=80, device=device)


def train_step_fn(model, packed):
    optim = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

    def step():
        model.train()
        data = model.data_preprocessor(packed, True)
        loss, _ = model.parse_losses(model(**data, mode='loss'))
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)

    return step


def infer_fn(model, packed):

    def infer():
        model.eval()
        with torch.no_grad():
            data = model.data_preprocessor(packed, False)
            return model(**data, mode='tensor')

    return infer


def extra_weight_grads(model, packed, device):
    """The floor's extra cost: one conv weight-gradient per CBN layer, at the shapes of one real iteration."""
    from cbn_mmdet.models import CrossIterationBatchNorm2d as CBN
    from cbn_mmdet.models import find_conv
    captured = []

    def hook(module, inputs, output):
        spec, _ = find_conv(inputs[0])
        if spec is not None:
            captured.append((spec.input.detach().clone(), tuple(spec.weight.shape), inputs[0].detach().clone(),
                             spec.stride, spec.padding, spec.dilation, spec.groups))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, CBN)]
    train_step_fn(model, packed)()
    for h in handles:
        h.remove()

    def run():
        for u, shape, x, stride, padding, dilation, groups in captured:
            conv2d_weight(u, shape, x, stride, padding, dilation, groups)

    return run, len(captured)


def run_model(args, device):
    packed = detection_batch(device)
    variants = [v for v in MODEL_VARIANTS if v in args.model_variants]
    models = {v: build_detector(v, device) for v in variants}
    cases = {f'train {v}': train_step_fn(m, packed) for v, m in models.items()}
    floors = {}
    cbn_variants = [v for v in ('CBN heads', 'CBN all') if v in models and v.replace('CBN', 'BN') in models]
    for v in cbn_variants:
        floors[v], count = extra_weight_grads(models[v], packed, device)
        cases[f'extra weight-grads {v}'] = floors[v]
        print(f'[model] {v}: {count} CBN layers with a conv')
    infer = args.model_infer and {'BN heads', 'CBN heads'} <= set(models)
    for v in ('BN heads', 'CBN heads') if infer else ():
        cases[f'infer {v}'] = infer_fn(models[v], packed)
    # window full before timing: k-1 warm-up training steps run inside interleaved()
    times = interleaved(cases, args.model_reps, max(args.warmup, 3), device)
    out = dict(times={k: summary(v) for k, v in times.items()})
    for v in cbn_variants:
        bn = v.replace('CBN', 'BN')  # the same layers normalized by BN
        out[f'({v} - {bn}) / extra weight-grads'] = paired(times, f'train {v}', f'train {bn}',
                                                           scale=f'extra weight-grads {v}')
        out[f'{v} / {bn} (train)'] = paired(times, f'train {v}', f'train {bn}')
    for v in ('CBN heads r=4', 'CBN heads authors'):
        if {v, 'BN heads', 'CBN heads'} <= set(models):  # against the floor of the exact default
            out[f'({v} - BN heads) / extra weight-grads'] = paired(times, f'train {v}', 'train BN heads',
                                                                   scale='extra weight-grads CBN heads')
    if {'CBN heads authors', 'CBN heads'} <= set(models):  # what the exact backward costs, in floors
        out['(CBN heads - CBN heads authors) / extra weight-grads'] = paired(
            times, 'train CBN heads', 'train CBN heads authors', scale='extra weight-grads CBN heads')
    if {'GN heads', 'BN heads'} <= set(models):
        out['GN heads / BN heads (train)'] = paired(times, 'train GN heads', 'train BN heads')
    if infer:
        out['CBN heads / BN heads (inference)'] = paired(times, 'infer CBN heads', 'infer BN heads')
        # identical outputs in eval mode: load BN's weights into the CBN model (same keys)
        models['CBN heads'].load_state_dict(models['BN heads'].state_dict(), strict=True)
        a, b = infer_fn(models['BN heads'], packed)(), infer_fn(models['CBN heads'], packed)()
        out['eval outputs identical'] = bool(all(torch.equal(x, y) for x, y in zip(_leaves(a), _leaves(b))))
    print('\n[model] Faster R-CNN R50-FPN 4conv1fc, 2 images 512x512, forward+backward+SGD')
    for name, s in out['times'].items():
        print(f"  {name:<34}{s['median']:8.2f} s  [{s['q1']:.2f}, {s['q3']:.2f}]")
    for name, s in out.items():
        if isinstance(s, dict) and 'median' in s:
            print(f"  {name:<54}{s['median']:7.3f}  95% CI [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]")
    if infer:
        print(f"  eval outputs identical (CBN vs BN, same weights): {out['eval outputs identical']}")
    return out


# ----------------------------------------------------------------------------- model case without mmcv's ops
NOOPS_VARIANTS = ('BN all', 'CBN heads', 'CBN all')
NOOPS_WINDOW = 4  # CBN's window size k in this case, as in the model case (the paper's detection setting)
NOOPS_ROI = 7  # RoIAlign's output size in the Faster R-CNN config (roi_layer output_size=7): RoIs of 256x7x7
# the package __init__s that load_mmdet_resnet_fpn() skips, and the module files it loads, in dependency order
NOOPS_PACKAGES = ('mmdet.models', 'mmdet.models.layers', 'mmdet.models.backbones', 'mmdet.models.necks')
NOOPS_MODULES = ('mmdet.models.layers.res_layer', 'mmdet.models.backbones.resnet', 'mmdet.models.necks.fpn')


def load_mmdet_resnet_fpn():
    """mmdet's ``ResNet`` and ``FPN`` classes, without running ``mmdet/models/__init__.py`` (or mmcv.ops).

    ``mmdet.models`` and its subpackages import every detector in their ``__init__``, and with them mmcv's compiled
    ops (RoIAlign, nms), which the pure-Python mmcv of the GPU check lacks: ``import mmdet.models`` fails there. The
    three module files that ResNet and FPN live in need only mmcv.cnn, mmengine, mmdet.registry and mmdet.utils, none
    of which imports mmcv.ops. They are loaded by the standard import machinery under their real names, beneath
    placeholder packages (a bare module with the real ``__path__``, whose ``__init__`` never runs), and the
    placeholders are removed again. The real names matter: executing resnet.py and fpn.py registers ResNet and FPN
    in mmdet's MODELS registry, and a later real ``import mmdet.models`` (where mmcv has its ops, as on the CPU
    machine) finds the three modules in sys.modules instead of executing them a second time, which would register
    the names twice, an error in mmengine; such an import works (from-imports of them too), but the new package
    objects then lack the three as attributes (``mmdet.models.necks.fpn`` by attribute access). Where
    ``mmdet.models`` is already imported (``main`` runs the model case first), its modules are used as they are.
    """
    import importlib
    import types

    import mmdet
    models_dir = osp.join(osp.dirname(mmdet.__file__), 'models')
    placeholders = [pkg for pkg in NOOPS_PACKAGES if pkg not in sys.modules]
    for pkg in placeholders:
        module = types.ModuleType(pkg)
        module.__path__ = [osp.join(models_dir, *pkg.split('.')[2:])]
        sys.modules[pkg] = module
    try:
        res_layer, resnet, fpn = NOOPS_MODULES
        if 'mmdet.models.layers' in placeholders:  # resnet.py's `from ..layers import ResLayer` reads the package
            sys.modules['mmdet.models.layers'].ResLayer = importlib.import_module(res_layer).ResLayer
        return importlib.import_module(resnet).ResNet, importlib.import_module(fpn).FPN
    finally:
        for pkg in placeholders:
            del sys.modules[pkg]


def build_noops_model(variant, device):
    """R50 + FPN as in mmdet's faster-rcnn_r50_fpn_1x_coco.py (no pretrained weights) and the shared 4conv1fc stack of
    ``Shared4Conv1FCBBoxHead`` (4 ConvModules 3x3 256 with the norm, then fc 256*7*7 -> 1024 and ReLU), built from
    mmdet's and mmcv's pure-Python modules. 'CBN heads' puts CBN in the FPN and the head stack, as the model case's
    variant of that name does (12 layers); 'CBN all' in the backbone too; 'BN all' is the baseline of both."""
    from mmcv.cnn import ConvModule
    if variant not in NOOPS_VARIANTS:
        raise ValueError(f'model_noops: unknown variant {variant!r} (choose from {NOOPS_VARIANTS})')
    resnet, fpn = load_mmdet_resnet_fpn()
    bn = dict(type='BN', requires_grad=True)
    cbn = dict(type='CBN', window_size=NOOPS_WINDOW, requires_grad=True)
    body, heads = (cbn if variant == 'CBN all' else bn), (bn if variant == 'BN all' else cbn)
    torch.manual_seed(0)
    # norm_eval=False: the backbone's norms train (as the model case's 'all' variants); frozen_stages=1 as the config
    backbone = resnet(depth=50, num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=1, norm_cfg=dict(body),
                      norm_eval=False, style='pytorch', init_cfg=None)
    # the config's neck: R50's four stage widths in, 256 channels and 5 levels out
    neck = fpn(in_channels=[256, 512, 1024, 2048], out_channels=256, num_outs=5, norm_cfg=dict(heads))
    # Shared4Conv1FCBBoxHead's defaults: conv_out_channels=256 (the model case sets it), fc_out_channels=1024
    head = nn.Sequential(*[ConvModule(256, 256, 3, padding=1, norm_cfg=dict(heads)) for _ in range(4)],
                         nn.Flatten(1), nn.Linear(256 * NOOPS_ROI * NOOPS_ROI, 1024), nn.ReLU(inplace=True))
    return nn.ModuleDict(dict(backbone=backbone, neck=neck, head=head)).to(device)


def noops_norms(model):
    """{part: {norm class: count}} of a model from :func:`build_noops_model`."""
    out = {}
    for part, module in model.items():
        counts = out.setdefault(part, {})
        for m in module.modules():
            if isinstance(m, (nn.BatchNorm2d, CrossIterationBatchNorm2d)):
                counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    return out


def noops_step_fn(model, images, rois):
    """One training step: forward and backward of backbone + FPN on ``images`` and of the head stack on ``rois``
    (standing for RoIAlign's output, which needs mmcv's ops; it requires grad, so the head computes its input
    gradient as in the detector), with a scalar loss, then an SGD step (so the windows compensate real kernel
    changes). Every CBN layer is told the iteration first (``begin_iteration``, as CBNBurnInHook does after burn-in:
    windowed, collecting)."""
    # the model case's optimizer (train_step_fn): small steps, the kernels move a little every iteration
    optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)
    layers = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
    iteration = [0]
    model.train()  # ResNet.train() keeps its frozen stages in eval mode

    def step():
        for layer in layers:
            layer.begin_iteration(iteration[0])
        iteration[0] += 1
        feats = model['neck'](model['backbone'](images))
        loss = sum(f.pow(2).mean() for f in feats) + model['head'](rois).pow(2).mean()
        loss.backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        rois.grad = None

    return step


def run_model_noops(args, device):
    # 512: the model case's images (detection_batch); 256 on the CPU keeps a step at a few seconds on this machine
    size = args.noops_size or (512 if device.type == 'cuda' else 256)
    gen = torch.Generator().manual_seed(0)  # the batch is drawn on the CPU: the same numbers on every device
    images = torch.randn(args.noops_images, 3, size, size, generator=gen).to(device)
    rois = torch.randn(args.noops_rois, 256, NOOPS_ROI, NOOPS_ROI, generator=gen).to(device).requires_grad_()
    models = {v: build_noops_model(v, device) for v in NOOPS_VARIANTS}
    cases = {v: noops_step_fn(m, images, rois) for v, m in models.items()}
    # k-1 steps fill a window; the k-th is the first timed like every later one (warm-up inside interleaved())
    times = interleaved(cases, args.model_reps, max(args.warmup, NOOPS_WINDOW), device)
    out = dict(images=list(images.shape), rois=list(rois.shape), window_size=NOOPS_WINDOW,
               norms={v: noops_norms(m) for v, m in models.items()},
               times={v: summary(t) for v, t in times.items()},
               ratios={f'{v} / BN all': paired(times, v, 'BN all') for v in ('CBN heads', 'CBN all')})
    # the CBN layers that train (those of the backbone's frozen stages are in eval mode: plain BN, no window) and how
    # many past iterations their windows hold now: k-1 when the steps really ran windowed
    out['cbn_layers'] = {}
    for v, m in models.items():
        cbn = [layer for layer in m.modules() if isinstance(layer, CrossIterationBatchNorm2d)]
        lengths = [layer.window_length for layer in cbn if layer.training]
        out['cbn_layers'][v] = dict(total=len(cbn), training=len(lengths),
                                    window_lengths=[min(lengths), max(lengths)] if lengths else [])
    print(f"\n[model_noops] R50-FPN on {'x'.join(map(str, out['images']))} + 4conv1fc on {args.noops_rois} RoIs "
          f"(no mmcv ops), forward+backward+SGD, CBN k={NOOPS_WINDOW}")
    for v, s in out['times'].items():
        c = out['cbn_layers'][v]
        windows = f", windows of {'-'.join(map(str, sorted(set(c['window_lengths']))))}" if c['training'] else ''
        print(f"  {v:<12}{1e3 * s['median']:10.1f} ms  [{1e3 * s['q1']:.1f}, {1e3 * s['q3']:.1f}]  "
              f"{c['total']} CBN layers, {c['training']} training{windows}")
    for name, s in out['ratios'].items():
        print(f"  {name:<22}{s['median']:7.3f}  IQR [{s['q1']:.3f}, {s['q3']:.3f}]  "
              f"95% CI of median [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]")
    return out


def _leaves(obj):
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _leaves(o)]
    return []


def _vm_hwm_bytes() -> int:
    """This process's resident-set high-water mark (VmHWM: per address space, so it restarts at exec)."""
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM:'))


def peak_memory_child(variant, device):
    """Peak memory of five training steps of one variant (run in a fresh child process)."""
    model = build_detector(variant, torch.device(device))
    step = train_step_fn(model, detection_batch(torch.device(device)))
    built = _vm_hwm_bytes()
    for _ in range(5):
        step()
    if device == 'cuda':
        return dict(peak_bytes=torch.cuda.max_memory_allocated())
    return dict(peak_rss_bytes=_vm_hwm_bytes(), peak_rss_after_build_bytes=built)


def run_memory(args):
    out = {}
    env = {k: v for k, v in os.environ.items() if k not in STEADY_MALLOC}  # memory as users see it
    for variant in MODEL_VARIANTS:
        code = (f'import json, sys; sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {osp.join(ROOT, "tools")!r});'
                f'import benchmark; print("RESULT", json.dumps(benchmark.peak_memory_child({variant!r}, '
                f'{args.device!r})))')
        proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith('RESULT')]
        out[variant] = json.loads(line[-1][7:]) if line else dict(error=proc.stderr[-500:])
        print(f'[memory] {variant}: {out[variant]}')
    return out


CASES = ('launch', 'layer', 'window', 'model', 'model_noops', 'memory')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--cases', default='launch,layer,window,model,memory',
                        help=f"comma-separated, of {','.join(CASES)} (model_noops: not in the default)")
    parser.add_argument('--reps', type=int, default=15, help='repetitions of the layer cases (median)')
    parser.add_argument('--second-order', type=int, default=0,
                        help="also time CBN with second_order=R in the layer case (0: not)")
    parser.add_argument('--model-reps', type=int, default=5, help='repetitions of the model cases (median)')
    parser.add_argument('--noops-size', type=int, default=None,
                        help='model_noops: image side (default 512 on CUDA, 256 on the CPU)')
    parser.add_argument('--noops-images', type=int, default=2, help='model_noops: images per batch')
    parser.add_argument('--noops-rois', type=int, default=512,
                        help="model_noops: RoIs for the head stack (Faster R-CNN's sampler keeps 512 per image)")
    parser.add_argument('--warmup', type=int, default=3)
    parser.add_argument('--subsample', type=int, default=4,
                        help="also time CBN with stat_grad_subsample=R in the layer case (1: skip)")
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--layer-threads', type=int, default=1,
                        help='torch CPU threads for the layer and window cases (1: steadier timings)')
    parser.add_argument('--model-threads', type=int, default=None,
                        help='torch CPU threads for the model case (default: torch default)')
    parser.add_argument('--model-variants', nargs='+', default=list(MODEL_VARIANTS), choices=MODEL_VARIANTS,
                        metavar='VARIANT', help=f'model variants to time (default: all of {MODEL_VARIANTS})')
    parser.add_argument('--no-model-infer', dest='model_infer', action='store_false',
                        help='skip the inference timing and the eval-output check in the model case')
    parser.add_argument('--system-malloc', action='store_true',
                        help='keep the allocator as it is (default when run as a script: STEADY_MALLOC)')
    parser.add_argument('--out', default=osp.join(ROOT, 'work_dirs/benchmark/benchmark.json'))
    args = parser.parse_args(argv)
    if args.subsample < 1:
        parser.error(f'--subsample must be >= 1, got {args.subsample}')
    if args.second_order < 0:
        parser.error(f'--second-order must be >= 0, got {args.second_order}')
    unknown = [c for c in args.cases.split(',') if c not in CASES]
    if unknown:
        parser.error(f"--cases: unknown case {unknown[0]!r} in {args.cases!r} (choose from {','.join(CASES)})")
    for name in ('model_reps', 'noops_images', 'noops_rois'):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    # the backbone downsamples by 32, and BN in training needs more than one value per channel at C5 (2x2 at 64)
    if args.noops_size is not None and (args.noops_size < 64 or args.noops_size % 32):
        parser.error(f'--noops-size must be a multiple of 32 and >= 64, got {args.noops_size}')
    device = torch.device(args.device)
    default_threads = torch.get_num_threads()
    result = dict(device=str(device), torch=torch.__version__,
                  machine=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                  malloc=allocator_settings() or 'system defaults')
    if device.type == 'cuda':
        result['gpu'] = torch.cuda.get_device_name(device)
    cases = args.cases.split(',')
    torch.set_num_threads(args.layer_threads)
    result['layer_threads'] = args.layer_threads
    if 'launch' in cases:
        result['launch'] = run_launch(args, device)
    if 'layer' in cases:
        result['layer'] = run_layer(args, device)
    if 'window' in cases:
        result['window'] = run_window(args, device)
    torch.set_num_threads(args.model_threads or default_threads)
    result['model_threads'] = torch.get_num_threads()
    if 'model' in cases:
        result['model'] = run_model(args, device)
    if 'model_noops' in cases:
        result['model_noops'] = run_model_noops(args, device)
    if 'memory' in cases:
        result['memory'] = run_memory(args)
    os.makedirs(osp.dirname(args.out), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)
    print(f'\nwritten {args.out}')
    return result


def _reexec_with_steady_malloc() -> None:
    """Restart this script with STEADY_MALLOC in the environment (glibc reads it at process start only)."""
    if (sys.platform.startswith('linux') and '--system-malloc' not in sys.argv
            and any(os.environ.get(k) != v for k, v in STEADY_MALLOC.items())):
        os.execve(sys.executable, [sys.executable] + sys.argv, dict(os.environ, **STEADY_MALLOC))


if __name__ == '__main__':
    _reexec_with_steady_malloc()
    main()
