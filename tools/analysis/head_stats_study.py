"""Is GN's lead in the toy detection study about evaluation statistics? Precise statistics on a study's checkpoints.

    python tools/analysis/head_stats_study.py --study DIR [--methods bn-small cbn-authors cbn]
        [--conditions head-test head-train] [--seeds 0 1 2 3 4] [--num-images 100] [--jobs 1] [--out DIR]

The hypothesis (issue 12): the box head's norm layers are trained on the sampler's RoIs but normalize the RPN's top
proposals at test time; their running statistics then fit the wrong inputs, while GN keeps none and is immune. For
every checkpoint of a ``detection_study.py --save-checkpoint`` run (``DIR/runs/<method>_seed<s>/``), each condition
recomputes running statistics with ``tools/precise_bn.py`` and evaluates on the toy val split:

* ``head-test``: the box head's BN/CBN layers (a one-stage detector's head), on training images through the test
  path (test-time proposals): the fix the hypothesis predicts. For a head shared across FPN levels, precise
  statistics pool every level's values by count (the large early levels weigh most), where the per-call EMA weighs
  the last levels most: the difference bounds what that choice of weights costs, mixed with any train/test shift;
* ``head-train``: the same layers on the training path (the sampler's RoIs): precise BN of the training inputs, the
  control that separates an EMA's noise from a train/test shift;
* ``all-test``: the neck's and the box head's layers on the test path.

Each (run, condition) writes ``runs/<method>_seed<s>_<condition>.json`` and is not run again. ``head_stats.json``
holds mAP per method and condition, and the paired differences (condition - trained statistics) over the seeds with
95% t-intervals; GN's mAP from the same study is listed beside them.
"""
import argparse
import json
import os
import os.path as osp
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from paired_stats import paired_difference  # this folder: run as a script or with it on sys.path

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
HEADS = ['roi_head', 'bbox_head']  # a two-stage detector's box head; a one-stage detector's (shared) head
CONDITIONS = {
    'head-test': (HEADS, 'test'),
    'head-train': (HEADS, 'train'),
    'all-test': (['neck'] + HEADS, 'test'),
}
KEYS = ('bbox_mAP', 'bbox_mAP_50', 'bbox_mAP_75')


def run_one(args, method: str, seed: int, condition: str) -> dict:
    run_dir = osp.join(args.study, 'runs', f'{method}_seed{seed}')
    path = osp.join(args.out, 'runs', f'{method}_seed{seed}_{condition}.json')
    with open(osp.join(run_dir, 'metrics.json')) as f:
        trained = json.load(f)
    if osp.exists(path):
        with open(path) as f:
            done = json.load(f)
        want = dict(num_images=args.num_images, checkpoint=trained.get('checkpoint'),
                    trained={k: trained[k] for k in KEYS})
        have = {key: done.get(key) for key in want}
        if have != want:
            raise ValueError(f'head_stats_study: {path} was made with {have}, not with {want} (another --num-images, '
                             'or the study was rerun): use another --out')
        return done
    if not trained.get('checkpoint') or not osp.exists(trained['checkpoint']):
        raise FileNotFoundError(f'head_stats_study: {run_dir} has no checkpoint: run detection_study.py with '
                                '--save-checkpoint')
    modules, source = CONDITIONS[condition]
    work = osp.join(args.out, 'work', f'{method}_seed{seed}_{condition}')
    os.makedirs(work, exist_ok=True)
    cmd = [sys.executable, osp.join(ROOT, 'tools', 'precise_bn.py'), osp.join(run_dir, 'config.py'),
           trained['checkpoint'], '--modules', *modules, '--source', source, '--num-images', str(args.num_images),
           '--eval', '--work-dir', work, '--json', osp.join(work, 'precise_bn.json')]
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    with open(osp.join(work, 'stdout.log'), 'w') as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f'head_stats_study: {method} seed {seed} {condition} failed; see {work}/stdout.log')
    with open(osp.join(work, 'precise_bn.json')) as f:
        report = json.load(f)
    result = dict(method=method, seed=seed, condition=condition, num_images=args.num_images,
                  checkpoint=trained['checkpoint'], trained={k: trained[k] for k in KEYS},
                  **{k: report['metrics'].get(f'coco/{k}', 0.0) for k in KEYS},
                  layers={name: {k: row[k] for k in ('mean_shift_in_sd', 'var_ratio')}
                          for name, row in report['layers'].items()})
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, path)
    print(f"  {method:<12} seed {seed} {condition:<10}: bbox mAP {trained['bbox_mAP']:.3f} -> "
          f"{result['bbox_mAP']:.3f}", flush=True)
    return result


def summarize(results, study_runs) -> dict:
    table, paired = {}, {}
    for method in sorted({r['method'] for r in results}):
        rows = [r for r in results if r['method'] == method]
        trained = {r['seed']: r['trained']['bbox_mAP'] for r in rows}
        table[method] = dict(trained=[float(np.mean(list(trained.values()))), len(trained)])
        for condition in sorted({r['condition'] for r in rows}):
            sub = [r for r in rows if r['condition'] == condition]
            table[method][condition] = [float(np.mean([r['bbox_mAP'] for r in sub])), len(sub)]
            d = paired_difference([r['bbox_mAP'] - r['trained']['bbox_mAP'] for r in sub])
            paired[f'{method}: {condition} - trained'] = {k: d[k] for k in ('n', 'mean', 'ci95', 'min', 'max')}
    gn = [r['bbox_mAP'] for r in study_runs if r['method'] == 'gn']
    if gn:
        table['gn'] = dict(trained=[float(np.mean(gn)), len(gn)])
    return dict(table=table, paired=paired)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--study', required=True, help='a detection_study.py --save-checkpoint output folder')
    parser.add_argument('--methods', nargs='+', default=['bn-small', 'cbn-authors', 'cbn'])
    parser.add_argument('--conditions', nargs='+', default=['head-test', 'head-train'], choices=sorted(CONDITIONS))
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2, 3, 4])
    parser.add_argument('--num-images', type=int, default=100)
    parser.add_argument('--jobs', type=int, default=1)
    parser.add_argument('--out', default=None, help='default: STUDY/head_stats')
    args = parser.parse_args(argv)
    if args.num_images < 1 or args.jobs < 1:
        parser.error(f'--num-images and --jobs must be >= 1, got {args.num_images} and {args.jobs}')
    args.study = osp.abspath(args.study)
    args.out = osp.abspath(args.out or osp.join(args.study, 'head_stats'))
    os.makedirs(osp.join(args.out, 'runs'), exist_ok=True)
    jobs = [(m, s, c) for s in args.seeds for m in args.methods for c in args.conditions]
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(lambda job: run_one(args, *job), jobs))
    study_runs = []
    for name in sorted(os.listdir(osp.join(args.study, 'runs'))):
        path = osp.join(args.study, 'runs', name, 'metrics.json')
        if osp.exists(path):
            with open(path) as f:
                study_runs.append(json.load(f))
    summary = dict(settings=vars(args), runs=results, **summarize(results, study_runs))
    with open(osp.join(args.out, 'head_stats.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    for name, row in summary['paired'].items():
        ci = f"{row['ci95']:.3f}" if row['ci95'] is not None else 'n/a'
        print(f"{name:<32} bbox mAP {row['mean']:+.3f} +- {ci} (95%, n={row['n']}; "
              f"min {row['min']:+.3f}, max {row['max']:+.3f})")
    return summary


if __name__ == '__main__':
    main()
