"""Tests for plugins/autoencoders.py and lift3d/diffusion/autoencoding.py (tiny configs, CPU)."""

import json

import pytest
import torch

from lift3d.diffusion.autoencoding import decode_volume, encode_volume
from lift3d.plugins import PluginManager
from lift3d.plugins.protocols import Autoencoder
from lift3d_plugins.autoencoders import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    IdentityAutoencoder,
    KLAutoencoder,
    tiny_kl_config,
)


@pytest.fixture(scope="module")
def registry():
    return PluginManager(autoload=False).autoencoders


@pytest.fixture(scope="module")
def kl(registry):
    torch.manual_seed(0)
    return registry.create("kl", config=tiny_kl_config(image_channels=1, latent_channels=4), chunk_size=3).eval()


@pytest.fixture(scope="module")
def saved(kl, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    kl.save(folder)
    return folder


def _copy(folder, tmp_path):
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    return tmp_path


def test_kl_attributes_follow_the_paper_f4(kl):
    assert isinstance(kl, Autoencoder) and isinstance(kl, torch.nn.Module)
    assert (kl.image_channels, kl.latent_channels, kl.downsampling_factor) == (1, 4, 4)
    assert kl.scaling_factor == 1.0


@torch.no_grad()
def test_kl_round_trip_shapes(kl):
    x = torch.rand(5, 1, 16, 24) * 2 - 1
    z = kl.encode(x)
    assert z.shape == (5, 4, 4, 6)
    assert kl.decode(z).shape == x.shape


@torch.no_grad()
def test_kl_encode_is_posterior_mode_times_scale(registry):
    torch.manual_seed(0)
    ae = registry.create("kl", config=tiny_kl_config(), scaling_factor=0.5).eval()
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    expected = ae.vae.encode(x).latent_dist.mode() * 0.5
    assert torch.allclose(ae.encode(x), expected, atol=1e-6)
    assert torch.equal(ae.encode(x), ae.encode(x))  # deterministic by default
    assert torch.allclose(ae.decode(expected), ae.vae.decode(expected / 0.5).sample, atol=1e-6)


@torch.no_grad()
def test_kl_sampling_is_optional_and_seeded(registry):
    torch.manual_seed(0)
    ae = registry.create("kl", config=tiny_kl_config(), sample=True).eval()
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    a = ae.encode(x, generator=torch.Generator().manual_seed(1))
    b = ae.encode(x, generator=torch.Generator().manual_seed(1))
    c = ae.encode(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.allclose(a, c)


@torch.no_grad()
def test_chunked_equals_unchunked(kl):
    x = torch.rand(7, 1, 16, 16) * 2 - 1  # 7 slices in chunks of 3: 3 + 3 + 1
    whole = KLAutoencoder(kl.vae, chunk_size=100)
    z = kl.encode(x)
    assert torch.allclose(z, whole.encode(x), atol=1e-5)
    assert torch.allclose(kl.decode(z), whole.decode(z), atol=1e-5)


@torch.no_grad()
def test_chunking_bounds_the_batch_the_vae_sees(kl, monkeypatch):
    seen = []
    encode = kl.vae.encode
    monkeypatch.setattr(kl.vae, "encode", lambda chunk: seen.append(len(chunk)) or encode(chunk))
    kl.encode(torch.zeros(7, 1, 8, 8))
    assert seen == [3, 3, 1]


@torch.no_grad()
def test_save_load_round_trip(kl, saved, registry):
    assert sorted(p.name for p in saved.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    loaded = registry.create("kl", path=saved).eval()
    assert loaded.downsampling_factor == 4 and loaded.latent_channels == 4
    for (name, a), b in zip(kl.vae.state_dict().items(), loaded.vae.state_dict().values()):
        assert torch.equal(a, b), name
    x = torch.rand(2, 1, 8, 8) * 2 - 1
    assert torch.equal(kl.encode(x), loaded.encode(x))


def test_scaling_factor_override_is_saved(registry, tmp_path):
    registry.create("kl", config=tiny_kl_config(), scaling_factor=0.25).save(tmp_path)
    assert registry.create("kl", path=tmp_path).scaling_factor == 0.25


def test_missing_weights_names_the_file(saved, tmp_path, registry):
    folder = _copy(saved, tmp_path)
    (folder / WEIGHTS_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"has no {WEIGHTS_NAME}"):
        registry.create("kl", path=folder)


def test_pickled_weights_are_refused(saved, tmp_path, registry):
    folder = _copy(saved, tmp_path)
    (folder / WEIGHTS_NAME).rename(folder / "diffusion_pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"found diffusion_pytorch_model\.bin, but lift3d never loads pickled"):
        registry.create("kl", path=folder)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_weights_name_the_file(saved, tmp_path, registry, damage):
    folder = _copy(saved, tmp_path)
    weights = folder / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(b"not a safetensors file" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME} is not a readable safetensors file"):
        registry.create("kl", path=folder)


def test_weights_that_do_not_match_the_config(saved, tmp_path, registry):
    folder = _copy(saved, tmp_path)
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["latent_channels"] = 8
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME}' has tensors of the wrong shape: decoder.conv_in.weight"):
        registry.create("kl", path=folder)


def test_missing_or_bad_config_names_the_file(saved, tmp_path, registry):
    folder = _copy(saved, tmp_path)
    (folder / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}: autoencoder config is not valid JSON"):
        registry.create("kl", path=folder)
    (folder / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"has no {CONFIG_NAME}"):
        registry.create("kl", path=folder)


def test_config_of_another_model_is_refused(saved, tmp_path, registry):
    folder = _copy(saved, tmp_path)
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps(dict(config, _class_name="UNet2DModel")))
    with pytest.raises(ValueError, match=rf"{CONFIG_NAME}: _class_name 'UNet2DModel' is not a class lift3d builds; valid: AutoencoderKL"):
        registry.create("kl", path=folder)


def test_missing_folder(tmp_path, registry):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        registry.create("kl", path=tmp_path / "nope")


@pytest.mark.parametrize("options", [{}, {"path": "a", "config": {}}])
def test_kl_needs_exactly_one_source(registry, options):
    with pytest.raises(ValueError, match="exactly one of path= .* or config="):
        registry.create("kl", **options)


def test_bad_options_are_clear(registry):
    with pytest.raises(ValueError, match="chunk_size must be a positive int, got 0"):
        registry.create("kl", config=tiny_kl_config(), chunk_size=0)
    with pytest.raises(ValueError, match=r"multiples of norm_num_groups=8, got \(16, 12\)"):
        tiny_kl_config(block_out_channels=(16, 12))


def test_kl_encode_rejects_bad_shapes(kl):
    with pytest.raises(ValueError, match=r"encode expects slices \(B, 1, H, W\) with H and W divisible by 4, got \(1, 1, 6, 8\)"):
        kl.encode(torch.zeros(1, 1, 6, 8))
    with pytest.raises(ValueError, match=r"decode expects latents \(B, 4, h, w\), got \(1, 3, 2, 2\)"):
        kl.decode(torch.zeros(1, 3, 2, 2))


def test_identity(registry):
    ae = registry.create("identity", image_channels=2)
    assert isinstance(ae, Autoencoder) and isinstance(ae, torch.nn.Module)
    assert (ae.image_channels, ae.latent_channels, ae.downsampling_factor, ae.scaling_factor) == (2, 2, 1, 1.0)
    x = torch.randn(3, 2, 5, 7)
    assert torch.equal(ae.decode(ae.encode(x)), x)
    with pytest.raises(ValueError, match=r"encode expects slices \(B, 2, H, W\), got \(3, 1, 5, 7\)"):
        ae.encode(torch.zeros(3, 1, 5, 7))


@torch.no_grad()
def test_volume_helpers_match_slice_api(kl):
    x = torch.rand(2, 1, 3, 8, 8) * 2 - 1  # b c n h w
    z = encode_volume(kl, x)
    assert z.shape == (2, 4, 3, 2, 2)
    # Slice k of volume b is encoded exactly as that slice on its own.
    assert torch.allclose(z[1, :, 2], kl.encode(x[1, :, 2][None])[0], atol=1e-5)
    out = decode_volume(kl, z)
    assert out.shape == x.shape
    assert torch.allclose(out[0, :, 1], kl.decode(z[0, :, 1][None])[0], atol=1e-5)
    ident = IdentityAutoencoder()
    assert torch.equal(decode_volume(ident, encode_volume(ident, x)), x)
    with pytest.raises(ValueError, match=r"encode_volume expects a volume batch \(b, 1, n, h, w\), got \(2, 1, 8, 8\)"):
        encode_volume(kl, x[:, :, 0])


def test_a_folder_without_a_scaling_factor_is_refused(saved, tmp_path, registry):
    import json
    import shutil

    folder = tmp_path / "no-scale"
    shutil.copytree(saved, folder)
    config = json.loads((folder / CONFIG_NAME).read_text())
    del config["scaling_factor"]
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"has no scaling_factor, so its latents' scale is unknown"):
        registry.create("kl", path=folder)
    assert registry.create("kl", path=folder, scaling_factor=0.5).scaling_factor == 0.5
