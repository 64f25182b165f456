"""lift3d.lifting.fuse: the residual and centre tap folded into the host conv, for inference."""

import copy

import pytest
import torch
from einops import rearrange

import lift3d
from tests.conftest import tiny_unet2d

FUSABLE = [("full", {}), ("depthwise", {}), ("low-rank", {}), ("low-rank", {"train_down": False}),
           ("full", {"groups": 4})]
IDS = ["full", "depthwise", "low-rank", "low-rank-fixed-down", "full-groups4"]
TOLERANCE = {"rtol": 1e-4, "atol": 1e-4}
"""fp32 round-off of the folding (done in float64), on outputs of order 1."""


def trained_like(kind, options, padding_mode="zeros", std=0.1, seed=0):
    unet = tiny_unet2d()
    lift3d.inflate(unet, kind, padding_mode=padding_mode, **options)
    g = torch.Generator().manual_seed(seed)
    for _, layer in lift3d.volumetric_layers(unet):
        layer.init_random_(std=std, generator=g)
    return unet


@pytest.mark.parametrize("kind, options", FUSABLE, ids=IDS)
@pytest.mark.parametrize("padding_mode", ["zeros", "replicate"])
@pytest.mark.parametrize("b, n", [(1, 1), (2, 2), (1, 7)])
def test_fused_output_matches_unfused(kind, options, padding_mode, b, n):
    unet = trained_like(kind, options, padding_mode)
    fused = lift3d.fuse(copy.deepcopy(unet))
    assert all(lift3d.fused_layers(fused).values())
    x, t = torch.randn(b, 2, n, 16, 16), torch.arange(b) * 400 + 7
    with torch.no_grad():
        expected = unet(x, t).sample
        out = fused(x, t).sample
    assert out.abs().max() > 0.1  # outputs of order 1, so atol is a relative bound too
    torch.testing.assert_close(out, expected, **TOLERANCE)
    assert not torch.equal(out, unet(x, t).sample * 0)  # not trivially zero


@pytest.mark.parametrize("kind, options", FUSABLE[:3], ids=IDS[:3])
def test_fused_model_still_runs_as_the_2d_model(kind, options):
    unet = trained_like(kind, options)
    fused = lift3d.fuse(copy.deepcopy(unet))
    x, t = torch.randn(2, 2, 3, 16, 16), torch.tensor([5, 50])
    flat = rearrange(x, "b c n h w -> (b n) c h w")
    with torch.no_grad():
        with lift3d.volumetric_disabled(unet):
            expected = unet(x, t).sample
        with lift3d.volumetric_disabled(fused):
            torch.testing.assert_close(fused(x, t).sample, expected, **TOLERANCE)
        torch.testing.assert_close(fused(flat, t.repeat_interleave(3)).sample,
                                   unet(flat, t.repeat_interleave(3)).sample, **TOLERANCE)


def test_fused_model_keeps_volumes_apart():
    fused = lift3d.fuse(trained_like("full", {}))
    x, t = torch.randn(2, 2, 5, 16, 16), torch.tensor([9, 9])
    with torch.no_grad():
        base = fused(x, t).sample
        other = x.clone()
        other[1] += 1
        assert torch.equal(fused(other, t).sample[0], base[0])


def test_fused_model_cannot_be_trained_or_saved(tmp_path):
    fused = lift3d.fuse(trained_like("low-rank", {}))
    with pytest.raises(ValueError, match="fused for inference.*cannot be trained"):
        lift3d.set_trainable(fused, "all")
    with pytest.raises(ValueError, match="fused for inference.*cannot be saved"):
        lift3d.lifting.checkpoint.save_lifted(fused, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_layers_that_cannot_be_folded_are_left_as_they_are():
    unet = tiny_unet2d()
    lift3d.inflate(unet, "full", where="block-output")  # hosts are residual blocks, not convs
    g = torch.Generator().manual_seed(0)
    for _, layer in lift3d.volumetric_layers(unet):
        layer.init_random_(std=0.1, generator=g)
    fused = lift3d.fuse(copy.deepcopy(unet))
    assert not any(lift3d.fused_layers(fused).values())
    x, t = torch.randn(1, 2, 4, 16, 16), torch.tensor([3])
    with torch.no_grad():
        assert torch.equal(fused(x, t).sample, unet(x, t).sample)


def test_fuse_is_idempotent_and_fused_layers_skip_the_centre_tap():
    fused = lift3d.fuse(trained_like("full", {}))
    lift3d.fuse(fused)
    layer = next(layer for _, layer in lift3d.volumetric_layers(fused))
    assert type(layer).__name__ == "FusedSliceConv"
    assert torch.count_nonzero(layer.weight[:, :, 1]) == 0
