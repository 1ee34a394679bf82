"""mmengine 0.10.7 checkpoints with torch's safe unpickler, on every torch the stack check accepts.

torch 2.6 made ``torch.load(weights_only=True)`` the default. mmengine's training checkpoints pickle its
``HistoryBuffer`` (with bound methods) and numpy arrays in the message hub, so ``--resume`` and
``tools/test.py CONFIG CKPT`` fail with an ``UnpicklingError``. Rather than switching the safe unpickler off, the
loader registered here keeps ``weights_only=True`` and allow-lists exactly the types mmengine writes, for the one
load (:func:`allow_listed`).

- torch >= 2.4 (``torch.serialization.add_safe_globals``, ``get_safe_globals``, ``clear_safe_globals``): the
  allow-list is added for the load, and the user's own list is put back as it was afterwards. torch 2.5's
  ``safe_globals`` context is not used: on exit it removes its globals even where the user had allow-listed them.
- torch 2.1-2.3 have no allow-list, and their ``weights_only=True`` unpickler cannot build a ``HistoryBuffer`` at
  all. There the loader uses ``weights_only=False``, which is those torches' default and what mmengine's own loader
  does, and warns that a checkpoint can then run code: load only files you trust, or use torch >= 2.4.
"""
import codecs
import os.path as osp
import warnings
from contextlib import contextmanager
from typing import List

import numpy as np
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader

ALLOW_LIST_API = ('add_safe_globals', 'get_safe_globals', 'clear_safe_globals')
UNSAFE_FALLBACK = ('torch {version} has no allow-list for its weights_only unpickler '
                   '(torch.serialization.add_safe_globals, torch >= 2.4), and that unpickler cannot load mmengine\'s '
                   'HistoryBuffer. cbn_mmdet therefore loads checkpoints with weights_only=False, the default of '
                   'torch {version} and what mmengine does: a checkpoint can run code when it is loaded. Load only '
                   'files you trust, or use torch >= 2.4, where the safe unpickler is kept.')


def mmengine_safe_globals() -> List:
    """The globals an mmengine training checkpoint needs besides tensors and plain containers.

    numpy's array and scalar rebuild functions are taken from what numpy pickles (``__reduce__``), not from a module
    path: they live in ``numpy.core.multiarray`` in numpy 1.x, whose ``numpy._core`` is a stub once something
    imports it, and in ``numpy._core.multiarray`` in numpy 2. ``codecs.encode`` (``_codecs.encode``) turns the str
    that pickle protocol 2 writes for numpy's bytes back into bytes; torch allows it by default from 2.5, not in 2.4.
    """
    reconstruct = np.zeros(0).__reduce__()[0]
    scalar = np.int64(0).__reduce__()[0]
    dtype_classes = {type(np.dtype(code)) for code in '?bBhHiIlLqQefdgFDG'}
    return [getattr, codecs.encode, HistoryBuffer, np.ndarray, np.dtype, reconstruct, scalar,
            *sorted(dtype_classes, key=str)]


def has_allow_list() -> bool:
    """Whether the running torch can allow-list globals for its weights_only unpickler (torch >= 2.4)."""
    return all(hasattr(torch.serialization, name) for name in ALLOW_LIST_API)


@contextmanager
def allow_listed(safe_globals: List):
    """Allow-list ``safe_globals`` for the ``torch.load`` calls inside, and put the user's list back afterwards.

    Raises RuntimeError on a torch without an allow-list (:func:`has_allow_list` is False).
    """
    serialization = torch.serialization
    missing = [name for name in ALLOW_LIST_API if not hasattr(serialization, name)]
    if missing:
        raise RuntimeError(f'torch {torch.__version__} has no weights_only allow-list: torch.serialization lacks '
                           f'{", ".join(missing)} (torch >= 2.4 has them)')
    before = list(serialization.get_safe_globals())
    serialization.add_safe_globals(safe_globals)
    try:
        yield
    finally:
        serialization.clear_safe_globals()
        serialization.add_safe_globals(before)


def load_from_local(filename: str, map_location=None):
    """mmengine's local-file loader, with the safe unpickler and the allow-list above where torch has one."""
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    if not has_allow_list():
        warnings.warn(UNSAFE_FALLBACK.format(version=torch.__version__), stacklevel=2)
        return torch.load(filename, map_location=map_location, weights_only=False)
    with allow_listed(mmengine_safe_globals()):
        return torch.load(filename, map_location=map_location, weights_only=True)


def install_checkpoint_loader() -> None:
    """Register :func:`load_from_local` as mmengine's loader for local paths."""
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local, force=True)
