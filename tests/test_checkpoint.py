import json

import pytest
import torch

import lift3d
from lift3d.lifting.checkpoint import (CheckpointError, load_lifted, load_volumetric, read_settings, save_lifted,
                               save_volumetric)
from tests.conftest import tiny_unet2d
from tests.test_inflate import PlainNet, randomise


def lifted_unet(seed=0, **kwargs):
    model = lift3d.inflate(tiny_unet2d(), **kwargs)
    randomise(model, seed)
    return model


def run(model):
    torch.manual_seed(0)
    with torch.no_grad():
        return model(torch.randn(1, 2, 4, 16, 16), torch.tensor([7])).sample


def test_whole_model_round_trip_is_a_diffusers_folder(tmp_path):
    model = lifted_unet(kernel_size=5, padding_mode="replicate")
    save_lifted(model, tmp_path / "model")
    files = sorted(p.name for p in (tmp_path / "model").iterdir())
    assert files == ["config.json", "diffusion_pytorch_model.safetensors", "lift3d.json"]
    settings = read_settings(tmp_path / "model")
    assert settings["diffusers_class"] == "UNet2DModel"
    assert settings["lift"]["kernel_size"] == 5 and settings["lift"]["num_layers"] == 16
    assert settings["lift3d_version"] == lift3d.__version__
    loaded = load_lifted(tmp_path / "model")
    assert torch.equal(run(loaded), run(model))


def test_generic_module_round_trip(tmp_path):
    model = lift3d.inflate(PlainNet())
    randomise(model)
    save_lifted(model, tmp_path / "plain")
    with pytest.raises(CheckpointError, match="pass the 2D model"):
        load_lifted(tmp_path / "plain")
    loaded = load_lifted(tmp_path / "plain", PlainNet())
    x = torch.randn(1, 1, 3, 8, 8)
    assert torch.equal(loaded(x), model(x))


def test_volumetric_layers_alone(tmp_path):
    model = lifted_unet()
    path = save_volumetric(model, tmp_path / "volumetric.safetensors")
    fresh = lift3d.inflate(tiny_unet2d())  # same 2D weights (seeded), identity volumetric layers
    assert not torch.equal(run(fresh), run(model))
    meta = load_volumetric(fresh, path)
    assert meta["kernel_size"] == 3 and meta["num_layers"] == 16 and meta["format"] == "lift3d"
    assert torch.equal(run(fresh), run(model))


def test_mismatched_models_name_missing_and_unexpected_keys(tmp_path):
    path = save_volumetric(lifted_unet(), tmp_path / "v.safetensors")
    other = lift3d.inflate(tiny_unet2d(), where="block-output")
    with pytest.raises(CheckpointError, match=r"missing keys: .*resnets.0.volumetric.*unexpected keys: .*conv1.volumetric"):
        load_volumetric(other, path)
    wider = lift3d.inflate(tiny_unet2d(), kernel_size=5)
    with pytest.raises(CheckpointError, match="wrong shape"):
        load_volumetric(wider, path)


def test_bad_folders_and_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_lifted(tmp_path / "nope")
    tiny_unet2d().save_pretrained(tmp_path / "plain2d")
    with pytest.raises(CheckpointError, match="no lift3d.json"):
        load_lifted(tmp_path / "plain2d")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_volumetric(lifted_unet(), bad)


def test_nothing_pickled(tmp_path):
    save_lifted(lifted_unet(), tmp_path / "m")
    save_volumetric(lifted_unet(), tmp_path / "v.safetensors")
    names = [p.suffix for p in tmp_path.rglob("*") if p.is_file()]
    assert set(names) <= {".json", ".safetensors"}
    assert json.loads((tmp_path / "m" / "lift3d.json").read_text())["weights"].endswith(".safetensors")


def test_save_lifted_replaces_atomically(tmp_path):
    save_lifted(lifted_unet(0), tmp_path / "m")
    model = lifted_unet(1)
    save_lifted(model, tmp_path / "m")
    assert torch.equal(run(load_lifted(tmp_path / "m")), run(model))
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no temp folders left


def test_ema_weights_override(tmp_path):
    model = lifted_unet()
    ema = {k: torch.zeros_like(v) if lift3d.is_volumetric_parameter(k) else v for k, v in model.state_dict().items()}
    save_volumetric(model, tmp_path / "v.safetensors", state_dict=ema)
    fresh = lifted_unet(5)
    load_volumetric(fresh, tmp_path / "v.safetensors")
    assert all(torch.count_nonzero(v) == 0 for v in lift3d.volumetric_state_dict(fresh).values())
