"""A test-only hook: after training, every rank writes its CBN windows, parameters and norm types to work_dir."""
import os.path as osp

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from cbn_mmdet.engine import cbn_layers


@HOOKS.register_module(force=True)
class RankDumpHook(Hook):

    def after_train(self, runner):
        model = runner.model.module if hasattr(runner.model, 'module') else runner.model
        torch.save(
            dict(windows={n: l.get_window_state() for n, l in cbn_layers(runner.model)},
                 params={n: p.detach().clone() for n, p in model.named_parameters()},
                 norm_types=sorted({type(m).__name__ for m in model.modules() if 'Norm' in type(m).__name__}),
                 wrapper=type(runner.model).__name__, iter=runner.iter),
            osp.join(runner.work_dir, f'rank{get_rank()}.pt'))
