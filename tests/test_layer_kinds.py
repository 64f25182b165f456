"""The registry of layer kinds, a plugin's own kind, and every kind through the checkpoints."""

import types

import pytest
import torch
from einops import rearrange
from torch import nn

import lift3d
from lift3d.layers import registry as layer_kinds
from lift3d.lifting.checkpoint import CheckpointError, load_lifted, load_volumetric, save_lifted, save_volumetric
from lift3d.plugins import PluginError, PluginManager, hookimpl, using_plugins
from tests.conftest import tiny_unet2d

KINDS = [(kind, {}) for kind in layer_kinds.names()] + [("low-rank", {"train_down": False, "rank": 3})]


class ScaledNeighbour(nn.Module):
    """A third party's kind: f + a * (f[i-1] + f[i+1]) per channel, a = 0 at init."""

    def __init__(self, channels, *, kernel_size=3, padding_mode="zeros", device=None, dtype=None):
        super().__init__()
        self.scale = nn.Parameter(torch.zeros(channels, 1, 1, device=device, dtype=dtype))

    def reset_parameters(self):
        nn.init.zeros_(self.scale)

    def init_random_(self, std=None, generator=None):
        with torch.no_grad():
            self.scale.normal_(0, std or 1.0, generator=generator)

    def forward(self, x, num_slices):
        v = rearrange(x, "(b n) c h w -> b n c h w", n=num_slices)
        neighbours = torch.zeros_like(v)
        neighbours[:, 1:] += v[:, :-1]
        neighbours[:, :-1] += v[:, 1:]
        return x + rearrange(self.scale * neighbours, "b n c h w -> (b n) c h w")


class ThirdParty:
    @hookimpl
    def lift3d_register_layer_kinds(self, registry):
        registry.add("scaled-neighbour", ScaledNeighbour)


def test_builtin_kinds_register_from_their_own_modules():
    registry = layer_kinds.LAYER_KINDS
    assert registry.names() == ["depthwise", "full", "low-rank", "slice-attention"]
    assert {name: registry.entry(name).plugin for name in registry.names()} == {
        "depthwise": "lift3d.layers.volumetric", "full": "lift3d.layers.volumetric",
        "low-rank": "lift3d.layers.low_rank", "slice-attention": "lift3d.layers.slice_attention"}
    with pytest.raises(PluginError, match="layer kind 'full' is registered twice"):
        PluginManager(autoload=False).registry("layer_kinds").add("full", ScaledNeighbour)


def test_a_plugin_adds_a_kind_that_inflate_uses():
    unet = tiny_unet2d()
    x, t = torch.randn(2, 2, 4, 16, 16), torch.tensor([1, 2])
    with using_plugins(ThirdParty()), torch.no_grad():
        assert layer_kinds.LAYER_KINDS.entry("scaled-neighbour").plugin == __name__
        expected = unet(rearrange(x, "b c n h w -> (b n) c h w"), t.repeat_interleave(4)).sample
        lift3d.inflate(unet, "scaled-neighbour")
        assert torch.equal(rearrange(unet(x, t).sample, "b c n h w -> (b n) c h w"), expected)
    assert lift3d.lift_settings(unet)["kind"] == "scaled-neighbour"
    assert "scaled-neighbour" not in layer_kinds.names()  # gone with the block


def test_a_kind_must_build_a_layer():
    broken = types.SimpleNamespace(lift3d_register_layer_kinds=hookimpl(
        lambda registry: registry.add("broken", lambda channels, **kw: object())))
    with using_plugins(broken), pytest.raises(PluginError, match="layer kind 'broken' built a object, not an nn.Module"):
        lift3d.inflate(tiny_unet2d(), "broken")


def randomised(kind, options):
    unet = tiny_unet2d()
    lift3d.inflate(unet, kind, **options)
    g = torch.Generator().manual_seed(3)
    for _, layer in lift3d.volumetric_layers(unet):
        layer.init_random_(std=0.1, generator=g)
    return unet


@pytest.mark.parametrize("kind, options", KINDS, ids=[k + str(len(o)) for k, o in KINDS])
def test_every_kind_round_trips_through_the_checkpoints(tmp_path, kind, options):
    unet = randomised(kind, options)
    x, t = torch.randn(1, 2, 3, 16, 16), torch.tensor([4])
    with torch.no_grad():
        expected = unet(x, t).sample
    save_lifted(unet, tmp_path / "model")
    loaded = load_lifted(tmp_path / "model")
    assert lift3d.lift_settings(loaded) == lift3d.lift_settings(unet)
    save_volumetric(unet, tmp_path / "adapter.safetensors")
    fresh = lift3d.inflate(tiny_unet2d(), kind, **options)
    metadata = load_volumetric(fresh, tmp_path / "adapter.safetensors")
    # the settings record what built the layers: low-rank's default rank floor is written down too
    recorded = {"rank_min": 16} if kind == "low-rank" and not {"rank", "rank_min"} & set(options) else {}
    assert metadata["kind"] == kind and metadata["options"] == {**options, **recorded}
    with torch.no_grad():
        assert torch.equal(loaded(x, t).sample, expected)
        assert torch.equal(fresh(x, t).sample, expected)


def test_an_adapter_of_another_kind_is_refused(tmp_path):
    save_volumetric(randomised("full", {}), tmp_path / "adapter.safetensors")
    with pytest.raises(CheckpointError, match="holds layers of kind 'full', but the model's are 'low-rank'"):
        load_volumetric(lift3d.inflate(tiny_unet2d(), "low-rank"), tmp_path / "adapter.safetensors")


def test_settings_from_before_kinds_load_as_the_full_layer():
    from lift3d.lifting.checkpoint import inflate_arguments

    old = {"kernel_size": 3, "where": ["a"], "padding_mode": "zeros", "groups": 1, "num_layers": 1}
    assert inflate_arguments(old) == {"kind": "full", "kernel_size": 3, "where": ["a"], "padding_mode": "zeros",
                                      "groups": 1}
