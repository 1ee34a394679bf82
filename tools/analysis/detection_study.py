"""A small-batch detection study on the toy COCO, on the CPU: which normalization in the heads trains best?

    python tools/analysis/detection_study.py [--iters 300] [--seeds 0 1 2] [--images-per-iter 2] [--jobs 2]
                                             [--pretrain-iters N | --backbone-checkpoint CKPT] [--out DIR]

The toy Faster R-CNN (``configs/toy/faster-rcnn_r18-cbn-heads_fpn_toy.py``: ResNet-18/32 from scratch with BN,
FPN and 4conv1fc box head of 64 channels, 128x128 images) is trained with its FPN neck and box head normalized by
each of:

* ``bn-small``: BN, ``--images-per-iter`` images per iteration (default 2);
* ``gn``: GN (32 groups), the same images per iteration;
* ``naive-cbn``: Naive CBN, k=4 (no Taylor compensation), the same images per iteration;
* ``cbn-authors``: CBN, k=4, with the authors' backward (the compensated history held constant);
* ``cbn``: CBN, k=4, the layer's default options (the exact backward), the same images per iteration;
* ``cbn-second`` (not run by default): ``cbn`` with ``second_order=16``, the centred moment moved to second order
  from 16 stored input patches per slot (issue 20);
* ``bn-large``: BN at ``--large-batch`` images per iteration (default 8 = 4 x 2, the effective example count of
  the k=4 window), the upper bound; the same number of iterations and learning rate, so it also sees 4x the images;
* ``gn-neck`` / ``gn-head`` (controls, not run by default): GN in the neck and BN in the box head, or the reverse,
  at the small batch: where GN's lead comes from;
* ``ideal`` (control, not run by default; ``tools/analysis/ideal_stats.py``): BN in the neck and box head whose
  statistics are over ``k * --images-per-iter`` images (k = ``--window-size``): the training images plus
  ``(k - 1) *`` as many other random training images, run through the detector in a no-grad pass before each
  iteration, while the loss is over the training images only. SyncBN's statistics without its batch: what CBN's
  window could at best give. If it does not beat ``bn-small``, this toy cannot show a statistics benefit.

Every (method, seed) trains ``--iters`` iterations with the toy config's schedule scaled to that length (linear
warm-up, lr steps at 75% and 92%), CBN burn-in for the first sixth, and is then evaluated once with MMDetection's
CocoMetric on the toy val split. Runs go through mmengine's Runner (``tools/train.py``), ``--jobs`` at a time, each
in its own process with ``--threads`` torch threads. Each run's config, log and metrics stay in ``--out/runs/``.
A run whose ``metrics.json`` is on disk with the same settings is not run again, so an interrupted study resumes
where it stopped (and a pretraining run's checkpoint is reused the same way). BN and GN runs do not depend on the
window's options (``--window-size``), so a window-length study may share them: link or copy their run folders, and
the pretraining folder, into its ``--out`` (docs/studies/classification.md, "The window's length").

By default the backbone trains from scratch with BN at the run's batch. ``--pretrain-iters N`` first trains a BN
model for N iterations and loads its backbone, frozen with its BN, into every run (the paper's "fixed BN" backbone,
which also removes the upstream drift that CBN's compensation truncates); ``--backbone-checkpoint`` uses a given
checkpoint instead.

Writes ``detection_study.json`` (per-run metrics, per-method mean +- std, CPU seconds, and the paired differences
of ``PAIRS`` over the seeds that both methods ran: mean, standard error and 95% t-interval) and
``detection_study.png`` into ``--out`` (default ``work_dirs/analysis/detection_study``).
"""
import argparse
import copy
import json
import os
import os.path as osp
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from paired_stats import paired_difference  # this folder: run as a script or with it on sys.path

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOY_CONFIG = osp.join(ROOT, 'configs/toy/faster-rcnn_r18-cbn-heads_fpn_toy.py')
# --detector: the toy config, and where the method's norm goes
DETECTORS = {
    'faster-rcnn': TOY_CONFIG,  # the FPN neck and the 4conv1fc box head
    'retinanet': osp.join(ROOT, 'configs/toy/retinanet_r18-cbn-head_fpn_toy.py'),  # the head shared by 5 levels
}
NORMS = {
    'bn-small': "dict(type='BN', requires_grad=True)",
    'gn': "dict(type='GN', num_groups=32, requires_grad=True)",
    'naive-cbn': "dict(type='CBN', window_size=4, compensate=False, requires_grad=True)",
    'cbn-authors': "dict(type='CBN', window_size=4, backward='authors', requires_grad=True)",
    'cbn': "dict(type='CBN', window_size=4, requires_grad=True)",
    'cbn-second': "dict(type='CBN', window_size=4, second_order=16, requires_grad=True)",  # issue 20
    'bn-large': "dict(type='BN', requires_grad=True)",
    'ideal': "dict(type='IdealStatsBN', requires_grad=True)",  # with IdealStatsHook
}
CONTROLS = ('ideal', 'gn-neck', 'gn-head', 'cbn-second')  # not in the default --methods
# controls that place GN's lead: GN in one part, BN in the other, (neck, box head)
SPLIT = {'gn-neck': ('gn', 'bn-small'), 'gn-head': ('bn-small', 'gn')}
METHODS = tuple(NORMS) + tuple(SPLIT)
# the methods that --window-size etc. change ('ideal': its extra images are (k - 1) times the batch)
WINDOWED = tuple(m for m, norm in NORMS.items() if "'CBN'" in norm) + ('ideal', )
# paired differences (a - b) reported per seed: what the exact backward changes, and where it stands
PAIRS = (('cbn', 'cbn-authors'), ('cbn', 'bn-small'), ('cbn-authors', 'bn-small'), ('gn', 'cbn'), ('gn', 'bn-small'),
         ('cbn', 'naive-cbn'), ('bn-large', 'cbn'), ('bn-large', 'bn-small'), ('bn-large', 'gn'),
         ('gn-neck', 'bn-small'), ('gn-head', 'bn-small'), ('gn', 'gn-neck'), ('gn', 'gn-head'),
         ('ideal', 'bn-small'), ('ideal', 'cbn'), ('bn-large', 'ideal'), ('cbn-second', 'cbn'),
         ('cbn-second', 'bn-small'))
METRICS = ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75')
SUBSAMPLED = ('cbn', 'cbn-second')  # the methods that --stat-grad-subsample changes
# --drift-interval: what each run keeps of tools/analysis/kernel_drift.py's measurement (means over the neck's and
# box head's convs, and per conv)
DRIFT_KEYS = ('kernel_angle_step', 'kernel_angle_window', 'kernel_norm_mean', 'kernel_window_span',
              'kernel_measured_steps', 'kernel_drift_per_conv', 'convs')


def burnin_iters(iters: int) -> int:
    """CBN's burn-in in a run of ``iters`` iterations: the first sixth (at least one)."""
    return max(iters // 6, 1)


def run_config(method: str, seed: int, images: int, args) -> str:
    """The text of one run's config: the toy config with the method's norm in the neck and box head.

    From ``args``: ``iters``, ``lr``, ``data_root``; ``window_size`` overrides CBN's k (and sets ``ideal``'s
    ``(k - 1) * images`` extra images); ``stat_grad_subsample > 1``
    sets CBN's opt-in approximation of ``dnu/dW``; ``stats_interval > 0`` adds
    :class:`CBNStatsErrorHook`; ``backbone_checkpoint`` loads the backbone from a checkpoint and freezes it, BN
    included (the paper's "fixed BN" backbone); ``save_checkpoint`` keeps the last checkpoint.
    """
    iters = args.iters
    burnin = burnin_iters(iters)
    data = args.data_root.rstrip('/') + '/'
    hooks = []
    if 'cbn' in method:
        hooks.append(f"dict(type='CBNBurnInHook', burnin_iters={burnin}, window_size={args.window_size})")
    imports = ''
    if method == 'ideal':  # ideal_stats is in tools/analysis, on sys.path in the study's runs
        hooks.append(f"dict(type='IdealStatsHook', num_images={(args.window_size - 1) * images})")
        imports = "custom_imports = dict(imports=['cbn_mmdet', 'ideal_stats'], allow_failed_imports=False)\n"
    drift = getattr(args, 'drift_interval', 0)
    if drift:  # how fast the neck's and box head's kernels turn after burn-in (issue 20; kernel_drift.py)
        parts = "('bbox_head', )" if getattr(args, 'detector', 'faster-rcnn') == 'retinanet' else \
            "('neck', 'roi_head.bbox_head')"
        hooks.append(f"dict(type='KernelDriftHook', window_size={args.window_size}, interval={drift}, "
                     f"begin={burnin}, parts={parts})")  # every method from the same iteration on
        imports = imports or "custom_imports = dict(imports=['cbn_mmdet'], allow_failed_imports=False)\n"
        imports = imports.replace("'cbn_mmdet'", "'cbn_mmdet', 'kernel_drift'")
    if getattr(args, 'stats_interval', 0):
        hooks.append(f"dict(type='CBNStatsErrorHook', interval={args.stats_interval}, num_images=16, chunk=4)")
    hooks = '[' + ', '.join(hooks) + ']'
    backbone = ''
    if getattr(args, 'backbone_checkpoint', None):
        backbone = (f"backbone=dict(frozen_stages=4, norm_eval=True, init_cfg=dict(_delete_=True, type='Pretrained', "
                    f"checkpoint={args.backbone_checkpoint!r}, prefix='backbone.')),\n             ")
    save = f'interval={iters}' if getattr(args, 'save_checkpoint', False) else f'interval={iters + 1}, save_last=False'
    neck_method, head_method = SPLIT.get(method, (method, method))
    norm, head_norm = NORMS[neck_method], NORMS[head_method]
    subsample = getattr(args, 'stat_grad_subsample', 1)
    if method in SUBSAMPLED and subsample != 1:  # Naive CBN computes no dnu/dW
        norm = head_norm = f'{norm[:-1]}, stat_grad_subsample={subsample})'
    detector = getattr(args, 'detector', 'faster-rcnn')
    if detector == 'retinanet':  # the shared head only (its FPN has no norm)
        parts = 'bbox_head=dict(norm_cfg=dict(_delete_=True, **head_norm))'
    else:
        parts = ('neck=dict(norm_cfg=dict(_delete_=True, **norm)),\n             '
                 'roi_head=dict(bbox_head=dict(norm_cfg=dict(_delete_=True, **head_norm)))')
    return f"""# generated by tools/analysis/detection_study.py: method {method}, seed {seed}, detector {detector}
_base_ = {DETECTORS[detector]!r}
{imports}norm = {norm}
head_norm = {head_norm}
model = dict({backbone}{parts})
train_dataloader = dict(batch_size={images}, dataset=dict(data_root={data!r}))
val_dataloader = dict(dataset=dict(data_root={data!r}))
test_dataloader = val_dataloader
val_evaluator = dict(ann_file={data + 'annotations/instances_val.json'!r})
test_evaluator = val_evaluator
train_cfg = dict(max_iters={iters}, val_interval={iters}, val_begin={iters + 1})  # evaluated once, after training
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end={min(100, iters // 3)}),
    dict(type='MultiStepLR', by_epoch=False, begin=0, end={iters}, milestones=[{iters * 3 // 4}, {iters * 23 // 25}],
         gamma=0.1),
]
optim_wrapper = dict(optimizer=dict(lr={args.lr}))
custom_hooks = {hooks}
default_hooks = dict(logger=dict(interval=50), checkpoint=dict({save}))
randomness = dict(seed={seed})
"""


def single_run(args) -> dict:
    """Train and evaluate one (method, seed) in this process; write and return its metrics."""
    import torch
    torch.set_num_threads(args.threads)
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    import train as train_tool

    method, seed = args.single
    seed = int(seed)
    images = args.large_batch if method == 'bn-large' else args.images_per_iter
    work_dir = osp.join(args.out, 'runs', f'{method}_seed{seed}')
    os.makedirs(work_dir, exist_ok=True)
    config = osp.join(work_dir, 'config.py')
    with open(config, 'w') as f:
        f.write(run_config(method, seed, images, args))
    start_cpu, start = time.process_time(), time.time()
    runner = train_tool.main([config, '--work-dir', work_dir])
    train_cpu = time.process_time() - start_cpu
    metrics = runner.val()
    drift = {}
    if getattr(args, 'drift_interval', 0):
        with open(osp.join(work_dir, 'kernel_drift.json')) as f:
            drift = {k: v for k, v in json.load(f).items() if k in DRIFT_KEYS}
        drift['drift_interval'] = args.drift_interval
    result = dict(method=method, seed=seed, detector=args.detector, images_per_iter=images, iters=runner.iter,
                  lr=args.lr,
                  window_size=args.window_size, stat_grad_subsample=args.stat_grad_subsample,
                  threads=args.threads, train_cpu_s=train_cpu, wall_s=time.time() - start,
                  finite_loss=bool(np.isfinite(runner.message_hub.get_scalar('train/loss').current())),
                  # CocoMetric returns no keys when the model detects nothing at all: that is an mAP of 0
                  no_detections=not metrics, backbone_checkpoint=args.backbone_checkpoint,
                  checkpoint=osp.join(work_dir, f'iter_{runner.iter}.pth') if args.save_checkpoint else None,
                  **{key: float(metrics.get(f'coco/{key}', 0.0)) for key in METRICS}, **drift)
    with open(osp.join(work_dir, 'metrics.json'), 'w') as f:
        json.dump(result, f, indent=1)
    return result


def launch(args, method: str, seed: int) -> dict:
    """One run in a child process (clean registries, its own thread count); its metrics.json."""
    work_dir = osp.join(args.out, 'runs', f'{method}_seed{seed}')
    os.makedirs(work_dir, exist_ok=True)
    done = finished_run(work_dir, args, method)
    if done is not None:
        print(f'  {method:<10} seed {seed}: on disk, not run again', flush=True)
        return done
    cmd = [sys.executable, osp.abspath(__file__), '--single', method, str(seed), '--iters', str(args.iters),
           '--images-per-iter', str(args.images_per_iter), '--large-batch', str(args.large_batch), '--lr',
           str(args.lr), '--threads', str(args.threads), '--out', args.out, '--data-root', args.data_root,
           '--window-size', str(args.window_size), '--stats-interval', str(getattr(args, 'stats_interval', 0)),
           '--stat-grad-subsample', str(args.stat_grad_subsample), '--detector', args.detector,
           '--drift-interval', str(getattr(args, 'drift_interval', 0))]
    if getattr(args, 'backbone_checkpoint', None):
        cmd += ['--backbone-checkpoint', args.backbone_checkpoint]
    if getattr(args, 'save_checkpoint', False):
        cmd.append('--save-checkpoint')
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    with open(osp.join(work_dir, 'stdout.log'), 'w') as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f'detection_study: run {method} seed {seed} failed (exit {proc.returncode}); '
                           f'see {work_dir}/stdout.log')
    with open(osp.join(work_dir, 'metrics.json')) as f:
        result = json.load(f)
    print(f"  {method:<10} seed {seed}: bbox mAP {result['bbox_mAP']:.3f}  mAP50 {result['bbox_mAP_50']:.3f}  "
          f"({result['train_cpu_s']:.0f} CPU s)", flush=True)
    return result


def finished_run(work_dir: str, args, method: str):
    """The run's metrics when it is on disk with this command's settings (and its checkpoint, when one is asked
    for); None when it must run. A run with other settings makes the study stop rather than mix them."""
    path = osp.join(work_dir, 'metrics.json')
    if not osp.exists(path):
        return None
    with open(path) as f:
        result = json.load(f)
    want = dict(iters=args.iters, lr=args.lr, window_size=args.window_size, detector=args.detector,
                stat_grad_subsample=args.stat_grad_subsample, backbone_checkpoint=args.backbone_checkpoint,
                images_per_iter=args.large_batch if method == 'bn-large' else args.images_per_iter)
    have = {key: result.get(key) for key in want}
    have['detector'] = result.get('detector', 'faster-rcnn')  # runs from before --detector
    if method not in WINDOWED:  # the window's options do not touch BN or GN: a window study may share their runs
        # (stat_grad_subsample changes only SUBSAMPLED, but is still checked for the other CBN methods: stricter)
        for key in ('window_size', 'stat_grad_subsample'):
            have.pop(key), want.pop(key)
    if have != want:
        raise ValueError(f'detection_study: {path} was run with {have}, not with this command\'s {want}: '
                         'use another --out')
    if getattr(args, 'save_checkpoint', False) and not (result.get('checkpoint') and osp.exists(result['checkpoint'])):
        return None
    drift = getattr(args, 'drift_interval', 0)
    if drift and (result.get('kernel_angle_step') is None or result.get('drift_interval') != drift
                  or result.get('kernel_window_span') != args.window_size - 1):
        return None  # run again, measuring the kernels at this interval, over this window
    return result


def paired(runs) -> dict:
    """``a - b`` per metric over the seeds both ran: n, mean, standard error and the 95% t-interval's half-width."""
    by = {(r['method'], r['seed']): r for r in runs}
    out = {}
    for a, b in PAIRS:
        seeds = sorted(s for (m, s) in by if m == a and (b, s) in by)
        if len(seeds) < 2:
            continue
        row = dict(n=len(seeds), seeds=seeds)
        for key in METRICS:
            d = paired_difference([by[(a, s)][key] - by[(b, s)][key] for s in seeds])
            row[key] = {k: d[k] for k in ('mean', 'sem', 'ci95', 'min', 'max')}
        out[f'{a} - {b}'] = row
    return out


def summarize(runs) -> dict:
    out = {}
    for method in METHODS:
        rows = [r for r in runs if r['method'] == method]
        if rows:
            out[method] = dict(n=len(rows), images_per_iter=rows[0]['images_per_iter'],
                               cpu_s=float(sum(r['train_cpu_s'] for r in rows)),
                               **{key: [float(np.mean([r[key] for r in rows])),
                                        float(np.std([r[key] for r in rows], ddof=1)) if len(rows) > 1 else 0.0]
                                  for key in METRICS})
            if all(r.get('kernel_angle_step') is not None for r in rows):  # --drift-interval
                out[method].update({key: float(np.mean([r[key] for r in rows]))
                                    for key in ('kernel_angle_step', 'kernel_angle_window', 'kernel_norm_mean')})
    return out


def plot(result, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    summary = result['summary']
    methods = [m for m in METHODS if m in summary]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key in zip(axes, ('bbox_mAP', 'bbox_mAP_50')):
        for i, method in enumerate(methods):
            mean, std = summary[method][key]
            ax.bar(i, mean, yerr=std, capsize=4, color='tab:orange' if method == 'cbn' else 'tab:blue', alpha=0.7)
            seeds = [r[key] for r in result['runs'] if r['method'] == method]
            ax.plot([i] * len(seeds), seeds, 'k.', ms=6)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels([f"{m}\n{summary[m]['images_per_iter']} img/it" for m in methods], fontsize=8)
        backbone = 'frozen, pretrained' if result['settings'].get('backbone_checkpoint') else 'from scratch'
        ax.set(ylabel=key.replace('_', ' '), title=f"{key}: mean +- std, {len(result['settings']['seeds'])} seeds, "
               f"{result['settings']['iters']} iters\nbackbone {backbone}", ylim=(0, None))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_run_args(parser) -> None:
    """The options of one training run (shared with ``detection_stats_error.py``)."""
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--iters', type=int, default=300)
    parser.add_argument('--images-per-iter', type=int, default=2, help='images per iteration of the small batch')
    parser.add_argument('--jobs', type=int, default=2, help='runs at a time (one process each)')
    parser.add_argument('--threads', type=int, default=1, help='torch threads per run')
    parser.add_argument('--data-root', default=osp.join(ROOT, 'data/toy_coco'))
    parser.add_argument('--backbone-checkpoint', default=None,
                        help='load the backbone from this checkpoint and freeze it, BN included ("fixed BN")')
    parser.add_argument('--save-checkpoint', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--detector', default='faster-rcnn', choices=sorted(DETECTORS),
                        help="the toy detector: 'faster-rcnn' (norm in the FPN neck and the box head) or "
                        "'retinanet' (norm in the head shared by the 5 FPN levels)")


def check_args(args) -> None:
    args.data_root = osp.abspath(args.data_root)
    args.out = osp.abspath(args.out)
    for name in ('iters', 'images_per_iter', 'large_batch', 'jobs', 'threads', 'window_size', 'stat_grad_subsample'):
        if getattr(args, name) < 1:
            raise ValueError(f'--{name.replace("_", "-")} must be >= 1, got {getattr(args, name)}')
    if args.lr <= 0:
        raise ValueError(f'--lr must be > 0, got {args.lr}')
    drift = getattr(args, 'drift_interval', 0)
    if drift < 0:
        raise ValueError(f'--drift-interval must be >= 0, got {drift}')
    if drift and args.window_size < 2:
        raise ValueError(f'--drift-interval {drift} measures the angle across a window: it needs --window-size >= 2, '
                         f'got {args.window_size}')
    if drift:  # measured at begin + j * interval, once window_size - 1 earlier kernels are stored
        begin = burnin_iters(args.iters)
        if not any(it >= args.window_size - 1 for it in range(begin, args.iters, drift)):
            raise ValueError(f'--drift-interval {drift}: no iteration in [{begin}, {args.iters}) is measured with '
                             f'--window-size {args.window_size}; use more --iters or a smaller interval')
    split = [m for m in getattr(args, 'methods', ()) if m in SPLIT]
    if split and getattr(args, 'detector', 'faster-rcnn') != 'faster-rcnn':
        raise ValueError(f'--methods {split} put GN in one of the neck and the box head: only with --detector '
                         f'faster-rcnn (the toy RetinaNet has no norm in its neck), got {args.detector!r}')


def run_all(args, jobs) -> list:
    """Launch ``(run_args, method, seed)`` runs ``args.jobs`` at a time on the toy data (generated when missing)."""
    sys.path.insert(0, osp.join(ROOT, 'tools'))
    import generate_toy_coco
    generate_toy_coco.main(['--out-dir', args.data_root])
    with ThreadPoolExecutor(args.jobs) as pool:
        return list(pool.map(lambda job: launch(*job), jobs))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--methods', nargs='+', default=[m for m in METHODS if m not in CONTROLS], choices=METHODS)
    add_run_args(parser)
    parser.add_argument('--large-batch', type=int, default=8, help="images per iteration of 'bn-large'")
    parser.add_argument('--lr', type=float, default=0.02)
    parser.add_argument('--window-size', type=int, default=4, help='k of CBN and Naive CBN')
    parser.add_argument('--stat-grad-subsample', type=int, default=1,
                        help="CBN's opt-in approximation: dnu/dW from every r-th RoI or row (1: exact)")
    parser.add_argument('--out', default=osp.join(ROOT, 'work_dirs/analysis/detection_study'))
    parser.add_argument('--single', nargs=2, metavar=('METHOD', 'SEED'), help=argparse.SUPPRESS)
    parser.add_argument('--summarize', action='store_true',
                        help='train nothing: summarize and plot the requested runs that are on disk (the pretraining '
                        'run too)')
    parser.add_argument('--stats-interval', type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument('--drift-interval', type=int, default=0,
                        help='every N iterations after burn-in, record how fast the kernels before the neck\'s and '
                        'box head\'s norms turn (tools/analysis/kernel_drift.py; 0: off)')
    parser.add_argument('--pretrain-iters', type=int, default=0,
                        help='first train a BN model (bn-small, 2 threads) this long and use its backbone, frozen, '
                        'in every run (the paper\'s fixed-BN backbone); 0: backbones train from scratch')
    args = parser.parse_args(argv)
    check_args(args)
    if args.single:
        return single_run(args)
    if args.pretrain_iters < 0:
        raise ValueError(f'--pretrain-iters must be >= 0, got {args.pretrain_iters}')
    pretrain = None
    if args.pretrain_iters:
        pre = copy.copy(args)
        pre.iters, pre.threads, pre.save_checkpoint = args.pretrain_iters, 2, True
        pre.drift_interval = 0  # the pretraining run is not a method's: it is not measured
        pre.out = osp.join(args.out, 'pretrain')
        if args.summarize and finished_run(osp.join(pre.out, 'runs', 'bn-small_seed100'), pre, 'bn-small') is None:
            raise ValueError(f'detection_study --summarize: no pretraining run of {pre.iters} iterations in '
                             f'{pre.out}')
        print(f'detection_study: pretraining the backbone, {pre.iters} iterations of bn-small', flush=True)
        (pretrain, ) = run_all(pre, [(pre, 'bn-small', 100)])
        args.backbone_checkpoint = pretrain['checkpoint']

    jobs = [(args, method, seed) for seed in args.seeds for method in args.methods]
    if args.summarize:  # train nothing: the requested runs that are on disk with these settings
        jobs = [job for job in jobs
                if finished_run(osp.join(args.out, 'runs', f'{job[1]}_seed{job[2]}'), args, job[1]) is not None]
    # the slow large-batch runs first, so the pool ends evenly
    jobs.sort(key=lambda job: job[1] != 'bn-large')
    print(f'detection_study: {len(jobs)} runs of {args.iters} iterations, {args.jobs} at a time', flush=True)
    start = time.time()
    runs = run_all(args, jobs)
    settings = {k: v for k, v in vars(args).items() if k != 'single'}
    result = dict(settings=settings, pretrain=pretrain, wall_s=time.time() - start,
                  cpu_s=float(sum(r['train_cpu_s'] for r in runs)), runs=runs, summary=summarize(runs),
                  paired=paired(runs))
    os.makedirs(args.out, exist_ok=True)
    with open(osp.join(args.out, 'detection_study.json'), 'w') as f:
        json.dump(result, f, indent=1)
    plot(result, osp.join(args.out, 'detection_study.png'))
    print(f"\n{'method':<12}{'img/it':>7}{'bbox mAP':>18}{'mAP50':>18}")
    for method, row in result['summary'].items():
        print(f"{method:<12}{row['images_per_iter']:>7}{row['bbox_mAP'][0]:>11.3f} +- {row['bbox_mAP'][1]:.3f}"
              f"{row['bbox_mAP_50'][0]:>11.3f} +- {row['bbox_mAP_50'][1]:.3f}")
    for name, row in result['paired'].items():
        d = row['bbox_mAP']
        print(f"{name:<24} bbox mAP {d['mean']:+.3f} +- {d['ci95']:.3f} (95%, {row['n']} seeds; "
              f"min {d['min']:+.3f}, max {d['max']:+.3f})")
    print(f"{len(runs)} runs, {result['cpu_s'] / 60:.1f} CPU min of training, {result['wall_s'] / 60:.1f} min wall; "
          f'written {args.out}')
    return result


if __name__ == '__main__':
    main()
