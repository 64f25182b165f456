"""Exports written before the package layout changed (and before the export settings had a format
field) still load and sample the same prediction. The fixture was written by that code: a tiny lifted
stage-2 export, a source, and the prediction that code made from it (DPM-Solver++, 3 steps, seed 0).

The prediction is compared to float rounding (1e-5 on a [-1, 1] image), not bit for bit: CPUs with
different vector units (AVX-512 against AVX2) round convolutions differently, so the same code gives
predictions that differ in the sixth decimal from one machine to the next. A wrong or missing weight,
lift or scheduler setting moves the prediction by orders of magnitude more."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from lift3d.diffusion.export import read_training_settings
from lift3d.sampling.synthesis import load_synthesis_model, synthesize

FIXTURE = Path(__file__).parent / "fixtures" / "export-v0"


def test_the_fixture_predates_the_format_field():
    assert "format" not in json.loads((FIXTURE / "model" / "lift3d_training.json").read_text())
    assert read_training_settings(FIXTURE / "model").format == 1


def test_an_old_export_loads_and_samples_the_same_prediction(one_thread):
    expected = load_file(str(FIXTURE / "expected.safetensors"))
    model = load_synthesis_model(FIXTURE / "model", device="cpu")
    prediction = synthesize(model, expected["source"], scheduler="dpm", steps=3, seed=0)
    torch.testing.assert_close(prediction, expected["prediction"], rtol=0, atol=1e-5)
