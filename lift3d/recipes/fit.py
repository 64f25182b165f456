"""Fit: the validated recipe, from a dataset (a folder of NIfTI pairs or any dataset plugin) to a scored,
reported model. ``lift3d fit --data FOLDER --source T1 --target T2 --out RUN`` runs it.

Phases, each keyed and resumable (``lift3d.recipes.phases``): fingerprint -> plan (``plan.json``,
editable) -> split (``lift3d.recipes.fit_setup``) -> stage 1 -> stage 2 (each variant of the plan, one
chosen on validation) -> the solver and sample count (chosen on validation within the evaluation budget) ->
optionally the 3D U-Net baseline -> the test subjects synthesised as NIfTI on their own grids -> scores with
paired intervals -> ``report.html``, and the chosen model in ``RUN/model`` with its model card
(``lift3d.recipes.fit_phases``). Nothing is chosen on the test subjects: validation picks, test reports.
"""

from __future__ import annotations

import os
from typing import Any

from lift3d.recipes.fit_phases import choose_solver, choose_stage2, publish_model, score_test, train_stages
from lift3d.recipes.fit_setup import FitContext, FitRequest, prepare
from lift3d.recipes.methods import Predictor

__all__ = ["FitContext", "FitRequest", "fit", "prepare"]


def fit(request: FitRequest) -> dict[str, Any]:
    """Run every phase of the fit (skipping those done with the same inputs); returns the results."""
    if request.device == "cpu":  # Accelerate would otherwise take a GPU
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    ctx = prepare(request)
    stage1, stage2 = train_stages(ctx)
    predictor = Predictor(ctx.plan.seed, ctx.device, request.out / "predictions")
    val = ctx.pairs("val")
    lifted, slice_wise = choose_stage2(ctx, stage1, stage2, predictor, val)
    chosen = choose_solver(ctx, lifted, predictor, val)
    results = score_test(ctx, slice_wise, chosen, predictor)
    publish_model(ctx, chosen, results)
    return results
