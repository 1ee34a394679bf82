"""How fast the kernels before the norms turn during training (issue 20's mechanism), for the studies.

The Taylor term of CBN moves a stored iteration's statistics to the current kernel to first order. How much that
leaves out grows with the angle the kernel turns across the window. :class:`KernelDrift` measures it on any list of
convolutions: per conv, the angle between the kernel after a step and after the previous step, the angle across the
``k - 1`` steps of a full window, and the kernel's norm. It only reads the kernels, so training is unchanged.

* ``tools/analysis/classification_study.py`` records it for every run (the convs before the norms);
* :class:`KernelDriftHook` records it in an MMDetection run, for the convs of every ``ConvModule`` with a norm under
  the model's ``parts`` (the toy detectors' FPN neck and box head), and writes ``kernel_drift.json`` into the work
  dir when training ends; ``tools/analysis/detection_study.py --drift-interval N`` adds it to every run.
"""
import json
import math
import os.path as osp
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS

__all__ = ['kernel_angle', 'KernelDrift', 'KernelDriftHook']


def kernel_angle(a: torch.Tensor, b: torch.Tensor) -> float:
    """The angle in radians between two kernels (flattened), computed in fp64."""
    cos = F.cosine_similarity(a.flatten().double(), b.flatten().double(), 0).clamp(-1, 1).item()
    return math.acos(cos)


class KernelDrift:
    """The kernels' angle per step and across a window of ``k`` iterations, and their norm.

    ``step(measure)`` is called after every optimizer step. It keeps the last ``max(k, 2)`` kernels of each conv
    (one device copy per step) and, where ``measure`` holds and ``k - 1`` earlier kernels (one, for ``k = 1``) are
    stored, syncs with the host once to record each conv's angles and norm. With ``k = 1`` (no window) the window
    angle is None.
    """

    def __init__(self, convs: Sequence[torch.nn.Module], k: int):
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f'KernelDrift: k must be an int >= 1, got {k!r}')
        self.convs, self.span = list(convs), k - 1
        self.keep = max(self.span, 1) + 1  # kernels kept per conv: the window's first, or the previous step's
        self.history = [[] for _ in self.convs]  # per conv, the last `keep` kernels (oldest first)
        self.step_angle, self.window_angle, self.norm = [], [], []

    @torch.no_grad()
    def step(self, measure: bool) -> None:
        rows = []
        for conv, hist in zip(self.convs, self.history):
            w = conv.weight.detach().flatten().clone()
            hist.append(w)
            if len(hist) > self.keep:
                hist.pop(0)
            if measure and len(hist) == self.keep:
                window = kernel_angle(w, hist[0]) if self.span else math.nan
                rows.append((kernel_angle(w, hist[-2]), window, w.norm().item()))
        if measure and rows and len(rows) == len(self.convs):
            step, window, norm = zip(*rows)
            self.step_angle.append(step)
            self.window_angle.append(window)
            self.norm.append(norm)

    def summary(self) -> dict:
        """Means over the measured steps, averaged over the convs, and per conv (None before any measurement)."""
        if not self.step_angle:
            return dict(kernel_angle_step=None, kernel_angle_window=None, kernel_norm_mean=None)
        per_conv = {name: np.mean(np.asarray(v), 0) for name, v in
                    (('step', self.step_angle), ('window', self.window_angle), ('norm', self.norm))}
        return dict(kernel_angle_step=float(per_conv['step'].mean()),
                    kernel_angle_window=float(per_conv['window'].mean()) if self.span else None,
                    kernel_norm_mean=float(per_conv['norm'].mean()), kernel_window_span=self.span,
                    kernel_measured_steps=len(self.step_angle),
                    kernel_drift_per_conv={k: v.tolist() for k, v in per_conv.items() if self.span or k != 'window'})


@HOOKS.register_module(force=True)
class KernelDriftHook(Hook):
    """:class:`KernelDrift` in an mmengine run, for the convs of the ``ConvModule`` s with a norm under ``parts``.

    Args:
        window_size (int): ``k``: the window angle spans ``k - 1`` steps.
        interval (int): Measure every ``interval`` iterations.
        begin (int): First iteration measured (e.g. the end of CBN's burn-in).
        parts (Sequence[str]): Attribute paths of the model searched for ConvModules (``'roi_head.bbox_head'``).
    """

    def __init__(self, window_size: int = 4, interval: int = 10, begin: int = 0,
                 parts: Sequence[str] = ('neck', 'roi_head.bbox_head')):
        for name, value, low in (('window_size', window_size, 2), ('interval', interval, 1), ('begin', begin, 0)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f'KernelDriftHook: {name} must be an int >= {low}, got {value!r}')
        if isinstance(parts, str) or not all(isinstance(p, str) and p for p in parts):
            raise ValueError(f'KernelDriftHook: parts must be a sequence of attribute paths, got {parts!r}')
        self.window_size, self.interval, self.begin, self.parts = window_size, interval, begin, tuple(parts)
        self.names, self.drift = [], None

    def before_train(self, runner) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        convs, self.names = [], []
        for part in self.parts:
            sub = model
            for attr in part.split('.'):
                sub = getattr(sub, attr, None)
                if sub is None:
                    raise ValueError(f'KernelDriftHook: the model has no {part!r} (parts={self.parts})')
            for name, module in sub.named_modules():
                if getattr(module, 'with_norm', False) and isinstance(getattr(module, 'conv', None), torch.nn.Conv2d):
                    convs.append(module.conv)
                    self.names.append('.'.join(x for x in (part, name, 'conv') if x))
        if not convs:
            raise ValueError(f'KernelDriftHook: no ConvModule with a norm under {self.parts}')
        self.drift = KernelDrift(convs, self.window_size)

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        it = runner.iter  # the iteration just trained (mmengine advances runner.iter after the hooks)
        self.drift.step(measure=it >= self.begin and (it - self.begin) % self.interval == 0)

    def after_train(self, runner) -> None:
        out = dict(self.drift.summary(), convs=self.names, interval=self.interval, begin=self.begin)
        with open(osp.join(runner.work_dir, 'kernel_drift.json'), 'w') as f:
            json.dump(out, f, indent=1)
