import pytest
import torch

from lift3d.layers.low_rank import LowRankVolumetricConv, rank_for


@pytest.mark.parametrize("padding_mode", ["zeros", "replicate"])
@pytest.mark.parametrize("kernel_size", [1, 3, 5])
@pytest.mark.parametrize("n", [1, 2, 7])
def test_fast_path_equals_einops_reference(padding_mode, kernel_size, n):
    layer = LowRankVolumetricConv(16, kernel_size, padding_mode=padding_mode)
    layer.init_random_(generator=torch.Generator().manual_seed(n))
    x = torch.randn(2 * n, 16, 5, 6)
    torch.testing.assert_close(layer(x, n), layer.forward_reference(x, n), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("train_down", [True, False])
def test_identity_at_init_is_exact_and_the_bottleneck_is_live(train_down):
    layer = LowRankVolumetricConv(16, train_down=train_down)
    x = torch.randn(3 * 5, 16, 3, 3)
    assert torch.equal(layer(x, 5), x)
    assert torch.count_nonzero(layer.up_weight) == 0 and torch.count_nonzero(layer.bias) == 0
    assert torch.count_nonzero(layer.down_weight) > 0 and torch.count_nonzero(layer.weight) > 0  # up has a gradient
    layer(x, 5).square().sum().backward()
    assert layer.up_weight.grad.abs().sum() > 0
    assert isinstance(layer.down_weight, torch.nn.Parameter) == train_down
    assert "down_weight" in layer.state_dict()


def test_reset_parameters_restores_identity():
    layer = LowRankVolumetricConv(8)
    layer.init_random_()
    x = torch.randn(6, 8, 2, 2)
    assert not torch.equal(layer(x, 3), x)
    layer.reset_parameters()
    assert torch.equal(layer(x, 3), x)


def test_rank():
    assert rank_for(128) == 16 and rank_for(16) == 2 and rank_for(4) == 1
    assert rank_for(64, rank=100) == 64 and rank_for(64, rank_ratio=0.5) == 32
    assert LowRankVolumetricConv(32, rank=3).rank == 3
    with pytest.raises(ValueError, match="rank must be a positive integer, got 0"):
        rank_for(8, rank=0)
    with pytest.raises(ValueError, match=r"rank_ratio must be in \(0, 1\], got 2"):
        rank_for(8, rank_ratio=2)


def test_bad_input_names_the_value():
    with pytest.raises(ValueError, match="whole number of volumes"):
        LowRankVolumetricConv(4)(torch.randn(5, 4, 2, 2), 2)
    with pytest.raises(ValueError, match="expects 4 channels, got 3"):
        LowRankVolumetricConv(4)(torch.randn(2, 3, 2, 2), 2)
    with pytest.raises(ValueError, match="reflect.*available: zeros, replicate"):
        LowRankVolumetricConv(4, padding_mode="reflect")
