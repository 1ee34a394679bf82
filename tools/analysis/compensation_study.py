"""Why the Taylor term leaves the window's variance wrong under the exact backward, and what corrects it.

    python tools/analysis/compensation_study.py [--trainings bn authors exact] [--lr 0.1] [--seeds 0 1]
        [--steps 300] [--k 8] [--out work_dirs/analysis/compensation_study]

The trajectory of issue 20: scikit-learn's digits, upsampled to 16x16, 2 images per step; conv (1 -> 32, 3x3, no
bias) -> norm -> ReLU -> conv (32 -> 32, 3x3, stride 2, no bias) -> norm -> ReLU -> pooling -> linear; SGD with
momentum 0.9 and weight decay 1e-4; the norms' gamma and beta frozen. ``--trainings`` picks what trains the network:
``bn`` (BatchNorm), ``naive`` (Naive CBN), ``authors`` and ``exact`` (CBN with that backward, the layer's other
options at their defaults or ``--second-order``). Issue 20's bar compares each CBN training's own estimator
(``taylor_nu``, or ``second_order_strata<r>`` with ``--second-order r``) with the ``naive`` training's ``naive``.

The first layer's input is the images, which no normalization touches, so at every step its window can be rerun
exactly: the same ``k`` iterations' images through the *current* kernel (the target), and a 512-image batch through
it (the population). For every training the study then computes, from the stored images and kernels, what each
estimator of the window statistics would give at that step:

* ``naive``: the stored statistics as they are;
* ``taylor_nu`` (the paper's Eq. 7-8, the layer's compensation): ``nu`` moved to first order. For a conv without
  bias ``mu`` is linear in the kernel and ``nu`` quadratic, so the term it misses is exactly
  ``dW' M2_tau dW = dW' C_tau dW + dmu^2``, with ``C_tau`` the covariance and ``M2_tau`` the second moment of the
  input patches of iteration ``tau``;
* ``taylor_s``: the centred moment ``s = nu - mu^2`` moved to first order instead; it misses ``dW' C_tau dW``
  alone (its ``-dmu^2`` is gone);
* ``second_order``: ``taylor_s`` plus ``dW' C_tau dW`` with ``C_tau`` exact: equal to the target for this layer;
* ``second_order_r{r}``: ``dW' C_tau dW`` estimated from ``r`` input patches of iteration ``tau`` drawn at random
  (what a layer could store: ``r x D`` numbers per slot instead of ``D x D``);
* ``second_order_diag``: ``C_tau`` replaced by its diagonal;
* ``drift_weighted``: ``taylor_nu`` with slot weights ``exp(-(angle_tau / angle_0)^2)`` that fall with the angle
  the kernel turned since the slot was stored (``angle_0`` = ``--drift-angle``); judged against the population,
  since it changes which images the window covers.

The errors are ``||mu - mu*|| / ||sd*||`` and ``||sd - sd*|| / ||sd*||`` (:func:`cbn_mmdet.ops.relative_stat_errors`)
against the window at current weights (``*``) and against the population, averaged over the last
``--average-last`` steps. The mechanism's measurements, per step: the kernel norm, the angle it turns per step and
across the window, the relative step ``||W_t - W_t-1|| / ||W_t||``, and the parts of ``taylor_nu``'s variance error:
``mean_tau dW' C dW`` (what a second-order term adds) and ``mean_tau dmu^2`` (what the centred moment avoids), both
relative to the target variance. As a check of the offline estimators against the layer, ``taylor_nu`` is compared
with the statistics CBN actually normalized with when CBN trains (``layer_check``: largest relative difference).

Writes ``compensation_study.json`` and ``error_vs_angle.png``, ``mechanism.png`` into ``--out``.
"""
import argparse
import json
import math
import os
import os.path as osp
import sys
from collections import defaultdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)

from cbn_mmdet.models.cbn import CrossIterationBatchNorm2d  # noqa: E402
from cbn_mmdet.ops import relative_stat_errors  # noqa: E402
from cbn_mmdet.ops.conv_grads import patch_positions  # noqa: E402

TRAININGS = ('bn', 'naive', 'authors', 'exact')


def load_digits_16():
    """scikit-learn's 1797 digits, bilinearly upsampled to 16x16 and standardized."""
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(16, 16), mode='bilinear', align_corners=False)
    return (images - images.mean()) / images.std(), torch.tensor(digits.target)


class TwoLayerNet(nn.Module):
    """conv -> norm -> ReLU, twice, then pooling and a linear classifier; the norms' gamma and beta frozen."""

    def __init__(self, training, k, second_order=None):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(1, 32, 3, padding=1, bias=False),
                                    nn.Conv2d(32, 32, 3, padding=1, stride=2, bias=False)])
        if training == 'bn':
            self.norms = nn.ModuleList([nn.BatchNorm2d(32) for _ in range(2)])
        else:
            extra = {} if second_order is None else dict(second_order=second_order)
            if training == 'naive':
                extra = dict(compensate=False)
            else:
                extra['backward'] = training
            self.norms = nn.ModuleList([CrossIterationBatchNorm2d(32, window_size=k, **extra) for _ in range(2)])
        for norm in self.norms:
            norm.weight.requires_grad_(False)
            norm.bias.requires_grad_(False)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(norm(conv(x)))
        return self.fc(x.mean((2, 3)))


def angle(a, b):
    """The angle between two kernels, in radians."""
    cos = (a * b).sum() / (a.norm() * b.norm())
    return math.acos(max(-1.0, min(1.0, cos.item())))


def patches(u, conv):
    """The input patches of ``conv`` on ``u``: (N*L, D) in fp64."""
    cols = F.unfold(u.double(), conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (N, D, L)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def slot_parts(u, w_tau, w_t, conv, r, gen, strata):
    """What every estimator needs from one stored iteration: its statistics at its own kernel and the exact and
    estimated parts of their move to the current kernel (fp64, per channel)."""
    x = patches(u, conv)  # (M, D)
    w_tau, w_t = (w.double().reshape(w.shape[0], -1) for w in (w_tau, w_t))
    m = x.mean(0)
    xc = x - m
    y = xc @ w_tau.t()  # (M, C): centred outputs at tau
    delta = w_t - w_tau
    dy = xc @ delta.t()
    mu = m @ w_tau.t()
    d_mu = m @ delta.t()
    out = dict(mu=mu, s=y.square().mean(0), d_mu=d_mu, cross=2 * (y * dy).mean(0), rem=dy.square().mean(0))
    var_x = xc.square().mean(0)  # diagonal of C_tau
    out['rem_diag'] = delta.square() @ var_x
    for size in r:
        pick = torch.randint(x.shape[0], (size, ), generator=gen)
        out[f'rem_r{size}'] = (x[pick] - m).matmul(delta.t()).square().mean(0)
    if strata:  # the layer's own choice of patches (second_order=r): fixed strata of the output positions
        pick = torch.tensor(patch_positions(x.shape[0], strata))
        out['rem_layer'] = (x[pick] - m).matmul(delta.t()).square().mean(0)
    return out


def window_stats(mus, ss, weights):
    """The weighted window mean and variance (Eq. 9-11) of per-iteration (mu, s) rows."""
    mus, ss = torch.stack(mus), torch.stack(ss).clamp(min=0)
    w = torch.tensor(weights, dtype=mus.dtype)[:, None]
    n = w.sum()
    mu_bar = (w * mus).sum(0) / n
    return mu_bar, (w * (ss + (mus - mu_bar).square())).sum(0) / n


ESTIMATORS = ('naive', 'taylor_nu', 'taylor_s', 'second_order', 'second_order_diag', 'drift_weighted')


def estimates(parts, angles, r, drift_angle, strata):
    """Every estimator's window (mu_bar, var_bar); ``parts[0]`` is the current iteration (no move)."""
    out = {}
    ones = [1.0] * len(parts)
    out['naive'] = window_stats([p['mu'] for p in parts], [p['s'] for p in parts], ones)
    moved_mu = [p['mu'] + p['d_mu'] for p in parts]
    s_nu = [p['s'] + p['cross'] - p['d_mu'].square() for p in parts]
    out['taylor_nu'] = window_stats(moved_mu, s_nu, ones)
    s_s = [p['s'] + p['cross'] for p in parts]
    out['taylor_s'] = window_stats(moved_mu, s_s, ones)
    out['second_order'] = window_stats(moved_mu, [s + p['rem'] for s, p in zip(s_s, parts)], ones)
    out['second_order_diag'] = window_stats(moved_mu, [s + p['rem_diag'] for s, p in zip(s_s, parts)], ones)
    for size in r:
        out[f'second_order_r{size}'] = window_stats(moved_mu, [s + p[f'rem_r{size}'] for s, p in zip(s_s, parts)],
                                                    ones)
    if strata:
        out[f'second_order_strata{strata}'] = window_stats(moved_mu, [s + p['rem_layer'] for s, p in zip(s_s, parts)],
                                                           ones)
    weights = [math.exp(-(a / drift_angle) ** 2) for a in angles]
    out['drift_weighted'] = window_stats(moved_mu, s_nu, weights)
    return out


def run_one(training, seed, args, images, labels, big):
    torch.manual_seed(seed)
    model = TwoLayerNet(training, args.k, args.second_order)
    optim = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=args.lr, momentum=0.9,
                            weight_decay=1e-4)
    gen = torch.Generator().manual_seed(1000 + seed)
    sample_gen = torch.Generator().manual_seed(2000 + seed)
    conv = model.convs[0]
    history = []  # (images, kernel) of the last k steps, newest last
    rows = []
    for step in range(args.steps):
        idx = torch.randint(len(images), (args.batch_size, ), generator=gen)
        batch = images[idx]
        loss = F.cross_entropy(model(batch), labels[idx])
        w_t = conv.weight.detach().clone()
        history = (history + [(batch, w_t)])[-args.k:]
        if len(history) == args.k:
            newest_first = history[::-1]
            with torch.no_grad():
                strata = args.second_order or 0
                parts = [slot_parts(u, w_tau, w_t, conv, args.patches, sample_gen, strata) for u, w_tau in newest_first]
                angles = [angle(w_t, w_tau) for _, w_tau in newest_first]
                target = torch.var_mean(torch.cat([F.conv2d(u.double(), w_t.double(), None, conv.stride,
                                                            conv.padding) for u, _ in newest_first]),
                                        dim=(0, 2, 3), correction=0)
                pop = torch.var_mean(F.conv2d(big.double(), w_t.double(), None, conv.stride, conv.padding),
                                     dim=(0, 2, 3), correction=0)
            est = estimates(parts, angles, args.patches, args.drift_angle, strata)
            var_t = target[0]
            row = dict(step=step, norm=w_t.norm().item(), angle_step=angle(w_t, history[-2][1]),
                       angle_window=angles[-1], rel_step=(w_t - history[-2][1]).norm().item() / w_t.norm().item(),
                       rem_c=(torch.stack([p['rem'] for p in parts[1:]]).mean(0) / var_t).mean().item(),
                       rem_dmu=(torch.stack([p['d_mu'].square() for p in parts[1:]]).mean(0) / var_t).mean().item(),
                       err={}, err_pop={})
            for name, (mu, var) in est.items():
                row['err'][name] = relative_stat_errors(mu, var, target[1], target[0])
                row['err_pop'][name] = relative_stat_errors(mu, var, pop[1], pop[0])
            batch_var, batch_mu = torch.var_mean(F.conv2d(batch.double(), w_t.double(), None, conv.stride,
                                                          conv.padding), dim=(0, 2, 3), correction=0)
            row['err_pop']['bn'] = relative_stat_errors(batch_mu, batch_var, pop[1], pop[0])
            call = None if training == 'bn' else model.norms[0].last_call
            if call is not None and call.stats is not None and training != 'naive':
                norm = model.norms[0]
                ref_mu, ref_var = est[f'second_order_strata{norm.second_order}' if norm.second_order else 'taylor_nu']
                row['layer_check'] = max(((call.stats.mu_bar.double() - ref_mu).abs().max()
                                          / var_t.sqrt().max()).item(),
                                         ((call.stats.var_bar.double() - ref_var).abs() / var_t).max().item())
            rows.append(row)
        loss.backward()
        optim.step()
        optim.zero_grad()
    return rows


def summarize(rows, last):
    rows = [r for r in rows if r['step'] >= rows[-1]['step'] - last + 1]
    out = dict(steps=len(rows))
    for key in ('norm', 'angle_step', 'angle_window', 'rel_step', 'rem_c', 'rem_dmu'):
        out[key] = float(np.mean([r[key] for r in rows]))
    out['rel_step_median'] = float(np.median([r['rel_step'] for r in rows]))
    out['final_norm'] = rows[-1]['norm']
    for what in ('err', 'err_pop'):
        out[what] = {name: np.mean([r[what][name] for r in rows], 0).tolist() for name in rows[0][what]}
    checks = [r['layer_check'] for r in rows if 'layer_check' in r]
    if checks:
        out['layer_check'] = float(max(checks))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--trainings', nargs='+', default=list(TRAININGS), choices=TRAININGS)
    parser.add_argument('--second-order', type=int, default=None,
                        help="the layer's second_order for the CBN trainings (default: the layer's default); its "
                             "own estimator, second_order_strata<r>, is then checked against the layer")
    parser.add_argument('--lr', type=float, default=0.1)
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1])
    parser.add_argument('--steps', type=int, default=300)
    parser.add_argument('--k', type=int, default=8)
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--big', type=int, default=512, help='images of the population batch')
    parser.add_argument('--patches', type=int, nargs='*', default=[16, 64],
                        help='sizes r of the sampled-patch estimates of the second-order term')
    parser.add_argument('--drift-angle', type=float, default=0.1, help='angle_0 of the drift-weighted window (rad)')
    parser.add_argument('--average-last', type=int, default=225)
    parser.add_argument('--out', default=osp.join(ROOT, 'work_dirs/analysis/compensation_study'))
    args = parser.parse_args(argv)
    for name in ('k', 'steps', 'batch_size', 'big', 'average_last'):
        if getattr(args, name) < 1:
            raise ValueError(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    if args.k < 2:
        raise ValueError(f'--k must be >= 2 (a window), got {args.k}')
    torch.set_num_threads(1)
    images, labels = load_digits_16()
    big = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:args.big]]
    result = dict(settings=vars(args), torch=torch.__version__, runs=[])
    curves = {}
    for training in args.trainings:
        rows = []
        for seed in args.seeds:
            seed_rows = run_one(training, seed, args, images, labels, big)
            curves[(training, seed)] = seed_rows
            rows.append(summarize(seed_rows, args.average_last))
        run = dict(training=training, per_seed=rows,
                   err={name: np.mean([r['err'][name] for r in rows], 0).tolist() for name in rows[0]['err']},
                   err_pop={name: np.mean([r['err_pop'][name] for r in rows], 0).tolist()
                            for name in rows[0]['err_pop']})
        for key in ('norm', 'final_norm', 'angle_step', 'angle_window', 'rel_step', 'rel_step_median', 'rem_c',
                    'rem_dmu'):
            run[key] = float(np.mean([r[key] for r in rows]))
        if 'layer_check' in rows[0]:
            run['layer_check'] = max(r['layer_check'] for r in rows)
        result['runs'].append(run)
        print(f"{training}: |W| {run['final_norm']:.1f}, step {run['rel_step_median']:.5f}, window angle "
              f"{run['angle_window']:.3f} rad, rem C {run['rem_c']:.4f} dmu^2 {run['rem_dmu']:.4f}; "
              + ', '.join(f"{n} {v[0]:.4f}/{v[1]:.4f}" for n, v in run['err'].items()))
    os.makedirs(args.out, exist_ok=True)
    with open(osp.join(args.out, 'compensation_study.json'), 'w') as f:
        json.dump(result, f, indent=1)
    plot(curves, args)
    print(f'written {args.out}')
    return result


def plot(curves, args):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (training, seed), rows in curves.items():
        a = [r['angle_window'] for r in rows]
        for ax, name in ((axes[0], 'taylor_nu'), (axes[1], 'second_order_diag')):
            ax.scatter(a, [r['err'][name][1] for r in rows], s=4, label=f'{training} seed {seed}')
    for ax, name in ((axes[0], 'taylor_nu'), (axes[1], 'second_order_diag')):
        ax.set(title=f'layer 1, {name}: sd error vs window angle', xlabel='angle W_t, W_t-k+1 (rad)',
               ylabel='||sd - sd*|| / ||sd*||', xscale='log', yscale='log')
        ax.legend(fontsize=7, markerscale=3)
    fig.tight_layout()
    fig.savefig(osp.join(args.out, 'error_vs_angle.png'), dpi=110)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for (training, seed), rows in curves.items():
        steps = [r['step'] for r in rows]
        axes[0].plot(steps, [r['norm'] for r in rows], label=f'{training} seed {seed}')
        axes[1].plot(steps, [r['angle_window'] for r in rows], label=f'{training} seed {seed}')
        axes[2].plot(steps, [r['rem_c'] + r['rem_dmu'] for r in rows], label=f'{training} seed {seed}')
    axes[0].set(title='||W|| (layer 1)', xlabel='step')
    axes[1].set(title='angle turned across the window (rad)', xlabel='step', yscale='log')
    axes[2].set(title="missed by Eq. 8: mean dW' M2 dW / var*", xlabel='step', yscale='log')
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(osp.join(args.out, 'mechanism.png'), dpi=110)
    plt.close('all')


if __name__ == '__main__':
    main()
