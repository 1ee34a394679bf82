"""Per-process distributed training on a CPU-only machine with mmengine 0.10.7.

Stock mmengine calls ``torch.cuda.set_device`` in its launcher and passes ``device_ids`` to DDP, and both fail
without a GPU. ``setup_cpu_distributed`` initializes the process group with gloo before the Runner does (the Runner
then skips its own init), and ``CPUCompatibleDDP`` drops ``device_ids`` for modules on the CPU. On GPUs neither
is used: the standard nccl path runs. ``process_group_scope`` destroys, when a tool ends, the group that the tool's
run created.
"""
import contextlib
import os

import torch
import torch.distributed as dist
from mmengine.model import MMDistributedDataParallel
from mmengine.registry import MODEL_WRAPPERS


@MODEL_WRAPPERS.register_module(force=True)
class CPUCompatibleDDP(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` that accepts ``device_ids`` for a CPU module and drops them."""

    def __init__(self, module, device_ids=None, **kwargs):
        param = next(module.parameters(), None)
        if param is not None and param.device.type == 'cpu':
            device_ids = None
        super().__init__(module=module, device_ids=device_ids, **kwargs)


def setup_cpu_distributed(cfg, launcher: str) -> bool:
    """Prepare ``cfg`` for a distributed CPU run; returns True if it did (no CUDA and a launcher is set)."""
    if launcher == 'none' or torch.cuda.is_available():
        return False
    if not dist.is_initialized():
        dist.init_process_group(backend='gloo', rank=int(os.environ['RANK']),
                                world_size=int(os.environ['WORLD_SIZE']))
    cfg.setdefault('env_cfg', {}).setdefault('dist_cfg', {})['backend'] = 'gloo'
    wrapper = dict(cfg.get('model_wrapper_cfg') or {})
    wrapper['type'] = 'CPUCompatibleDDP'
    wrapper.setdefault('broadcast_buffers', False)
    wrapper.setdefault('find_unused_parameters', cfg.get('find_unused_parameters', False))
    cfg.model_wrapper_cfg = wrapper
    return True


@contextlib.contextmanager
def process_group_scope():
    """Destroy the default process group on leaving the block (normally or by an error) if the block created it.

    The tools create it (gloo in ``setup_cpu_distributed``, or nccl in the Runner) and nothing else destroys it. Left
    to interpreter shutdown, it was seen to abort a finished 2-process gloo run (``terminate called without an active
    exception``, exit code 1). A group that existed before the block belongs to the caller and is left alone.
    """
    created_here = not dist.is_initialized()
    try:
        yield
    finally:
        if created_here and dist.is_initialized():
            dist.destroy_process_group()
