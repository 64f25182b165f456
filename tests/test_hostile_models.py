"""Hostile model folders: nothing in one reaches the network, leaves its folder, or gets past memory.

Every crafted file must give one :class:`lift3d.io.errors.Lift3dError` line naming the file, from the
Python API and from ``lift3d-synthesize`` (exit 2), with no network call attempted.
"""

from __future__ import annotations

import json
import shutil
import socket
import struct

import nibabel as nib
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lift3d
from lift3d.lifting.checkpoint import CheckpointError, load_lifted
from lift3d.cli.synthesize import main as synthesize_main
from lift3d.training.config import TrainConfig
from lift3d.io.errors import BudgetError, Lift3dError, UnsafePathError
from lift3d.sampling.synthesis import load_synthesis_model, synthesize
from lift3d.training.export import export_model
from lift3d.training.unets import build_autoencoder, build_objective, build_unet, new_unet2d
from tests.conftest import fuzz_examples

SIZE, SLICES = 16, 4
pytestmark = pytest.mark.usefixtures("one_thread")


class _Dataset:
    num_slices = SLICES


def _export(root, stage: str):
    cfg = TrainConfig()
    cfg.run.stage = stage
    cfg.data.options = {"size": SIZE, "num_slices": SLICES}
    cfg.model.block_out_channels = [8, 16]
    cfg.model.norm_num_groups = 4
    torch.manual_seed(0)
    unet = new_unet2d(cfg, 2, 1, SIZE)
    if stage == "volumes":
        lift3d.inflate(unet)
    return export_model(cfg, unet, build_autoencoder(cfg), build_objective(cfg), _Dataset(), root)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A stage-1 (2D) and a stage-2 (lifted) export, as lift3d-finetune writes them."""
    return {stage: _export(tmp_path_factory.mktemp(stage), stage) for stage in ("slices", "volumes")}


@pytest.fixture
def copy_of(folders, tmp_path):
    def make(stage: str):
        return shutil.copytree(folders[stage], tmp_path / f"{stage}-copy")
    return make


class NetworkCalled(AssertionError):
    pass


@pytest.fixture
def no_network(monkeypatch):
    """Every way to open a connection fails the test, and the offline switches are off, so the
    test proves that lift3d never *tries*, not that the switches stopped it."""
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise NetworkCalled(f"network call attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    for name in ("HF_HUB_OFFLINE", "DIFFUSERS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return attempts


def _edit_json(path, change):
    value = json.loads(path.read_text())
    path.write_text(json.dumps(change(value)))


SCHEDULER = "scheduler/scheduler_config.json"

# (file, replacement) pairs a hostile folder may hold, for both stages
CRAFTED = [
    ("config.json", lambda v: "google/ddpm-cifar10-32"),
    ("config.json", lambda v: "../other-model"),
    ("config.json", lambda v: {**v, "_class_name": "DiffusionPipeline"}),
    ("config.json", lambda v: {**v, "in_channels": -2}),
    ("config.json", lambda v: [v]),
    (SCHEDULER, lambda v: "google/ddpm-cifar10-32"),
    (SCHEDULER, lambda v: {**v, "num_train_timesteps": 2_000_000_000}),
    (SCHEDULER, lambda v: {**v, "beta_schedule": "evil"}),
    (SCHEDULER, lambda v: {**v, "_class_name": "DiffusionPipeline"}),
    ("lift3d_training.json", lambda v: [v]),
    ("lift3d_training.json", lambda v: {**v, "conditioning": "evil"}),
    ("lift3d_training.json", lambda v: {**v, "autoencoder": {"name": "kl", "options": {"path": "/etc"}}}),
    ("lift3d_training.json", lambda v: {**v, "autoencoder": {"name": "kl", "options": {"path": "../.."}}}),
]


@pytest.mark.parametrize("stage", ["slices", "volumes"])
@pytest.mark.parametrize("name, change", CRAFTED, ids=[f"{n}-{i}" for i, (n, _) in enumerate(CRAFTED)])
def test_crafted_model_folder_is_refused_without_network(copy_of, no_network, stage, name, change):
    folder = copy_of(stage)
    _edit_json(folder / name, change)
    with pytest.raises(Lift3dError, match=name.split("/")[-1] + "|" + str(folder)):
        load_synthesis_model(folder, device="cpu")
    assert no_network == []


@pytest.mark.parametrize("stage", ["slices", "volumes"])
def test_a_path_string_as_config_does_not_load_another_folder(copy_of, folders, stage):
    folder = copy_of(stage)
    (folder / "config.json").write_text(json.dumps(str(folders[stage])))
    with pytest.raises(Lift3dError, match=r"config.json: config.json must be a JSON object, got a str"):
        load_synthesis_model(folder, device="cpu")


@pytest.mark.parametrize("change", [
    lambda v: {**v, "diffusers_class": "DiffusionPipeline"},
    lambda v: {**v, "lift": {**v["lift"], "kernel_size": 2000001}},
    lambda v: {**v, "lift": {**v["lift"], "kernel_size": 3.0}},
    lambda v: [v],
], ids=["pipeline", "kernel-2000001", "kernel-float", "list"])
def test_crafted_lift_settings_are_refused(copy_of, no_network, change):
    folder = copy_of("volumes")
    _edit_json(folder / "lift3d.json", change)
    with pytest.raises(Lift3dError, match="lift3d.json"):
        load_lifted(folder)
    assert no_network == []


def test_cli_refuses_a_hub_id_in_one_line_without_network(copy_of, no_network, tmp_path, capsys):
    folder = copy_of("volumes")
    (folder / "config.json").write_text(json.dumps("google/ddpm-cifar10-32"))
    source = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((16, 16, 4)).astype(np.float32), np.eye(4)), source)
    code = synthesize_main(["--model", str(folder), "--source", str(source), "--out", str(tmp_path / "out"),
                            "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and "config.json must be a JSON object, got a str" in err
    assert no_network == []
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_finetune_from_a_crafted_pretrained_folder_is_refused_without_network(copy_of, no_network):
    folder = copy_of("slices")
    (folder / "config.json").write_text(json.dumps("google/ddpm-cifar10-32"))
    cfg = TrainConfig()
    cfg.run.stage = "volumes"
    cfg.model.pretrained = str(folder)
    with pytest.raises(Lift3dError, match="config.json must be a JSON object"):
        build_unet(cfg, build_autoencoder(cfg), SIZE)
    assert no_network == []


# --------------------------------------------------------------------------------------------
# Paths named inside a folder stay inside it


@pytest.mark.parametrize("weights", ["/etc/passwd", "../../../../../etc/passwd", "sub/../../x.safetensors"])
def test_weights_outside_the_folder_are_refused(copy_of, weights):
    folder = copy_of("volumes")
    _edit_json(folder / "lift3d.json", lambda v: {**v, "weights": weights})
    with pytest.raises(UnsafePathError, match="weights"):
        load_lifted(folder)


def test_absolute_weights_of_another_run_are_refused(copy_of, folders):
    folder = copy_of("volumes")
    other = folders["volumes"] / "diffusion_pytorch_model.safetensors"
    _edit_json(folder / "lift3d.json", lambda v: {**v, "weights": str(other.resolve())})
    with pytest.raises(UnsafePathError, match="an absolute path"):
        load_lifted(folder)


@pytest.mark.parametrize("name", ["diffusion_pytorch_model.safetensors", "config.json", "lift3d.json",
                                  "lift3d_training.json", SCHEDULER])
def test_a_symlink_out_of_the_folder_is_refused(copy_of, folders, tmp_path, name):
    folder = copy_of("volumes")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    target = outside / name.replace("/", "_")
    shutil.copy(folders["volumes"] / name, target)
    (folder / name).unlink()
    (folder / name).symlink_to(target)
    with pytest.raises(UnsafePathError, match="outside"):
        load_synthesis_model(folder, device="cpu")


# --------------------------------------------------------------------------------------------
# Sizes, dtypes and values


def test_huge_unet_widths_are_refused_before_allocation(copy_of, monkeypatch):
    monkeypatch.setenv("LIFT3D_MEMORY_BUDGET", "1GiB")
    folder = copy_of("slices")
    _edit_json(folder / "config.json", lambda v: {**v, "block_out_channels": [65536, 65536], "norm_num_groups": 4})
    with pytest.raises(BudgetError, match=r"config.json: the UNet2DModel's weights need [0-9.]+ TiB, more than the 1.0 GiB lift3d may use \(LIFT3D_MEMORY_BUDGET\)"):
        load_synthesis_model(folder, device="cpu")


def test_wide_volumetric_kernel_is_refused_before_allocation(copy_of, monkeypatch):
    monkeypatch.setenv("LIFT3D_MEMORY_BUDGET", "1MiB")
    folder = copy_of("volumes")
    _edit_json(folder / "lift3d.json", lambda v: {**v, "lift": {**v["lift"], "kernel_size": 1023}})
    with pytest.raises(BudgetError, match="lift3d.json: its lift settings .* kernel_size 1023 need 11.5 MiB, more than the 1.0 MiB"):
        load_lifted(folder)


def _retype_first_tensor(path, old: str, new: str) -> str:
    """Rewrite the dtype of the first ``old`` tensor in a safetensors header (same byte length)."""
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + length])
    name = next(k for k, v in header.items() if k != "__metadata__" and v["dtype"] == old)
    header[name]["dtype"] = new
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (length - len(text))
    assert len(text) == length
    path.write_bytes(raw[:8] + text + raw[8 + length:])
    return name


def test_a_tampered_dtype_is_refused(copy_of):
    folder = copy_of("volumes")
    name = _retype_first_tensor(folder / "diffusion_pytorch_model.safetensors", "F32", "I32")
    with pytest.raises(CheckpointError, match=rf"wrong dtype: {name}: file torch.int32 vs model torch.float32"):
        load_lifted(folder)


def test_synthesize_refuses_a_source_outside_the_training_range(folders):
    model = load_synthesis_model(folders["volumes"], device="cpu")
    source = torch.rand(1, 1, SLICES, SIZE, SIZE) * 2 - 1
    with pytest.raises(ValueError, match=r"source values span \[.*\], but the model takes sources scaled to \[-1, 1\]"):
        synthesize(model, source * 1000, steps=2)


@pytest.mark.parametrize("device", ["meta", "xla"])
def test_unknown_devices_are_refused(folders, device):
    with pytest.raises(ValueError, match=r"valid: cpu, cuda, cuda:N, mps"):
        load_synthesis_model(folders["volumes"], device=device)


def test_inflate_refuses_bad_arguments(unet2d):
    with pytest.raises(TypeError, match="inflate needs a torch.nn.Module .* got NoneType"):
        lift3d.inflate(None)
    with pytest.raises(TypeError, match=r"kernel_size must be an odd int, got 3.0 \(float\)"):
        lift3d.inflate(unet2d, kernel_size=3.0)
    with pytest.raises(ValueError, match="heads must be a positive integer, got 0"):
        lift3d.inflate(unet2d, "slice-attention", heads=0)
    assert not lift3d.is_lifted(unet2d)


def test_inflate_sizes_its_layers_before_allocating(unet2d, monkeypatch):
    monkeypatch.setenv("LIFT3D_MEMORY_BUDGET", "1MiB")
    with pytest.raises(BudgetError, match="volumetric layers of kind 'low-rank' with kernel_size 2000001 need"):
        lift3d.inflate(unet2d, kernel_size=2000001)
    assert not lift3d.is_lifted(unet2d)


def test_an_empty_batch_is_refused(unet2d):
    lifted = lift3d.inflate(unet2d)
    for shape in [(0, 2, 4, 16, 16), (1, 2, 0, 16, 16)]:
        with pytest.raises(ValueError, match=r"at least one volume of at least one slice"):
            lifted(torch.zeros(shape), 1)


# --------------------------------------------------------------------------------------------
# Fuzz: every reader of a model folder either loads or raises Lift3dError naming the file

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
FILES = ["config.json", "lift3d.json", "lift3d_training.json", SCHEDULER]
FUZZ = settings(max_examples=fuzz_examples(60), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _load_or_user_error(folder) -> None:
    try:
        load_synthesis_model(folder, device="cpu")
    except Lift3dError as exc:
        assert "\n" not in str(exc).strip() or "affine" in str(exc)
        assert str(folder) in str(exc) or "LIFT3D_MEMORY_BUDGET" in str(exc), str(exc)


@FUZZ
@given(name=st.sampled_from(FILES), data=st.data())
def test_fuzz_mutated_settings_load_or_raise_a_user_error(folders, tmp_path_factory, monkeypatch, name, data):
    monkeypatch.setenv("LIFT3D_MEMORY_BUDGET", "256MiB")
    folder = shutil.copytree(folders["volumes"], tmp_path_factory.mktemp("fuzz") / "m")
    value = json.loads((folder / name).read_text())
    if data.draw(st.booleans(), label="replace whole file"):
        value = data.draw(JSON, label="file")
    else:
        key = data.draw(st.sampled_from(sorted(value)), label="key")
        value[key] = data.draw(JSON, label="value")
    (folder / name).write_text(json.dumps(value))
    _load_or_user_error(folder)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=4000), flips=st.lists(st.integers(0, 400), max_size=4))
def test_fuzz_damaged_weights_load_or_raise_a_user_error(folders, tmp_path_factory, cut, flips):
    folder = shutil.copytree(folders["volumes"], tmp_path_factory.mktemp("fuzz") / "m")
    path = folder / "diffusion_pytorch_model.safetensors"
    raw = bytearray(path.read_bytes())
    for i in flips:
        raw[i] ^= 0x5A
    path.write_bytes(bytes(raw[: len(raw) - cut]))
    _load_or_user_error(folder)


# --------------------------------------------------------------------------------------------
# Lifting a saved stage-1 export: lift3d inflate STAGE1 OUT


def test_lift3d_inflate_lifts_a_stage1_export_that_synthesises_the_same(folders, tmp_path, capsys):
    from lift3d.cli.main import main as lift3d_main

    out = tmp_path / "lifted"
    assert lift3d_main(["inflate", str(folders["slices"]), str(out), "--kind", "low-rank", "--option", "rank=4"]) == 0
    assert "volumetric layers" in capsys.readouterr().out
    flat, lifted = (load_synthesis_model(f, device="cpu") for f in (folders["slices"], out))
    assert lifted.lifted and json.loads((out / "lift3d.json").read_text())["lift"]["kind"] == "low-rank"
    source = torch.rand(1, 1, SLICES, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    a = synthesize(flat, source, scheduler="dpm", steps=2, seed=0)
    b = synthesize(lifted, source, scheduler="dpm", steps=2, seed=0)
    assert torch.allclose(a, b, atol=1e-4)  # identity at initialisation (fused for inference: fp32 round-off)


@pytest.mark.parametrize("case", ["exists", "inside", "unknown-kind", "lifted-input"])
def test_lift3d_inflate_refuses_in_one_line_and_writes_nothing(folders, tmp_path, capsys, case):
    from lift3d.cli.main import main as lift3d_main

    stage1, out, extra = str(folders["slices"]), tmp_path / "lifted", []
    if case == "exists":
        out.mkdir()
    elif case == "inside":
        out = folders["slices"] / "lifted"
    elif case == "unknown-kind":
        extra = ["--kind", "banana"]
    else:
        stage1 = str(folders["volumes"])
    before = sorted(p.name for p in tmp_path.iterdir())
    assert lift3d_main(["inflate", stage1, str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ": error: " in err
    assert {"exists": "exists already", "inside": "lies inside", "unknown-kind": "banana",
            "lifted-input": "lifted already"}[case] in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not (folders["slices"] / "lifted").exists()
