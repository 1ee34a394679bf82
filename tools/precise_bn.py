"""Recompute a trained detector's BN/CBN running statistics on the inputs the layers meet at test time (precise BN).

    python tools/precise_bn.py CONFIG CHECKPOINT [--modules roi_head bbox_head] [--source test|train]
                               [--num-images 200] [--out NEW.pth] [--eval] [--json FILE] [--work-dir DIR]

A box head's norm layers are trained on the sampler's RoIs but, at test time, normalize the RPN's top proposals.
Their running statistics, BN's and CBN's alike, then describe the wrong inputs. This tool runs training images
through the model and replaces the running statistics of the BN/CBN layers under ``--modules`` by the exact
statistics of their inputs (``cbn_mmdet.engine.precise_stats``), layer by layer:

* ``--source test`` (the fix): training images through the *test* pipeline and the test path (``mode='predict'``,
  test-time proposals);
* ``--source train`` (the control): training images through the training pipeline and the training path
  (``mode='loss'``, the sampler's RoIs): precise statistics of the training distribution.

The images are the first ``--num-images`` of the training set in a fixed shuffled order (seed 0); their labels are
not used by ``--source test``. ``--out`` saves the checkpoint with the new statistics (its ``meta['precise_bn']``
records what was done); ``--eval`` then evaluates it with the config's test loop (CocoMetric). Prints one line per
layer: the mean shift of the mean, in old standard deviations, and the mean ratio of new to old variance.
"""
import argparse
import copy
import json
import os.path as osp
import sys

sys.path.insert(0, osp.join(osp.dirname(osp.abspath(__file__)), '..'))

import cbn_mmdet  # noqa: E402,F401
from mmengine.runner import Runner  # noqa: E402
from mmengine.runner.checkpoint import save_checkpoint, weights_to_cpu  # noqa: E402

from cbn_mmdet.engine.precise_stats import norm_layers, recompute_statistics  # noqa: E402

sys.path.insert(0, osp.dirname(osp.abspath(__file__)))
from train import load_cfg, parse_runner_args  # noqa: E402

SOURCES = {'test': 'predict', 'train': 'loss'}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('config')
    parser.add_argument('checkpoint')
    parser.add_argument('--modules', nargs='+', default=['roi_head', 'bbox_head'],
                        help="module names whose BN/CBN layers are recomputed (default: a two-stage detector's "
                        "roi_head, a one-stage detector's bbox_head), e.g. neck roi_head ('' for all)")
    parser.add_argument('--source', choices=sorted(SOURCES), default='test',
                        help='test: test pipeline and test path (test-time proposals); train: the training path')
    parser.add_argument('--num-images', type=int, default=200)
    parser.add_argument('--out', help='save the checkpoint with the recomputed statistics here')
    parser.add_argument('--eval', action='store_true', help="evaluate with the config's test loop afterwards")
    parser.add_argument('--json', help='write the per-layer report (and the metrics with --eval) here')
    parser.add_argument('--work-dir')
    args = parse_runner_args(parser, argv)
    if args.num_images < 1:
        parser.error(f'--num-images must be >= 1, got {args.num_images}')
    return args


def _base_dataset(dataset_cfg):
    """The dataset config that holds ann_file, under wrappers such as RepeatDataset or ClassBalancedDataset."""
    cfg = dataset_cfg
    while 'ann_file' not in cfg and 'dataset' in cfg:
        cfg = cfg['dataset']
    if 'ann_file' not in cfg:
        raise ValueError(f"precise_bn: cannot find the training set's ann_file in train_dataloader.dataset "
                         f"(type {dataset_cfg.get('type')!r}); set it with --cfg-options")
    return cfg


def training_images_loader(cfg, source: str):
    """A finite loader over the training images, in a fixed shuffled order: the test pipeline for 'test', the
    training pipeline for 'train'."""
    train = copy.deepcopy(cfg.train_dataloader)
    base = _base_dataset(train.dataset)
    if source == 'test':
        loader = copy.deepcopy(cfg.test_dataloader)
        dataset = copy.deepcopy(loader.dataset)
        for key in ('data_root', 'ann_file', 'data_prefix', 'metainfo'):
            if key in base:
                dataset[key] = copy.deepcopy(base[key])
        dataset.pop('indices', None)
        dataset['test_mode'] = True  # keeps images without annotations, as test sets do
        loader.dataset = dataset
    else:
        loader = train
    loader.sampler = dict(type='DefaultSampler', shuffle=True, seed=0)
    loader.pop('batch_sampler', None)
    loader.persistent_workers = False
    return Runner.build_dataloader(loader, seed=0)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_cfg(args.config, args.launcher, args.cfg_options, args.work_dir)
    cfg.load_from = args.checkpoint
    cfg.resume = False
    runner = Runner.from_cfg(cfg)
    runner.load_or_resume()  # loaded once: runner.test() below does not load it again
    layers = norm_layers(runner.model, args.modules)
    if not layers:
        raise ValueError(f'precise_bn: no BN/CBN layer with running statistics under --modules {args.modules}')
    report = recompute_statistics(runner.model, training_images_loader(cfg, args.source), layers,
                                  SOURCES[args.source], args.num_images)
    for name, row in report.items():
        print(f"precise_bn: {name:<40} mean shift {row['mean_shift_in_sd']:.3f} sd, variance x{row['var_ratio']:.3f}"
              f" ({row['images']} images, {row['values_per_channel']} values per channel)", flush=True)
    result = dict(config=args.config, checkpoint=args.checkpoint, modules=args.modules, source=args.source,
                  num_images=args.num_images, layers=report)
    if args.out:
        save_checkpoint(dict(meta=dict(precise_bn={k: v for k, v in result.items() if k != 'layers'}),
                             state_dict=weights_to_cpu(runner.model.state_dict())), args.out)
        print(f'precise_bn: written {args.out}')
    if args.eval:
        result['metrics'] = {k: float(v) for k, v in runner.test().items()}
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == '__main__':
    main()
