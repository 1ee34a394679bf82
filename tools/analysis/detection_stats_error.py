"""CBN's statistics error during detection training on the toy COCO (CBNStatsErrorHook), for several k and lr.

    python tools/analysis/detection_stats_error.py [--ks 2 4 8] [--lrs 0.02 0.05] [--subsamples 1] [--seeds 0]
                                                   [--iters 200] [--interval 10] [--backbone-checkpoint CKPT]
                                                   [--method cbn|cbn-second] [--out DIR]

The toy Faster R-CNN with CBN in the FPN neck and the 4conv1fc box head (``tools/analysis/detection_study.py``,
method ``cbn``, the layer's defaults, or ``--method cbn-second``, with ``second_order=16``) is trained for each
(k, lr, seed) with :class:`cbn_mmdet.engine.CBNStatsErrorHook`, which measures every ``--interval`` iterations,
once the windows are open, how far CBN's, Naive CBN's and BN's statistics are from the population statistics (16
fixed training images through the same weights, every normalization frozen to what it used in the training
forward). The neck's layers see whole feature maps of 2 images; the head's see 2 x 128 RoIs.
By default the backbone trains from scratch with BN; ``--backbone-checkpoint`` loads it from a checkpoint (for
example the pretraining run of ``detection_study.py --pretrain-iters``) and freezes it, BN included.
``--subsamples 1 4`` also trains every setting with CBN's opt-in approximation ``stat_grad_subsample=4`` (``dnu/dW``
from every 4th RoI or row), so that its cost in accuracy is measured against exact CBN on the same seeds.

Writes ``detection_stats_error.json`` (mean errors per k, lr, layer group and estimator, and the norm config and
backward the runs used) and
``detection_stats_error.png`` into ``--out`` (default ``work_dirs/analysis/detection_stats_error``).
"""
import argparse
import copy
import json
import os
import os.path as osp
import sys
import time
from collections import defaultdict

import numpy as np

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
import detection_study  # noqa: E402
from cbn_mmdet.engine.stats_hook import ESTIMATORS  # noqa: E402

ROOT = detection_study.ROOT
GROUPS = ('neck', 'roi_head')


def group_of(layer: str) -> str:
    return layer.split('.')[0]


def summarize(records) -> dict:
    """{group: {estimator: [mean error of mu, mean error of sd]}} over every measured (iteration, layer)."""
    rows = defaultdict(list)
    for r in records:
        for est in ESTIMATORS:
            rows[(group_of(r['layer']), est)].append(r['errors'][est])
            rows[('all', est)].append(r['errors'][est])
    out = defaultdict(dict)
    for (group, est), values in rows.items():
        out[group][est] = np.mean(values, axis=0).tolist()
    return dict(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--ks', type=int, nargs='+', default=[2, 4, 8])
    parser.add_argument('--lrs', type=float, nargs='+', default=[0.02, 0.05])
    parser.add_argument('--subsamples', type=int, nargs='+', default=[1],
                        help="CBN's stat_grad_subsample values to train with (1: exact)")
    parser.add_argument('--interval', type=int, default=10, help='iterations between measurements')
    parser.add_argument('--method', default='cbn', choices=('cbn', 'cbn-second'),
                        help="detection_study's method: 'cbn' (the layer's defaults) or 'cbn-second' (second_order=16)")
    detection_study.add_run_args(parser)
    parser.add_argument('--out', default=osp.join(ROOT, 'work_dirs/analysis/detection_stats_error'))
    parser.set_defaults(seeds=[0], iters=200)
    args = parser.parse_args(argv)
    if min(args.ks) < 1:
        raise ValueError(f'--ks must all be >= 1, got {args.ks}')
    if min(args.lrs) <= 0:
        raise ValueError(f'--lrs must all be > 0, got {args.lrs}')
    if min(args.subsamples) < 1:
        raise ValueError(f'--subsamples must all be >= 1, got {args.subsamples}')
    if args.interval < 1:
        raise ValueError(f'--interval must be >= 1, got {args.interval}')
    # every run is --method at --images-per-iter; k, lr and the subsampling are set per setting below
    args.large_batch, args.window_size, args.lr, args.stats_interval = 8, min(args.ks), min(args.lrs), args.interval
    args.stat_grad_subsample = min(args.subsamples)
    detection_study.check_args(args)

    start = time.time()
    settings = []  # one args copy per (k, lr, subsample): its own --out
    for sub in args.subsamples:
        for lr in args.lrs:
            for k in args.ks:
                run_args = copy.copy(args)
                run_args.lr, run_args.window_size, run_args.stat_grad_subsample = lr, k, sub
                run_args.out = osp.join(args.out, f'k{k}_lr{lr}' + (f'_sub{sub}' if sub != 1 else ''))
                settings.append(run_args)
    jobs = [(s, args.method, seed) for s in settings for seed in args.seeds]
    print(f'detection_stats_error: {len(jobs)} runs of {args.iters} iterations, {args.jobs} at a time', flush=True)
    runs = detection_study.run_all(args, jobs)

    kept = ('ks', 'lrs', 'subsamples', 'seeds', 'iters', 'interval', 'images_per_iter', 'threads',
            'backbone_checkpoint', 'method')
    # the norm config the runs used, read from a run's config (k is each setting's), and the layer options it gave,
    # the defaults it did not name included (the backward)
    from mmengine.config import Config

    from cbn_mmdet import CrossIterationBatchNorm2d
    norm = Config.fromfile(osp.join(settings[0].out, 'runs', f'{args.method}_seed{args.seeds[0]}', 'config.py')).norm
    norm = {k: v for k, v in norm.items() if k not in ('window_size', 'requires_grad')}
    probe = CrossIterationBatchNorm2d(1, **{k: v for k, v in norm.items() if k != 'type'})
    result = dict(settings={k: v for k, v in vars(args).items() if k in kept}, norm_cfg=norm,
                  layer=dict(backward=probe.backward, second_order=probe.second_order), runs=[])
    curves = {}
    for run_args in settings:
        records = []
        for seed in args.seeds:
            path = osp.join(run_args.out, 'runs', f'{args.method}_seed{seed}', 'cbn_stats_error.json')
            with open(path) as f:
                records += json.load(f)['records']
        mine = [r for r in runs if r['lr'] == run_args.lr and r['window_size'] == run_args.window_size
                and r['stat_grad_subsample'] == run_args.stat_grad_subsample]
        result['runs'].append(dict(k=run_args.window_size, lr=run_args.lr, subsample=run_args.stat_grad_subsample,
                                   measurements=len(records),
                                   bbox_mAP=float(np.mean([r['bbox_mAP'] for r in mine])),
                                   error=summarize(records)))
        curves[(run_args.window_size, run_args.lr, run_args.stat_grad_subsample)] = records
    result['cpu_s'] = float(sum(r['train_cpu_s'] for r in runs))
    result['wall_s'] = time.time() - start
    os.makedirs(args.out, exist_ok=True)
    with open(osp.join(args.out, 'detection_stats_error.json'), 'w') as f:
        json.dump(result, f, indent=1)
    plot(result, curves, args, osp.join(args.out, 'detection_stats_error.png'))
    print(f"\n{'k':>3}{'lr':>7}{'r':>3}  {'group':<9}" +
          ''.join(f'{e + " mu":>10}{e + " sd":>10}' for e in ESTIMATORS))
    for run in result['runs']:
        for group in ('neck', 'roi_head'):
            errs = run['error'].get(group, {})
            print(f"{run['k']:>3}{run['lr']:>7}{run['subsample']:>3}  {group:<9}" + ''.join(
                f'{errs[e][0]:>10.3f}{errs[e][1]:>10.3f}' for e in ESTIMATORS if e in errs))
    print(f"{len(runs)} runs, {result['cpu_s'] / 60:.1f} CPU min; written {args.out}")
    return result


def plot(result, curves, args, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 3, figsize=(15, 8))
    for row, (col, what) in enumerate(((0, 'mean'), (1, 'sigma'))):
        for ax, group in zip(grid[row][:2], GROUPS):
            for lr in args.lrs:
                for sub in args.subsamples:  # Naive and BN once (from the first r): they do not use dnu/dW
                    runs = sorted((r for r in result['runs'] if r['lr'] == lr and r['subsample'] == sub),
                                  key=lambda r: r['k'])
                    lines = (('CBN', '-o'), ('Naive', '--s'), ('BN', ':')) if sub == args.subsamples[0] else (
                        ('CBN', '-.^'), )
                    for est, style in lines:
                        label = f'{est} lr={lr}' + (f' r={sub}' if est == 'CBN' and len(args.subsamples) > 1 else '')
                        ax.plot([r['k'] for r in runs], [r['error'][group][est][col] if group in r['error']
                                                         else np.nan for r in runs], style, label=label)
            ax.set(title=f'{group} layers: error of the {what}', xlabel='window k',
                   ylabel=f'|{what}_est - {what}_pop| / |sd_pop|')
            ax.set_xscale('log', base=2)
        ax = grid[row][2]  # over training, k=4 (or the first k), the largest lr, all layers averaged per step
        k0 = 4 if 4 in args.ks else args.ks[0]
        records = curves[(k0, args.lrs[-1], args.subsamples[0])]
        for est in ESTIMATORS:
            steps = sorted({r['iter'] for r in records})
            ax.plot(steps, [np.mean([r['errors'][est][col] for r in records if r['iter'] == s]) for s in steps],
                    label=est)
        ax.set(title=f'k={k0}, lr={args.lrs[-1]}: error of the {what}, mean over layers', xlabel='iteration')
        ax.legend(fontsize=8)
    grid[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == '__main__':
    main()
