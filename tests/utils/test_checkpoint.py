"""mmengine checkpoints load through torch's weights_only unpickler once cbn_mmdet is imported, on every torch.

What torch offers to allow-list globals depends on its version: ``add_safe_globals``, ``get_safe_globals`` and
``clear_safe_globals`` from torch 2.4, the ``safe_globals`` context from 2.5, and nothing in torch 2.1-2.3. The
``kind`` fixture runs each test as every one of these torches that the running torch can show, by removing from
``torch.serialization`` what a newer torch adds.
"""
import pickle
import re
import types
import warnings

import numpy as np
import pytest
import torch
from mmengine.logging import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader, _load_checkpoint
from packaging.version import Version

import cbn_mmdet  # noqa: F401
from cbn_mmdet.utils.checkpoint import allow_listed, has_allow_list, load_from_local, mmengine_safe_globals

# kind -> what torch.serialization must offer for it, and what is removed to show it on a newer torch
ALLOW_LIST = ('add_safe_globals', 'get_safe_globals', 'clear_safe_globals')
NEEDS = {'torch>=2.5': ('safe_globals', *ALLOW_LIST), 'torch2.4': ALLOW_LIST, 'torch<2.4': ()}
WITH_ALLOW_LIST = ['torch>=2.5', 'torch2.4']
REMOVED = {'torch>=2.5': (), 'torch2.4': ('safe_globals', ), 'torch<2.4': ('safe_globals', *ALLOW_LIST)}
RAN = []


def ran():
    RAN.append(1)
    return 'ran'


class RunsCode:

    def __reduce__(self):
        return (ran, ())


class UserType:
    """A type a user allow-listed on their own; the loader must leave it allow-listed."""


@pytest.fixture(params=list(NEEDS))
def kind(request, monkeypatch):
    missing = [name for name in NEEDS[request.param] if not hasattr(torch.serialization, name)]
    if missing:
        pytest.skip(f'torch {torch.__version__} has no torch.serialization.{missing[0]}')
    for name in REMOVED[request.param]:
        monkeypatch.delattr(torch.serialization, name, raising=False)
    unpickler = torch._weights_only_unpickler
    if request.param == 'torch2.4' and '_codecs.encode' in unpickler._get_allowed_globals():
        # torch 2.4 does not allow _codecs.encode by default, which numpy's arrays need in pickle protocol 2
        defaults = unpickler._get_allowed_globals
        monkeypatch.setattr(unpickler, '_get_allowed_globals',
                            lambda: {k: v for k, v in defaults().items() if k != '_codecs.encode'})
    assert has_allow_list() == (request.param != 'torch<2.4')
    RAN.clear()
    return request.param


def mmengine_like_checkpoint(path):
    buffer = HistoryBuffer()
    buffer.update(1.5)
    torch.save(dict(meta=dict(epoch=1, seed=np.int64(3), arr=np.arange(3.0)), state_dict=dict(w=torch.ones(2)),
                    message_hub=dict(log_scalars={'loss': buffer})), path)


def load_as_the_loader_should(path, kind):
    """mmengine's ``_load_checkpoint``: it warns that it falls back where torch has no allow-list, and only there."""
    fallback = f'torch {re.escape(torch.__version__)} has no allow-list.*weights_only=False'
    if kind == 'torch<2.4':
        with pytest.warns(UserWarning, match=fallback):
            return _load_checkpoint(str(path), map_location='cpu')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        ckpt = _load_checkpoint(str(path), map_location='cpu')
    assert not [w for w in caught if re.search(fallback, str(w.message))]
    return ckpt


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        load_from_local(str(tmp_path / 'nope.pth'))


def test_the_safe_unpickler_alone_refuses_it(tmp_path):
    """The problem exists on every torch: without the allow-list, weights_only=True refuses the file."""
    path = tmp_path / 'c.pth'
    mmengine_like_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


@pytest.mark.skipif(Version(torch.__version__) < Version('2.6'), reason='torch < 2.6 defaults to weights_only=False')
def test_plain_torch_load_fails_on_this_torch(tmp_path):
    """torch >= 2.6 defaults to weights_only=True, so plain ``torch.load`` refuses the file too."""
    path = tmp_path / 'c.pth'
    mmengine_like_checkpoint(path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)


def test_mmengine_loader_reads_it(tmp_path, kind):
    path = tmp_path / 'c.pth'
    mmengine_like_checkpoint(path)
    assert CheckpointLoader._get_checkpoint_loader(str(path)) is load_from_local
    ckpt = load_as_the_loader_should(path, kind)
    assert ckpt['message_hub']['log_scalars']['loss'].current() == 1.5
    assert torch.equal(ckpt['state_dict']['w'], torch.ones(2))
    assert type(ckpt['meta']['seed']) is np.int64 and ckpt['meta']['seed'] == 3
    assert np.array_equal(ckpt['meta']['arr'], np.arange(3.0)) and ckpt['meta']['arr'].dtype == np.float64


@pytest.mark.parametrize('kind', WITH_ALLOW_LIST, indirect=True)
@pytest.mark.parametrize('content', ['checkpoint', 'code'])
def test_the_allow_list_ends_with_the_load(tmp_path, kind, content):
    """After a load, one that succeeds or one that is refused, torch's allow-list is the user's own again."""
    path = tmp_path / 'c.pth'
    mmengine_like_checkpoint(path) if content == 'checkpoint' else torch.save(dict(x=RunsCode()), path)
    serialization = torch.serialization
    saved = list(serialization.get_safe_globals())
    serialization.add_safe_globals([UserType])
    try:
        users = set(serialization.get_safe_globals())
        assert UserType in users
        if content == 'code':
            with pytest.raises(pickle.UnpicklingError):
                load_from_local(str(path))
        else:
            assert load_from_local(str(path))['meta']['epoch'] == 1
        assert set(serialization.get_safe_globals()) == users
        with pytest.raises(pickle.UnpicklingError, match='Unsupported global'):
            torch.load(path, weights_only=True)  # none of the loader's globals is left allow-listed
    finally:
        serialization.clear_safe_globals()
        serialization.add_safe_globals(saved)


@pytest.mark.parametrize('kind', WITH_ALLOW_LIST, indirect=True)
def test_a_global_the_user_allow_listed_too_stays_allow_listed(tmp_path, kind):
    """torch's own ``safe_globals`` context would drop np.ndarray here: on exit it removes what it added."""
    path = tmp_path / 'c.pth'
    mmengine_like_checkpoint(path)
    torch.save(dict(arr=np.zeros(2)), tmp_path / 'arr.pth')
    serialization = torch.serialization
    saved = list(serialization.get_safe_globals())
    # what the user needs for a bare numpy array, np.ndarray among them
    serialization.add_safe_globals([g for g in mmengine_safe_globals() if g not in (getattr, HistoryBuffer)])
    try:
        load_from_local(str(path))
        assert np.ndarray in serialization.get_safe_globals()
        assert np.array_equal(torch.load(tmp_path / 'arr.pth', weights_only=True)['arr'], np.zeros(2))
    finally:
        serialization.clear_safe_globals()
        serialization.add_safe_globals(saved)


def test_arbitrary_code_still_refused(tmp_path, kind):
    """Refused wherever torch has an allow-list. Without one, the loader does what it documents and warns."""
    path = tmp_path / 'evil.pth'
    torch.save(dict(x=RunsCode()), path)
    if kind == 'torch<2.4':
        with pytest.warns(UserWarning, match='a checkpoint can run code'):
            assert load_from_local(str(path)) == dict(x='ran')
        assert RAN == [1]
        return
    with pytest.raises(pickle.UnpicklingError):
        load_from_local(str(path))
    assert RAN == []


def test_allow_listed_refuses_a_torch_without_an_allow_list(monkeypatch):
    for name in REMOVED['torch<2.4']:
        monkeypatch.delattr(torch.serialization, name, raising=False)
    message = (f'torch {re.escape(torch.__version__)} has no weights_only allow-list: torch.serialization lacks '
               'add_safe_globals, get_safe_globals, clear_safe_globals')
    with pytest.raises(RuntimeError, match=message):
        with allow_listed(mmengine_safe_globals()):
            pass


def test_the_allow_list_holds_what_numpy_pickles_with_numpy_1s_core_stub(monkeypatch):
    """numpy 1.26 has a ``numpy._core`` without ``multiarray`` once something imports it; its rebuild functions live
    in ``numpy.core.multiarray``. The allow-list must hold the functions numpy's pickles name, on either numpy."""
    monkeypatch.setattr(np, '_core', types.ModuleType('numpy._core'), raising=False)
    allowed = mmengine_safe_globals()
    assert np.zeros(0).__reduce__()[0] in allowed and np.int64(0).__reduce__()[0] in allowed
