"""The distillation phase of a fit: the chosen lifted flow model distilled into one- or two-pass students, one
per family of the plan (``plan.distill``), each keyed and resumable; the best student on validation replaces
the chosen few-step sampler when it comes within ``plan.distill_tolerance_db`` of its validation PSNR.

A student is sampled with Euler in 1 step (K = 1 or 2 samples) or 2 steps (K = 1): at most 2 network passes
per volume. It still samples: K >= 2 gives a mean and a std map, as any lift3d model.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from lift3d.io.writing import write_text_atomic
from lift3d.recipes.fit_setup import FitContext
from lift3d.recipes.methods import Method, Predictor, solver_revision

STUDENT_SAMPLING = ((1, 1), (1, 2), (2, 1))
"""(Euler steps, samples K) a student is tried with on validation: 1 or 2 network passes per volume; K = 2 also in
antithetic pairs where the plan tries them (``plan.solver_antithetic``)."""


def train_student(ctx: FitContext, teacher: Method, family: str, student_steps: int = 1) -> Method:
    """One distillation run of ``teacher`` (its solver's steps as the teacher's Euler solve) into a student that
    samples in ``student_steps`` Euler steps, keyed on the teacher's training run and the plan's distillation
    settings."""
    from lift3d.recipes.make_a_volume import distill_config
    from lift3d.training.loop import train

    plan = ctx.plan
    key = {"teacher": teacher.run_id, "teacher_steps": teacher.steps, "family": family, "steps": plan.distill_steps,
           "lr": plan.distill_lr, "val_every": plan.distill_val_every, "val": ctx.splits["val"], "seed": plan.seed}
    k = plan.distill_teacher_samples
    key |= {"student_steps": student_steps} | solver_revision("flow")  # the Euler grid both sides are solved on
    key |= {"teacher_samples": k} if k > 1 else {}
    name = f"distill-{family}" + (f"-{student_steps}step" if student_steps > 1 else "") + (f"-mean{k}" if k > 1 else "")

    def work(folder: Path) -> dict[str, Any]:
        ctx.request.log(f"[distill, {family}] a {student_steps}-step student, {plan.distill_steps} steps from the "
                        f"teacher's Euler-{teacher.steps}" + (f", mean of {k}" if k > 1 else "")
                        + f", validation every {plan.distill_val_every}")
        cfg = distill_config(ctx.recipe(), folder, plan.seed, teacher.folder, family=family,
                             teacher_steps=teacher.steps, student_steps=student_steps, steps=plan.distill_steps,
                             learning_rate=plan.distill_lr, validate_every=plan.distill_val_every,
                             teacher_samples=k)
        cfg.run.overwrite = True  # the phase folder is new: only this phase writes there
        return {"model": str(train(cfg))}

    record = ctx.phases.run(name, key, work)
    return Method(f"lifted-{family}", ctx.phases.folder(name) / "model", record["run_id"], solver="flow")


def family_of(student: Method) -> str:
    """The family (its steps, its teacher's mean) a student's phase folder names: ``direct``, ``direct-2step``,
    ``reflow-mean2``..."""
    return student.folder.parent.name.removeprefix("distill-")


def choose_student(ctx: FitContext, chosen: Method, predictor: Predictor, val) -> tuple[Method, Method | None]:
    """The students of every family of the plan, tried on validation at 1 and 2 passes; returns the method the
    fit publishes (the best student when it comes within the tolerance of ``chosen``, else ``chosen``) and the
    best student (None when the plan distils nothing or the model is not a flow model)."""
    from lift3d.recipes.fit_phases import antithetic_options, validation_psnr

    plan = ctx.plan
    if not plan.distill or plan.objective != "flow":
        return chosen, None
    rows, best = [], None
    for family, student_steps in ((f, n) for f in plan.distill for n in plan.distill_student_steps):
        student = train_student(ctx, chosen, family, student_steps)
        for steps, samples, anti in ((n, k, a) for n, k in STUDENT_SAMPLING for a in antithetic_options(plan, k)):
            method = replace(student, steps=steps, samples=samples, antithetic=anti)
            psnr = validation_psnr(predictor, method, val)
            rows.append({"family": family_of(student), "steps": steps, "samples": samples, "antithetic": anti,
                         "evaluations": method.evaluations, "val_psnr": psnr})
            ctx.request.log(f"  {family_of(student)} student, {method.description}: {method.evaluations} passes, "
                            f"validation PSNR {psnr:.2f}")
            if best is None or (psnr, -method.evaluations) > (best[0], -best[1].evaluations):
                best = (psnr, method)
    reference = validation_psnr(predictor, chosen, val)
    wins = best[0] >= reference - plan.distill_tolerance_db
    student = replace(best[1], name="lifted-student")
    ctx.request.log(f"[choose student] {family_of(student)}, {student.description}: validation PSNR "
                    f"{best[0]:.2f} against {reference:.2f} for {chosen.description} ({chosen.evaluations} passes); "
                    + ("the student is published" if wins else
                       f"more than {plan.distill_tolerance_db:g} dB below: the few-step sampler is kept"))
    write_text_atomic(ctx.request.out / "choose_student.json", json.dumps(
        {"candidates": rows, "reference": {"method": chosen.description, "val_psnr": reference},
         "chosen": {"family": family_of(student), "steps": student.steps, "samples": student.samples,
                    "antithetic": student.antithetic, "val_psnr": best[0]},
         "tolerance_db": plan.distill_tolerance_db, "published": wins}, indent=1))
    return (student if wins else chosen), student
