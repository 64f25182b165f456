"""Every number lift3d reads has a bound, and an export agrees with itself (issue 33).

A model's ``config.json`` that asks for 100000 resnets per block, a memory budget of 400 digits, a noise
scheduler config with keys diffusers would take on trust (``steps_offset = 1e9``, ``shift = 1e-300``,
``rescale_betas_zero_snr = "yes"``), an export format newer than the reader, and an export whose objective,
scheduler class and prediction type contradict each other: each is one line naming the file (or the
variable) and the key and saying what would be valid, before diffusers sees anything.

Tests lift3d/io/schemas.py, lift3d/io/schema_errors.py, lift3d/io/budget.py and lift3d/diffusion/export.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import lift3d
from lift3d.diffusion.export import SCHEDULER_CONFIG, TRAINING_SETTINGS, read_scheduler_config, read_training_settings
from lift3d.io.budget import ENV, parse_size
from lift3d.io.errors import Lift3dError
from lift3d.io.schemas import ModelConfig, validate
from lift3d.lifting.checkpoint import load_unet2d
from lift3d.sampling.synthesis import load_synthesis_model
from lift3d.training.config import TrainConfig
from lift3d.training.export import export_model
from lift3d.training.unets import build_autoencoder, build_objective, new_unet2d

pytestmark = pytest.mark.usefixtures("one_thread")


class _Dataset:
    num_slices = 4


def _export(root: Path, objective: str, stage: str = "slices") -> Path:
    cfg = TrainConfig()
    cfg.run.stage = stage
    cfg.data.options = {"size": 16, "num_slices": 4}
    cfg.model.block_out_channels = [8, 16]
    cfg.model.norm_num_groups = 4
    cfg.diffusion.objective = objective
    torch.manual_seed(0)
    unet = new_unet2d(cfg, 2, 1, 16)
    if stage == "volumes":
        lift3d.inflate(unet)
    return export_model(cfg, unet, build_autoencoder(cfg), build_objective(cfg), _Dataset(), root)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """A ddpm and a flow stage-1 export, as lift3d-finetune writes them."""
    return {objective: _export(tmp_path_factory.mktemp(objective), objective) for objective in ("ddpm", "flow")}


def copy_of(exports: dict[str, Path], objective: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(exports[objective], tmp_path / f"{objective}-copy"))


def edit(path: Path, change) -> None:
    path.write_text(json.dumps(change(json.loads(path.read_text())), allow_nan=True))


def with_(**values):
    return lambda v: {**v, **values}


def one_line(exc: BaseException, *parts: str) -> str:
    text = str(exc)
    assert "\n" not in text and all(p in text for p in parts), text
    return text


# --------------------------------------------------------------------------------------------
# A model's config.json: every size bounded before diffusers builds anything (even on meta)


MODEL_CONFIGS = [
    ({"layers_per_block": 100000}, "layers_per_block must be <= 64, got 100000"),
    ({"layers_per_block": [1, 100000]}, "layers_per_block[1] must be <= 64, got 100000"),
    ({"layers_per_block": 0}, "layers_per_block must be >= 1, got 0"),
    ({"layers_per_block": "2"}, "layers_per_block must be an integer or a list, got '2'"),
    ({"transformer_layers_per_block": 10**6}, "transformer_layers_per_block must be <= 64"),
    ({"layers_per_block": 8, "transformer_layers_per_block": 16},
     "layers_per_block x transformer_layers_per_block must be at most 64 at each level, got 8 x 16"),
    ({"block_out_channels": [8] * 17}, "block_out_channels must hold at most 16 items, got 17"),
    ({"block_out_channels": [8, 10**9]}, "block_out_channels[1] must be <= 65536, got 1000000000"),
    ({"down_block_types": ["DownBlock2D"] * 1000}, "down_block_types must hold at most 16 items, got 1000"),
    ({"attention_head_dim": 10**9}, "attention_head_dim must be <= 4096"),
    ({"num_class_embeds": 10**12}, "num_class_embeds must be <= 1000000, got 1000000000000"),
    ({"conv_in_kernel": 10001}, "conv_in_kernel must be <= 15, got 10001"),
    ({"conv_out_kernel": 4}, "conv_out_kernel must be odd"),
    ({"downsample_padding": 10**6}, "downsample_padding must be <= 8, got 1000000"),
    ({"norm_num_groups": 10**9}, "norm_num_groups must be <= 65536"),
    ({"sample_size": 10**9}, "sample_size must be <= 65536, got 1000000000"),
    ({"time_embedding_dim": 10**9}, "time_embedding_dim must be <= 65536"),
    ({"num_train_timesteps": 10**12}, "num_train_timesteps must be <= 100000"),
    ({"freq_shift": 10**30}, "freq_shift must be <= 1024"),
    ({"in_channels": True}, "in_channels must be an integer, got True"),
    ({"dropout": 2.0}, "dropout must be <= 1, got 2.0"),
    ({"norm_eps": float("nan")}, "norm_eps must be a finite number, got nan"),
    ({"scaling_factor": 1e300}, "scaling_factor must be <= 1000"),
    ({"latents_mean": [0.0] * 5000}, "latents_mean must hold at most 1024 items, got 5000"),
    ({"act_fn": "x" * 1000}, "act_fn must be at most 64 characters long"),
    ({"flip_sin_to_cos": "yes"}, "flip_sin_to_cos must be true or false, got 'yes'"),
    ({"add_attention": 1}, "add_attention must be true or false, got 1"),
]


@pytest.mark.parametrize("change, message", MODEL_CONFIGS, ids=[m[:40] for _, m in MODEL_CONFIGS])
def test_every_size_in_a_model_config_is_bounded(exports, change, message):
    base = json.loads((exports["ddpm"] / "config.json").read_text())
    with pytest.raises(Lift3dError) as refused:
        validate({**base, **change}, ModelConfig, "config.json", "config.json")
    one_line(refused.value, "config.json", message)


def test_a_model_of_100000_layers_per_block_is_refused_before_it_is_built(exports, tmp_path, monkeypatch):
    """The issue's case: sizing such a U-Net on the meta device never ends; now it never starts."""
    import diffusers

    monkeypatch.setattr(diffusers.UNet2DModel, "from_config", lambda *a, **k: pytest.fail("diffusers was asked"))
    folder = copy_of(exports, "ddpm", tmp_path)
    edit(folder / "config.json", with_(layers_per_block=100000))
    with pytest.raises(Lift3dError) as refused:
        load_unet2d(folder)
    one_line(refused.value, str(folder / "config.json"), "layers_per_block must be <= 64, got 100000")


def test_the_largest_config_lift3d_trains_is_within_the_bounds(exports):
    base = json.loads((exports["ddpm"] / "config.json").read_text())
    largest = {**base, "block_out_channels": [8] * 16, "down_block_types": ["DownBlock2D"] * 16,
               "up_block_types": ["UpBlock2D"] * 16, "layers_per_block": 64}
    assert validate(largest, ModelConfig, "config.json").layers_per_block == 64


# --------------------------------------------------------------------------------------------
# The memory budget: read exactly, never overflowing


@pytest.mark.parametrize("text, message", [
    ("9" * 400, "is not a size"),
    ("1" + "0" * 30, "is more than lift3d can count; use a size of at most 9223372036854775807 bytes"),
    ("9999999999TiB", "is more than lift3d can count"),
    ("1e9", "is not a size; use bytes or a unit"),
    ("-1", "is not a size"),
    ("1.5.5GiB", "is not a size"),
    ("8EiB", "is not a size; use bytes or a unit: b, kb, mb, gb, tb, kib, mib, gib, tib"),
    ("nan", "is not a size"),
])
def test_a_bad_memory_budget_is_one_line_naming_the_variable(monkeypatch, text, message):
    from lift3d.io.budget import check_bytes

    monkeypatch.setenv(ENV, text)
    with pytest.raises(Lift3dError) as refused:
        check_bytes(1, "a tensor")
    assert len(str(refused.value)) < 300
    one_line(refused.value, ENV, message)


@pytest.mark.parametrize("text, size", [("512MiB", 512 * 2**20), ("1.5GiB", 3 * 2**29), (" 3 kb ", 3000),
                                        ("9223372036854775807", 2**63 - 1), ("0.5", 0)])
def test_a_memory_budget_is_read_exactly(text, size):
    assert parse_size(text) == size


# --------------------------------------------------------------------------------------------
# Noise scheduler configs: lift3d's schema (known keys, ranges, real booleans) before diffusers


SCHEDULERS = [
    ("ddpm", with_(rescale_betas_zero_snr="yes"), "rescale_betas_zero_snr must be true or false, got 'yes'"),
    ("ddpm", with_(clip_sample=1), "clip_sample must be true or false, got 1"),
    ("ddpm", with_(steps_offset=1e9), "steps_offset must be an integer, got 1000000000.0"),
    ("ddpm", with_(steps_offset=10**9), "steps_offset must be <= 1, got 1000000000"),
    ("ddpm", with_(trained_betas=[0.1, 0.2]), "trained_betas must be null, got a list of 2"),
    ("ddpm", with_(num_train_timesteps=2_000_000_000), "num_train_timesteps must be <= 100000"),
    ("ddpm", with_(num_train_timesteps=True), "num_train_timesteps must be an integer, got True"),
    ("ddpm", with_(beta_start=0.0), "beta_start must be > 0, got 0.0"),
    ("ddpm", with_(beta_end=1e-9), "beta_end must be >= beta_start"),
    ("ddpm", with_(timestep_spacing="evil"), "timestep_spacing must be one of 'leading', 'trailing' or 'linspace'"),
    ("ddpm", with_(prediction_type="flow_prediction"), "prediction_type must be one of 'epsilon', 'v_prediction' or "
                                                       "'sample'"),
    ("ddpm", with_(sample_max_value=float("inf")), "sample_max_value must be a finite number"),
    ("ddpm", with_(evil=1), "evil is not a key lift3d reads; valid keys: _class_name, _diffusers_version, beta_end"),
    ("ddpm", with_(shift=3.0), "shift is not a key lift3d reads"),
    ("ddpm", with_(_diffusers_version="../../x"), "_diffusers_version must match"),
    ("flow", with_(shift=1e-300), "shift must be >= 0.01, got 1e-300"),
    ("flow", with_(shift=1e9), "shift must be <= 100, got 1000000000.0"),
    ("flow", with_(base_image_seq_len=10**30), "base_image_seq_len must be <= 16777216"),
    ("flow", with_(stochastic_sampling="no"), "stochastic_sampling must be true or false, got 'no'"),
    ("flow", with_(beta_start=0.1, beta_end=0.2), "beta_end, beta_start are not keys lift3d reads"),
    ("flow", with_(_class_name="DiffusionPipeline"), "_class_name 'DiffusionPipeline' is not a noise scheduler lift3d "
                                                     "exports; valid: DDPMScheduler, FlowMatchEulerDiscreteScheduler"),
    ("flow", lambda v: {k: x for k, x in v.items() if k != "_class_name"}, "_class_name None is not a noise scheduler"),
    ("flow", lambda v: [v], "scheduler config must be a JSON object, got a list"),
]


@pytest.mark.parametrize("objective, change, message", SCHEDULERS, ids=[m[:40] for _, _, m in SCHEDULERS])
def test_a_scheduler_config_is_checked_by_lift3d_before_diffusers(exports, tmp_path, monkeypatch, objective, change,
                                                                  message):
    import diffusers

    for name in ("DDPMScheduler", "FlowMatchEulerDiscreteScheduler"):
        monkeypatch.setattr(getattr(diffusers, name), "from_config",
                            classmethod(lambda *a, **k: pytest.fail("diffusers saw the config")))
    folder = copy_of(exports, objective, tmp_path)
    edit(folder / SCHEDULER_CONFIG, change)
    with pytest.raises(Lift3dError) as refused:
        read_scheduler_config(folder)
    one_line(refused.value, str(folder / SCHEDULER_CONFIG), message)


# --------------------------------------------------------------------------------------------
# Export format versions and stage labels


@pytest.mark.parametrize("objective, change, message", [
    ("ddpm", with_(format=3), "format must be from 1 to 2 (the newest this lift3d reads), got 3"),
    ("flow", with_(format=10**30), "format must be from 1 to 2"),
    ("ddpm", with_(format=0), "format must be >= 1, got 0"),
    ("ddpm", with_(format="2"), "format must be an integer, got '2'"),
    ("ddpm", with_(format=True), "format must be an integer, got True"),
    ("flow", with_(format=1), "format 1 exports are ddpm exports, but objective is 'flow'"),
    ("ddpm", with_(stage="Volumes"), "stage must match"),
    ("ddpm", with_(stage="x" * 33), "stage must match"),
    ("ddpm", with_(stage="../slices"), "stage must match"),
])
def test_a_newer_format_or_a_bad_stage_label_is_refused(exports, tmp_path, objective, change, message):
    folder = copy_of(exports, objective, tmp_path)
    edit(folder / TRAINING_SETTINGS, change)
    with pytest.raises(Lift3dError) as refused:
        read_training_settings(folder)
    one_line(refused.value, str(folder / TRAINING_SETTINGS), message)


@pytest.mark.parametrize("objective, change", [
    ("ddpm", with_(stage="volumes")), ("ddpm", with_(stage="segmenter-2")), ("ddpm", with_(format=2)),
    ("ddpm", lambda v: {k: x for k, x in v.items() if k not in ("format", "stage")}), ("flow", with_(stage="volumes")),
], ids=["volumes", "registered-label", "ddpm-format-2", "no-format-no-stage", "flow-volumes"])
def test_what_lift3d_writes_or_wrote_still_reads(exports, tmp_path, objective, change):
    folder = copy_of(exports, objective, tmp_path)
    edit(folder / TRAINING_SETTINGS, change)
    assert read_training_settings(folder).conditioning == "concat"
    assert read_scheduler_config(folder)["num_train_timesteps"] == 1000


# --------------------------------------------------------------------------------------------
# An export agrees with itself: objective, scheduler class, prediction type, schedule


RELABELLED = [
    ("flow", TRAINING_SETTINGS, with_(objective="ddpm", format=1),
     "_class_name is 'FlowMatchEulerDiscreteScheduler', but the lift3d_training.json objective 'ddpm' trains with a "
     "DDPMScheduler"),
    ("flow", TRAINING_SETTINGS, with_(objective="ddpm", format=1, prediction_type="epsilon"),
     "_class_name is 'FlowMatchEulerDiscreteScheduler', but the lift3d_training.json objective 'ddpm'"),
    ("flow", TRAINING_SETTINGS, lambda v: {k: x for k, x in v.items() if k != "objective"}, "objective 'ddpm'"),
    ("ddpm", TRAINING_SETTINGS, with_(objective="flow", format=2, prediction_type="flow_prediction"),
     "_class_name is 'DDPMScheduler', but the lift3d_training.json objective 'flow' trains with a "
     "FlowMatchEulerDiscreteScheduler"),
    ("ddpm", TRAINING_SETTINGS, with_(prediction_type="v_prediction"),
     "prediction_type is 'v_prediction', but its objective 'ddpm' on the schedule of"),
    ("flow", TRAINING_SETTINGS, with_(prediction_type="epsilon"), "predicts 'flow_prediction'"),
    ("ddpm", TRAINING_SETTINGS, with_(objective="nope", format=2), "Unknown objective 'nope'; available: ddpm, flow"),
    ("ddpm", TRAINING_SETTINGS, with_(objective_options={"train_steps": 10**9}),
     "objective option train_steps must be an integer from 1 to the 1000 training timesteps"),
    ("flow", TRAINING_SETTINGS, with_(objective_options={"shift": 5.0}), "does not fit the lift3d_training.json"),
    ("ddpm", TRAINING_SETTINGS, with_(objective_options={"cheat": 1}), "objective_options {\"cheat\": 1} are not"),
    ("ddpm", SCHEDULER_CONFIG, with_(prediction_type="sample"), "the ddpm objective predicts epsilon or v_prediction"),
    ("ddpm", SCHEDULER_CONFIG, with_(rescale_betas_zero_snr=True),
     "rescale_betas_zero_snr is true, but the lift3d_training.json objective 'ddpm' trains with false"),
    ("ddpm", SCHEDULER_CONFIG, with_(clip_sample=True), "clip_sample is true, but"),
    ("ddpm", SCHEDULER_CONFIG, lambda v: {k: x for k, x in v.items() if k != "clip_sample"},
     "clip_sample is missing (diffusers reads true), but the lift3d_training.json objective 'ddpm' trains with false"),
    ("ddpm", SCHEDULER_CONFIG, with_(steps_offset=1), "steps_offset is 1, but"),
    ("ddpm", SCHEDULER_CONFIG, with_(variance_type="learned_range"), "variance_type is \"learned_range\", but"),
    ("ddpm", SCHEDULER_CONFIG, with_(thresholding=True), "thresholding is true, but"),
    ("flow", SCHEDULER_CONFIG, with_(use_dynamic_shifting=True), "use_dynamic_shifting is true, but"),
    ("flow", SCHEDULER_CONFIG, with_(invert_sigmas=True), "invert_sigmas is true, but"),
]


@pytest.mark.parametrize("objective, name, change, message", RELABELLED, ids=[m[:40] for *_, m in RELABELLED])
def test_an_export_that_contradicts_itself_is_refused(exports, tmp_path, objective, name, change, message):
    folder = copy_of(exports, objective, tmp_path)
    edit(folder / name, change)
    for read in (read_training_settings, read_scheduler_config, lambda f: load_synthesis_model(f, device="cpu")):
        with pytest.raises(Lift3dError) as refused:
            read(folder)
        one_line(refused.value, str(folder), message)


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_an_export_as_written_agrees_with_itself(exports, objective):
    model = load_synthesis_model(exports[objective], device="cpu")
    assert model.objective.name == objective and model.scheduler_config["_class_name"] == \
        type(model.objective.scheduler).__name__


# --------------------------------------------------------------------------------------------
# Library refusals in lift3d's words: the file, the key, and diffusers' reason quoted last


@pytest.mark.parametrize("change, message", [
    ({"down_block_types": ["Evil", "DownBlock2D"]}, "down_block_types holds a value diffusers does not build a "
                                                    "UNet2DModel from (diffusers: Evil does not exist.)"),
    ({"act_fn": "evil"}, "act_fn holds a value diffusers does not build a UNet2DModel from"),
    ({"time_embedding_type": "evil"}, "diffusers cannot build a UNet2DModel from it; a block type, activation or "
                                      "embedding name in it is not one diffusers knows"),
    ({"up_block_types": ["UpBlock2D"]}, "up_block_types must name one block per width of block_out_channels (2), got 1"),
    ({"in_channels": 3}, "diffusion_pytorch_model.safetensors (for the model config.json describes) has tensors of "
                         "the wrong shape: conv_in.weight"),
], ids=["block-type", "activation", "embedding", "block-count", "weights-of-another-shape"])
def test_a_config_diffusers_refuses_is_told_by_file_and_key(exports, tmp_path, change, message):
    folder = copy_of(exports, "ddpm", tmp_path)
    edit(folder / "config.json", with_(**change))
    with pytest.raises(Lift3dError) as refused:
        load_unet2d(folder)
    one_line(refused.value, str(folder), message)


@pytest.mark.parametrize("key, value", [("kind", "not json"), ("kernel_size", "{"), ("where", '"x')])
def test_volumetric_metadata_that_is_not_json_is_one_line_naming_the_key(unet2d, tmp_path, key, value):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    lift3d.inflate(unet2d, "full")
    path = lift3d.save_volumetric(unet2d, tmp_path / "volumetric.safetensors")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    save_file(load_file(str(path)), str(path), metadata={**metadata, key: value})
    with pytest.raises(Lift3dError) as refused:
        lift3d.load_volumetric(unet2d, path)
    one_line(refused.value, str(path), f"its metadata key {key!r} is not JSON")
