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
from dataclasses import dataclass, replace
from typing import Any

from lift3d.recipes.fit_distill import choose_student
from lift3d.recipes.fit_phases import choose_solver, choose_stage2, publish_model, score_test, train_stages
from lift3d.recipes.fit_setup import FitContext, FitRequest, prepare
from lift3d.recipes.methods import Method, Predictor

__all__ = ["FitContext", "FitRequest", "Fitted", "fit", "prepare", "run_fit"]


@dataclass
class Fitted:
    """A finished fit: its context, the methods it chose and scored, their sampler (with its cache) and results."""

    ctx: FitContext
    predictor: Predictor
    slice_wise: Method  # the stage-1 model, sampled as ``lifted`` is
    lifted: Method  # the chosen stage-2 model with the chosen few-step sampler
    student: Method | None  # the best distilled student on validation, if the plan distils
    published: Method  # what RUN/model holds: the student when it won on validation, else ``lifted``
    results: dict[str, Any]


def fit(request: FitRequest) -> dict[str, Any]:
    """Run every phase of the fit (skipping those done with the same inputs); returns the results."""
    return run_fit(request).results


def run_fit(request: FitRequest) -> Fitted:
    """``fit``, returning the methods too (a benchmark scores and times them further)."""
    if request.device == "cpu":  # Accelerate would otherwise take a GPU
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    ctx = prepare(request)
    stage1, stage2 = train_stages(ctx)
    predictor = Predictor(ctx.plan.seed, ctx.device, request.out / "predictions")
    val = ctx.pairs("val")
    lifted, slice_wise = choose_stage2(ctx, stage1, stage2, predictor, val)
    chosen = choose_solver(ctx, lifted, predictor, val)
    published, student = choose_student(ctx, chosen, predictor, val)
    slice_wise = replace(slice_wise, solver=chosen.solver, steps=chosen.steps, samples=chosen.samples,
                         antithetic=chosen.antithetic)
    results = score_test(ctx, slice_wise, chosen, predictor, student)
    publish_model(ctx, published, results)
    return Fitted(ctx, predictor, slice_wise, chosen, student, published, results)
