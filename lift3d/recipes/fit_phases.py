"""The training, selection and scoring phases of ``lift3d.recipes.fit.fit``, one function each."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from lift3d.evaluation.metrics import METRICS, PLANE_METRICS, paired_differences, summarize
from lift3d.io.writing import make_folder, refuse_link, write_text_atomic
from lift3d.recipes.fit_setup import FitContext
from lift3d.recipes.methods import Method, Prediction, Predictor, score_subjects, scored
from lift3d.recipes.plan import StageTwoVariant
from lift3d.recipes.predict import FIT_FILE



def _train(ctx: FitContext, stage: str, folder: Path, stage1_model: Path | None = None,
           variant: StageTwoVariant | None = None) -> Path:
    from lift3d.training.loop import train

    recipe = ctx.recipe(variant.overrides() if variant else None)
    cfg = stage_config_for(recipe, stage, folder, ctx.plan.seed, stage1_model)
    return train(cfg)


def stage_config_for(recipe, stage: str, folder: Path, seed: int, stage1_model: Path | None):
    from lift3d.recipes.make_a_volume import stage_config

    cfg = stage_config(recipe, stage, folder, seed, stage1_model)
    cfg.run.overwrite = True  # the phase folder is new: only this phase writes there
    return cfg


def train_stages(ctx: FitContext) -> tuple[Method, dict[str, Method]]:
    """Stage 1, then one stage-2 run per variant of the plan; each keyed on what it depends on."""
    plan = ctx.plan
    grid = plan.data_options()
    key1 = {"data": ctx.data, "train": ctx.splits["train"], "grid": grid, "widths": plan.widths,
            "layers": plan.layers_per_block, "objective": plan.objective, "seed": plan.seed,
            "steps": plan.stage1_steps, "batch": plan.stage1_batch, "lr": plan.stage1_lr}
    key1 |= {"source_context": plan.source_context} if plan.source_context else {}

    def stage1_work(folder: Path) -> dict[str, Any]:
        ctx.request.log(f"[stage 1] {plan.stage1_steps} steps x {plan.stage1_batch} slices")
        return {"model": str(_train(ctx, "slices", folder))}

    record1 = ctx.phases.run("stage1", key1, stage1_work)
    # the model is where the phase writes it, whatever its record says
    stage1 = Method("slice-wise", ctx.phases.folder("stage1") / "model", record1["run_id"])
    stage2: dict[str, Method] = {}
    for i, variant in enumerate(plan.stage2_variants):
        key2 = {"stage1": record1["run_id"], "variant": variant.overrides(), "steps": plan.stage2_steps,
                "val": ctx.splits["val"], "val_every": plan.stage2_val_every, "lr": plan.stage2_lr}

        def stage2_work(folder: Path, variant=variant) -> dict[str, Any]:
            ctx.request.log(f"[stage 2, {variant.name()}] {plan.stage2_steps} steps, validation every "
                            f"{plan.stage2_val_every}")
            return {"model": str(_train(ctx, "volumes", folder, stage1.folder, variant)), "variant": variant.name()}

        record2 = ctx.phases.run(f"stage2-{i}", key2, stage2_work)
        stage2[variant.name()] = Method("lifted", ctx.phases.folder(f"stage2-{i}") / "model", record2["run_id"])
    return stage1, stage2


def _selection_solver(ctx: FitContext, model: Path) -> dict[str, Any]:
    """The objective's few-step preset (one sample): how stage-2 variants are compared on validation."""
    from lift3d.diffusion.export import read_training_settings
    from lift3d.diffusion.objectives import OBJECTIVES, objective_name

    preset = dict(OBJECTIVES.get(objective_name(read_training_settings(model).objective)).fast)
    return {"solver": preset["solver"], "steps": int(preset["steps"])}


def validation_psnr(predictor: Predictor, method: Method, pairs) -> float:
    return summarize(score_subjects(Prediction(predictor(method, pairs).mean, None, 0.0), pairs))["psnr"]["mean"]


def choose_stage2(ctx: FitContext, stage1: Method, stage2: dict[str, Method], predictor: Predictor,
                  val) -> tuple[Method, Method]:
    """The stage-2 variant whose export scores best on validation; it and the slice-wise model, with the
    selection solver. Says so when no variant beats slice-wise there."""
    solver = _selection_solver(ctx, stage1.folder)
    scores = {name: validation_psnr(predictor, replace(m, **solver), val) for name, m in stage2.items()}
    slice_wise_psnr = validation_psnr(predictor, replace(stage1, **solver), val)
    best = max(scores, key=lambda name: scores[name])
    ctx.request.log(f"[choose stage 2] validation PSNR: slice-wise {slice_wise_psnr:.2f}, "
                    + ", ".join(f"{n} {s:.2f}" for n, s in scores.items()) + f"; chosen: {best}")
    if scores[best] <= slice_wise_psnr:
        ctx.request.log("  WARNING: no stage-2 variant beat slice-wise on validation PSNR")
    write_text_atomic(ctx.request.out / "choose_stage2.json", json.dumps(
        {"solver": solver, "validation_psnr": scores, "slice_wise_psnr": slice_wise_psnr, "chosen": best}, indent=1))
    return replace(stage2[best], **solver), replace(stage1, **solver)


def solver_candidates(objective: str, plan) -> list[dict[str, Any]]:
    """Every registered solver of ``objective`` at the plan's steps and sample counts within its budget; K >= 2
    also in antithetic pairs (``plan.solver_antithetic``) where the solver is deterministic."""
    from lift3d.sampling.solvers import SOLVERS, solvers_for

    return [{"solver": name, "steps": steps, "samples": k, "antithetic": anti}
            for name in solvers_for(objective) for steps in plan.solver_steps for k in plan.solver_samples
            for anti in antithetic_options(plan, k, SOLVERS.get(name).stochastic)
            if steps * k <= plan.evaluation_budget]


def antithetic_options(plan, samples: int, stochastic: bool = False) -> tuple[bool, ...]:
    """Independent samples, and antithetic pairs too where the plan tries them, K >= 2 and the solver is
    deterministic."""
    return (False, True) if plan.solver_antithetic and samples >= 2 and not stochastic else (False,)


def choose_solver(ctx: FitContext, lifted: Method, predictor: Predictor, val) -> Method:
    """The solver, steps and sample count best on validation PSNR within the plan's evaluation budget (ties:
    fewer network passes)."""
    from lift3d.io.errors import Lift3dError

    rows = []
    for candidate in solver_candidates(ctx.plan.objective, ctx.plan):
        method = replace(lifted, **candidate)
        try:
            psnr = validation_psnr(predictor, method, val)
        except Lift3dError as exc:  # e.g. a multistep solver that needs more steps than given
            ctx.request.log(f"  {method.description}: skipped ({exc})")
            continue
        rows.append({**candidate, "evaluations": method.evaluations, "val_psnr": psnr})
        ctx.request.log(f"  {method.description}: {method.evaluations} passes, validation PSNR {psnr:.2f}")
    best = max(rows, key=lambda r: (r["val_psnr"], -r["evaluations"]))
    chosen = replace(lifted, **{k: best[k] for k in ("solver", "steps", "samples", "antithetic")})
    ctx.request.log(f"[choose solver] {chosen.description} ({best['evaluations']} passes per volume, budget "
                    f"{ctx.plan.evaluation_budget})")
    write_text_atomic(ctx.request.out / "choose_solver.json", json.dumps({"candidates": rows, "chosen": best},
                                                                         indent=1))
    return chosen


def _write_nifti(folder: Path, pairs, prediction: Prediction) -> None:
    from lift3d.data.nifti import save_volume
    from lift3d.sampling.synthesis import save_std_volume

    for i, pair in enumerate(pairs):  # named as lift3d-synthesize names its outputs, for lift3d-evaluate
        save_volume(make_folder(folder) / f"{pair.subject}_synth.nii.gz", prediction.mean[i], pair.meta)
        if prediction.std is not None:
            save_std_volume(make_folder(folder, "std") / f"{pair.subject}_std.nii.gz", prediction.std[i, 0], pair.meta)


def _paired(results: dict[str, Any], comparisons: list[tuple[str, str]]) -> dict[str, Any]:
    scores = {**METRICS, **PLANE_METRICS}
    return {f"{b} vs {a}": paired_differences(results[a]["subjects"], results[b]["subjects"], metrics=scores)
            for b, a in comparisons if a in results and b in results}


def score_test(ctx: FitContext, slice_wise: Method, lifted: Method, predictor: Predictor,
               student: Method | None = None) -> dict[str, Any]:
    """The test subjects (``slice_wise`` sampled as ``lifted`` is): each method's prediction as NIfTI on the
    subject's own grid, every score, the paired differences of lifted against slice-wise (and of the distilled
    student and the baseline), ``results.json`` and ``report.html``."""
    from lift3d.recipes.fit_report import write_results

    test = ctx.pairs("test")
    methods = [lifted, slice_wise]
    methods += [student] if student is not None else []
    baseline = train_baseline(ctx) if ctx.plan.baseline else None
    if baseline is not None:
        predictor.baseline = baseline
        methods.append(Method("3d-unet", None))
    predictions: dict[str, Prediction] = {}
    results: dict[str, Any] = {}
    for method in methods:
        ctx.request.log(f"[test] {method.name}: {method.description}")
        predictions[method.name] = predictor(method, test)
        results[method.name] = scored(method, predictions[method.name], test)
        _write_nifti(ctx.request.out / "test" / method.name, test, predictions[method.name])
    paired = _paired(results, [("lifted", "slice-wise"), ("lifted", "3d-unet"), ("lifted-student", "lifted"),
                               ("lifted-student", "3d-unet")])
    return write_results(ctx, results, paired, predictions, test)


def train_baseline(ctx: FitContext):
    """MONAI's 3D U-Net, L1 from source to target, the weights best on validation; keyed and resumable."""
    from safetensors.torch import load_file, save_file

    from lift3d.recipes.unet3d import build_unet3d, train_unet3d

    plan = ctx.plan
    net, description = build_unet3d(plan.baseline_features)
    key = {"data": ctx.data, "model": description, "steps": plan.baseline_steps, "batch": plan.baseline_batch,
           "lr": plan.baseline_lr, "seed": plan.seed}

    def work(folder: Path) -> dict[str, Any]:
        ctx.request.log(f"[3D U-Net] {plan.baseline_steps} steps x {plan.baseline_batch} volumes, L1")
        trained, info = train_unet3d(ctx.pairs("train"), ctx.pairs("val"), features=plan.baseline_features,
                                     steps=plan.baseline_steps, batch=plan.baseline_batch, lr=plan.baseline_lr,
                                     val_every=plan.baseline_val_every, seed=plan.seed, device=ctx.device)
        save_file({k: v.detach().cpu().contiguous() for k, v in trained.state_dict().items()},
                  str(folder / "model.safetensors"))
        return {"info": {k: v for k, v in info.items() if k != "history"}}

    ctx.phases.run("baseline", key, work)
    net.load_state_dict(load_file(str(ctx.phases.folder("baseline") / "model.safetensors")))
    return net.to(ctx.device).eval()


def publish_model(ctx: FitContext, lifted: Method, results: dict[str, Any]) -> Path:
    """``RUN/model``: the chosen lifted export, how to sample it, and its model card."""
    from lift3d.recipes.card import write_fit_card

    from lift3d.training.checkpoints import write_folder

    dest = refuse_link(ctx.request.out / "model", "the fit's model folder")
    for path in [lifted.folder, *lifted.folder.rglob("*")]:
        refuse_link(path, "a file of the chosen model")  # a copy must not bring in what a link points at
    choice = {"solver": lifted.solver, "steps": lifted.steps, "samples": lifted.samples,
              "antithetic": lifted.antithetic}

    def write(tmp: Path) -> None:
        shutil.copytree(lifted.folder, tmp)
        write_text_atomic(tmp / FIT_FILE, json.dumps(choice, indent=1) + "\n")
        write_fit_card(tmp, ctx, lifted, results)

    write_folder(dest, write)  # the new model replaces the old one whole, or not at all
    ctx.request.log(f"[model] {dest} (sampled with {lifted.description}; {dest / 'README.md'})")
    return dest
