"""mmengine 0.10.7 checkpoints on torch >= 2.6.

torch 2.6 made ``torch.load(weights_only=True)`` the default. mmengine's training checkpoints pickle its
``HistoryBuffer`` (with bound methods) and numpy arrays in the message hub, so ``--resume`` and
``tools/test.py CONFIG CKPT`` fail with an ``UnpicklingError``. Rather than switching the safe unpickler off, the
loader registered here keeps ``weights_only=True`` and allow-lists exactly the types mmengine writes.
"""
import os.path as osp
from typing import List

import numpy as np
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader


def mmengine_safe_globals() -> List:
    """The globals an mmengine training checkpoint needs besides tensors and plain containers."""
    core = getattr(np, '_core', None) or np.core
    dtype_classes = {type(np.dtype(code)) for code in '?bBhHiIlLqQefdgFDG'}
    return [getattr, HistoryBuffer, np.ndarray, np.dtype, core.multiarray._reconstruct, core.multiarray.scalar,
            *sorted(dtype_classes, key=str)]


def load_from_local(filename: str, map_location=None):
    """mmengine's local-file loader, with the safe unpickler and the allow-list above."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    with torch.serialization.safe_globals(mmengine_safe_globals()):
        return torch.load(filename, map_location=map_location, weights_only=True)


def install_checkpoint_loader() -> None:
    """Register :func:`load_from_local` as mmengine's loader for local paths."""
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)
