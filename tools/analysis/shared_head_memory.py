"""Window memory of CBN in a head shared across FPN levels (RetinaNet R50-FPN).

    python tools/analysis/shared_head_memory.py [--ks 4 8] [--size 256] [--iters 4] [--out FILE]

MMDetection's RetinaNet R50-FPN with ``norm_cfg=dict(type='CBN')`` in its head (4 cls + 4 reg convs, 256 -> 256,
3x3, called once per level P3-P7) and BN elsewhere, trained ``--iters`` SGD steps on generated images, no pretrained
weights. Printed per head norm layer: its calls per iteration, the bytes of one call position's window and of all
its windows (``window_nbytes``), the layer's scratch (``workspace_nbytes``, shared by its call positions), and the
training step's time. The running-statistics update (one EMA update per call, as BN does in a shared head) is two
ops of the fused path (tools/benchmark.py counts them). Writes the numbers as JSON to ``--out`` if given.
"""
import argparse
import copy
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import cbn_mmdet  # noqa: E402,F401
from cbn_mmdet import CrossIterationBatchNorm2d  # noqa: E402

CONFIG = 'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py'


def build(k):
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.hub import get_config
    from mmengine.registry import DefaultScope
    register_all_modules()
    cfg = copy.deepcopy(get_config(CONFIG).model)
    cfg.backbone.init_cfg = None
    cfg.bbox_head.norm_cfg = dict(type='CBN', window_size=k, requires_grad=True)
    with DefaultScope.overwrite_default_scope('mmdet'):
        model = MODELS.build(cfg)
    model.init_weights()
    return model


def measure(k, size, iters):
    from mmdet.testing import demo_mm_inputs
    torch.manual_seed(0)
    model = build(k)
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, CrossIterationBatchNorm2d)]
    packed = demo_mm_inputs(2, [[3, size, size]] * 2, num_items=[3, 2], num_classes=80)
    optim = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    model.train()
    step_time = 0.0
    for it in range(iters):
        for _, layer in layers:
            layer.begin_iteration(it)
        start = time.perf_counter()
        data = model.data_preprocessor(packed, True)
        loss, _ = model.parse_losses(model(**data, mode='loss'))
        loss.backward()
        optim.step()
        optim.zero_grad()
        step_time = time.perf_counter() - start  # the last step: windows full
    rows = []
    for name, layer in layers:
        rows.append(dict(layer=name, calls=layer.calls_per_iteration, window_lengths=layer.window_lengths,
                         bytes_per_call=layer.window_at(0).nbytes, bytes=layer.window_nbytes,
                         workspace_bytes=layer.workspace_nbytes))
    return dict(k=k, size=size, layers=rows, head_bytes=sum(r['bytes'] + r['workspace_bytes'] for r in rows),
                step_s=step_time, running_stat_updates=sum(r['calls'] for r in rows))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--ks', type=int, nargs='+', default=[4, 8])
    parser.add_argument('--size', type=int, default=256)
    parser.add_argument('--iters', type=int, default=0, help='default: k + 1 (windows full)')
    parser.add_argument('--out')
    args = parser.parse_args()
    results = []
    for k in args.ks:
        res = measure(k, args.size, args.iters or k + 1)
        results.append(res)
        print(f'k={k}: RetinaNet head, {len(res["layers"])} CBN layers')
        for r in res['layers']:
            print(f'  {r["layer"]:32s} calls={r["calls"]} windows={r["window_lengths"]} '
                  f'{r["bytes_per_call"] / 2**20:7.2f} MiB per call position, {r["bytes"] / 2**20:7.2f} MiB')
        print(f'  head total {res["head_bytes"] / 2**20:.1f} MiB with scratch; running-statistics updates: '
              f'{res["running_stat_updates"]} per step; step {res["step_s"]:.2f} s')
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(results, f, indent=1)


if __name__ == '__main__':
    main()
