"""The registry of layer kinds, a plugin's own kind, and every kind through the checkpoints."""

import pytest
import torch
from einops import rearrange
from torch import nn

import lift3d
from lift3d.layers import registry as layer_kinds
from lift3d.lifting.checkpoint import CheckpointError, load_lifted, load_volumetric, save_lifted, save_volumetric
from lift3d.plugins import PluginError, PluginManager, hookimpl
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


def test_builtin_kinds_register_like_a_plugin():
    registry = layer_kinds.build_registry(PluginManager(autoload=False).pm)
    assert registry.names() == ["depthwise", "full", "low-rank", "slice-attention"]
    assert registry.entry("low-rank").plugin == "lift3d.layers.low_rank"
    with pytest.raises(PluginError, match="layer kind 'full' is registered twice"):
        registry.add("full", ScaledNeighbour)


def test_a_plugin_adds_a_kind_that_inflate_uses(monkeypatch):
    registry = layer_kinds.build_registry(PluginManager(autoload=False, extra_plugins=(ThirdParty(),)).pm)
    monkeypatch.setattr(layer_kinds, "registry", lambda: registry)
    unet = tiny_unet2d()
    x, t = torch.randn(2, 2, 4, 16, 16), torch.tensor([1, 2])
    with torch.no_grad():
        expected = unet(rearrange(x, "b c n h w -> (b n) c h w"), t.repeat_interleave(4)).sample
        lift3d.inflate(unet, "scaled-neighbour")
        assert torch.equal(rearrange(unet(x, t).sample, "b c n h w -> (b n) c h w"), expected)
    assert lift3d.lift_settings(unet)["kind"] == "scaled-neighbour"


def test_a_kind_must_build_a_layer(monkeypatch):
    registry = layer_kinds.build_registry(PluginManager(autoload=False).pm)
    registry.add("broken", lambda channels, **kw: object())
    monkeypatch.setattr(layer_kinds, "registry", lambda: registry)
    with pytest.raises(PluginError, match="layer kind 'broken' built a object, not an nn.Module"):
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
