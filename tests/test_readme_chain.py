"""The README's commands, chained as a user types them after the demo, run at tiny scale (a quick demo and a
tiny plan.json written where the fit reads it): fit -> predict -> evaluate."""

from __future__ import annotations

import glob
import json
import re
import shlex
from pathlib import Path


from lift3d.cli.evaluate import main as evaluate
from lift3d.cli.main import main as lift3d
from lift3d.recipes.plan import Plan, StageTwoVariant, save_plan

ROOT = Path(__file__).resolve().parents[1]
TINY = Plan(size=16, num_slices=8, widths=[16, 32], stage1_steps=2, stage1_batch=4, stage2_steps=1,
            stage2_val_every=1, stage2_variants=[StageTwoVariant()], evaluation_budget=2, solver_steps=[1, 2],
            solver_samples=[1], val_size=1, test_size=1, distill=["direct"], distill_steps=1,
            distill_val_every=1)


def readme_commands(section: str) -> list[list[str]]:
    """The shell commands of the README's bash block under ``section``, continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    block = re.search(rf"## {re.escape(section)}.*?```bash\n(.*?)```", text, re.S).group(1)
    lines = [line for line in block.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]
    return [shlex.split(line) for line in lines]


def run(argv: list[str]) -> int:
    args = [match for arg in argv[1:] for match in (sorted(glob.glob(arg)) if "*" in arg else [arg])]
    return {"lift3d": lift3d, "lift3d-evaluate": evaluate}[argv[0]](args)


def test_the_readme_commands_run_as_written_after_the_demo(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert lift3d(["demo", "--scale", "quick", "--out", "demo-out"]) == 0
    commands = readme_commands("Your own data: fit, predict, evaluate")
    assert [c[:2] for c in commands] == [["lift3d", "fit"], ["lift3d", "predict"], ["lift3d-evaluate", "--pred"]]
    save_plan(TINY, Path("demo-fit"))  # what a user may edit; tiny here so the chain runs in seconds
    for command in commands:
        assert run(command) == 0, command
    summary = json.loads(Path("demo-eval/summary.json").read_text())
    assert summary["n_subjects"] == 1 and summary["metrics"]["psnr"]["n"] == 1
    assert Path("demo-eval/report.html").is_file() and Path("demo-fit/report.html").is_file()
