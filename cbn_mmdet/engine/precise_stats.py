"""Precise statistics for a trained detector: the running statistics of its BN/CBN layers recomputed after training.

A norm layer's running statistics are an EMA of what it saw in training. In a two-stage detector the box head saw the
sampler's RoIs (for example 512 per image, 25% positive), while at test time it sees the RPN's top proposals, whose
feature statistics differ. :func:`recompute_statistics` replaces the statistics of chosen layers by the exact
statistics of their inputs on the inputs they get on a path of the model:

* ``mode='predict'``: the test path (``model(..., mode='predict')``), for example on training images with the test
  pipeline: the statistics the layers meet at test time;
* ``mode='loss'``: the training path (``mode='loss'``, the sampler's RoIs): precise BN of the training distribution
  (Wu and Johnson, 2021), the control that separates an EMA's noise from a shift between training and test inputs.

Layers are done one at a time, in module order, with the model in eval mode: each layer's statistics are measured
with the layers before it already updated, so the result does not depend on the order of the passes. That costs one
pass over the data per layer. Every pass starts from the same random state (``seed``: Python's, numpy's and torch's
generators), so a loader with random augmentation (a flip) and the training path's RoI sampler give every layer the
same images, flips and RoIs, as long as the loader works in this process (``num_workers=0``) and its order is fixed. Statistics are accumulated in fp64: per channel, the sum and the sum of squares of the
layer's input over every other dimension; the variance is stored unbiased, as BN stores it.
"""
import random
from typing import Dict, Iterable, List, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

MODES = ('predict', 'loss')


def norm_layers(model: nn.Module, prefixes: Sequence[str]) -> List[Tuple[str, _BatchNorm]]:
    """The ``_BatchNorm`` layers (BN, SyncBN, CBN) of ``model`` under any of the module names ``prefixes`` (for
    example ``['roi_head']`` or ``['neck', 'roi_head']``; ``['']`` is every layer), in module order, tracking running
    statistics."""
    out = []
    for name, module in model.named_modules():
        if not isinstance(module, _BatchNorm) or not module.track_running_stats:
            continue
        if any(p == '' or name == p or name.startswith(p + '.') for p in prefixes):
            out.append((name, module))
    return out


class _Moments:
    """Per-channel count, sum and sum of squares of a layer's input (dim 1 is the channel), in fp64."""

    def __init__(self):
        self.n = 0
        self.s1 = self.s2 = None

    def __call__(self, module, args):
        x = args[0].detach()
        if x.numel() == 0:
            return
        c = x.shape[1]
        flat = x.transpose(0, 1).reshape(c, -1).double()
        s1, s2 = flat.sum(1), flat.pow(2).sum(1)
        self.s1 = s1 if self.s1 is None else self.s1 + s1
        self.s2 = s2 if self.s2 is None else self.s2 + s2
        self.n += flat.shape[1]

    def result(self) -> Tuple[Tensor, Tensor]:
        mean = self.s1 / self.n
        var = (self.s2 / self.n - mean.pow(2)).clamp_min(0) * (self.n / max(self.n - 1, 1))
        return mean, var


@torch.no_grad()
def recompute_statistics(model: nn.Module, data_loader: Iterable, layers: Sequence[Tuple[str, _BatchNorm]],
                         mode: str = 'predict', num_images: int = 200, seed: int = 0) -> Dict[str, dict]:
    """Replace the running statistics of ``layers`` (pairs from :func:`norm_layers`) by those of their inputs on
    ``mode``'s path over the first ``num_images`` images of ``data_loader`` (mmengine data batches); layer by layer,
    in order. Returns, per layer: the values counted per channel, the mean |shift| of the mean in units of the old
    standard deviation, and the mean ratio of the new variance to the old.

    The model is left in eval mode. Raises ``ValueError`` for a bad ``mode`` or ``num_images``, or when a layer saw
    no input (it is not on that path)."""
    if mode not in MODES:
        raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    if num_images < 1:
        raise ValueError(f'num_images must be >= 1, got {num_images}')
    model.eval()
    report = {}
    for name, layer in layers:
        moments = _Moments()
        handle = layer.register_forward_pre_hook(moments)
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            seen = 0
            for batch in data_loader:
                data = model.data_preprocessor(batch, mode == 'loss')
                model(**data, mode=mode)
                seen += len(data['data_samples'])
                if seen >= num_images:
                    break
        finally:
            handle.remove()
        if moments.n == 0:
            raise ValueError(f"recompute_statistics: layer '{name}' saw no input on the {mode!r} path")
        mean, var = moments.result()
        old_mean, old_var = layer.running_mean.double(), layer.running_var.double()
        report[name] = dict(
            images=seen, values_per_channel=moments.n,
            mean_shift_in_sd=float(((mean - old_mean).abs() / (old_var + layer.eps).sqrt()).mean()),
            var_ratio=float(((var + layer.eps) / (old_var + layer.eps)).mean()))
        layer.running_mean.copy_(mean.to(layer.running_mean.dtype))
        layer.running_var.copy_(var.to(layer.running_var.dtype))
    return report
