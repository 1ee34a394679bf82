"""CBN inside a ``torch.compile``'d model: a training call runs eagerly (a graph break); where its input comes out
of a compiled graph (inductor, aot_eager) it warns that the graph hides its convolution and acts as BatchNorm, and
under the ``eager`` backend it finds its convolution and is CBN; eval-mode calls are traced as BatchNorm's."""
import copy
import warnings

import pytest
import torch
from torch import nn

from cbn_mmdet.models import CrossIterationBatchNorm2d

# fp64 throughout. The layers run eagerly in training, outside the compiled graphs, which hold the convolutions,
# the ReLU and their backward: inductor calls the same aten convolution on the CPU and fuses the elementwise ops,
# so a value differs from eager, if at all, by a reordered sum of <= C_in * 9 = 72 products, ~72 u = 8e-15
# relative (u = 2^-53). Four SGD steps at lr 0.1 on this loss, whose Hessian's norm is O(1), grow that by well
# under 100x: 1e-10 leaves a margin of ~1e2 over it on any CPU.
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


def cbn_net():
    torch.manual_seed(0)
    return Net(lambda c: CrossIterationBatchNorm2d(c, window_size=3)).double()


def _train(model, forward, steps=4):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
        forward(x).sub(0.5).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _same(model, ref):
    for (name, p), q in zip(model.state_dict().items(), ref.state_dict().values()):
        assert torch.allclose(p, q, rtol=TOL, atol=TOL), name  # parameters and running statistics


def test_compiled_training_runs_eagerly_warns_and_acts_as_bn():
    # Traced, the layer's window state (Python attributes that change every iteration) would be baked into the
    # graph: inductor then failed at the second iteration (a bank's size asserted against the first one's).
    torch.compiler.reset()
    cbn = cbn_net()
    bn = Net(nn.BatchNorm2d).double()
    bn.load_state_dict(cbn.state_dict())
    compiled = torch.compile(cbn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        _train(cbn, compiled)
    said = [str(w.message) for w in caught if 'CrossIterationBatchNorm2d' in str(w.message)]
    assert len(said) == 2 and all('torch.compile' in s and 'plain BatchNorm' in s for s in said), said
    _train(bn, bn)
    _same(cbn, bn)  # BN's
    assert all(layer.window_at(0) is None for layer in (cbn.norm1, cbn.norm2))  # nothing stored


def test_eager_backend_keeps_cbn():
    # the eager backend's graphs run torch's own ops: each layer still finds its convolution, so this is CBN
    torch.compiler.reset()
    cbn, ref = cbn_net(), cbn_net()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        _train(cbn, torch.compile(cbn, backend='eager'))
    assert not [w for w in caught if 'CrossIterationBatchNorm2d' in str(w.message)]  # no layer fell back
    _train(ref, ref)
    _same(cbn, ref)
    assert cbn.norm1.window_lengths == ref.norm1.window_lengths == [2]


@pytest.mark.parametrize('shape', [(2, 3, 8, 8), (0, 3, 8, 8)])  # an empty batch too (a head with no RoIs)
def test_compiled_eval_is_traced_as_batchnorm(shape):
    torch.compiler.reset()
    cbn = cbn_net()
    _train(cbn, cbn)  # eager training: running statistics that differ from their initial values
    bn = Net(nn.BatchNorm2d).double()
    bn.load_state_dict(cbn.state_dict())
    cbn.eval(), bn.eval()
    x = torch.randn(*shape, dtype=torch.float64)
    out = torch.compile(cbn, fullgraph=True)(x)  # fullgraph: an eval call needs no graph break
    assert out.shape == shape[:1] + (8, 8, 8) and torch.allclose(out, bn(x), rtol=TOL, atol=TOL)


def test_compiled_training_under_fullgraph_is_refused():
    torch.compiler.reset()
    with pytest.raises(Exception, match='_eager_forward'):  # dynamo names the function it may not skip
        torch.compile(copy.deepcopy(cbn_net()), fullgraph=True)(torch.randn(2, 3, 8, 8, dtype=torch.float64))
