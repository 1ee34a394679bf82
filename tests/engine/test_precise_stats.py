"""cbn_mmdet.engine.precise_stats: recomputed statistics equal the exact statistics of each layer's input, layer by
layer (the later layer sees the earlier one's new statistics), on the chosen path only."""
import pytest
import torch
from torch import nn

from cbn_mmdet.engine.precise_stats import norm_layers, recompute_statistics
from cbn_mmdet.models.cbn import CrossIterationBatchNorm2d


class TwoPaths(nn.Module):
    """conv -> BN -> ReLU -> conv -> CBN, with mmengine's model interface: ``data_preprocessor(batch, training)`` and
    ``forward(inputs, data_samples, mode)``. The 'loss' path adds 1 to the input, so the two paths' inputs differ."""

    def __init__(self):
        super().__init__()
        self.head = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Conv2d(4, 5, 3, padding=1), CrossIterationBatchNorm2d(5))
        self.other = nn.BatchNorm2d(3)
        self.calls = []

    def data_preprocessor(self, batch, training):
        return dict(inputs=batch['inputs'].double() + (1.0 if training else 0.0), data_samples=batch['data_samples'])

    def forward(self, inputs, data_samples, mode):
        self.calls.append((mode, self.training))
        return self.head(inputs)


def batches(seed, n_batches=5, size=3):
    g = torch.Generator().manual_seed(seed)
    return [dict(inputs=torch.randn(size, 3, 6, 5, generator=g) * 2 + 0.5, data_samples=[None] * size)
            for _ in range(n_batches)]


def exact(x):
    """Mean and unbiased variance per channel, over every other dimension, in fp64."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(1), flat.var(1, correction=1)


@pytest.mark.parametrize('mode', ['predict', 'loss'])
def test_layer_by_layer_exact(mode):
    torch.manual_seed(0)
    model = TwoPaths().double()
    model.head[1].running_mean.fill_(3.0)  # stale statistics, far from the data's
    model.head[4].running_var.fill_(9.0)
    data = batches(1)
    layers = norm_layers(model, ['head'])
    assert [name for name, _ in layers] == ['head.1', 'head.4']  # 'other' is not under 'head'
    other = model.other.running_mean.clone()
    report = recompute_statistics(model, data, layers, mode=mode, num_images=12)  # 4 batches of 3
    assert not model.training and all(m == mode and not t for m, t in model.calls)
    assert len(model.calls) == 2 * 4  # one pass per layer, stopped after 12 images
    x = torch.cat([model.data_preprocessor(b, mode == 'loss')['inputs'] for b in data[:4]])
    y1 = model.head[0](x)
    mean1, var1 = exact(y1)
    # fp64 sums of 4*3*30 = 360 values per channel: the two-pass formula above and the one-pass sums differ by
    # O(n u max|x|^2 / var) ~ 1e-12 relative, far below 1e-9
    torch.testing.assert_close(model.head[1].running_mean, mean1, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(model.head[1].running_var, var1, rtol=1e-9, atol=1e-9)
    y2 = model.head[3](model.head[2](model.head[1](y1)))  # with head.1's NEW statistics (eval mode)
    mean2, var2 = exact(y2)
    torch.testing.assert_close(model.head[4].running_mean, mean2, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(model.head[4].running_var, var2, rtol=1e-9, atol=1e-9)
    assert torch.equal(model.other.running_mean, other)
    assert report['head.1']['images'] == 12 and report['head.1']['values_per_channel'] == 12 * 30
    assert report['head.1']['mean_shift_in_sd'] > 0.5  # the stale 3.0 was far off


def test_bad_arguments_and_a_layer_off_the_path():
    model = TwoPaths().double()
    with pytest.raises(ValueError, match="mode must be one of .*got 'train'"):
        recompute_statistics(model, batches(0), norm_layers(model, ['head']), mode='train')
    with pytest.raises(ValueError, match='num_images must be >= 1, got 0'):
        recompute_statistics(model, batches(0), norm_layers(model, ['head']), num_images=0)
    with pytest.raises(ValueError, match="layer 'other' saw no input on the 'predict' path"):
        recompute_statistics(model, batches(0), norm_layers(model, ['other']))
    assert [n for n, _ in norm_layers(model, [''])] == ['head.1', 'head.4', 'other']
