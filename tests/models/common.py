"""What the layer tests share: the devices they run on, the conv geometries, fp32 without TF32, a plain SGD step,
and a comparison of window states."""
import contextlib

import pytest
import torch

# Every layer test that can run on CUDA takes a ``device``; without a CUDA device those cases skip, with the reason.
DEVICES = ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                               reason='needs a CUDA device'))]


def sgd_step(params, lr=0.05):
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.sub_(lr * p.grad)
                p.grad = None


CONV_VARIANTS = {
    '3x3': dict(kernel_size=3, padding=1),
    '1x1': dict(kernel_size=1),
    'stride2': dict(kernel_size=3, padding=1, stride=2),
    'dilation2': dict(kernel_size=3, padding=2, dilation=2),
    'groups2': dict(kernel_size=3, padding=1, groups=2),
    # every geometric argument different along the two axes (the maps are non-square too)
    'nonsquare': dict(kernel_size=(3, 2), stride=(2, 1), padding=(1, 2), dilation=(1, 2)),
}
# what only a whole layer meets: padding done before the convolution op (reflect, circular, and the asymmetric
# 'same' of an even kernel: the op gets the padded input and no padding), and 4 groups (one input channel per
# group for the reference grid's first conv, 4 -> 8, two for its second, 8 -> 8)
MODULE_CONV_VARIANTS = {
    'reflect_s2': dict(kernel_size=3, padding=1, padding_mode='reflect', stride=2),
    'circular': dict(kernel_size=3, padding=1, padding_mode='circular'),
    'same_even': dict(kernel_size=2, padding='same'),
    'groups4': dict(kernel_size=3, padding=1, groups=4),
}


@contextlib.contextmanager
def no_tf32():
    """fp32 convolutions and matrix products in fp32 on CUDA (TF32 rounds their inputs to 10 bits, which the fp32
    tolerances do not allow for); nothing changes on the CPU."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def same_windows(a, b):
    """Whether two {layer name: window state} dicts hold the same windows, bit for bit."""
    def same(x, y):
        if isinstance(x, dict):
            return isinstance(y, dict) and set(x) == set(y) and all(same(x[k], y[k]) for k in x)
        if isinstance(x, (list, tuple)):
            return isinstance(y, (list, tuple)) and len(x) == len(y) and all(map(same, x, y))
        if isinstance(x, torch.Tensor):
            return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
        return x == y

    return bool(a) and same(a, b)
