"""mmengine checkpoints load through torch's weights_only unpickler once cbn_mmdet is imported."""
import pickle

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader, _load_checkpoint

import cbn_mmdet  # noqa: F401
from cbn_mmdet.utils.checkpoint import load_from_local


def mmengine_like_checkpoint(path):
    buffer = HistoryBuffer()
    buffer.update(1.5)
    torch.save(dict(meta=dict(epoch=1, seed=np.int64(3), arr=np.arange(3.0)), state_dict=dict(w=torch.ones(2)),
                    message_hub=dict(log_scalars={'loss': buffer})), path)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        load_from_local(str(tmp_path / 'nope.pth'))


def test_plain_torch_load_fails_on_this_torch(tmp_path):
    """The problem exists: without the allow-list, torch's default refuses the file."""
    path = tmp_path / 'c.pth'
    mmengine_like_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)


def test_mmengine_loader_reads_it(tmp_path):
    path = tmp_path / 'c.pth'
    mmengine_like_checkpoint(path)
    assert CheckpointLoader._get_checkpoint_loader(str(path)) is load_from_local
    ckpt = _load_checkpoint(str(path), map_location='cpu')
    assert ckpt['message_hub']['log_scalars']['loss'].current() == 1.5
    assert torch.equal(ckpt['state_dict']['w'], torch.ones(2))


def test_arbitrary_code_still_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ('pwned', ))

    path = tmp_path / 'evil.pth'
    torch.save(dict(x=Evil()), path)
    with pytest.raises(pickle.UnpicklingError):
        load_from_local(str(path))
