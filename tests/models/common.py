"""What the layer tests share: the devices they run on and a plain SGD step."""
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
