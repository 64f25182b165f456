"""Training stages are a registered kind (lift3d/training/stages/): a stage registered from outside lift3d is
offered by the config and the command line, sized by the memory check, and trained by the loop; each stage
refuses the options it ignores; no code outside the stage objects branches on a stage's name; and the docs'
table of built-in stages is the registry's."""

from __future__ import annotations

import ast
import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest
from torch import nn

import lift3d
from lift3d.io.budget import ENV as BUDGET_ENV
from lift3d.io.errors import BudgetError
from lift3d.plugins import using_plugins
from lift3d.training.config import ConfigError, TrainConfig, apply, refuse_ignored, validate
from lift3d.training.memory import check_memory
from lift3d.training.options import at_least, opt
from lift3d.training.stages import STAGES, Stage, get_stage
from lift3d.training.task import Task

ROOT = Path(__file__).resolve().parents[1]
BUILT_IN = {"autoencoder", "distill", "segmenter", "slices", "volumes"}
TINY_DATA = {"dataset": "phantom", "options": {"size": 16, "num_slices": 4, "num_subjects": 5}, "batch_size": 4}


# --------------------------------------------------------------------------------------------
# A toy stage, as a third party's one file would write it


@dataclasses.dataclass
class ToyConfig:
    scale: float = opt(1.0, "toy stage: the factor the linear model learns", rule=at_least(0))
    width: int = opt(1, "toy stage: how many times over the model's weight is counted by the memory check",
                     rule=at_least(1))


class Toy(Stage):
    """Learns ``y = scale * x`` on the mean of each slice: the smallest stage the loop can train."""

    summary = "a toy stage from the tests"
    section, options = "toy", ToyConfig
    export_label = "toy"
    reads = ("run", "data", "optim")
    ignores = ("data.window",)

    def view(self, cfg: Any, dataset) -> Any:
        from lift3d.training.data_order import IndexedView

        return IndexedView(dataset.slices())

    def memory(self, cfg: Any) -> tuple[int, int, str]:
        nbytes = 8 * cfg.toy.width
        return nbytes, nbytes, f"the toy model of toy.width = {cfg.toy.width}"

    def prepare(self, cfg: Any, dataset, output_dir: Path):
        view, scale = self.view(cfg, dataset), cfg.toy.scale

        def make_task(accelerator) -> Task:
            model = nn.Linear(1, 1, bias=False)
            nn.init.zeros_(model.weight)

            def loss(model, batch: dict, micro: int):
                x = batch["source"].float().mean(dim=(1, 2, 3))[:, None].to(accelerator.device)
                return ((model(x) - scale * x) ** 2).mean(), {}

            def export(model) -> Path:
                (output_dir / "model").mkdir(parents=True, exist_ok=True)
                path = output_dir / "model" / "toy.json"
                path.write_text(json.dumps({"stage": self.export_label, "weight": model.weight.item()}))
                return path.parent

            return Task(model, list(model.parameters()), view, loss, lambda model: {"val_weight": model.weight.item()},
                        export)

        return make_task


class ToyPlugin:
    @lift3d.hookimpl
    def lift3d_register_stages(self, registry):
        registry.add("toy", Toy)


@pytest.fixture
def toy():
    with using_plugins(ToyPlugin()):
        yield


def finetune(argv: list[str], capsys) -> tuple[int, str, str]:
    from lift3d.cli.finetune import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_registered_stage_is_offered_by_the_config_and_the_command_line(toy, capsys):
    assert "toy" in STAGES.names() and BUILT_IN <= set(STAGES.names())
    cfg = apply(TrainConfig(), {"run": {"stage": "toy"}, "toy": {"scale": 2.0}}, "test")
    assert validate(cfg).toy.scale == 2.0 and cfg.to_dict()["toy"] == {"scale": 2.0, "width": 1}
    with pytest.raises(ConfigError, match=r"toy.scale = -1.0 is not allowed; it must be >= 0"):
        apply(TrainConfig(), {"toy": {"scale": -1}}, "test")
    from lift3d.cli.finetune import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "--toy.scale" in text and "'toy' = a toy stage from the tests" in text
    code, _, err = finetune(["--run.stage", "toys"], capsys)
    assert code == 2 and "run.stage = 'toys' is not allowed; choose one of: autoencoder, distill, segmenter, slices, toy, " \
                          "volumes" in err


def test_without_the_plugin_the_stage_and_its_section_are_gone():
    assert "toy" not in STAGES.names()
    with pytest.raises(ConfigError, match=r"unknown section \[toy\]"):
        apply(TrainConfig(), {"toy": {"scale": 2.0}}, "test")


def test_the_memory_check_asks_the_stage(toy, monkeypatch):
    cfg = apply(TrainConfig(), {"run": {"stage": "toy"}, "toy": {"width": 10**9}}, "test")
    monkeypatch.setenv(BUDGET_ENV, "1GiB")
    with pytest.raises(BudgetError, match=r"the toy model of toy.width = 1000000000: its weights, gradients"):
        check_memory(cfg)
    cfg.toy.width = 1
    check_memory(cfg)


def test_the_loop_trains_a_registered_stage_through_the_command_line(toy, tmp_path, capsys):
    out = tmp_path / "toy"
    code, stdout, err = finetune(["--run.stage", "toy", "--toy.scale", "3", "--run.output_dir", str(out),
                                  "--run.max_steps", "40", "--run.checkpoint_every", "0", "--optim.learning_rate",
                                  "0.3", "--optim.lr_scheduler", "linear", "--run.tracker", "none",
                                  "--data.options", json.dumps(TINY_DATA["options"])], capsys)
    assert code == 0, err
    saved = json.loads((out / "model" / "toy.json").read_text())
    assert saved["stage"] == "toy" and abs(saved["weight"] - 3.0) < 0.3  # it learned y = 3 x, from weight 0
    assert "stage 'toy' on 1 process(es)" in stdout


# --------------------------------------------------------------------------------------------
# Options a stage ignores are refused, naming the stage


@pytest.mark.parametrize("stage, option, value, whose", [
    ("segmenter", "model.pretrained", "runs/stage1/model", ""),
    ("segmenter", "data.window", 8, ""),
    ("segmenter", "run.validate_every", 10, ""),
    ("segmenter", "lift.kind", "low-rank", " (an option of stage 'volumes')"),
    ("autoencoder", "diffusion.objective", "flow", ""),
    ("autoencoder", "segmenter.context", 2, " (an option of stage 'segmenter')"),
    ("slices", "lift.trainable", "all", " (an option of stage 'volumes')"),
    ("slices", "vae.latent_channels", 8, " (an option of stage 'autoencoder')"),
    ("volumes", "segmenter.dice_weight", 0.5, " (an option of stage 'segmenter')"),
])
def test_a_stage_refuses_an_option_it_ignores(stage, option, value, whose):
    section, name = option.split(".")
    cfg = apply(TrainConfig(), {"run": {"stage": stage}}, "test")
    apply(cfg, {section: {name: value}}, "test")
    with pytest.raises(ConfigError) as info:
        refuse_ignored(cfg)
    assert str(info.value).startswith(f"{option} = {value!r} is not used by stage {stage!r}{whose}; leave it at its "
                                      "default")


def test_options_at_their_default_or_read_by_the_stage_pass():
    cfg = apply(TrainConfig(), {"run": {"stage": "segmenter", "validate_every": 0},
                                "model": {"pretrained": ""}, "segmenter": {"context": 2}}, "test")
    refuse_ignored(cfg)  # defaults given explicitly, and the stage's own section
    refuse_ignored(apply(TrainConfig(), {"run": {"stage": "volumes"}, "lift": {"kind": "low-rank"},
                                         "data": {"window": 4}}, "test"))


def test_the_command_line_refuses_an_ignored_option_in_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "seg"
    code, _, err = finetune(["--run.stage", "segmenter", "--data.window", "8", "--run.output_dir", str(out)], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "data.window = 8 is not used by stage 'segmenter'" in err
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# Nothing outside the stage objects branches on a stage's name


def _branches_on_a_stage_name(path: Path, root: Path = ROOT) -> list[str]:
    """Comparisons (==, !=, in) of anything with a built-in stage's name: what a stage property should answer."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Compare):
            for side in [node.left, *node.comparators]:
                values = list(side.elts) if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                if any(isinstance(v, ast.Constant) and v.value in BUILT_IN for v in values):
                    found.append(f"{path.relative_to(root)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_code_branches_on_a_stage_name():
    assert set(STAGES.names()) >= BUILT_IN
    found = [line for path in sorted((ROOT / "lift3d").rglob("*.py")) for line in _branches_on_a_stage_name(path)]
    assert found == []


def test_the_branch_finder_finds_a_branch(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text('def f(cfg):\n    return 1 if cfg.run.stage == "volumes" else 2\n'
                     'def g(stage):\n    return stage in ("slices", "x") or stage != "autoencoder"\n')
    assert len(_branches_on_a_stage_name(probe, tmp_path)) == 3


def test_each_stage_lives_in_its_own_file_and_declares_what_it_reads():
    for name in BUILT_IN:
        stage = get_stage(name)
        module = type(stage).__module__
        assert module == f"lift3d.training.stages.{name}" and stage.export_label == name
        assert stage.summary and set(stage.reads) <= set(TrainConfig().sections())
        assert all(option.split(".")[0] in stage.reads for option in stage.ignores)


# --------------------------------------------------------------------------------------------
# The docs' table of built-in stages is the registry's


def test_the_docs_table_of_stages_is_the_registrys():
    text = (ROOT / "docs" / "pages" / "stages.md").read_text()
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| `([^`]+)` \| [^|]+ \| ([^|]+) \| [^|]+ \| `([^`]+)` \|$", text,
                      re.MULTILINE)
    assert {row[0] for row in rows} == BUILT_IN
    for name, path, section, label in rows:
        stage = get_stage(name)
        assert path == f"lift3d/training/stages/{name}.py" and (ROOT / path).is_file()
        assert section.strip() == (f"`[{stage.section}]`" if stage.section else "none")
        assert label == stage.export_label


def test_a_registered_object_that_is_no_stage_is_refused_by_name():
    class NotAStage:
        pass

    class Plugin:
        @lift3d.hookimpl
        def lift3d_register_stages(self, registry):
            registry.add("bogus", NotAStage)

    with using_plugins(Plugin()):
        with pytest.raises(ValueError, match=r"stage 'bogus' .* must be a subclass of lift3d.training.stages.Stage"):
            get_stage("bogus")
    assert "bogus" not in STAGES.names()  # the registry is clean again
