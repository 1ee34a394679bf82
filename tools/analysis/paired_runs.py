"""Paired differences between runs of two study folders (the same seeds), written as JSON.

    python tools/analysis/paired_runs.py --pair A B [--pair A B ...] [--out FILE]

A and B name runs as ``SOURCE:SELECTOR``. SOURCE is a classification-study folder (its ``runs/*.json``) or a
detection-study JSON (``detection_study.json``, its ``runs`` list). SELECTOR is ``variant@batch_size`` for a
classification folder (metric ``test_top1``) and ``method`` for a detection JSON (metric ``bbox_mAP``). Each pair is
reported as ``paired_stats.paired_difference`` of A - B over the seeds both have. The output goes to ``--out``
(default ``work_dirs/analysis/paired_runs.json``), never into docs/.
"""
import argparse
import glob
import json
import os
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from paired_stats import paired_difference  # noqa: E402


def load(spec: str):
    """``SOURCE:SELECTOR`` -> (metric name, {seed: value})."""
    source, _, selector = spec.rpartition(':')
    if not source or not selector:
        raise SystemExit(f'paired_runs: expected SOURCE:SELECTOR, got {spec!r}')
    if osp.isdir(source):
        variant, _, bs = selector.partition('@')
        values = {}
        for path in sorted(glob.glob(osp.join(source, 'runs', '*.json'))):
            with open(path) as f:
                run = json.load(f)
            if run.get('variant') == variant and (not bs or run.get('batch_size') == int(bs)):
                values[run['seed']] = run['test_top1']
        return 'test_top1', values
    with open(source) as f:
        study = json.load(f)
    return 'bbox_mAP', {r['seed']: r['bbox_mAP'] for r in study['runs'] if r['method'] == selector}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--pair', nargs=2, action='append', required=True, metavar=('A', 'B'))
    parser.add_argument('--out', default='work_dirs/analysis/paired_runs.json')
    args = parser.parse_args(argv)
    result = {}
    for a, b in args.pair:
        metric_a, va = load(a)
        metric_b, vb = load(b)
        if metric_a != metric_b:
            raise SystemExit(f'paired_runs: {a} and {b} measure different metrics ({metric_a}, {metric_b})')
        seeds = sorted(set(va) & set(vb))
        if not seeds:
            raise SystemExit(f'paired_runs: {a} and {b} share no seed')
        d = paired_difference([va[s] - vb[s] for s in seeds])
        result[f'{a} - {b}'] = dict(metric=metric_a, seeds=seeds, **d)
        ci = 'n/a' if d['ci95'] is None else f"{d['ci95']:.3f}"
        print(f"{a} - {b}: {d['mean']:+.3f} ± {ci} ({metric_a}, seeds {seeds}, min {d['min']:+.3f}, "
              f"max {d['max']:+.3f})")
    os.makedirs(osp.dirname(osp.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=1)
    print(f'written {args.out}')
    return result


if __name__ == '__main__':
    main()
