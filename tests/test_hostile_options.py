"""Hostile options (issue 21): the config layer and the dataset options refuse what cannot work, in one line.

Non-finite floats, bools for numbers, non-strings for strings, empty paths, bad widths, a second
``--config``, and sizes past the memory budget; then property-based fuzzing of ``apply`` +
``validate`` and of the phantom dataset's options.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from lift3d.training.config import ConfigError, TrainConfig, apply, load_toml, unet2d_arguments, validate
from lift3d.training.memory import check_memory, model_memory
from lift3d.io.budget import ENV as BUDGET_ENV
from lift3d.io.budget import memory_budget
from lift3d.io.errors import BudgetError, Lift3dError
from tests.conftest import fuzz_examples

SMALL = ["--data.options", "{size = 16, num_slices = 4, num_subjects = 5}", "--model.block_out_channels", "[16, 32]",
         "--run.stage", "slices", "--run.max_steps", "1"]


def finetune(argv: list[str], capsys) -> tuple[int, str]:
    from lift3d.cli.finetune import main

    code = main(argv)
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    assert err.count("\n") == 1, err
    return err


def test_config_error_is_a_lift3d_error():
    assert issubclass(ConfigError, Lift3dError)


# ---------------------------------------------------------------------------------------------------------------
# 1. Non-finite floats, on the command line, in TOML, inside option tables and set in Python


@pytest.mark.parametrize("flag, value", [
    ("--optim.learning_rate", "inf"), ("--optim.weight_decay", "inf"), ("--optim.max_grad_norm", "nan"),
    ("--vae.kl_weight", "1e400"), ("--optim.ema_decay", "-inf"),
])
def test_non_finite_floats_are_refused_on_the_command_line(tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    code, err = finetune([*SMALL, "--run.output_dir", str(out), f"{flag}={value}"], capsys)
    assert code == 2
    assert f"{flag[2:]} = " in one_line(err) and "must be a finite number" in err
    assert not out.exists()


def test_non_finite_floats_are_refused_in_toml_and_inside_tables(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[optim]\nlearning_rate = inf\n")
    with pytest.raises(ConfigError, match=r"optim.learning_rate = inf is not allowed; .* must be a finite number"):
        apply(TrainConfig(), load_toml(path), str(path))
    with pytest.raises(ConfigError, match=r"data.options\['size'\] must be a finite number"):
        apply(TrainConfig(), {"data": {"options": {"size": float("nan")}}}, "test")
    with pytest.raises(ConfigError, match=r"lift.options\['a'\]\[1\] must be a finite number"):
        apply(TrainConfig(), {"lift": {"options": "{\"a\": [1, Infinity]}"}}, "command line")


def test_non_finite_floats_set_in_python_are_refused_by_validate():
    cfg = TrainConfig()
    cfg.optim.weight_decay = math.inf  # at_least(0) holds for inf: the finiteness check must come first
    with pytest.raises(ConfigError, match="optim.weight_decay = inf is not allowed"):
        validate(cfg)


# ---------------------------------------------------------------------------------------------------------------
# 2. Only a bool is a bool, only an int an int, only a str a str


@pytest.mark.parametrize("toml, message", [
    ("[run]\nmax_steps = true", "run.max_steps = True is not a valid int"),
    ("[run]\noutput_dir = [1, 2]", "run.output_dir = [1, 2] is not a valid str"),
    ("[run]\noutput_dir = 5", "run.output_dir = 5 is not a valid str"),
    ("[optim]\nlearning_rate = true", "optim.learning_rate = True is not a valid float"),
    ("[model]\nattention = 1", "model.attention = 1 is not a valid bool"),
    ("[run]\nmax_steps = 2.5", "run.max_steps = 2.5 is not a valid int"),
    ("[model]\nblock_out_channels = [true, 8]", "model.block_out_channels = [True, 8] is not a valid list of ints"),
    ("[model]\nblock_out_channels = [8.0, 16]", "model.block_out_channels = [8.0, 16] is not a valid list of ints"),
    ("[data]\noptions = 3", "data.options = 3 is not a valid dict"),
])
def test_wrong_kinds_in_toml_are_refused_and_create_nothing(tmp_path, capsys, monkeypatch, toml, message):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "c.toml"
    path.write_text(toml + "\n")
    code, err = finetune(["--config", str(path), *SMALL], capsys)
    assert code == 2 and message in one_line(err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]  # no folder named "[1, 2]" or "5"


def test_bools_set_in_python_are_refused_by_validate():
    cfg = TrainConfig()
    cfg.run.max_steps = True
    with pytest.raises(ConfigError, match="run.max_steps = True is not a valid int"):
        validate(cfg)


# ---------------------------------------------------------------------------------------------------------------
# 3. Empty paths


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_output_dir_is_refused(tmp_path, capsys, monkeypatch, value):
    monkeypatch.chdir(tmp_path)
    code, err = finetune([*SMALL, "--run.output_dir", value], capsys)
    assert code == 2 and f"run.output_dir = {value!r} is not allowed; it must be a path (not empty)" in one_line(err)
    assert list(tmp_path.iterdir()) == []


def test_empty_means_none_for_pretrained_and_resume_but_blank_does_not():
    cfg = apply(TrainConfig(), {"model": {"pretrained": ""}, "run": {"resume": ""}}, "test")
    assert cfg.model.pretrained == "" and cfg.run.resume == ""
    with pytest.raises(ConfigError, match="model.pretrained = ' ' is not allowed"):
        apply(TrainConfig(), {"model": {"pretrained": " "}}, "test")
    with pytest.raises(ConfigError, match="run.resume = 'a\\\\x00b' is not allowed"):
        apply(TrainConfig(), {"run": {"resume": "a\0b"}}, "test")
    with pytest.raises(ConfigError, match="data.dataset = '' is not allowed"):
        apply(TrainConfig(), {"data": {"dataset": ""}}, "test")


# ---------------------------------------------------------------------------------------------------------------
# 4. Widths


@pytest.mark.parametrize("value, message", [
    ("[]", "model.block_out_channels = [] is not allowed; it must be a list of 1 to 16 positive widths"),
    ("[8, -8]", "model.block_out_channels = [8, -8] is not allowed; it must be a list of 1 to 16 positive widths"),
    ("[12, 16]", "model.block_out_channels = [12, 16] is not allowed with model.norm_num_groups = 8"),
    ("[8, 4]", "the last width must be >= 8"),
    ("[8, \"x\"]", "is not a valid list of ints"),
])
def test_bad_unet_widths_are_one_line(tmp_path, capsys, value, message):
    out = tmp_path / "out"
    argv = [*SMALL, "--run.output_dir", str(out), "--model.block_out_channels", value, "--model.norm_num_groups",
            "4" if value == "[8, 4]" else "8"]
    code, err = finetune(argv, capsys)
    assert code == 2 and message in one_line(err)
    assert not out.exists()


def test_vae_widths_are_checked_in_the_autoencoder_stage():
    cfg = apply(TrainConfig(), {"run": {"stage": "autoencoder"}, "vae": {"block_out_channels": [8, 12],
                                                                         "norm_num_groups": 8}}, "test")
    with pytest.raises(ConfigError, match=r"vae.block_out_channels = \[8, 12\] is not allowed with "
                                          r"vae.norm_num_groups = 8: .* 12 is not"):
        validate(cfg)
    cfg.run.stage = "slices"  # the autoencoder stage's options do not matter to the other stages
    validate(cfg)
    with pytest.raises(ConfigError, match="vae.block_out_channels = \\[\\] is not allowed"):
        apply(TrainConfig(), {"vae": {"block_out_channels": []}}, "test")


# ---------------------------------------------------------------------------------------------------------------
# 5. A second --config


def test_a_second_config_is_refused(tmp_path, capsys):
    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text("[run]\nmax_steps = 1\n")
    b.write_text("[run]\nmax_steps = 2\n")
    code, err = finetune(["--config", str(a), "--config", str(b), "--run.output_dir", str(tmp_path / "o")], capsys)
    assert code == 2
    assert f"--config is given twice ({a} and {b}); lift3d reads one config file" in one_line(err)
    assert not (tmp_path / "o").exists()


def test_config_files_that_are_not_toml_text_are_one_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe[run]\n")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_toml(bad)
    bad.write_text("a = " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_toml(bad)
    with pytest.raises(ConfigError, match="it is a folder"):
        load_toml(tmp_path)
    with pytest.raises(ConfigError, match="--config is empty"):
        load_toml("")
    with pytest.raises(ConfigError, match=r"data.options = .* is not a valid dict"):
        apply(TrainConfig(), {"data": {"options": "[" * 100000}}, "command line")


# ---------------------------------------------------------------------------------------------------------------
# 6. Sizes past memory, refused before anything is allocated


def test_a_billion_diffusion_steps_is_refused(tmp_path, capsys):
    code, err = finetune([*SMALL, "--run.output_dir", str(tmp_path / "o"),
                          "--diffusion.num_train_timesteps", "1000000000"], capsys)
    assert code == 2
    assert "diffusion.num_train_timesteps = 1000000000 is not allowed; it must be from 1 to 100000" in one_line(err)


def test_the_noise_schedule_is_checked_against_the_budget(monkeypatch):
    monkeypatch.setenv(BUDGET_ENV, "1MiB")
    cfg = apply(TrainConfig(), {"diffusion": {"num_train_timesteps": 100_000}}, "test")
    with pytest.raises(BudgetError, match=r"diffusion.num_train_timesteps = 100000: the noise schedule's arrays need "
                                          r"6.1 MiB, more than the 1.0 MiB"):
        check_memory(validate(cfg))


@pytest.mark.parametrize("stage", ["slices", "volumes"])
def test_huge_unet_widths_are_refused_before_allocation(tmp_path, capsys, stage):
    code, err = finetune([*SMALL, "--run.stage", stage, "--run.output_dir", str(tmp_path / "o"),
                          "--model.block_out_channels", "[65536, 65536]"], capsys)
    assert code == 2
    assert "the U-Net of model.block_out_channels = [65536, 65536], layers_per_block = 1 (at least)" in one_line(err)
    assert "B, more than the" in err and "lift3d may use" in err
    assert not (tmp_path / "o").exists()


def test_a_huge_kernel_size_is_refused_before_allocation(tmp_path, capsys):
    code, err = finetune([*SMALL, "--run.stage", "volumes", "--run.output_dir", str(tmp_path / "o"),
                          "--lift.kernel_size", "2000001"], capsys)
    assert code == 2 and "kernel_size 2000001" in one_line(err) and "more than the" in err


def test_the_model_estimate_is_the_model_training_builds():
    from diffusers import UNet2DModel

    cfg = apply(TrainConfig(), {"run": {"stage": "slices"}, "model": {"block_out_channels": [16, 32],
                                                                    "attention": True}}, "test")
    weights, trained, _ = model_memory(cfg)
    real = UNet2DModel(**unet2d_arguments(cfg.model, 2, 1))  # concat: a 1-channel target and its source
    assert weights == trained == sum(p.numel() * 4 for p in real.parameters())
    cfg.run.stage = "volumes"  # stage 2 trains only the inserted layers by default
    weights2, trained2, what = model_memory(cfg)
    assert weights2 > weights and 0 < trained2 == weights2 - weights and "lift.kernel_size = 3" in what
    cfg.model.pretrained = "somewhere"  # a pretrained U-Net is measured where it is read
    assert model_memory(cfg) is None


def test_a_tight_budget_counts_gradients_and_adam_moments(monkeypatch):
    cfg = apply(TrainConfig(), {"run": {"stage": "slices"}, "model": {"block_out_channels": [16, 32]}}, "test")
    weights, _, _ = model_memory(cfg)
    monkeypatch.setenv(BUDGET_ENV, str(3 * weights))  # the weights fit, their optimizer state does not
    with pytest.raises(BudgetError, match="its weights, gradients and AdamW moments need"):
        check_memory(validate(cfg))
    monkeypatch.setenv(BUDGET_ENV, str(4 * weights + 10**6))
    check_memory(validate(cfg))


@pytest.mark.parametrize("stage", ["slices", "volumes", "autoencoder"])
@pytest.mark.parametrize("widths, layers, context", [([8], 1, 0), ([64, 8], 2, 3), ([8, 64, 8], 1, 1)])
def test_the_quick_lower_bound_never_refuses_what_fits(monkeypatch, stage, widths, layers, context):
    """Absurd widths are refused from a formula before the meta build; it must stay below the real size."""
    cfg = apply(TrainConfig(), {"run": {"stage": stage}, "model": {"block_out_channels": widths, "layers_per_block":
                layers, "source_context": context}, "vae": {"block_out_channels": widths, "layers_per_block": layers,
                "norm_num_groups": 8, "latent_channels": 16, "adversarial_weight": 0.1, "discriminator_width": 8}},
                "test")
    weights, trained, _ = model_memory(cfg)
    monkeypatch.setenv(BUDGET_ENV, str(weights + 3 * trained + 10**6))  # + the noise schedule
    check_memory(validate(cfg))


# ---------------------------------------------------------------------------------------------------------------
# 7. Dataset options


@pytest.mark.parametrize("options, message", [
    ("{num_slices = 100000000}", "phantom: num_slices = 100000000 and size = 64: a training grid of 100000000 x 64"),
    ("{size = 1000000}", "phantom: num_slices = 32 and size = 1000000"),
])
def test_huge_phantom_grids_are_one_line_naming_the_option(tmp_path, capsys, options, message):
    argv = [*SMALL, "--run.output_dir", str(tmp_path / "o"), "--data.options", options]
    code, err = finetune(argv, capsys)
    assert code == 2 and message in one_line(err) and "more than the" in err


def test_the_phantom_working_set_is_budgeted(monkeypatch):
    from lift3d_plugins.datasets.phantom import PhantomDataset

    monkeypatch.setenv(BUDGET_ENV, "8MiB")
    with pytest.raises(BudgetError, match=r"phantom: num_slices = 32 and size = 64 give 32 x 64 x 64 float32 voxels; "
                                          r"24 such volumes \(generating one subject\) need 12.0 MiB, more than the "
                                          r"8.0 MiB"):
        PhantomDataset(size=64, num_slices=32)
    with pytest.raises(BudgetError, match=r"248 such volumes \(generating one subject, and 32 cached\)"):
        PhantomDataset(size=32, num_slices=32, num_subjects=40, cache=True)
    PhantomDataset(size=32, num_slices=32)


@pytest.mark.parametrize("options, message", [
    ({"num_slices": True}, "num_slices must be a positive integer, got True"),
    ({"size": True}, "in-plane size must be an int or a pair"),
    ({"num_slices": 1e8}, "num_slices must be a positive integer, got 100000000.0"),
    ({"num_subjects": 10**12}, "phantom: num_subjects = 1000000000000: the subject names need"),
    ({"seed": -1}, "phantom: seed must be an integer >= 0, got -1"),
    ({"cache": "yes"}, "phantom: cache must be true or false"),
])
def test_bad_phantom_options_are_lift3d_errors(options, message):
    from lift3d_plugins.datasets.phantom import PhantomDataset

    with pytest.raises(Lift3dError) as info:
        PhantomDataset(**options)
    assert message in str(info.value)


def test_huge_icbm152_grids_are_refused():
    from lift3d_plugins.datasets.icbm152 import ICBM152Dataset

    with pytest.raises(BudgetError, match="icbm152: num_slices = 100000000 and size = 48"):
        ICBM152Dataset(num_slices=100_000_000)
    with pytest.raises(BudgetError, match="icbm152: num_slices = 24 and size = 1000000"):
        ICBM152Dataset(size=1_000_000)


def test_the_icbm152_template_working_set_is_budgeted(monkeypatch):
    from lift3d_plugins.datasets.icbm152 import ICBM152Dataset

    monkeypatch.setenv(BUDGET_ENV, "64MiB")
    with pytest.raises(BudgetError, match=r"icbm152: the template grid of 95 x 95 x 82 voxels .* 42 float32 volumes"):
        ICBM152Dataset()  # 36, and 6 for the tissue maps
    with pytest.raises(BudgetError, match=r"icbm152: the template grid of 95 x 95 x 82 voxels .* 36 float32 volumes"):
        ICBM152Dataset(tissue=False)


def _fake_subjects(root: Path, folders: list[str], files: list[str]) -> Path:
    for folder in folders:
        (root / folder).mkdir(parents=True)
        for name in files:
            (root / folder / name).write_bytes(b"")  # never opened: the sizes are refused first
    return root


@pytest.mark.parametrize("name, folders, files", [
    ("rire", [f"patient_00{i}" for i in range(1, 6)], ["mr_T1.nii.gz", "mr_T2.nii.gz"]),
    ("s2m", [f"p{i}" for i in range(1, 6)], ["SWI.nii.gz", "MRA.nii.gz"]),
])
def test_huge_file_dataset_grids_are_refused_before_reading(tmp_path, monkeypatch, name, folders, files):
    from lift3d.plugins import create

    root = _fake_subjects(tmp_path / "data", folders, files)
    with pytest.raises(BudgetError, match=f"{name}: num_slices = 100000000 and size = 64"):
        create("datasets", name, root=root, num_slices=100_000_000, size=64, test_size=1)
    monkeypatch.setenv(BUDGET_ENV, "1MiB")  # 6 working volumes of 16 x 64 x 64 float32 = 1.5 MiB
    with pytest.raises(BudgetError, match=rf"{name}: num_slices = 16 and size = 64 give 16 x 64 x 64 float32 voxels; "
                                          r"6 such volumes"):
        create("datasets", name, root=root, num_slices=16, size=64, test_size=1)


def test_timestep_samplers_refuse_sizes_past_the_budget():
    from lift3d.plugins import create

    sampler = create("timestep_samplers", "make-a-volume")
    with pytest.raises(BudgetError, match="timestep weights over num_train_timesteps = 1000000000000 need"):
        sampler(1, 4, 10**12)
    with pytest.raises(BudgetError, match="timesteps for num_volumes = 1000000 x num_slices = 100000000 need"):
        create("timestep_samplers", "uniform-slice")(10**6, 10**8, 1000)
    with pytest.raises(Lift3dError, match="num_slices must be a positive integer, got True"):
        sampler(1, True, 1000)


# ---------------------------------------------------------------------------------------------------------------
# 8. `lift3d plugins` lists the layer kinds


def test_plugins_command_lists_layer_kinds(capsys):
    from lift3d.layers import registry as layer_kinds
    from lift3d.cli.main import main

    assert main(["plugins", "--kind", "layer_kinds"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("layer_kinds:\n")
    assert {line.split()[0] for line in out.splitlines()[1:] if line.strip()} == set(layer_kinds.names())
    assert main(["plugins"]) == 0 and "\nlayer_kinds:\n" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------------
# 9. Fuzzing: every random set of options is accepted, or refused with a Lift3dError naming the option

SECTIONS = {name: [f.name for f in dataclasses.fields(obj)] for name, obj in
            ((f.name, getattr(TrainConfig(), f.name)) for f in dataclasses.fields(TrainConfig))}
SCALARS = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, 2, 3, 8, 16, 32, 65536, 10**9]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["", "inf", "nan", "-inf", "1e400", "true", "[]", "[8, -8]", "[16, 32]", "{}", "{a = nan}",
                     "latest", "slices", "volumes", "autoencoder", "none", "tensorboard", "csv"]),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=6), inner, max_size=4)),
                      max_leaves=12)
OPTIONS = st.sampled_from(sorted(SECTIONS)).flatmap(
    lambda section: st.tuples(st.just(section), st.sampled_from(SECTIONS[section] + ["bogus"])))
DEFAULTS = {(f.name, g.name): getattr(getattr(TrainConfig(), f.name), g.name)
            for f in dataclasses.fields(TrainConfig) for g in dataclasses.fields(getattr(TrainConfig(), f.name))}
WIDTHS = st.sampled_from([8, 16, 32, 12, 65536, 2**40, 0, -8])


def plausible(option: tuple[str, str]) -> st.SearchStrategy:
    """Values of the option's own kind, near its default or far past any sensible size."""
    default = DEFAULTS.get(option)
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return st.one_of(st.integers(min_value=-2, max_value=2 * default + 3),
                         st.sampled_from([10**5, 10**6, 10**9, 2**63, 10**30]))
    if isinstance(default, float):
        return st.one_of(st.floats(min_value=0, max_value=1), st.sampled_from([math.inf, -math.inf, math.nan, 1e308]))
    if isinstance(default, list):
        return st.lists(WIDTHS, min_size=0, max_size=5)
    if isinstance(default, dict):
        return st.dictionaries(st.sampled_from(["size", "num_slices", "rank", "heads", "groups"]), SCALARS, max_size=3)
    return st.one_of(st.just(default), st.text(max_size=4))


TABLES = st.lists(OPTIONS.flatmap(lambda option: st.tuples(st.just(option), st.one_of(VALUES, plausible(option)),
                                                           st.booleans())), max_size=6)

_kinds = {"bool": bool, "int": int, "float": float, "str": str}
FUZZ_EXAMPLES = fuzz_examples(300)


def _check_types(cfg: TrainConfig) -> None:
    """What ``apply`` + ``validate`` let through has the declared kind: no bool for an int, no inf, no list for a str."""
    for section in SECTIONS:
        obj = getattr(cfg, section)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            kind = _kinds.get(f.type if isinstance(f.type, str) else f.type.__name__)
            if kind is not None:
                assert type(value) is kind, (section, f.name, value)
            if kind is float:
                assert math.isfinite(value)
            if isinstance(value, str) and f.name == "output_dir":
                assert value.strip()


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(TABLES)
def test_fuzz_apply_and_validate(monkeypatch, entries):
    monkeypatch.setenv(BUDGET_ENV, "256MiB")
    values: dict = {}
    for (section, name), value, as_text in entries:
        if as_text and not isinstance(value, str):  # as the command line gives it
            value = json.dumps(value) if isinstance(value, (list, dict)) else str(value)
        values.setdefault(section, {})[name] = value
    cfg = TrainConfig()
    try:
        check_memory(validate(apply(cfg, values, "fuzz")))
    except BudgetError as exc:
        event("refused: over the budget")
        assert "need" in str(exc) and "lift3d may use" in str(exc) and "\n" not in str(exc)
    except ConfigError as exc:
        event("refused: ConfigError")
        message = str(exc)
        assert "\n" not in message
        named = [f"{s}.{n}" for s in SECTIONS for n in SECTIONS[s]] + ["fuzz: unknown", "fuzz: ["]
        assert any(n in message for n in named), message
    else:
        event("accepted")
        _check_types(cfg)


GRID_SIZES = st.one_of(st.sampled_from([1, 2, 4, 8, 16, 32, 10**6, 10**8]), st.integers(min_value=-8, max_value=2**40), st.booleans(), st.floats(allow_nan=True),
                       st.text(max_size=3), st.none(),
                       st.tuples(st.integers(min_value=-8, max_value=2**30), st.integers(min_value=-8, max_value=512)),
                       st.lists(st.integers(min_value=0, max_value=64), max_size=3))
PHANTOM_OPTIONS = st.fixed_dictionaries({}, optional={
    "size": GRID_SIZES, "num_slices": GRID_SIZES, "multiple": GRID_SIZES, "num_subjects": GRID_SIZES,
    "seed": GRID_SIZES, "cache_size": GRID_SIZES,
    "test_size": st.one_of(GRID_SIZES, st.floats(min_value=-1, max_value=2)),
    "val_size": st.one_of(GRID_SIZES, st.floats(min_value=-1, max_value=2)),
    "cache": st.one_of(st.booleans(), st.integers(0, 1), st.text(max_size=3)),
    "split": st.sampled_from(["train", "val", "test", "all", "bogus", 3, None]),
    "slice_axis": st.sampled_from(["axial", "coronal", "sagittal", "oblique", ["axial"], None]),
    "source": st.sampled_from(["T1", "T2", "PD", 1]),
})
PHANTOM_EXAMPLES = fuzz_examples(400)


@settings(max_examples=PHANTOM_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(PHANTOM_OPTIONS)
def test_fuzz_phantom_options(monkeypatch, options):
    from lift3d_plugins.datasets.phantom import WORKING_VOLUMES, PhantomDataset

    monkeypatch.setenv(BUDGET_ENV, "64MiB")
    try:
        dataset = PhantomDataset(**options)
    except Lift3dError as exc:
        event(f"refused: {type(exc).__name__}")
        assert "\n" not in str(exc) and str(exc)
    else:
        event("accepted")
        assert 4 * math.prod(dataset.grid.shape) * WORKING_VOLUMES <= memory_budget()
        assert len(dataset) >= 1
