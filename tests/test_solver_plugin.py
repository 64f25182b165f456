"""A new solver is one new file: a hand-written Euler solver (no diffusers) registered from this test module
samples a flow model through the API and through ``lift3d-synthesize``, and the built-ins keep their contract."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import lift3d
from lift3d.cli.synthesize import OUTPUT_SUFFIX, main
from lift3d.diffusion.objectives import OBJECTIVES, create_objective
from lift3d.plugins.registry import filled_for_now
from lift3d.sampling.solvers import SOLVERS, Solver, build_solver, solvers_for
from lift3d.sampling.synthesis import load_synthesis_model, synthesize_posterior, unet_evaluations
from lift3d.training.config import TrainConfig
from lift3d.training.export import export_model
from lift3d.training.unets import build_autoencoder, build_objective, new_unet2d

SIZE, SLICES = 16, 4
SOLVERS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "pages" / "solvers.md"

pytestmark = pytest.mark.usefixtures("one_thread")


class ToyEuler(Solver):
    """Euler on a flow model's straight path, by hand: ``x <- x + (s_next - s) v`` on the uniform grid of ``s``
    the built-in Euler solver visits (``1, (N - 1) / N, ..., 1 / N``, then 0), so the two agree to float
    rounding."""

    inverts = {"flow": 3}
    needs_next_t = True
    informed_start = True
    summary = "a test's Euler, by hand"
    steps_taken = 0  # counts every step, to prove this solver ran

    def __init__(self, timesteps: torch.Tensor, num_train_timesteps: int) -> None:
        self.timesteps, self.num_train_timesteps = timesteps, num_train_timesteps

    @classmethod
    def build(cls, objective, scheduler_config, steps, *, device=None, clip_x0=False):
        T = objective.num_train_timesteps
        sigmas = torch.tensor([1 - i / steps for i in range(steps)], dtype=torch.float32)
        return cls((sigmas * T).to(device), T)

    def step(self, output, t, sample, *, t_next):
        ToyEuler.steps_taken += 1
        s_next = 0.0 if t_next is None else t_next / self.num_train_timesteps
        return sample + (s_next - t / self.num_train_timesteps) * output

    def noised(self, clean, noise, begin):
        s = self.timesteps[begin] / self.num_train_timesteps
        return (1 - s) * clean + s * noise


class ToyEulerFromNoise(ToyEuler):
    """The same, declaring no informed start."""

    informed_start = False


@pytest.fixture
def toy_euler():
    """``toy-euler`` registered as a solver file would register it, and removed again after the test."""

    def register(registry):
        if registry is SOLVERS:
            SOLVERS.register("toy-euler")(ToyEuler)  # a solver's own module: @SOLVERS.register("toy-euler")
            SOLVERS.register("toy-euler-from-noise")(ToyEulerFromNoise)

    ToyEuler.steps_taken = 0
    with filled_for_now(register):
        yield ToyEuler
    assert "toy-euler" not in SOLVERS and "toy-euler-from-noise" not in SOLVERS


def _export(folder, objective):
    cfg = TrainConfig()
    cfg.run.stage = "volumes"
    cfg.data.options = {"size": SIZE, "num_slices": SLICES}
    cfg.model.block_out_channels = [16, 32]
    cfg.diffusion.objective = objective
    torch.manual_seed(0)
    unet = lift3d.inflate(new_unet2d(cfg, 2, 1, SIZE))
    for _, layer in lift3d.volumetric_layers(unet):
        layer.init_random_(std=0.05, generator=torch.Generator().manual_seed(1))

    class Dataset:
        num_slices = SLICES

    return export_model(cfg, unet, build_autoencoder(cfg), build_objective(cfg), Dataset(), folder)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Untrained tiny exports, one per objective: sampling them is deterministic, which is all this needs."""
    root = tmp_path_factory.mktemp("solver-models")
    return {name: _export(root / name, name) for name in ("flow", "ddpm")}


@pytest.fixture(scope="module")
def source():
    return torch.rand(1, 1, SLICES, SIZE, SIZE, generator=torch.Generator().manual_seed(3)) * 2 - 1


def test_a_toy_solver_samples_through_the_api(toy_euler, models, source):
    model = load_synthesis_model(models["flow"], device="cpu")
    assert "toy-euler" in solvers_for("flow") and "toy-euler" not in solvers_for("ddpm")
    toy = synthesize_posterior(model, source, solver="toy-euler", samples=2, seed=4, progress=False)
    assert toy_euler.steps_taken == 2 * 3  # its default steps for flow, for each of the 2 samples
    assert toy.unet_evaluations == unet_evaluations(model, "toy-euler", samples=2) == 6
    # Euler by hand on the uniform grid: the same volumes as the built-in Euler solver, to float rounding
    builtin = synthesize_posterior(model, source, solver="flow", steps=3, samples=2, seed=4, progress=False)
    torch.testing.assert_close(toy.mean, builtin.mean, atol=1e-4, rtol=0)
    assert toy.std is not None and float(toy.std.mean()) > 0
    toy_euler.steps_taken = 0
    started = synthesize_posterior(model, source, solver="toy-euler", steps=8, start="estimate", strength=0.25,
                                   samples=1, progress=False)
    assert toy_euler.steps_taken == 2 and started.unet_evaluations == 3 and torch.isfinite(started.mean).all()
    with pytest.raises(ValueError, match="start = 'estimate' needs a solver that declares an informed start; "
                                         "solver 'toy-euler-from-noise' does not"):
        synthesize_posterior(model, source, solver="toy-euler-from-noise", start="estimate", strength=0.5,
                             progress=False)
    assert toy_euler.steps_taken == 2  # refused before any step


def test_a_toy_solver_samples_through_the_cli(toy_euler, models, tmp_path, capsys):
    path = tmp_path / "a.nii.gz"
    data = np.random.default_rng(0).random((SIZE, SIZE, SLICES), dtype=np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), path)
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "toy-euler: a test's Euler, by hand, deterministic (flow models)" in help_text
    assert "3 for toy-euler" in help_text
    out = tmp_path / "out"
    assert main(["--model", str(models["flow"]), "--source", str(path), "--out", str(out),
                 "--solver", "toy-euler"]) == 0
    assert "flow model, toy-euler 3 steps" in capsys.readouterr().out and toy_euler.steps_taken == 3
    written = nib.load(out / f"a{OUTPUT_SUFFIX}").get_fdata()
    assert written.shape == data.shape and np.isfinite(written).all() and written.std() > 0
    # a solver says which objectives it inverts: a ddpm model refuses it in one line
    assert main(["--model", str(models["ddpm"]), "--source", str(path), "--out", str(tmp_path / "o2"),
                 "--solver", "toy-euler"]) == 2
    assert "solver 'toy-euler' does not sample a model trained with the 'ddpm' objective; valid: ddim, ddpm, dpm" \
        in capsys.readouterr().err


def test_misuse_of_a_solver_is_one_line(models):
    objective = create_objective("flow", {})
    with pytest.raises(ValueError, match="solver 'ddim' does not sample .* 'flow' objective; valid: dpm, flow"):
        build_solver("ddim", objective, {})
    with pytest.raises(ValueError, match="clip_x0 .* \\(dpm on a 'flow' model\\); solver 'flow' has no x0 clipping"):
        build_solver("flow", objective, {}, clip_x0=True)
    with pytest.raises(ValueError, match="steps must be an integer from 1 to the 1000 training timesteps, got 0"):
        build_solver("flow", objective, {}, 0)


@pytest.mark.parametrize("name", ["ddim", "ddpm", "dpm", "flow"])
def test_builtins_declare_their_contract(name):
    cls = SOLVERS.get(name)
    assert issubclass(cls, Solver) and cls.summary and cls.inverts and cls.informed_start
    assert cls.stochastic == (name == "ddpm")  # only ancestral DDPM adds noise after the start
    for objective_name, steps in cls.inverts.items():
        solver = build_solver(name, create_objective(objective_name, {}), {}, 2)
        assert len(solver.timesteps) == 2 and steps >= 1


def test_every_objective_names_solvers_that_invert_it():
    for name in OBJECTIVES.names():
        objective = create_objective(name, {})
        assert objective.default_solver in solvers_for(objective.name)
        assert objective.fast["solver"] in solvers_for(objective.name)


def builtin_table() -> str:
    """The table of built-in solvers docs/pages/solvers.md shows, made from the registry."""
    rows = ["| solver | what it is | stochastic | objectives (default steps) | informed start | clip x0 |",
            "|---|---|---|---|---|---|"]
    for entry in SOLVERS.entries():
        if not entry.plugin.startswith("lift3d.sampling.solvers."):
            continue  # a test's or a plugin's, not a built-in
        cls = entry.factory
        inverts = ", ".join(f"`{o}` ({n})" for o, n in cls.inverts.items())
        rows.append(f"| `{entry.name}` | {cls.summary} | {'yes' if cls.stochastic else 'no'} | {inverts} | "
                    f"{'yes' if cls.informed_start else 'no'} | {'yes' if cls.clips_x0 else 'no'} |")
    return "\n".join(rows)


def test_the_docs_table_of_builtins_matches_the_registry():
    page = SOLVERS_PAGE.read_text()
    table = re.search(r"^\| solver \|.*?(?=\n\n)", page, re.S | re.M)
    assert table is not None, f"{SOLVERS_PAGE} has no table of built-in solvers"
    assert table.group(0) == builtin_table(), f"update the table in {SOLVERS_PAGE} to:\n{builtin_table()}"


def test_flow_euler_steps_on_the_uniform_grid():
    """2 Euler steps visit s = 1 and 1/2: diffusers' own grid (1, then 1/1000) would sample as 1 step does."""
    from lift3d.recipes.methods import solver_revision

    flow = create_objective("flow", {})
    assert build_solver("flow", flow, {}, steps=2).timesteps.tolist() == [1000.0, 500.0]
    assert build_solver("flow", flow, {}, steps=4).timesteps.tolist() == [1000.0, 750.0, 500.0, 250.0]
    assert solver_revision("flow") == {"solver_revision": 1} and solver_revision("ddim") == {}
    assert solver_revision(None) == {}  # the 3D U-Net: no solver
