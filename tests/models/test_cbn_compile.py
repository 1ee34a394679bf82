"""CBN inside a ``torch.compile``'d model: a training call runs eagerly (a graph break), warns that the compiled
graph hides its convolution, and acts as BatchNorm; eval-mode calls are traced as BatchNorm's."""
import copy
import warnings

import pytest
import torch
from torch import nn

from cbn_mmdet.models import CrossIterationBatchNorm2d

# fp64 throughout. The compiled and the eager BatchNorm compute the same sums in other orders (inductor fuses and
# reassociates the reductions): each result differs by at most ~m u relative, m <= 2*8*8 = 128 summands and
# u = 2^-53, so ~1.4e-14. Four SGD steps at lr 0.1 on this loss grow such a difference by well under 100x (the
# Hessian's norm here is O(1)): 1e-10 leaves a margin of ~1e2 over that on any CPU.
TOL = 1e-10


class Net(nn.Module):

    def __init__(self, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.norm1 = norm(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.norm2 = norm(8)

    def forward(self, x):
        return self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x)))))


def _pair():
    torch.manual_seed(0)
    cbn = Net(lambda c: CrossIterationBatchNorm2d(c, window_size=3)).double()
    bn = Net(nn.BatchNorm2d).double()
    bn.load_state_dict(cbn.state_dict())
    return cbn, bn


def _train(model, forward, steps=4):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
        forward(x).sub(0.5).square().mean().backward()
        opt.step()
        opt.zero_grad()


def test_compiled_training_runs_eagerly_warns_and_acts_as_bn():
    # Traced, the layer's window state (Python attributes that change every iteration) would be baked into the
    # graph: inductor then failed at the second iteration (a bank's size asserted against the first one's).
    torch._dynamo.reset()
    cbn, bn = _pair()
    compiled = torch.compile(cbn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        _train(cbn, compiled)
    said = [str(w.message) for w in caught if 'CrossIterationBatchNorm2d' in str(w.message)]
    assert len(said) == 2 and all('torch.compile' in s and 'plain BatchNorm' in s for s in said), said
    _train(bn, bn)
    for (name, p), q in zip(cbn.state_dict().items(), bn.state_dict().values()):
        assert torch.allclose(p, q, rtol=TOL, atol=TOL), name  # parameters and running statistics: BN's
    assert all(layer.window_at(0) is None for layer in (cbn.norm1, cbn.norm2))  # nothing stored


def test_compiled_eval_is_traced_as_batchnorm():
    torch._dynamo.reset()
    cbn, bn = _pair()
    _train(cbn, cbn)  # eager training: running statistics that differ from their initial values
    bn.load_state_dict(cbn.state_dict())
    cbn.eval(), bn.eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    counts = torch._dynamo.utils.counters
    counts.clear()
    out = torch.compile(cbn, fullgraph=True)(x)  # fullgraph: an eval call needs no graph break
    assert torch.allclose(out, bn(x), rtol=TOL, atol=TOL)
    assert counts['stats']['unique_graphs'] == 1


def test_compiled_training_under_fullgraph_is_refused():
    torch._dynamo.reset()
    cbn, _ = _pair()
    with pytest.raises(Exception, match='(?i)disable|skip'):
        torch.compile(copy.deepcopy(cbn), fullgraph=True)(torch.randn(2, 3, 8, 8, dtype=torch.float64))
