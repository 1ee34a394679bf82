"""CBNBurnInHook: the burn-in schedule, the 'auto' window, and the windows in checkpoints.

The hook never does math: it tells each CBN layer, before every training iteration, whether to normalize with
its window and whether to collect history, and it moves the windows in and out of checkpoints.
"""
import math
from typing import Dict, Iterable, List, Optional, Tuple, Union

from mmengine.dist import all_gather_object, get_rank, get_world_size
from mmengine.hooks import CheckpointHook, Hook
from mmengine.model import is_model_wrapper
from torch import nn

from ..models import CrossIterationBatchNorm2d
from ..models.options import check_window_size, positive_int

CHECKPOINT_KEY = 'cbn_windows'  # rank 0's windows (every reader since the first release reads this key)
PER_RANK_KEY = 'cbn_windows_per_rank'  # dict(world_size=W, ranks=[rank 0's windows, rank 1's, ...])
# how often CBNBurnInHook reads the layers' device counters of checkpoint replays that saw another input (CUDA)
REPLAY_CHECK_INTERVAL = 100
_CBN_TYPES = ('CBN', 'CrossIterationBatchNorm2d', CrossIterationBatchNorm2d)


def resolve_auto_window(images_per_gpu: int) -> int:
    """The paper's suggested window (Sec. 4.3): ``k = min(ceil(16 / images per GPU), 8)``."""
    return min(math.ceil(16 / positive_int('images_per_gpu', images_per_gpu)), 8)


def cbn_layers(model: nn.Module) -> Iterable[Tuple[str, CrossIterationBatchNorm2d]]:
    """(name, layer) for every CBN layer of a model, looking through DDP and other model wrappers."""
    if is_model_wrapper(model):
        model = model.module
    for name, module in model.named_modules():
        if isinstance(module, CrossIterationBatchNorm2d):
            yield name, module


def config_uses_cbn(cfg) -> bool:
    """Whether a (model) config anywhere builds a CBN layer."""
    if isinstance(cfg, dict):
        if cfg.get('type') in _CBN_TYPES:
            return True
        return any(config_uses_cbn(v) for v in cfg.values())
    if isinstance(cfg, (list, tuple)):
        return any(config_uses_cbn(v) for v in cfg)
    return False


def ohem_heads_with_cbn(model_cfg) -> List[str]:
    """The heads of a detector config that use CBN and are mined by an OHEM sampler (``train_cfg.rpn`` for
    ``rpn_head``, ``train_cfg.rcnn`` for ``roi_head``). OHEM runs the head once per image without gradients, in
    training mode, so the head's calls per iteration follow the batch size, which per-call windows cannot."""
    if not isinstance(model_cfg, dict):
        return []
    train_cfg = model_cfg.get('train_cfg') or {}
    found = []
    for stage, head in (('rpn', 'rpn_head'), ('rcnn', 'roi_head')):
        stages = train_cfg.get(stage) if isinstance(train_cfg, dict) else None
        for step in (stages if isinstance(stages, (list, tuple)) else [stages]):  # cascade: one per stage
            sampler = step.get('sampler') if isinstance(step, dict) else None
            kind = str(sampler.get('type', '')) if isinstance(sampler, dict) else ''
            if kind.split('.')[-1] == 'OHEMSampler' and config_uses_cbn(model_cfg.get(head)) and head not in found:
                found.append(head)
    return found


def eval_mode_layers(layers: Iterable[Tuple[str, CrossIterationBatchNorm2d]]) -> List[str]:
    """The names of the CBN layers in eval mode that have a trainable parameter: in a training model, layers that
    mmdet's ``norm_eval=True`` keeps frozen. Layers of frozen stages (``frozen_stages``: eval mode and no trainable
    parameter) are deliberate and not listed; so are layers without parameters (``affine=False``)."""
    return [name for name, layer in layers
            if not layer.training and any(p.requires_grad for p in layer.parameters())]


def compiles(cfg) -> bool:
    """Whether mmengine's Runner compiles ``train_step`` under this config into graphs that hide convolutions from
    CBN layers: ``compile=True``, or a dict of ``torch.compile`` options without ``disable=True`` and with a backend
    other than ``'eager'`` (whose graphs run torch's own ops, so a layer still finds its convolution)."""
    option = cfg.get('compile')
    if isinstance(option, dict):
        return not option.get('disable', False) and option.get('backend', 'inductor') != 'eager'
    return option is True


class CBNBurnInHook(Hook):
    """Burn-in for Cross-Iteration BN (paper Sec. 3.3): k=1 first, then each layer's window.

    During the first ``burnin_iters`` iterations (or ``burnin_epochs`` epochs) every CBN layer is exactly BN. Each
    layer starts collecting history ``k-1`` iterations before the end of burn-in, so its window is full when it
    opens, and no statistics gradient is computed before then. The hook also resolves ``window_size='auto'``
    (``k = min(ceil(16 / images per GPU), 8)``, Sec. 4.3, images per GPU read from ``train_dataloader.batch_size``),
    saves every layer's window in training checkpoints under ``'cbn_windows'`` and restores it on resume, so a
    resumed run continues with full windows (a layer of a head shared across FPN levels: one window per call
    position; checkpoints written before per-call windows restore the first position). The iteration index comes
    from the runner, so the burn-in position resumes with it.

    Each rank keeps its own windows. mmengine writes checkpoints on rank 0 only (``Runner.save_checkpoint`` is
    ``master_only``), so in a distributed run the hook gathers every rank's windows (``all_gather_object``) just
    before each save: after the training iteration, epoch or validation after which the runner's ``CheckpointHook``
    saves, as its ``interval``, ``by_epoch``, ``save_begin``, ``save_last`` and ``save_best`` say, and at no other
    time (windows are large). The checkpoint holds rank 0's windows under ``'cbn_windows'``, as before, and every
    rank's under ``'cbn_windows_per_rank'`` (``dict(world_size=W, ranks=[...])``, indexed by rank). On resume with
    the same world size each rank restores its own windows; with another world size every rank restores rank 0's,
    and the hook logs both sizes. Checkpoints without per-rank windows (written before them, or by a 1-process run)
    restore ``'cbn_windows'`` on every rank. A window written with another window size keeps the configured one
    (see :meth:`CrossIterationBatchNorm2d.set_window_state`), and the hook logs it.

    The hook refuses what would silently replace CBN by BN: mmengine's ``sync_bn`` and ``compile`` options. At the
    first training iteration it warns about CBN layers left in eval mode (a backbone's ``norm_eval=True``).

    Args:
        burnin_epochs (int, optional): Burn-in length in epochs (the paper uses 3 on COCO).
        burnin_iters (int, optional): Burn-in length in iterations. Give exactly one of the two.
        window_size (int | str, optional): If given, overrides every CBN layer's window (an int >= 1 or 'auto').
            Default: None (each layer keeps its own; layers with 'auto' are resolved).

    Example:
        >>> custom_hooks = [dict(type='CBNBurnInHook', burnin_epochs=3)]
    """
    priority = 'ABOVE_NORMAL'

    def __init__(self,
                 burnin_epochs: Optional[int] = None,
                 burnin_iters: Optional[int] = None,
                 window_size: Optional[Union[int, str]] = None):
        if (burnin_epochs is None) == (burnin_iters is None):
            raise ValueError('CBNBurnInHook: give exactly one of burnin_epochs and burnin_iters, got '
                             f'burnin_epochs={burnin_epochs!r}, burnin_iters={burnin_iters!r}')
        for name, value in (('burnin_epochs', burnin_epochs), ('burnin_iters', burnin_iters)):
            if value is not None:
                positive_int(name, value, minimum=0, owner='CBNBurnInHook: ')
        if window_size is not None:
            check_window_size(window_size, owner='CBNBurnInHook: ')
        self.burnin_epochs = burnin_epochs
        self.burnin_iters = burnin_iters
        self.window_size = window_size
        self._burnin: Optional[int] = None
        self._opened_logged = False
        self._modes_checked = False
        self._layers = None  # (name, layer) pairs, found once in before_run
        # every rank's window states, gathered for the checkpoint that is about to be saved (kept on rank 0 only);
        # _gathered says, on every rank alike, that no training iteration has run since the gather
        self._per_rank: Optional[List[Dict[str, dict]]] = None
        self._gathered = False

    # ------------------------------------------------------------------ set-up
    def before_run(self, runner) -> None:
        cfg = getattr(runner, 'cfg', None) or {}
        if cfg.get('sync_bn') is not None and config_uses_cbn(cfg.get('model', {})):
            raise ValueError(f"CBNBurnInHook: the config sets sync_bn={cfg.get('sync_bn')!r} and uses CBN; "
                             "mmengine's sync_bn converts every _BatchNorm, CBN included, into SyncBatchNorm, which "
                             'would silently replace CBN. Remove sync_bn, or use SyncBN explicitly in norm_cfg.')
        self._layers = list(cbn_layers(runner.model))
        layers = dict(self._layers)
        if not layers:
            runner.logger.warning('CBNBurnInHook: the model has no CBN layer; the hook does nothing.')
            return
        mined = ohem_heads_with_cbn(cfg.get('model'))
        if mined:
            raise ValueError(f"CBNBurnInHook: the config's OHEMSampler mines {', '.join(mined)}, which use CBN. OHEM "
                             'runs the head once per image without gradients, in training mode, so its CBN layers '
                             'are called a number of times per iteration that follows the batch size (a smaller '
                             'last batch changes it), which their per-call windows cannot follow. Use BN or GN in '
                             'the mined head, or another sampler.')
        if compiles(cfg):
            raise ValueError(f"CBNBurnInHook: the config sets compile={cfg.get('compile')!r} and the model has "
                             f'{len(layers)} CBN layers; torch.compile (any backend but eager) hides the '
                             'convolutions from CBN layers whose inputs come out of compiled graphs, and those act '
                             'as plain BatchNorm. Remove compile from the config.')
        for name, layer in layers.items():
            layer.module_path = name
            if self.window_size is not None:
                layer.window_size = self.window_size
        if any(layer.window_size == 'auto' for layer in layers.values()):
            k = resolve_auto_window(self._images_per_gpu(runner))
            for layer in layers.values():
                if layer.window_size == 'auto':
                    layer.window_size = k
            runner.logger.info(f'CBNBurnInHook: window_size=auto -> k={k} '
                               f'(min(ceil(16 / {self._images_per_gpu(runner)} images per GPU), 8))')
        sizes = sorted({layer.window_size for layer in layers.values()})
        runner.logger.info(f'CBNBurnInHook: {len(layers)} CBN layers, window sizes {sizes}')

    @staticmethod
    def _images_per_gpu(runner) -> int:
        loader = getattr(runner, '_train_dataloader', None)
        batch_size = getattr(loader, 'batch_size', None)
        if batch_size is None and isinstance(loader, dict):
            batch_size = loader.get('batch_size')
        if batch_size is None:
            batch_size = (runner.cfg.get('train_dataloader') or {}).get('batch_size')
        if batch_size is None:
            raise ValueError("CBNBurnInHook: window_size='auto' needs train_dataloader.batch_size, found none")
        return batch_size

    def before_train(self, runner) -> None:
        if self.burnin_iters is not None:
            self._burnin = self.burnin_iters
        else:
            self._burnin = self.burnin_epochs * len(runner.train_dataloader)
        runner.logger.info(f'CBNBurnInHook: burn-in of {self._burnin} iterations (BN, k=1); windows open at '
                           f'iteration {self._burnin}')

    # ------------------------------------------------------------------ every iteration
    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        self._per_rank, self._gathered = None, False  # the windows change from here on
        it = runner.iter
        burnin = self._burnin or 0
        if self._layers is None:
            self._layers = list(cbn_layers(runner.model))
        if not self._modes_checked:  # the loop has just called model.train(): what stayed in eval is frozen
            self._modes_checked = True
            frozen = eval_mode_layers(self._layers)
            if frozen:
                runner.logger.warning(
                    f"CBNBurnInHook: {len(frozen)} of {len(self._layers)} CBN layers stay in eval mode while the "
                    f"model trains, with trainable parameters ({', '.join(frozen[:3])}"
                    f"{', ...' if len(frozen) > 3 else ''}): they normalize with their running statistics and never "
                    'open a window, as frozen BN. A backbone with norm_eval=True does this; set norm_eval=False '
                    'where CBN should train.')
        for _, layer in self._layers:
            k = layer.window_size
            layer.begin_iteration(it, use_window=it >= burnin, collect=k > 1 and it >= burnin - (k - 1))
        if it >= burnin and not self._opened_logged:
            self._opened_logged = True
            runner.logger.info(f'CBNBurnInHook: CBN windows are open from iteration {it}')

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if (runner.iter + 1) % REPLAY_CHECK_INTERVAL == 0:  # a rare host read, never per iteration
            for _, layer in self._layers or ():
                layer.check_replays()
        saver = self._checkpoint_hook(runner)
        if saver is not None and not saver.by_epoch and (
                self.every_n_train_iters(runner, saver.interval, saver.save_begin)
                or (saver.save_last and self.is_last_train_iter(runner))):
            self._gather_windows(runner)

    def after_train_epoch(self, runner) -> None:
        saver = self._checkpoint_hook(runner)
        if saver is not None and saver.by_epoch and (
                self.every_n_epochs(runner, saver.interval, saver.save_begin)
                or (saver.save_last and self.is_last_train_epoch(runner))):
            self._gather_windows(runner)

    def after_val_epoch(self, runner, metrics=None) -> None:
        saver = self._checkpoint_hook(runner)
        if saver is not None and saver.save_best and metrics:  # CheckpointHook may save the best checkpoint now
            self._gather_windows(runner)

    def after_train(self, runner) -> None:
        self._per_rank, self._gathered = None, False

    # ------------------------------------------------------------------ checkpoints
    @staticmethod
    def _checkpoint_hook(runner) -> Optional[CheckpointHook]:
        return next((h for h in getattr(runner, 'hooks', ()) if isinstance(h, CheckpointHook)), None)

    def _gather_windows(self, runner) -> None:
        """Every rank's window states onto rank 0, for the checkpoint rank 0 is about to write (a collective: all
        ranks call it at the same point, decided from settings that are the same on every rank)."""
        if self._gathered or get_world_size() == 1:
            return
        states = {name: layer.get_window_state() for name, layer in cbn_layers(runner.model)}
        gathered = all_gather_object(states)
        self._gathered = True
        self._per_rank = gathered if get_rank() == 0 else None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        for _, layer in cbn_layers(runner.model):
            layer.check_replays()
        if self._per_rank is not None:
            # one object under both keys: torch.save stores rank 0's windows once
            checkpoint[CHECKPOINT_KEY] = self._per_rank[0]
            checkpoint[PER_RANK_KEY] = dict(world_size=len(self._per_rank), ranks=self._per_rank)
            return
        checkpoint[CHECKPOINT_KEY] = {name: layer.get_window_state() for name, layer in cbn_layers(runner.model)}
        if get_world_size() > 1:
            runner.logger.warning(
                f"CBNBurnInHook: this checkpoint holds only rank 0's CBN windows (of {get_world_size()} ranks): it is "
                "saved where the CheckpointHook's settings announce no save; resuming from it restores them on every "
                'rank')

    def _states_for_this_rank(self, runner, checkpoint: dict) -> Tuple[Dict[str, dict], str]:
        """The window states this rank restores, and where they come from, for the log."""
        world, rank = get_world_size(), get_rank()
        per_rank = checkpoint.get(PER_RANK_KEY)
        if isinstance(per_rank, dict) and per_rank.get('ranks'):
            saved = per_rank.get('world_size', len(per_rank['ranks']))
            if saved == world and len(per_rank['ranks']) == world:
                return per_rank['ranks'][rank] or {}, f'each rank its own, {world} ranks'
            runner.logger.warning(f'CBNBurnInHook: the checkpoint holds the CBN windows of {saved} ranks, this run '
                                  f"has {world}: every rank restores rank 0's windows")
            return per_rank['ranks'][0] or {}, f"rank 0's of {saved} ranks on each of {world}"
        states = checkpoint.get(CHECKPOINT_KEY) or {}
        if world > 1 and states:
            return states, f'one set of windows, without per-rank windows, on each of {world} ranks'
        return states, ''

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        states, source = self._states_for_this_rank(runner, checkpoint)
        layers = dict(cbn_layers(runner.model))
        restored = 0
        notes = []
        for name, state in states.items():
            if name in layers:
                note = layers[name].set_window_state(state)
                if note:
                    notes.append(note)
                restored += any(sub.get('count', 0) > 0 for sub in [state, *(state.get('later_calls') or ())])
        if states:
            runner.logger.info(f'CBNBurnInHook: restored the windows of {restored} CBN layers from the checkpoint'
                               + (f' ({source})' if source else ''))
        if notes:
            runner.logger.warning(f'CBNBurnInHook: {len(notes)} CBN layers were configured with another window '
                                  f'size than the checkpoint holds, e.g. {notes[0]}')
