"""Test (evaluate) a checkpoint with MMDetection's Runner and CocoMetric (mirrors mmdet's tools/test.py)."""
import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), '..'))

import cbn_mmdet  # noqa: E402,F401
from mmengine.registry import RUNNERS  # noqa: E402
from mmengine.runner import Runner  # noqa: E402

from cbn_mmdet.utils.dist import process_group_scope, setup_cpu_distributed  # noqa: E402

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from train import load_cfg, parse_runner_args  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description='Test (and eval) a model (cbn_mmdet)')
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument('--work-dir', help='the directory to save the file containing evaluation metrics')
    parser.add_argument('--out', type=str, help='dump predictions to a pickle file for offline evaluation')
    return parse_runner_args(parser, argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_cfg(args.config, args.launcher, args.cfg_options, args.work_dir)
    cfg.load_from = args.checkpoint
    with process_group_scope():  # a distributed run's process group ends with the run
        setup_cpu_distributed(cfg, args.launcher)
        runner = Runner.from_cfg(cfg) if 'runner_type' not in cfg else RUNNERS.build(cfg)
        if args.out is not None:
            assert args.out.endswith(('.pkl', '.pickle')), 'The dump file must be a pkl file.'
            from mmdet.evaluation import DumpDetResults
            runner.test_evaluator.metrics.append(DumpDetResults(out_file_path=args.out))
        metrics = runner.test()
    return metrics


if __name__ == '__main__':
    main()
