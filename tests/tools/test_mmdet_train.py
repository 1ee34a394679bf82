"""Training through MMDetection's own code path, as a user of the plugin does it.

MMDetection's own ``tools/train.py`` (the copy mmdet ships inside its package, ``mmdet/.mim/tools/train.py``) runs
in a fresh interpreter on a config that inherits the toy config by path. Nothing of ours runs in that process except
what the config's ``custom_imports`` loads: no tools/train.py of ours, no PYTHONPATH to the repository, no
``import cbn_mmdet`` before the config is read. The run must build the CBN layers, train 3 iterations with the
windows open and save them in the checkpoint.
"""
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
TOY = osp.join(ROOT, 'configs/toy/faster-rcnn_r18-cbn-heads_fpn_toy.py')

# The user's config: mmdet's configs come in through the toy config's `mmdet::` bases, ours by path from a clone.
USER_CONFIG = """\
_base_ = [{toy!r}]
custom_imports = dict(imports=['cbn_mmdet'], allow_failed_imports=False)
data_root = {data!r}
train_dataloader = dict(dataset=dict(data_root=data_root))
val_dataloader = None
val_cfg = None
val_evaluator = None
test_dataloader = None
test_cfg = None
test_evaluator = None
train_cfg = dict(max_iters=3, val_interval=3)
custom_hooks = [dict(type='CBNBurnInHook', burnin_iters=1)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval=3))
"""


def mmdet_train_script():
    import mmdet
    script = osp.join(osp.dirname(mmdet.__file__), '.mim', 'tools', 'train.py')
    if not osp.isfile(script):
        pytest.skip(f'this mmdet install ships no {script}')
    return script


def clean_env():
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', 'PYTHONSTARTUP')}
    env.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONHASHSEED='0')
    return env


def test_mmdet_tools_train_with_custom_imports_only(tmp_path):
    script = mmdet_train_script()
    data = tmp_path / 'toy_coco'
    subprocess.run([sys.executable, osp.join(ROOT, 'tools/generate_toy_coco.py'), '--out-dir', str(data),
                    '--num-train', '6', '--num-val', '2'], check=True, capture_output=True, cwd=tmp_path)
    config = tmp_path / 'my_faster-rcnn_cbn.py'
    config.write_text(USER_CONFIG.format(toy=TOY, data=f'{data}/'))
    work = tmp_path / 'work'

    # cwd outside the repository, and the interpreter finds cbn_mmdet only as an installed package
    proc = subprocess.run([sys.executable, script, str(config), '--work-dir', str(work)], cwd=tmp_path,
                          env=clean_env(), capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]

    # the neck's 4 lateral and 4 output convs and the 4 convs of the box head are CBN; windows open after 1 iteration
    assert 'CBNBurnInHook: 12 CBN layers, window sizes [4]' in log, log[-6000:]
    assert 'CBNBurnInHook: CBN windows are open from iteration' in log
    assert 'Iter(train) [3/3]' in log
    ckpt = torch.load(work / 'iter_3.pth', map_location='cpu', weights_only=False)
    windows = ckpt['cbn_windows']
    assert len(windows) == 12
    assert sum(name.startswith('neck.') for name in windows) == 8
    assert sum(name.startswith('roi_head.bbox_head.') for name in windows) == 4
    assert all(state['count'] >= 1 for state in windows.values())
