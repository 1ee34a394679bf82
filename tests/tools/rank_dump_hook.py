"""A test-only hook: every rank writes its CBN windows, parameters and norm types to work_dir.

After training: ``rank{r}.pt``. Windows only: ``rank{r}_start{iter}.pt`` when training starts (after a resume has
loaded its checkpoint), and ``rank{r}_iter{n}.pt`` after iteration ``n`` of ``windows_at``.
"""
import os.path as osp

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from cbn_mmdet.engine import cbn_layers


@HOOKS.register_module(force=True)
class RankDumpHook(Hook):

    def __init__(self, windows_at=()):
        self.windows_at = set(windows_at)

    @staticmethod
    def windows(runner):
        return {n: l.get_window_state() for n, l in cbn_layers(runner.model)}

    def before_train(self, runner):
        torch.save(self.windows(runner), osp.join(runner.work_dir, f'rank{get_rank()}_start{runner.iter}.pt'))

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        if runner.iter + 1 in self.windows_at:
            torch.save(self.windows(runner), osp.join(runner.work_dir, f'rank{get_rank()}_iter{runner.iter + 1}.pt'))

    def after_train(self, runner):
        model = runner.model.module if hasattr(runner.model, 'module') else runner.model
        torch.save(
            dict(windows=self.windows(runner),
                 params={n: p.detach().clone() for n, p in model.named_parameters()},
                 norm_types=sorted({type(m).__name__ for m in model.modules() if 'Norm' in type(m).__name__}),
                 wrapper=type(runner.model).__name__, iter=runner.iter),
            osp.join(runner.work_dir, f'rank{get_rank()}.pt'))
