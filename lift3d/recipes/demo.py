"""``lift3d demo``: the fit recipe (``lift3d.recipes.fit``) on real brain anatomy (``icbm152``), on a CPU, in minutes.

The demo is ``lift3d fit`` at its own scale: stage 1 (slice-wise diffusion) -> inflate -> stage 2 (volumetric
fine-tuning, the step best on the validation subjects exported) -> the few-step sampler chosen on validation
within 8 U-Net passes -> the chosen model distilled into a one- or two-pass student (published when it comes
within 0.1 dB of the sampler on validation) -> the held-out subjects synthesised and scored, slice-wise and lifted
with the same seed: the mean of K samples and their per-voxel std (an uncertainty map) -> figures, the report and
the subjects as a ``paired-nifti`` folder. The data are subjects made from the ICBM 152 2009c template that ships
with lift3d (``--dataset phantom``: the generated phantom instead).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lift3d.evaluation.figures import save_orthogonal_views
from lift3d.evaluation.metrics import INTENSITY_RULE
from lift3d.evaluation.report import SubjectViews, write_report
from lift3d.io.writing import write_text_atomic
from lift3d.recipes.folders import write_pairs, write_predictions, write_std
from lift3d.recipes.plan import Plan, StageTwoVariant

DATASETS = ("icbm152", "phantom")


@dataclass(frozen=True)
class DemoScale:
    """The demo's subjects and its plan (``lift3d.recipes.plan.Plan`` fields beyond the defaults)."""

    num_train: int
    num_val: int  # validation subjects: every choice of the fit is made on them
    num_test: int  # held-out subjects, synthesised and scored
    plan: dict[str, Any] = field(default_factory=dict)
    stage2: dict[str, Any] = field(default_factory=dict)  # the one stage-2 variant (StageTwoVariant fields)
    voxel_mm: int = 4  # icbm152: the generation voxel (the packaged template is 2 mm)


QUICK = {"size": 16, "num_slices": 8, "widths": [16, 32], "stage1_steps": 4, "stage1_batch": 8, "stage2_steps": 2,
         "stage2_val_every": 1, "solver_steps": [2, 4], "solver_samples": [1, 2], "distill": ["direct"],
         "distill_steps": 2, "distill_val_every": 1}
SCALES = {
    "icbm152": {
        # Stage 2 (volumetric layers only, 600 steps, cosine decay from lr 2e-3) as chosen on the validation
        # subjects val-00..02 (seeds 1500-1502), never on the demo's test subjects (seeds 2000-2005); 2.5D stage 1.
        "default": DemoScale(num_train=13, num_val=3, num_test=6, stage2={"lr_scheduler": "cosine"},
                             plan={"size": 32, "num_slices": 24, "stage1_steps": 1000, "stage2_steps": 600,
                                   "stage2_val_every": 100, "stage2_lr": 2e-3, "source_context": 1,
                                   "distill_steps": 150, "distill_val_every": 50}),
        # Seconds: for tests and a first look.
        "quick": DemoScale(num_train=2, num_val=1, num_test=1, voxel_mm=8, stage2={"lr_scheduler": "cosine"},
                           plan={**QUICK, "source_context": 1}),
    },
    "phantom": {
        # 16 slices of 32 x 32: lifting does not pay off at this size (README).
        "default": DemoScale(num_train=8, num_val=1, num_test=2,
                             plan={"size": 32, "num_slices": 16, "widths": [32, 64], "stage1_steps": 400,
                                   "stage2_steps": 120, "stage2_val_every": 40, "stage2_lr": 1e-4,
                                   "distill_steps": 60, "distill_val_every": 20}),
        "quick": DemoScale(num_train=3, num_val=1, num_test=1, plan=QUICK),
    },
}


def check_choice(what: str, value: str, valid) -> str:
    if value not in valid:
        raise ValueError(f"Unknown demo {what} {value!r}; available: {', '.join(valid)}")
    return value


def dataset_options(dataset: str, scale: DemoScale, seed: int) -> dict:
    """The dataset plugin's options beyond the grid (the plan adds it); ``split`` is added by whoever reads it."""
    if dataset == "phantom":
        n = scale.num_train + scale.num_val + scale.num_test
        return {"seed": seed, "num_subjects": n, "val_size": scale.num_val, "test_size": scale.num_test}
    return {"seed": seed, "num_train": scale.num_train, "num_val": scale.num_val, "num_test": scale.num_test,
            "voxel_mm": scale.voxel_mm}


def demo_plan(scale: DemoScale, seed: int) -> Plan:
    """The fit's plan at the demo's scale: one stage-2 variant (the low-rank layer, inflate's default)."""
    return Plan(seed=seed, stage2_variants=[StageTwoVariant(**scale.stage2)], **scale.plan)


def set_threads(threads: int | str | None) -> None:
    if threads == "auto":
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load < cores:
            return
        threads = 1
        print(f"[demo] load average {load:.1f} on {cores} CPU cores: 1 torch thread (choose with --threads N)")
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer or 'auto', got {threads!r}")
    torch.set_num_threads(threads)


def run_demo(out: str | Path, *, dataset: str = "icbm152", scale: str = "default", seed: int = 0,
             threads: int | str | None = "auto") -> dict:
    """Run the fit recipe at the demo's scale into ``out``; returns the paths written and the metrics.

    Everything that can be refused (the options, the seed, the data) is checked before ``out`` is made. A re-run
    into the same ``out`` keeps every phase already done (the fit's phases are keyed and resumable).

    ``threads``: torch's CPU threads; None keeps torch's default; ``"auto"`` (the default) is torch's
    default unless the machine is busy (1-minute load average >= its CPU count), then 1: on 2 cores
    shared with other jobs, 2 threads made a stage-1 step 17x slower than 1 thread (5.7 s against 0.34 s).
    """
    from lift3d.recipes.fit import FitRequest, run_fit

    check_choice("dataset", dataset, DATASETS)
    check_choice("scale", scale, SCALES[dataset])
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be a whole number from 0 to {2**32 - 1}, got {seed!r}")
    set_threads(threads)
    s, out = SCALES[dataset][scale], Path(out)
    plan = demo_plan(s, seed)
    start = time.perf_counter()
    what = "ICBM 152 subjects (real anatomy)" if dataset == "icbm152" else "the phantom"
    print(f"[demo] lift3d fit on {what}: {s.num_train} training, {s.num_val} validation and {s.num_test} test "
          f"subjects, {plan.num_slices} slices of {plan.size} x {plan.size}; stage 1 ({plan.stage1_steps} steps"
          + (f", 2.5D: {2 * plan.source_context + 1} source slices per target slice" if plan.source_context else "")
          + f"), stage-2 volumetric fine-tuning ({plan.stage2_steps} steps, the step best on validation exported), "
          f"the sampler chosen on validation, distillation, synthesis and evaluation")
    fitted = run_fit(FitRequest(out, "T1", "T2", dataset=dataset, options=dataset_options(dataset, s, seed),
                                seed=seed, plan=plan))
    print("[demo] the subjects, the synthesised volumes, figures and the report")
    write_subjects(out / "data", fitted)
    summary = demo_summary(dataset, scale, seed, s, fitted)
    summary["wall_s"] = time.perf_counter() - start
    files = write_outputs(out, dataset, fitted, summary)
    print_report(files, summary)
    return {"files": files, "summary": summary}


def write_subjects(folder: Path, fitted) -> Path:
    """Every subject of the demo (training, validation and test) as a ``paired-nifti`` folder on the training grid:
    ``T1.nii.gz``, ``T2.nii.gz`` and, where the dataset has one, ``brainmask.nii.gz`` per subject."""
    for split in ("train", "val", "test"):
        write_pairs(folder, fitted.ctx.pairs(split), source="T1", target="T2")
    return folder


def demo_methods(fitted) -> dict[str, Any]:
    """The methods the demo shows: slice-wise and lifted with the chosen sampler, and the distilled student."""
    methods = {"slice-wise": fitted.slice_wise, "lifted": fitted.lifted}
    if fitted.student is not None:
        methods["lifted-student"] = fitted.student
    return methods


def demo_summary(dataset: str, scale: str, seed: int, s: DemoScale, fitted) -> dict:
    """``metrics.json``: the settings, the choices, and the scores per method and per subject."""
    results, plan = fitted.results["methods"], fitted.ctx.plan
    summary = {"dataset": dataset, "scale": scale, "seed": seed, "intensity_scale": INTENSITY_RULE,
               "scored_inside": "the brain mask" if dataset == "icbm152" else "the whole volume",
               "sampler": fitted.lifted.description, "published": fitted.published.name,
               "settings": {**plan.model_dump(mode="json", exclude={"why"}), "num_train": s.num_train,
                            "num_val": s.num_val, "num_test": s.num_test, "samples": fitted.lifted.samples},
               "methods": {m: results[m]["summary"] for m in results},
               "subjects": {m: results[m]["subjects"] for m in results},
               "seconds_per_volume": {m: results[m]["seconds_per_volume"] for m in results},
               "unet_evaluations": {m: results[m]["unet_evaluations"] for m in results},
               "samplers": {m: results[m]["solver"] for m in results}}
    if all("clean_target" in results[m] for m in results):
        summary["methods_vs_clean_target"] = {m: results[m]["clean_target"]["summary"] for m in results}
        summary["subjects_vs_clean_target"] = {m: results[m]["clean_target"]["subjects"] for m in results}
    return summary


def write_outputs(out: Path, dataset: str, fitted, summary: dict) -> dict[str, Any]:
    """Each method's mean (and std) as ``synthesis/<method>/<subject>_synth.nii.gz`` on the training grid (what
    ``lift3d-evaluate`` re-scores), a figure per test subject, ``metrics.json`` and the report."""
    test, methods = fitted.ctx.pairs("test"), demo_methods(fitted)
    predictions = {name: fitted.predictor(method, test) for name, method in methods.items()}  # the fit's samples
    nifti, figures, views = [], [], {}
    modality = "T1 -> T2" if dataset == "icbm152" else "phantom T1 -> T2"
    for i, pair in enumerate(test):
        means = {name: p.mean[i, 0].float().numpy() for name, p in predictions.items()}
        stds = {name: p.std[i, 0].float().numpy() for name, p in predictions.items() if p.std is not None}
        for name in methods:
            nifti += map(str, write_predictions(out / "synthesis" / name, [pair], {pair.subject: means[name]}))
            if name in stds:
                nifti.append(str(write_std(out / "synthesis" / name / "std", pair, stds[name])))
        views[pair.subject] = SubjectViews(pair.target[0].numpy(), means, source=pair.source[0].numpy(), stds=stds,
                                           spacing=pair.meta.grid_spacing)
        figure = out / "evaluation" / "figures" / f"{pair.subject}.png"
        figure.parent.mkdir(parents=True, exist_ok=True)
        save_orthogonal_views(figure, {"source": pair.source[0].numpy(), **means, "target": pair.target[0].numpy()},
                              title=f"{pair.subject} ({dataset} test): {modality}, {summary['sampler']}",
                              error_of=[(name, "target") for name in methods],
                              uncertainty={"lifted": stds["lifted"]} if "lifted" in stds else None,
                              spacing=pair.meta.grid_spacing)
        figures.append(str(figure))
    metrics = out / "evaluation" / "metrics.json"
    write_text_atomic(metrics, json.dumps(summary, indent=2, default=str))
    rows = [{"method": m, **row} for m, per_subject in summary["subjects"].items() for row in per_subject]
    from lift3d.recipes.fit_report import uncertainty_lines

    report = write_report(out / "evaluation" / "report.html", rows, views=views,
                          notes=uncertainty_lines(fitted.results["methods"]),
                          title=f"lift3d demo: {dataset} test subjects, {summary['sampler']}")
    return {"model": str(out / "model"), "nifti": nifti, "figures": figures, "metrics": str(metrics),
            "report": str(report), "data": str(out / "data")}


def print_report(files: dict, summary: dict) -> None:
    print("\nlift3d demo: done")
    print(f"  model (safetensors):  {files['model']}")
    print(f"  synthesised NIfTI:    {', '.join(files['nifti'][:4])}{' ...' if len(files['nifti']) > 4 else ''}")
    print(f"  metrics JSON:         {files['metrics']}")
    print(f"  orthogonal views PNG: {', '.join(files['figures'])}")
    print(f"  report (a browser):   {files['report']}")
    print(f"  subjects (paired-nifti, with masks): {files['data']}")
    tables = [("target", summary["methods"])]
    if "methods_vs_clean_target" in summary:
        tables.append(("clean target (before its bias field and noise)", summary["methods_vs_clean_target"]))
    n = summary["methods"]["lifted"]["psnr"]["n"]
    for against, methods in tables:
        print(f"\n  against the {against}: mean over {n} held-out volumes, inside {summary['scored_inside']}, [0, 255]")
        print("  method              MAE     SSIM     PSNR   z-inconsistency   U-Net passes   s / volume")
        for method, stats in methods.items():
            values = [stats[k]["mean"] for k in ("mae", "ssim", "psnr", "z_inconsistency")]
            print(f"  {method:<14}" + "".join(f"{v:9.3f}" for v in values[:3]) + f"{values[3]:12.3f}"
                  + f"{summary['unet_evaluations'][method]:15d}{summary['seconds_per_volume'][method]:13.2f}")
    print("  (z-inconsistency: lower = fewer jumps between slices; U-Net passes per volume, all samples together)")
    print("  samplers, chosen on the validation subjects: "
          + "; ".join(f"{m}: {text}" for m, text in summary["samplers"].items())
          + f"; the published model: {summary['published']}")
    z = {m: summary["methods"][m]["z_inconsistency"]["mean"] for m in ("slice-wise", "lifted")}
    change = z["lifted"] / z["slice-wise"] - 1.0
    print(f"\n  lifted vs slice-wise: z-inconsistency {change:+.1%}, "
          f"PSNR {summary['methods']['lifted']['psnr']['mean'] - summary['methods']['slice-wise']['psnr']['mean']:+.2f} dB")
