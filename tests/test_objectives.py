"""Training objectives (ddpm, flow) as plugins; flow in both stages; inheritance; informed starts; few steps."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lift3d.diffusion.objectives import DDPMObjective, FlowMatchingObjective, create_objective
from lift3d.io.errors import Lift3dError
from lift3d.plugins import PluginManager, create, hookimpl
from lift3d.sampling.solvers import build_solver
from lift3d.sampling.synthesis import load_synthesis_model, synthesize, synthesize_posterior, unet_evaluations
from lift3d.training.loop import train
from tests.test_training import losses, tiny_cfg


def test_builtins_register_as_plugins():
    assert set(PluginManager(autoload=False).objectives.names()) >= {"ddpm", "flow"}
    assert isinstance(create("objectives", "flow"), FlowMatchingObjective)


def test_a_third_party_objective_registers_like_a_builtin():
    class Plugin:
        @hookimpl
        def lift3d_register_objectives(self, registry):
            registry.add("my-flow", FlowMatchingObjective)

    pm = PluginManager(autoload=False, extra_plugins=(Plugin(),))
    assert "my-flow" in pm.objectives.names()


def test_flow_forward_process_and_target_by_hand():
    objective = FlowMatchingObjective(num_train_timesteps=10)
    x0, eps = torch.full((1, 1, 2, 2), 2.0), torch.full((1, 1, 2, 2), -1.0)
    noisy, model_t = objective.noisy(x0, eps, torch.tensor([4]))  # s = (4 + 1) / 10 = 0.5
    assert torch.allclose(noisy, torch.full_like(x0, 0.5))  # 0.5 * 2 + 0.5 * -1
    assert model_t.tolist() == [5.0]
    assert torch.equal(objective.target(x0, eps, torch.tensor([4])), torch.full_like(x0, -3.0))
    # the exact velocity recovers x0 from any point of the path
    assert torch.allclose(objective.clean_estimate(torch.full_like(x0, -3.0), noisy, model_t[0]), x0)


def test_ddpm_clean_estimate_inverts_its_forward_process():
    for prediction_type in ("epsilon", "v_prediction"):
        objective = DDPMObjective(prediction_type=prediction_type)
        x0, eps, t = torch.randn(1, 1, 4, 4), torch.randn(1, 1, 4, 4), torch.tensor([600])
        noisy, model_t = objective.noisy(x0, eps, t)
        estimate = objective.clean_estimate(objective.target(x0, eps, t), noisy, model_t[0])
        assert torch.allclose(estimate, x0, atol=1e-4)


def test_step_matched_training_snaps_to_the_sampler_grid():
    objective = FlowMatchingObjective(train_steps=4)
    grid = (build_solver("flow", objective, dict(objective.scheduler.config), 4).timesteps - 1).round()
    snapped = objective.training_timesteps(torch.arange(1000))
    assert set(snapped.unique().tolist()) == set(grid.long().tolist())
    with pytest.raises(Lift3dError, match="train_steps must be an integer from 1 to the 1000"):
        FlowMatchingObjective(train_steps=0)


def test_unknown_objective_is_one_line():
    with pytest.raises(Lift3dError, match="Unknown objective 'rectified'; available: ddpm, flow"):
        create_objective("rectified", {})


@pytest.fixture(scope="module")
def flow_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    stage1 = train(tiny_cfg(root / "s1", run={"max_steps": 30, "log_every": 5}, diffusion={"objective": "flow"}))
    stage2 = train(tiny_cfg(root / "s2", stage="volumes", model={"pretrained": str(stage1)},
                            run={"max_steps": 3, "log_every": 1}, data={"batch_size": 1}))
    return root, stage1, stage2


def test_flow_trains_in_both_stages_and_stage2_inherits_it(flow_models):
    root, stage1, stage2 = flow_models
    rows = [float(r["loss"]) for r in losses(root / "s1") if r["loss"]]
    assert rows[-1] < rows[0]
    for folder in (stage1, stage2):
        settings = json.loads((folder / "lift3d_training.json").read_text())
        assert settings["objective"] == "flow" and settings["format"] == 2
        assert settings["prediction_type"] == "flow_prediction"
        assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == \
            "FlowMatchEulerDiscreteScheduler"


def test_stage2_refuses_a_contradicting_objective(flow_models, tmp_path):
    _, stage1, _ = flow_models
    with pytest.raises(ValueError, match="trained with objective 'flow', but this run says 'ddpm'"):
        train(tiny_cfg(tmp_path / "s2", stage="volumes", model={"pretrained": str(stage1)},
                       diffusion={"objective": "ddpm"}, data={"batch_size": 1}))


def test_flow_model_samples_in_few_steps_and_counts_them(flow_models):
    _, _, stage2 = flow_models
    model = load_synthesis_model(stage2, device="cpu")
    source = torch.rand(1, 1, 4, 16, 16) * 2 - 1
    calls = []
    hook = model.unet.register_forward_hook(lambda *a: calls.append(1))
    for solver, steps in (("flow", 1), ("flow", 2), ("dpm", 3)):
        calls.clear()
        out = synthesize_posterior(model, source, solver=solver, steps=steps, samples=2, progress=False)
        assert len(calls) == out.unet_evaluations == 2 * steps
        assert out.std is not None and float(out.std.mean()) > 0  # distinct samples, an uncertainty map
        assert out.mean.shape == source.shape and out.mean.abs().max() <= 1
    hook.remove()
    with pytest.raises(ValueError, match="solver 'ddim' does not sample a model trained with the 'flow' objective; "
                                         "valid: dpm, flow"):
        synthesize(model, source, solver="ddim", progress=False)
    with pytest.raises(ValueError, match="clip_x0 .* no x0 clipping"):
        synthesize(model, source, solver="flow", clip_x0=True, progress=False)


@pytest.mark.parametrize("start", ["estimate", "source"])
def test_informed_start_runs_the_last_part_of_the_schedule(flow_models, start):
    _, _, stage2 = flow_models
    model = load_synthesis_model(stage2, device="cpu")
    source = torch.rand(1, 1, 4, 16, 16) * 2 - 1
    calls = []
    hook = model.unet.register_forward_hook(lambda *a: calls.append(1))
    out = synthesize_posterior(model, source, solver="flow", steps=8, start=start, strength=0.25, samples=1,
                               progress=False)
    hook.remove()
    expected = 2 + (start == "estimate")
    assert len(calls) == out.unet_evaluations == expected
    assert unet_evaluations(model, "flow", 8, start=start, strength=0.25) == expected
    again = synthesize(model, source, solver="flow", steps=8, start=start, strength=0.25, samples=1,
                               progress=False)
    assert torch.equal(out.mean, again)  # seeded


def test_informed_start_on_a_ddpm_model(tmp_path):
    stage1 = train(tiny_cfg(tmp_path / "s1", run={"max_steps": 2}, model={"prediction_type": "v_prediction"}))
    model = load_synthesis_model(stage1, device="cpu")
    source = torch.rand(1, 1, 4, 16, 16) * 2 - 1
    out = synthesize_posterior(model, source, solver="dpm", steps=10, start="estimate", strength=0.3, samples=1,
                               progress=False)
    assert out.unet_evaluations == 4 and torch.isfinite(out.mean).all()


@pytest.mark.parametrize("options, message", [
    ({"start": "estimate"}, "needs strength in \\(0, 1\\)"),
    ({"start": "estimate", "strength": 1.0}, "needs strength in \\(0, 1\\)"),
    ({"start": "estimate", "strength": math.nan}, "needs strength"),
    ({"strength": 0.5}, "strength 0.5 is for an informed start"),
    ({"start": "middle"}, "start must be one of noise, estimate, source"),
])
def test_bad_start_options_are_one_line(flow_models, options, message):
    model = load_synthesis_model(flow_models[2], device="cpu")
    with pytest.raises(ValueError, match=message):
        synthesize(model, torch.zeros(1, 1, 4, 16, 16), solver="flow", progress=False, **options)


def test_cli_fast_preset_prints_evaluations_and_writes_mean_and_std(flow_models, tmp_path, capsys):
    import nibabel as nib
    import numpy as np

    from lift3d.cli.synthesize import main

    _, _, stage2 = flow_models
    source = tmp_path / "a.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((16, 16, 4), dtype=np.float32), np.diag([1, 1, 2, 1])),
             source)
    assert main(["--model", str(stage2), "--source", str(source), "--out", str(tmp_path / "out"), "--fast"]) == 0
    printed = capsys.readouterr().out
    # the flow preset chosen on validation: the mean of 2 Euler 4-step samples, a std map beside it
    assert "flow model, flow 4 steps" in printed and "2 samples" in printed and "8 U-Net evaluations per volume" in printed
    assert "s per volume" in printed
    assert (tmp_path / "out" / "a_synth.nii.gz").is_file() and (tmp_path / "out" / "std" / "a_std.nii.gz").is_file()
    assert main(["--model", str(stage2), "--source", str(source), "--out", str(tmp_path / "o2"),
                 "--solver", "ddim"]) == 2
    assert not (tmp_path / "o2").exists()
    assert "solver 'ddim' does not sample a model trained with the 'flow' objective" in capsys.readouterr().err


def test_step_matched_stage2_is_validated_with_its_own_sampler(flow_models, tmp_path, monkeypatch):
    import lift3d.sampling.synthesis as S

    _, stage1, _ = flow_models
    seen = []
    original = S.synthesize

    def recording(model, source, **options):
        seen.append((options["solver"], options["steps"]))
        return original(model, source, **options)

    monkeypatch.setattr(S, "synthesize", recording)
    data = {"batch_size": 1, "options": {"size": 16, "num_slices": 8, "num_subjects": 5, "val_size": 1}}
    train(tiny_cfg(tmp_path / "s2", stage="volumes", model={"pretrained": str(stage1)}, data=data,
                   run={"max_steps": 2, "validate_every": 1}, diffusion={"objective_options": {"train_steps": 2}}))
    assert seen and set(seen) == {("flow", 2)}
    settings = json.loads((tmp_path / "s2" / "model" / "lift3d_training.json").read_text())
    assert settings["objective_options"] == {"train_steps": 2}
