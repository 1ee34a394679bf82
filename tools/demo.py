"""The embedded default: generate toy COCO, train Faster R-CNN with CBN heads on the CPU, and print COCO mAP.

    python tools/demo.py [--iters N] [--work-dir DIR]

Steps: ``tools/generate_toy_coco.py`` (skipped when the data exist), ``tools/train.py`` on
``configs/toy/faster-rcnn_r18-cbn-heads_fpn_toy.py``, then ``tools/test.py`` on the last checkpoint, which loads it
through mmengine with torch's weights_only unpickler and evaluates with MMDetection's CocoMetric.
"""
import argparse
import os.path as osp
import sys
import time

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, osp.join(ROOT, 'tools'))

import generate_toy_coco  # noqa: E402
import test as test_tool  # noqa: E402
import train as train_tool  # noqa: E402

CONFIG = osp.join(ROOT, 'configs/toy/faster-rcnn_r18-cbn-heads_fpn_toy.py')


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--config', default=CONFIG)
    parser.add_argument('--iters', type=int, default=None, help='training iterations (default: the config)')
    parser.add_argument('--work-dir', default=osp.join(ROOT, 'work_dirs/toy_demo'))
    parser.add_argument('--data-root', default=osp.join(ROOT, 'data/toy_coco'))
    parser.add_argument('--cfg-options', nargs='+', default=[], help='extra key=value overrides of the config')
    args = parser.parse_args(argv)

    start = time.time()
    generate_toy_coco.main(['--out-dir', args.data_root])
    data = args.data_root.rstrip('/') + '/'
    options = [f'train_dataloader.dataset.data_root={data}', f'val_dataloader.dataset.data_root={data}',
               f'test_dataloader.dataset.data_root={data}',
               f'val_evaluator.ann_file={data}annotations/instances_val.json',
               f'test_evaluator.ann_file={data}annotations/instances_val.json']
    if args.iters is not None:
        # the same schedule, scaled: lr steps at 75% and 92% of training
        steps = f'[{args.iters * 3 // 4},{args.iters * 23 // 25}]'
        options += [f'train_cfg.max_iters={args.iters}', f'train_cfg.val_interval={args.iters}',
                    f'default_hooks.checkpoint.interval={args.iters}', f'param_scheduler.1.end={args.iters}',
                    f'param_scheduler.1.milestones={steps}']
    options += args.cfg_options
    runner = train_tool.main([args.config, '--work-dir', args.work_dir, '--cfg-options', *options])
    checkpoint = osp.join(args.work_dir, f'iter_{runner.iter}.pth')
    metrics = test_tool.main([args.config, checkpoint, '--work-dir', args.work_dir, '--cfg-options', *options])
    print('\n' + '=' * 60)
    print(f'CBN toy demo: {runner.iter} iterations, {time.time() - start:.0f} s in total')
    print(f'checkpoint: {checkpoint}')
    print(f"{'metric':<22}{'value':>8}")
    for key, value in metrics.items():
        print(f'{key:<22}{value:>8.3f}')
    print('=' * 60)
    return metrics


if __name__ == '__main__':
    main()
