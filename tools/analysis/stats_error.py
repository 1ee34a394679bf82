"""Does compensation make old statistics right for the current weights? Measured on real training trajectories.

    python tools/analysis/stats_error.py [--ks 2 4 8] [--lrs 0.02 0.1] [--seeds 0 1 2] [--steps 300]
                                         [--stat-grad-subsample 1] [--backward exact|authors] [--second-order R]
                                         [--out DIR]

A small CNN (three conv -> CBN -> ReLU blocks) is trained on scikit-learn's bundled digits with 2 images per
step and SGD with momentum. At every ``--every``-th step, from the same training forward, three estimates of each
layer's statistics are compared with the population statistics at the current weights:

* CBN's normalizing statistics (compensated window, Eq. 7-11);
* Naive CBN's (the same window, uncompensated);
* BN's (the current batch alone).

The population statistics come from a large fixed batch (512 images) pushed through the same weights. For the first
layer the input does not depend on any normalization, which is the cleanest comparison. For deeper layers the
population pass freezes every upstream layer's normalization to exactly what it was in the training forward, so the
error measured at a layer is that layer's own estimation error, not the upstream error carried along.

Errors (per layer, per step): ``|mu_est - mu_pop| / |sigma_pop|`` and ``|sigma_est - sigma_pop| / |sigma_pop|``
(L2 norms over channels). ``--stat-grad-subsample r`` trains CBN with its opt-in approximation of ``dnu/dW`` (every
r-th row), so that its effect on these errors can be compared with exact CBN on the same seeds. ``--backward`` and
``--second-order`` set the layer's options of those names (default: the layer's defaults); the JSON's ``settings``
and ``layer`` record what ran.

It also measures the truncation assumption (paper Sec. 4.4, Fig. 6) on the same trajectories:

* ``||d mu^l / d theta^r||_F / ||d mu^l / d theta^l||_F`` (and for nu) for r = l-1, l-2, with upstream layers
  normalized by their (differentiable) batch statistics;
* what truncation actually drops: the first-order drift terms ``<d mu^l/d theta^r, theta^r_t - theta^r_tau>`` of
  earlier layers, against the layer's own term, over the real windows;
* the bias of the first-order nu: ``nu_tau(theta_t) - [nu_tau + <d nu/d theta, d theta>] = d theta' S d theta >= 0``
  for the layer's own kernel (x is linear in it, so the remainder is exactly ``mean(dx^2)``), relative to the
  population variance, as a function of the age tau, k and the learning rate.

Writes ``stats_error.json`` and PNG plots into ``--out`` (default ``work_dirs/analysis/stats_error``).
"""
import argparse
import json
import os
import os.path as osp
import sys
from collections import defaultdict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, jacrev

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
sys.path.insert(0, ROOT)

from cbn_mmdet.engine.stats_hook import ESTIMATORS  # noqa: E402
from cbn_mmdet.models.cbn import CrossIterationBatchNorm2d  # noqa: E402
from cbn_mmdet.ops import relative_stat_errors, window_moments  # noqa: E402


def load_digits_tensor():
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    return (images - 0.3) / 0.4, torch.tensor(digits.target)


class DigitsNet(nn.Module):
    """conv -> CBN -> ReLU, three times, then global pooling and a linear classifier."""

    def __init__(self, window_size, stat_grad_subsample=1, **options):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(1, 16, 3, padding=1), nn.Conv2d(16, 32, 3, padding=1, stride=2),
                                    nn.Conv2d(32, 32, 3, padding=1)])
        self.norms = nn.ModuleList([CrossIterationBatchNorm2d(c, window_size=window_size,
                                                              stat_grad_subsample=stat_grad_subsample, **options)
                                    for c in (16, 32, 32)])
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        for conv, norm in zip(self.convs, self.norms):
            x = F.relu(norm(conv(x)))
        return self.fc(x.mean((2, 3)))


@torch.no_grad()
def population(model, big, train_stats):
    """Per layer: mean and variance of its input over ``big``, upstream normalization frozen to ``train_stats``."""
    out, h = [], big
    for conv, norm, (mu_bar, var_bar) in zip(model.convs, model.norms, train_stats):
        x = F.conv2d(h, conv.weight, conv.bias, conv.stride, conv.padding)  # no hooks: training inputs stay
        var, mu = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        out.append((mu, var))
        h = F.relu(F.batch_norm(x, mu_bar, var_bar, norm.weight, norm.bias, False, 0.0, norm.eps))
    return out


def stats_fn(model, layer, source, batch):
    """theta^source -> (mu^layer, nu^layer) on ``batch``, upstream normalized by differentiable batch statistics."""
    names = [f'convs.{source}.weight']
    params = {n: p.detach() for n, p in model.named_parameters()}

    def fn(theta):
        p = dict(params, **{names[0]: theta})
        h = batch
        for i in range(layer + 1):
            x = F.conv2d(h, p[f'convs.{i}.weight'], p[f'convs.{i}.bias'], model.convs[i].stride,
                         model.convs[i].padding)
            if i == layer:
                return x.mean((0, 2, 3)), (x * x).mean((0, 2, 3))
            var, mu = torch.var_mean(x, dim=(0, 2, 3), correction=0)
            h = F.relu((x - mu.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + 1e-5)
                       * p[f'norms.{i}.weight'].view(1, -1, 1, 1) + p[f'norms.{i}.bias'].view(1, -1, 1, 1))

    return fn, params[names[0]]


def jacobians(model, layer, batch):
    """{source: (J_mu, J_nu)} for source in layer, layer-1, layer-2 (each (C, |theta^source|))."""
    out = {}
    for source in range(max(0, layer - 2), layer + 1):
        fn, theta = stats_fn(model, layer, source, batch)
        j_mu, j_nu = jacrev(fn)(theta)
        out[source] = (j_mu.reshape(j_mu.shape[0], -1), j_nu.reshape(j_nu.shape[0], -1))
    return out


def run_one(k, lr, seed, steps, every, batch_size, images, labels, big, subsample=1, options=None):
    torch.manual_seed(seed)
    model = DigitsNet(k, subsample, **(options or {}))
    optim = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    gen = torch.Generator().manual_seed(1000 + seed)
    pre = {}

    def snapshot(module, args):  # the window as the forward sees it (before this iteration is pushed)
        bank = module.window_at(module.next_call_position(args[0]))
        pre[module] = bank.view() if bank is not None and bank.count else None

    hooks = [n.register_forward_pre_hook(snapshot) for n in model.norms]
    inputs = {}
    for i, conv in enumerate(model.convs):
        conv.register_forward_hook(lambda m, a, out, i=i: inputs.__setitem__(i, (a[0].detach(), out.detach())))
    errors = defaultdict(list)  # (layer, estimator) -> [(step, err_mu, err_sd)]
    history = []  # per step: thetas, per-layer J and (u, stats) for truncation and bias
    trunc = defaultdict(list)
    bias = defaultdict(list)
    for step in range(steps):
        idx = torch.randint(len(images), (batch_size, ), generator=gen)
        batch = images[idx]
        logits = model(batch)
        loss = F.cross_entropy(logits, labels[idx])
        measure = step >= k - 1 and step % every == 0
        if measure or k > 1:
            thetas = [c.weight.detach().clone() for c in model.convs]
        if measure:
            batch_stats = [torch.var_mean(inputs[layer][1], dim=(0, 2, 3), correction=0) for layer in range(3)]
            # what each layer normalized with (stats None: as BatchNorm, its batch's own)
            train_stats = [(n.last_call.stats.mu_bar, n.last_call.stats.var_bar) if n.last_call.stats is not None
                           else (batch_stats[i][1], batch_stats[i][0]) for i, n in enumerate(model.norms)]
            pops = population(model, big, train_stats)
            for layer, norm in enumerate(model.norms):
                var_t, mu_t = batch_stats[layer]
                est = {'CBN': train_stats[layer], 'BN': (mu_t, var_t)}
                h = pre[norm]
                est['Naive'] = window_moments(torch.cat([mu_t[None], h['mu']]), torch.cat([var_t[None], h['s']]),
                                              torch.cat([h['w'].new_ones(1), h['w']])) \
                    if h is not None else (mu_t, var_t)
                for name in ESTIMATORS:
                    errors[(layer, name)].append((step, *relative_stat_errors(*est[name], *pops[layer])))
        # truncation: Jacobians at this step for layers 1, 2 (all sources), kept for k-1 steps
        if k > 1:
            # Jacobians where a later measurement's window will need them
            need = step % every == 0 or every - step % every < k
            jac = {layer: jacobians(model, layer, batch) for layer in (1, 2)} if need else None
            if measure:
                for layer in (1, 2):
                    own = jac[layer][layer]
                    for source in range(max(0, layer - 2), layer):
                        r = layer - source
                        trunc[(layer, r, 'mu')].append(jac[layer][source][0].norm().item() / own[0].norm().item())
                        trunc[(layer, r, 'nu')].append(jac[layer][source][1].norm().item() / own[1].norm().item())
            history.append(dict(step=step, thetas=thetas, u=[inputs[i][0] for i in range(3)],
                                x=[inputs[i][1] for i in range(3)], jac=jac))
            history = history[-k:]
            past = [hst for hst in history[:-1] if hst['jac'] is not None]
            if measure:
                for hst in past:  # drift terms over the real window, and the nu bias of the own kernel
                    for layer in (1, 2):
                        d_own = hst['jac'][layer][layer][0] @ (thetas[layer] - hst['thetas'][layer]).flatten()
                        for source in range(max(0, layer - 2), layer):
                            d_src = hst['jac'][layer][source][0] @ (thetas[source] - hst['thetas'][source]).flatten()
                            trunc[(layer, layer - source, 'drift')].append(
                                d_src.norm().item() / max(d_own.norm().item(), 1e-12))
                    for layer in range(3):  # x is linear in the own kernel: the remainder is mean(dx^2) >= 0
                        conv = model.convs[layer]
                        with torch.no_grad():
                            x_new = F.conv2d(hst['u'][layer], conv.weight, conv.bias, conv.stride, conv.padding)
                        gap = (x_new - hst['x'][layer]).square().mean((0, 2, 3))
                        bias[(layer, step - hst['step'])].append((gap / pops[layer][1]).mean().item())
        loss.backward()
        optim.step()
        optim.zero_grad()
    for h in hooks:
        h.remove()
    return errors, trunc, bias


def mean_errors(values):
    """[mean error of mu, mean error of sigma] over the measured (step, err_mu, err_sd) rows of all seeds."""
    return np.array(values, dtype=float)[:, 1:].mean(0).tolist()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--ks', type=int, nargs='+', default=[2, 4, 8])
    parser.add_argument('--lrs', type=float, nargs='+', default=[0.02, 0.1])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--steps', type=int, default=300)
    parser.add_argument('--every', type=int, default=10)
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--big', type=int, default=512, help='images of the population batch')
    parser.add_argument('--stat-grad-subsample', type=int, default=1,
                        help="CBN's opt-in approximation: dnu/dW from every r-th row (1: exact)")
    parser.add_argument('--backward', default=None, choices=('exact', 'authors'),
                        help="CBN's backward (default: the layer's default)")
    parser.add_argument('--second-order', type=int, default=None,
                        help="CBN's second_order, r patches per slot (default: the layer's default)")
    parser.add_argument('--out', default=osp.join(ROOT, 'work_dirs/analysis/stats_error'))
    args = parser.parse_args(argv)
    options = {k: v for k, v in (('backward', args.backward), ('second_order', args.second_order)) if v is not None}
    if args.stat_grad_subsample < 1:
        raise ValueError(f'--stat-grad-subsample must be >= 1, got {args.stat_grad_subsample}')
    torch.set_num_threads(1)
    images, labels = load_digits_tensor()
    big = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:args.big]]
    probe = CrossIterationBatchNorm2d(1, **options)
    result = dict(settings=vars(args), layer=dict(backward=probe.backward, second_order=probe.second_order), runs=[])
    curves = {}
    for lr in args.lrs:
        for k in args.ks:
            errs, truncs, biases = defaultdict(list), defaultdict(list), defaultdict(list)
            for seed in args.seeds:
                e, t, b = run_one(k, lr, seed, args.steps, args.every, args.batch_size, images, labels, big,
                                  args.stat_grad_subsample, options)
                for merged, new in ((errs, e), (truncs, t), (biases, b)):
                    for key, v in new.items():
                        merged[key] += v
                if seed == args.seeds[0]:
                    curves[(k, lr)] = e
            run = dict(k=k, lr=lr,
                       error={f'layer{l + 1}/{name}': mean_errors(v) for (l, name), v in errs.items()},
                       truncation={f'layer{l + 1}/r=l-{r}/{kind}': float(np.mean(v)) for (l, r, kind), v in
                                   truncs.items()},
                       nu_bias={f'layer{l + 1}/tau={tau}': float(np.mean(v)) for (l, tau), v in biases.items()})
            result['runs'].append(run)
            print(f"k={k} lr={lr}: " + ', '.join(f"{key} mu {v[0]:.3f} sd {v[1]:.3f}"
                                                 for key, v in run['error'].items() if key.startswith('layer1')))
    os.makedirs(args.out, exist_ok=True)
    with open(osp.join(args.out, 'stats_error.json'), 'w') as f:
        json.dump(result, f, indent=1)
    plot(result, curves, args)
    print(f"written {args.out}")
    return result


def plot(result, curves, args):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 3, figsize=(15, 8))
    for row, (col, what) in enumerate(((0, 'mean'), (1, 'sigma'))):
        for layer, ax in enumerate(grid[row]):
            for lr in args.lrs:
                runs = {r['k']: r for r in result['runs'] if r['lr'] == lr}
                for name, style in (('CBN', '-o'), ('Naive', '--s'), ('BN', ':')):
                    ys = [runs[k]['error'][f'layer{layer + 1}/{name}'][col] for k in args.ks]
                    ax.plot(args.ks, ys, style, label=f'{name} lr={lr}')
            ax.set(title=f'layer {layer + 1}: error of the {what}', xlabel='window k',
                   ylabel=f'|{what}_est - {what}_pop| / |sd_pop|')
            ax.set_xscale('log', base=2)
    grid[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(osp.join(args.out, 'error_vs_k.png'), dpi=110)

    k0 = 4 if 4 in args.ks else args.ks[0]
    lr0 = args.lrs[-1]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, col, label in ((axes[0], 1, 'mean'), (axes[1], 2, 'sigma')):
        for name in ESTIMATORS:
            arr = np.array(curves[(k0, lr0)][(0, name)])
            ax.plot(arr[:, 0], arr[:, col], label=name)
        ax.set(title=f'layer 1, k={k0}, lr={lr0}, seed {args.seeds[0]}: error of the {label}', xlabel='step')
        ax.legend()
    fig.tight_layout()
    fig.savefig(osp.join(args.out, 'error_over_training.png'), dpi=110)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for lr in args.lrs:
        runs = [r for r in result['runs'] if r['lr'] == lr]
        for layer in (1, 2):
            axes[0].plot([r['k'] for r in runs], [r['truncation'].get(f'layer{layer + 1}/r=l-1/drift', np.nan)
                                                  for r in runs], '-o', label=f'layer {layer + 1}, lr={lr}')
        axes[1].plot([r['k'] for r in runs], [np.mean([v for key, v in r['nu_bias'].items()]) if r['nu_bias']
                                              else np.nan for r in runs], '-o', label=f'lr={lr}')
    axes[0].set(title='dropped drift (layer l-1) / own drift', xlabel='window k')
    axes[1].set(title='nu bias d theta\' S d theta / population var', xlabel='window k', yscale='log')
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(osp.join(args.out, 'truncation.png'), dpi=110)
    plt.close('all')


if __name__ == '__main__':
    main()
