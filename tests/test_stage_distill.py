"""The distillation stage: a lifted flow model distilled into a one- or two-step student, in the same loop,
exported like any stage; the student still samples (another seed, another volume)."""

from __future__ import annotations

import json

import pytest
import torch

from lift3d.io.errors import Lift3dError
from lift3d.sampling.synthesis import load_synthesis_model, synthesize_posterior
from lift3d.training.loop import train
from tests.test_objectives import flow_models  # noqa: F401  (the tiny stage-1 and stage-2 flow models)
from tests.test_training import losses, tiny_cfg


@pytest.mark.parametrize("family,teacher_samples,student_steps", [("reflow", 1, 1), ("direct", 1, 1), ("direct", 2, 1),
                                                                  ("direct", 1, 2)])
def test_a_lifted_flow_model_distils_into_a_student_that_still_samples(flow_models, family, teacher_samples,  # noqa: F811
                                                                       student_steps):
    root, _, stage2 = flow_models
    folder = root / f"distill-{family}-{teacher_samples}-{student_steps}"
    student = train(tiny_cfg(folder, stage="distill", model={"pretrained": str(stage2)},
                             run={"max_steps": 3, "log_every": 1}, data={"batch_size": 1},
                             distill={"family": family, "teacher_steps": 2, "student_steps": student_steps,
                                      "teacher_samples": teacher_samples}))
    rows = [float(r["loss"]) for r in losses(folder) if r["loss"]]
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(rows)))
    assert json.loads((student / "lift3d_training.json").read_text())["stage"] == "distill"
    model = load_synthesis_model(student, device="cpu")
    assert model.lifted and model.objective.name == "flow"
    source = torch.rand(1, 1, 8, 16, 16) * 2 - 1
    result = synthesize_posterior(model, source, samples=2, solver="flow", steps=student_steps, progress=False)
    assert result.unet_evaluations == 2 * student_steps
    assert result.std is not None and result.std.mean() > 0  # the samples differ


def test_distillation_needs_a_lifted_flow_teacher(flow_models, tmp_path):  # noqa: F811
    _, stage1, _ = flow_models
    with pytest.raises((Lift3dError, ValueError), match="distils a lifted flow model"):
        train(tiny_cfg(tmp_path / "d", stage="distill", model={"pretrained": str(stage1)}, run={"max_steps": 1},
                       data={"batch_size": 1}))
    with pytest.raises((Lift3dError, ValueError), match="needs model.pretrained"):
        train(tiny_cfg(tmp_path / "e", stage="distill", run={"max_steps": 1}, data={"batch_size": 1}))
