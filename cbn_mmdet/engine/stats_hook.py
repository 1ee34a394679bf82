"""CBNStatsErrorHook: how accurate are CBN's statistics during a real detection training run?

At every ``interval``-th iteration (once the windows are open) the hook compares, for chosen CBN layers, three
estimates of the statistics taken from the same training forward:

* CBN's normalizing statistics (the compensated window, Eq. 7-11);
* Naive CBN's (the same window, uncompensated);
* BN's (the current batch alone);

with the population statistics at the weights of that forward: the mean and variance of the layer's input over
``num_images`` fixed training images (``chunk`` at a time), pushed through the model's training forward (``loss``
mode: RPN proposals and sampled RoIs as in training). In that population pass every normalization layer (BN, SyncBN
and CBN) is frozen to exactly the statistics it used in the training forward, so the error measured at a layer is
its own estimation error, not upstream error carried along. The pass runs after the optimizer step with the
pre-step parameters swapped in, and the random-number state is restored afterwards: training is not changed.

A layer called several times per iteration (a head shared across FPN levels) is measured per call position: each
call against the population of its own level, with the window of that position. Its calls in the population pass
are frozen call by call, and the pass takes no call position (it does not run the layers' forward).

Logged per measured layer to the visualizer (``cbn_stats/<layer>/<estimator>_mu|sd``; per position
``cbn_stats/<layer>/call<c>/...`` for a layer called several times), as means over layers and positions to the
message hub (``train/cbn_err_mu_CBN`` ...), and written to ``<work_dir>/cbn_stats_error.json`` at the end (one record
per layer and call position, with its ``call``).
Errors are ``||mu_est - mu_pop|| / ||sd_pop||`` and ``||sd_est - sd_pop|| / ||sd_pop||`` over channels.
Main process only; it costs one no-grad forward over ``num_images`` images per measurement.
"""
import json
import os.path as osp
import random
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.dist import is_main_process
from mmengine.dataset import pseudo_collate
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..models import CrossIterationBatchNorm2d, recomputing
from ..models.replay import same_batch
from ..ops import batch_moments, relative_stat_errors, window_moments
from .hooks import cbn_layers

ESTIMATORS = ('CBN', 'Naive', 'BN')
RESULT_FILE = 'cbn_stats_error.json'


class _RNGState:
    """Save the python, numpy and torch generators on entry and put them back on exit."""

    def __enter__(self):
        self.state = random.getstate(), np.random.get_state(), torch.get_rng_state()
        return self

    def __exit__(self, *exc):
        py, np_state, torch_state = self.state
        random.setstate(py)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


class CBNStatsErrorHook(Hook):
    """Measure the error of CBN's, Naive CBN's and BN's statistics against population statistics while training.

    Args:
        interval (int): Measure every ``interval`` iterations. Default: 50.
        layers (Sequence[str], optional): Module paths of the CBN layers to follow (as in
            ``model.named_modules()``). Default: None, every CBN layer.
        num_images (int): Training images of the population pass (fixed, drawn once). Default: 32.
        chunk (int): Images per forward of the population pass. Default: 4.
        seed (int): Seed that draws the population images. Default: 0.

    Example:
        >>> custom_hooks = [dict(type='CBNBurnInHook', burnin_iters=500),
        ...                 dict(type='CBNStatsErrorHook', interval=100, num_images=64)]
    """
    priority = 'NORMAL'  # after the optimizer step, before LoggerHook prints the iteration

    def __init__(self,
                 interval: int = 50,
                 layers: Optional[Sequence[str]] = None,
                 num_images: int = 32,
                 chunk: int = 4,
                 seed: int = 0):
        for name, value in (('interval', interval), ('num_images', num_images), ('chunk', chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f'CBNStatsErrorHook: {name} must be an int >= 1, got {value!r}')
        if layers is not None and (isinstance(layers, str) or not all(isinstance(n, str) for n in layers)):
            raise ValueError(f'CBNStatsErrorHook: layers must be a list of module names, got {layers!r}')
        self.interval = interval
        self.layer_names = None if layers is None else list(layers)
        self.num_images = num_images
        self.chunk = chunk
        self.seed = seed
        self.records: List[dict] = []
        self._model: Optional[nn.Module] = None
        self._layers: Dict[str, CrossIterationBatchNorm2d] = {}
        self._batches = None
        self._handles = []
        self._params = None
        self._frozen = {}
        self._estimates = {}

    # ------------------------------------------------------------------ set-up
    def before_run(self, runner) -> None:
        self._model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        found = dict(cbn_layers(self._model))
        if self.layer_names is None:
            self._layers = found
        else:
            missing = [n for n in self.layer_names if n not in found]
            if missing:
                raise ValueError(f'CBNStatsErrorHook: layers {missing} are not CBN layers of the model; its CBN '
                                 f'layers are {sorted(found)}')
            self._layers = {n: found[n] for n in self.layer_names}
        if not self._layers:
            runner.logger.warning('CBNStatsErrorHook: the model has no CBN layer; the hook does nothing.')

    def _population_batches(self, runner) -> list:
        """``num_images`` fixed training samples, preprocessed in chunks (drawn once, RNG state kept)."""
        if self._batches is None:
            dataset = runner.train_dataloader.dataset
            if len(dataset) < 1:
                raise ValueError('CBNStatsErrorHook: the training dataset is empty')
            with _RNGState():
                gen = np.random.default_rng(self.seed)
                idx = gen.choice(len(dataset), min(self.num_images, len(dataset)), replace=False)
                samples = [dataset[int(i)] for i in idx]
                self._batches = [
                    self._model.data_preprocessor(pseudo_collate(samples[i:i + self.chunk]), training=True)
                    for i in range(0, len(samples), self.chunk)
                ]
        return self._batches

    # ------------------------------------------------------------------ the training forward
    def _measuring(self, runner) -> bool:
        return bool(self._layers) and is_main_process() and (runner.iter + 1) % self.interval == 0

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if not self._measuring(runner):
            return
        self._params = {n: p.detach().clone() for n, p in self._model.named_parameters()}
        self._frozen, self._estimates = {}, {}
        for module in self._model.modules():
            if isinstance(module, _BatchNorm):
                self._handles.append(module.register_forward_pre_hook(self._snapshot))
                self._handles.append(module.register_forward_hook(self._capture))

    def _snapshot(self, module, args) -> None:
        """Before the forward: the window of the call position it takes, as the layer sees it (this iteration not
        yet pushed). A checkpoint recomputation during backward (after the push) is not a call."""
        if recomputing() or not isinstance(module, CrossIterationBatchNorm2d) or not module.training:
            return
        x = args[0]
        if not x.numel():
            return
        position = module.next_call_position(x)
        window = module.window_at(position)
        if window is not None and window.count:
            view = window.view()
            self._estimates.setdefault(module, {})[position] = dict(
                window=(view['mu'].clone(), view['s'].clone(), view['w'].clone()))

    def _capture(self, module, args, output) -> None:
        """After the forward: the statistics the layer normalized with, and the batch's own, per call (a head
        shared across FPN levels calls its layers once per level)."""
        if recomputing():
            return
        x = args[0]
        frozen = self._frozen.setdefault(module, [])
        if x.numel() == 0 or not module.training:
            # no statistics of its own: its running statistics (eval mode, or an empty RoI batch), if it has any
            frozen.append(None if module.running_mean is None else
                          (module.running_mean.clone(), module.running_var.clone()))
            return
        mu_t, s_t = batch_moments(x.detach())
        replay = module.last_call if isinstance(module, CrossIterationBatchNorm2d) else None
        if replay is not None and replay.stats is not None and not bool(same_batch(replay.mu_t, mu_t)):
            # the layer's record is not of this input: freeze it to what it normalized with, but report nothing
            frozen.append((replay.stats.mu_bar.clone(), replay.stats.var_bar.clone()))
            warnings.warn(f"CBNStatsErrorHook: CBN layer '{module.module_path}': the statistics it normalized with "
                          'are not of the batch the hook saw (same_batch failed); this measurement is left out',
                          stacklevel=2)
        elif replay is not None and replay.stats is not None:
            frozen.append((replay.stats.mu_bar.clone(), replay.stats.var_bar.clone()))
            entry = self._estimates.setdefault(module, {}).setdefault(module.call_position, {})
            # a device count on the layer (skipped iterations weigh 0); read here, at a measured step, not in the layer
            entry.update(CBN=frozen[-1], BN=(mu_t, s_t), n_iters=round(float(replay.stats.n_iters)))
            window = entry.get('window')
            entry['Naive'] = (mu_t, s_t) if window is None else window_moments(  # skipped iterations weigh 0
                torch.cat([mu_t[None], window[0]]), torch.cat([s_t[None], window[1]]),
                torch.cat([window[2].new_ones(1), window[2]]))
        else:
            frozen.append((mu_t, s_t))

    # ------------------------------------------------------------------ the population pass
    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if not self._handles:
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []
        measured = {(name, call): layer for name, layer in self._layers.items()
                    for call, entry in sorted(self._estimates.get(layer, {}).items()) if entry.get('n_iters', 1) > 1}
        if measured:
            population = self._population(runner, measured)
            self._record(runner, measured, population)
        self._params, self._frozen, self._estimates = None, {}, {}

    @torch.no_grad()
    def _population(self, runner, measured) -> Dict[str, tuple]:
        model = self._model
        sums = {key: [0.0, 0.0, 0] for key in measured}
        names = {layer: name for (name, _), layer in measured.items()}
        calls = {}  # per module, its calls so far in the current forward: the k-th uses the k-th call's statistics
        overridden = []

        def frozen_forward(module, stats):
            def forward(x):
                call = calls[module] = calls.get(module, -1) + 1
                mu, var = stats[call % len(stats)]
                key = (names.get(module), call)
                if key in sums and x.numel():
                    xd = x.detach().double()
                    acc = sums[key]
                    acc[0] = acc[0] + xd.sum((0, 2, 3))
                    acc[1] = acc[1] + xd.square().sum((0, 2, 3))
                    acc[2] += x.numel() // x.shape[1]
                return F.batch_norm(x, mu.to(x.dtype), var.to(x.dtype), module.weight, module.bias, False, 0.0,
                                    module.eps)
            return forward

        for module in model.modules():
            if isinstance(module, _BatchNorm) and not self._frozen.get(module):
                # not called in the training forward: its running statistics
                self._frozen[module] = [None if module.running_mean is None else
                                        (module.running_mean.clone(), module.running_var.clone())]
            if isinstance(module, _BatchNorm) and any(stats is None for stats in self._frozen[module]):
                # no statistics from the training forward (an empty RoI batch) and no running statistics: skip
                runner.logger.warning(f'CBNStatsErrorHook: a {type(module).__name__} layer had no statistics '
                                      f'in iteration {runner.iter}; no measurement')
                return {}
        current = {}
        params = dict(model.named_parameters())
        try:
            for name, saved in self._params.items():  # the weights of the measured training forward
                current[name] = params[name].detach().clone()
                params[name].copy_(saved)
            for module, stats in self._frozen.items():
                module.forward = frozen_forward(module, stats)
                overridden.append(module)
            with _RNGState():
                for batch in self._population_batches(runner):  # as mmengine's BaseModel._run_forward
                    calls.clear()
                    if isinstance(batch, dict):
                        model(**batch, mode='loss')
                    else:
                        model(*batch, mode='loss')
        finally:
            for module in overridden:
                del module.forward
            for name, value in current.items():
                params[name].copy_(value)
        out = {}
        for key, (s1, s2, count) in sums.items():
            if count:
                mu = s1 / count
                out[key] = (mu, (s2 / count - mu * mu).clamp(min=0))
        return out

    def _record(self, runner, measured, population) -> None:
        step = runner.iter + 1
        scalars, means = {}, {}
        for (name, call), (mu_pop, var_pop) in population.items():
            layer = measured[(name, call)]
            entry = self._estimates[layer][call]
            errors = {est: relative_stat_errors(*entry[est], mu_pop, var_pop) for est in ESTIMATORS}
            self.records.append(dict(iter=step, layer=name, call=call, n_iters=entry['n_iters'], errors=errors))
            # a layer called once per level of a shared head: one series per call position (level)
            tag = f'{name}/call{call}' if len(self._frozen.get(layer, ())) > 1 else name
            for est, (e_mu, e_sd) in errors.items():
                scalars[f'cbn_stats/{tag}/{est}_mu'] = e_mu
                scalars[f'cbn_stats/{tag}/{est}_sd'] = e_sd
                means.setdefault(f'cbn_err_mu_{est}', []).append(e_mu)
                means.setdefault(f'cbn_err_sd_{est}', []).append(e_sd)
        if scalars:
            runner.visualizer.add_scalars(scalars, step=step)
            for key, values in means.items():
                runner.message_hub.update_scalar(f'train/{key}', float(np.mean(values)))

    def after_run(self, runner) -> None:
        if self.records and is_main_process():
            with open(osp.join(runner.work_dir, RESULT_FILE), 'w') as f:
                json.dump(dict(interval=self.interval, num_images=self.num_images, records=self.records), f,
                          indent=1)
