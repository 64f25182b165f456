import pytest
import torch

from lift3d.layers.volumetric import VolumetricConv


@pytest.mark.parametrize("padding_mode", ["zeros", "replicate"])
@pytest.mark.parametrize("kernel_size", [1, 3, 5])
@pytest.mark.parametrize("n", [1, 2, 7])
@pytest.mark.parametrize("groups", [1, 8])
def test_fast_path_equals_einops_reference(padding_mode, kernel_size, n, groups):
    layer = VolumetricConv(8, kernel_size, groups=groups, padding_mode=padding_mode)
    layer.init_random_(generator=torch.Generator().manual_seed(n))
    x = torch.randn(2 * n, 8, 5, 6)
    torch.testing.assert_close(layer(x, n), layer.forward_reference(x, n), atol=1e-5, rtol=1e-5)


def test_identity_at_init_is_exact():
    layer = VolumetricConv(4)
    x = torch.randn(3 * 5, 4, 3, 3)
    assert torch.equal(layer(x, 5), x)
    assert torch.count_nonzero(layer.weight) == 0 and torch.count_nonzero(layer.bias) == 0


def test_border_handling_zeros_vs_replicate():
    # A volume that is constant along n stays constant with replicate padding (every slice sees
    # the same neighbours); with zero padding the two border slices lack a neighbour and differ.
    x = torch.randn(1, 4, 3, 3).expand(6, 4, 3, 3).contiguous()
    for mode, border_differs in (("replicate", False), ("zeros", True)):
        layer = VolumetricConv(4, 3, padding_mode=mode)
        layer.init_random_(generator=torch.Generator().manual_seed(0))
        y = layer(x, 6)
        assert torch.allclose(y[1], y[2], atol=1e-6)
        assert (not torch.allclose(y[0], y[2], atol=1e-6)) == border_differs
        assert (not torch.allclose(y[5], y[2], atol=1e-6)) == border_differs


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="odd"):
        VolumetricConv(4, 2)
    with pytest.raises(ValueError, match="reflect.*available: zeros, replicate"):
        VolumetricConv(4, padding_mode="reflect")
    with pytest.raises(ValueError, match="whole number of volumes"):
        VolumetricConv(4)(torch.randn(5, 4, 2, 2), 2)


def test_reset_parameters_restores_identity():
    layer = VolumetricConv(4)
    layer.init_random_()
    layer.reset_parameters()
    x = torch.randn(6, 4, 2, 2)
    assert torch.equal(layer(x, 3), x)
