"""The detection study's ``ideal`` statistics control: BN whose statistics span more images than the loss does.

At ``bs`` images per iteration, each normalization layer of the neck and the box head normalizes the training
batch with the statistics of ``k * bs`` images: the ``bs`` training images plus ``(k - 1) * bs`` other random
training images, while the loss, and so its gradient, is over the ``bs`` training images only. These are SyncBN's
statistics without SyncBN's batch, and what a CBN window of ``k`` iterations could at best be: as many images, all
at the current weights. It is the classification study's ``ideal`` variant, in a detector.

Why two passes, not one batch of ``k * bs`` images with the loss masked to ``bs`` of them: in a detector the images
of a batch do not stay apart. The RPN's losses are averaged over the batch's anchors, the RoI head samples RoIs per
image but its losses are averaged over all of them, and the box head's norms see RoIs, not images. Masking the loss
would need a change in every loss of mmdet. The two passes keep mmdet's code as it is:

* :class:`IdealStatsHook` (``before_train_iter``) draws the extra images from a dataloader of its own (the train
  dataloader's config, ``num_images`` per iteration, its sampler seeded apart from the run's) and runs the
  detector's ``loss`` forward on them under ``torch.no_grad()``, in train mode, with every :class:`IdealStatsBN`
  in ``record`` phase. RPN proposals and RoI sampling happen as in training, so the box head's norms record the
  statistics of sampled RoIs of the extra images, as they would if those images were in the batch. The pass runs
  on its own Python, NumPy and torch random states (saved and restored around it), so the training batches' flips
  and RoI sampling draw from the same random streams as a BN run of the same seed, and the extra images' draws are
  reproducible. Every buffer of the model is restored after the pass, so a norm that trains elsewhere (the
  backbone's BN, when it is not frozen) keeps one running-statistics update per iteration. It then switches the
  norms to ``use`` phase for the real iteration; ``after_train_iter`` checks that every norm was used as many
  times as it recorded, and clears the records.
* :class:`IdealStatsBN` (a ``BatchNorm2d``). ``record``: it appends the per-channel count, mean and sum of squared
  deviations of its input (detached, float64) to a list, one entry per call, and normalizes with the input's own
  statistics, running statistics untouched. ``use``: the ``i``-th call of the iteration pools the ``i``-th record
  with the current batch (Chan et al.'s parallel formula, float64), normalizes with the pooled mean and biased
  variance, and updates the running statistics once with them (the variance with BN's ``n / (n - 1)``). The
  gradient flows through the current batch's share of the pooled statistics only: the records are constants, the
  statistics of the extra images at the same weights. Eval mode, and the ``off`` phase, are plain BN.

The one approximation: in the extra pass, the norms upstream of a layer (the neck's, for the box head) normalize
the extra images with the extra pass's own statistics, not with the pooled ones. The layer's records are
therefore those of extra images seen through slightly different upstream normalization than in one true batch of
``k * bs`` images. (The backbone is frozen, BN in eval mode, in setting B, so it does not enter.)

Call positions: a norm called more than once per iteration (a head shared by FPN levels) is handled by position:
its ``i``-th use pairs with its ``i``-th record, which holds if the two passes call it in the same order (mmdet's
heads do), and an input whose trailing shape differs from its record's raises. A use call with no record at its
position (no extra pass ran, or the position was not seen) falls back to plain BN and counts in
``fallback_calls``; under the hook that is an error (the hook checks the counts), never a silent change of
statistics.

The generated config imports this module with ``custom_imports``, so ``tools/analysis`` must be on ``sys.path``:
it is for the study's runs (``detection_study.py --single`` runs from this folder); for ``tools/train.py`` on such
a config, set ``PYTHONPATH=tools/analysis``.
"""
import copy
import random

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS, MODELS

PHASES = ('off', 'record', 'use')


class IdealStatsBN(nn.BatchNorm2d):
    """BN that normalizes with the pooled statistics of recorded extra images and the current batch (see module)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.phase = 'off'
        self._records = []  # (count, mean, m2, trailing shape) per record call, float64 [C]
        self.use_calls = 0
        self.fallback_calls = 0

    def set_phase(self, phase: str) -> None:
        """``record`` clears the records; ``use`` starts counting use calls; ``off`` clears everything."""
        if phase not in PHASES:
            raise ValueError(f'IdealStatsBN: phase must be one of {PHASES}, got {phase!r}')
        if phase in ('record', 'off'):
            self._records = []
        self.use_calls = self.fallback_calls = 0
        self.phase = phase

    @property
    def num_records(self) -> int:
        return len(self._records)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.phase == 'off':
            return super().forward(x)
        self._check_input_dim(x)
        if self.phase == 'record':
            with torch.no_grad():
                flat = x.detach().transpose(0, 1).reshape(x.shape[1], -1).double()
                mean = flat.mean(1)
                self._records.append((flat.shape[1], mean, ((flat - mean[:, None])**2).sum(1), tuple(x.shape[2:])))
            # the extra pass's own statistics downstream; the running statistics are updated in the use phase only
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        position = self.use_calls
        self.use_calls += 1
        if position >= len(self._records):  # nothing recorded at this call position: plain BN, counted
            self.fallback_calls += 1
            return super().forward(x)
        count_e, mean_e, m2_e, shape = self._records[position]
        if tuple(x.shape[2:]) != shape:
            raise RuntimeError(f'IdealStatsBN: use call {position} has input shape {tuple(x.shape)}, but the '
                               f'record at that position had trailing shape {shape}: the two passes do not call '
                               'this norm in the same order')
        dims = [0] + list(range(2, x.dim()))
        count_b = x.numel() // x.shape[1]
        mean_b = x.mean(dims).double()  # differentiable: the current batch's share
        var_b = x.var(dims, unbiased=False).double()
        count = count_e + count_b
        delta = mean_b - mean_e
        mean = mean_e + delta * (count_b / count)
        var = (m2_e + var_b * count_b + delta**2 * (count_e * count_b / count)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = (1.0 / float(self.num_batches_tracked)) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
                unbiased = var * (count / max(count - 1, 1))
                self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)
        view = [1, -1] + [1] * (x.dim() - 2)
        y = (x - mean.to(x.dtype).view(view)) * torch.rsqrt(var.to(x.dtype) + self.eps).view(view)
        if self.affine:
            y = y * self.weight.view(view) + self.bias.view(view)
        return y


class IdealStatsHook(Hook):
    """Before every training iteration, record the :class:`IdealStatsBN` statistics of ``num_images`` extra random
    training images (a no-grad ``loss`` forward in train mode), then let the iteration use them (see module)."""

    priority = 'NORMAL'

    def __init__(self, num_images: int, seed_offset: int = 1000):
        if num_images < 1:
            raise ValueError(f'IdealStatsHook: num_images must be >= 1, got {num_images}')
        self.num_images = num_images
        self.seed_offset = seed_offset

    @staticmethod
    def _model(runner):
        return runner.model.module if is_model_wrapper(runner.model) else runner.model

    def before_train(self, runner) -> None:
        self._layers = [(name, m) for name, m in self._model(runner).named_modules() if isinstance(m, IdealStatsBN)]
        if not self._layers:
            raise RuntimeError('IdealStatsHook: the model has no IdealStatsBN layer')
        seed = (runner.seed or 0) + self.seed_offset
        cfg = copy.deepcopy(runner.cfg.train_dataloader)
        cfg['batch_size'] = self.num_images
        cfg['sampler'] = dict(cfg['sampler'], seed=seed)  # other images than the training batches' order
        self._loader = iter(runner.build_dataloader(cfg, seed=seed))
        self._rng = (random.Random(seed).getstate(), np.random.RandomState(seed).get_state(),
                     torch.Generator().manual_seed(seed).get_state())
        runner.logger.info(f'IdealStatsHook: {len(self._layers)} IdealStatsBN layers, statistics over '
                           f'{self.num_images} extra images per iteration (sampler seed {seed})')

    def _swap_rng(self, states):
        """Install ``states`` (python, numpy, torch CPU) as the global random states; return the previous ones."""
        previous = (random.getstate(), np.random.get_state(), torch.get_rng_state())
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        return previous

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        model = self._model(runner)
        if not model.training:
            raise RuntimeError('IdealStatsHook: the model must be in train mode for the extra pass')
        for _, layer in self._layers:
            layer.set_phase('record')
        saved = self._swap_rng(self._rng)
        buffers = [(buf, buf.clone()) for buf in model.buffers()]  # e.g. a training backbone's BN running stats
        try:
            extra = next(self._loader)
            with torch.no_grad():
                model(**model.data_preprocessor(extra, True), mode='loss')
                for buf, value in buffers:
                    buf.copy_(value)
        finally:
            self._rng = self._swap_rng(saved)
        for _, layer in self._layers:
            layer.set_phase('use')

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        wrong = [f'{name}: {layer.use_calls} use calls, {layer.num_records} records, {layer.fallback_calls} '
                 'without a record' for name, layer in self._layers
                 if layer.use_calls != layer.num_records or layer.fallback_calls]
        for _, layer in self._layers:
            layer.set_phase('off')
        if wrong:
            raise RuntimeError('IdealStatsHook: the extra pass and the iteration did not call the norms alike: '
                               + '; '.join(wrong))


# the root registries (as cbn_mmdet registers CBN): mmcv's build_norm_layer and every scope find them
MODELS.register_module(name='IdealStatsBN', module=IdealStatsBN, force=True)
HOOKS.register_module(name='IdealStatsHook', module=IdealStatsHook, force=True)
