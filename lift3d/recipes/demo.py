"""``lift3d demo``: the whole Make-A-Volume pipeline on real brain anatomy (``icbm152``), on a CPU, in minutes.

stage 1 (slice-wise diffusion) -> inflate -> stage 2 (volumetric fine-tuning, the step best on the
validation subjects exported) -> synthesis of held-out volumes, slice-wise and lifted, with the same
seed: the mean of K samples and their per-voxel std (an uncertainty map) -> evaluation and figures. The data are
subjects made from the ICBM 152 2009c template that ships with lift3d (``--dataset phantom``: the
generated phantom instead).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lift3d.recipes.make_a_volume import Recipe, stage_config
from lift3d.training.config import TrainConfig
from lift3d.data import save_volume
from lift3d.evaluation.figures import save_orthogonal_views
from lift3d.evaluation.metrics import INTENSITY_RULE, summarize
from lift3d.evaluation.planes import score_pair_all
from lift3d.evaluation.report import SubjectViews, write_report
from lift3d.plugins import create
from lift3d.sampling.synthesis import load_synthesis_model, save_std_volume, synthesize_posterior
from lift3d.training.loop import train

DATASETS = ("icbm152", "phantom")


@dataclass(frozen=True)
class DemoScale:
    size: int
    num_slices: int
    stage1_steps: int
    stage2_steps: int
    sample_steps: int
    widths: tuple[int, ...]
    stage2_lr: float = 1e-4
    stage2_lr_scheduler: str = "constant"  # diffusers schedule over stage2_steps (OptimConfig.lr_scheduler)
    stage2_trainable: str = "volumetric"
    num_train: int = 8  # training subjects
    num_test: int = 2  # held-out subjects, synthesised and scored
    voxel_mm: int = 4  # icbm152: the generation voxel (the packaged template is 2 mm)
    num_val: int = 0  # validation subjects: stage 2 exports its step best on them (0: the last step)
    validate_every: int = 0  # stage-2 steps between validations (DPM-Solver++ 25, step 0 = stage 1 included)
    sampler: str = "ddim"
    samples: int = 1  # K: the mean of K samples is the prediction, their std the uncertainty map
    noise_correlation: float = 0.0  # rho across slices (synthesize's noise_correlation)
    source_context: int = 0  # 2.5D: stage 1 sees this many source slices on each side; stage 2 inherits it
    objective: str = "ddpm"  # or "flow" (flow matching: a few U-Net passes per volume)
    lift_kind: str = "low-rank"  # inflate's default (benchmarks/results/layer-kinds.md); "full" is the paper's layer


SCALES = {
    "icbm152": {
        # Stage 2 (volumetric layers only, 600 steps, cosine decay from lr 2e-3) chosen on the validation
        # subjects val-00..02 (seeds 1500-1502), never on the demo's test subjects (seeds 2000-2005): best
        # validation PSNR 23.47 (step 600) against 23.45 for lr 2e-3 constant (a lone peak at step 500) and
        # 23.12 for cosine from 4e-3, the benchmark's winner at 48 x 48 and 1200 steps; see the README.
        # Flow matching, sampled as the mean of 2 Euler 4-step samples (8 U-Net passes per volume): on the same
        # validation subjects 24.33 dB against 23.93 for v-prediction and the mean of 4 DPM-Solver++ 25 samples
        # (100 passes; benchmarks/demo_fast.py, benchmarks/results/demo_fast_cpu.json).
        "default": DemoScale(size=32, num_slices=24, stage1_steps=1000, stage2_steps=600, sample_steps=4,
                             widths=(16, 32, 64), stage2_lr=2e-3, stage2_lr_scheduler="cosine",
                             stage2_trainable="volumetric", num_train=13, objective="flow",
                             num_test=6, num_val=3, validate_every=100, sampler="flow", samples=2, source_context=1),
        # Seconds: for tests and a first look.
        "quick": DemoScale(size=16, num_slices=8, stage1_steps=4, stage2_steps=2, sample_steps=3, widths=(16, 32),
                           num_train=2, num_test=1, voxel_mm=8, num_val=1, validate_every=1, sampler="flow",
                           samples=2, source_context=1, stage2_lr_scheduler="cosine", objective="flow"),
    },
    "phantom": {
        # 16 slices of 32 x 32: lifting does not pay off at this size (README).
        "default": DemoScale(size=32, num_slices=16, stage1_steps=400, stage2_steps=120, sample_steps=50,
                             widths=(32, 64), num_train=8, num_test=2),
        "quick": DemoScale(size=16, num_slices=8, stage1_steps=4, stage2_steps=2, sample_steps=3, widths=(16, 32),
                           num_train=3, num_test=1),
    },
}


def check_choice(what: str, value: str, valid) -> str:
    if value not in valid:
        raise ValueError(f"Unknown demo {what} {value!r}; available: {', '.join(valid)}")
    return value


def dataset_options(dataset: str, scale: DemoScale, seed: int) -> dict:
    """The dataset plugin's options; ``split`` is added by whoever reads it."""
    common = {"size": scale.size, "num_slices": scale.num_slices, "seed": seed, "cache": True}
    if dataset == "phantom":
        n = scale.num_train + scale.num_test
        return common | {"num_subjects": n, "test_size": scale.num_test}
    return common | {"num_train": scale.num_train, "num_val": scale.num_val, "num_test": scale.num_test,
                     "voxel_mm": scale.voxel_mm}


def demo_recipe(scale: DemoScale, seed: int, dataset: str = "icbm152") -> Recipe:
    return Recipe(dataset=dataset, data_options=dataset_options(dataset, scale, seed), widths=scale.widths,
                  stage1_steps=scale.stage1_steps, stage2_steps=scale.stage2_steps,
                  source_context=scale.source_context, stage2_lr=scale.stage2_lr,
                  stage2_lr_scheduler=scale.stage2_lr_scheduler, stage2_trainable=scale.stage2_trainable,
                  objective=scale.objective,
                  stage2_lift={"kind": scale.lift_kind}, validate_every=scale.validate_every if scale.num_val else 0,
                  val_volumes=max(scale.num_val, 1), log_every=20, overwrite=True, name="demo")


def demo_config(out: Path, scale: DemoScale, stage: str, seed: int, dataset: str = "icbm152") -> TrainConfig:
    folder = out / ("stage1" if stage == "slices" else "stage2")
    return stage_config(demo_recipe(scale, seed, dataset), stage, folder, seed,
                        out / "stage1" / "model" if stage == "volumes" else None)


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
    """Run the pipeline into ``out``; returns the paths written and the metrics.

    ``threads``: torch's CPU threads; None keeps torch's default; ``"auto"`` (the default) is torch's
    default unless the machine is busy (1-minute load average >= its CPU count), then 1: on 2 cores
    shared with other jobs, 2 threads made a stage-1 step 17x slower than 1 thread (5.7 s against 0.34 s).
    """
    check_choice("dataset", dataset, DATASETS)
    check_choice("scale", scale, SCALES[dataset])
    set_threads(threads)
    s, out = SCALES[dataset][scale], Path(out)
    start = time.perf_counter()
    test = create("datasets", dataset, split="test", **dataset_options(dataset, s, seed))  # bad data fails here
    out.mkdir(parents=True, exist_ok=True)
    what = "ICBM 152 subjects (real anatomy)" if dataset == "icbm152" else "the phantom"
    print(f"[1/5] stage 1: slice-wise diffusion U-Net on {what}, {s.num_train} training subjects, "
          f"{s.num_slices} slices of {s.size} x {s.size} ({s.stage1_steps} steps"
          + (f"; 2.5D: {2 * s.source_context + 1} source slices per target slice)" if s.source_context else ")"))
    train(demo_config(out, s, "slices", seed, dataset))
    print(f"[2/5] + [3/5] inflate and stage-2 volumetric fine-tuning ({s.stage2_steps} steps, "
          f"trainable {s.stage2_trainable}, lr {s.stage2_lr:g} {s.stage2_lr_scheduler}"
          + (f"; the step best on {s.num_val} validation subjects is exported)" if s.num_val else ")"))
    model_dir = train(demo_config(out, s, "volumes", seed, dataset))

    names = {"ddim": "DDIM", "dpm": "DPM-Solver++", "flow": "flow Euler", "ddpm": "DDPM"}
    sampler = f"{names[s.sampler]}-{s.sample_steps}" + (
        f", mean of {s.samples}" if s.samples > 1 else "") + (f", rho {s.noise_correlation:g}" if s.noise_correlation else "")
    print(f"[4/5] synthesis of {len(test)} held-out volumes ({sampler}), slice-wise and lifted")
    model = load_synthesis_model(model_dir)
    synth_dir, eval_dir = out / "synthesis", out / "evaluation"
    rows: dict[str, list] = {"slice-wise": [], "lifted": []}
    clean_rows: dict[str, list] = {"slice-wise": [], "lifted": []}
    files = {"model": str(model_dir), "nifti": [], "figures": []}
    seconds: dict[str, list[float]] = {"slice-wise": [], "lifted": []}
    views: dict[str, SubjectViews] = {}
    evaluations: dict[str, int] = {}
    for pair in test:
        source = pair.source[None]
        outputs, stds = {}, {}
        for method, slice_wise in (("slice-wise", True), ("lifted", False)):
            tic = time.perf_counter()
            with torch.no_grad():
                estimate = synthesize_posterior(model, source, samples=s.samples, scheduler=s.sampler,
                                                steps=s.sample_steps, seed=seed, slice_wise=slice_wise,
                                                noise_correlation=s.noise_correlation, progress=True)
            seconds[method].append(time.perf_counter() - tic)
            evaluations[method] = estimate.unet_evaluations
            volume = estimate.mean[0]
            outputs[method] = volume[0].float().numpy()
            path = save_volume(synth_dir / f"{pair.subject}_{method}.nii.gz", volume, pair.meta)
            files["nifti"].append(str(path))
            if estimate.std is not None:
                stds[method] = estimate.std[0, 0].float().numpy()
                path = save_std_volume(synth_dir / "std" / f"{pair.subject}_{method}_std.nii.gz", estimate.std[0, 0],
                                       pair.meta)
                files["nifti"].append(str(path))
        for name, vol in (("source", pair.source), ("target", pair.target)):
            save_volume(synth_dir / f"{pair.subject}_{name}.nii.gz", vol, pair.meta)
        for method in rows:
            rows[method].append(score_pair_all(outputs[method], pair))
            if "clean_target" in pair.extra:
                clean_rows[method].append(score_pair_all(outputs[method], pair, "clean_target"))
        views[pair.subject] = SubjectViews(pair.target[0].numpy(), outputs, source=pair.source[0].numpy(), stds=stds,
                                           spacing=pair.meta.grid_spacing)
        figure = eval_dir / "figures" / f"{pair.subject}.png"
        figure.parent.mkdir(parents=True, exist_ok=True)
        modality = "T1 -> T2" if dataset == "icbm152" else "phantom T1 -> T2"
        save_orthogonal_views(figure, {"source": pair.source[0].numpy(), "slice-wise": outputs["slice-wise"],
                                       "lifted": outputs["lifted"], "target": pair.target[0].numpy()},
                              title=f"{pair.subject} ({dataset} test): {modality}, {sampler}",
                              error_of=[("slice-wise", "target"), ("lifted", "target")],
                              uncertainty={"lifted": stds["lifted"]} if stds else None, spacing=pair.meta.grid_spacing)
        files["figures"].append(str(figure))

    print("[5/5] evaluation")
    summary = {"dataset": dataset, "scale": scale, "seed": seed, "intensity_scale": INTENSITY_RULE,
               "scored_inside": "the brain mask" if dataset == "icbm152" else "the whole volume",
               "sampler": sampler,
               "settings": {"grid": f"{s.size} x {s.size} x {s.num_slices}", "widths": list(s.widths),
                            "stage1_steps": s.stage1_steps, "stage2_steps": s.stage2_steps,
                            "stage2_trainable": s.stage2_trainable, "stage2_lr": s.stage2_lr,
                            "stage2_lr_scheduler": s.stage2_lr_scheduler,
                            "stage2_validate_every": s.validate_every, "samples": s.samples,
                            "noise_correlation": s.noise_correlation, "source_context": s.source_context,
                            "num_train": s.num_train, "num_val": s.num_val, "num_test": s.num_test},
               "methods": {method: summarize(r) for method, r in rows.items()}, "subjects": rows,
               "seconds_per_volume": {m: sum(v) / len(v) for m, v in seconds.items()},
               "unet_evaluations": evaluations}
    if any(clean_rows.values()):
        summary["methods_vs_clean_target"] = {method: summarize(r) for method, r in clean_rows.items()}
        summary["subjects_vs_clean_target"] = clean_rows
    summary["wall_s"] = time.perf_counter() - start
    metrics_path = eval_dir / "metrics.json"
    tmp = metrics_path.with_name(".metrics.json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    tmp.replace(metrics_path)
    files["metrics"] = str(metrics_path)
    report_rows = [{"method": method, **row} for method, per_subject in rows.items() for row in per_subject]
    files["report"] = str(write_report(eval_dir / "report.html", report_rows, views=views,
                                       title=f"lift3d demo: {dataset} test subjects, {sampler}"))
    print_report(files, summary)
    return {"files": files, "summary": summary}


def print_report(files: dict, summary: dict) -> None:
    print("\nlift3d demo: done")
    print(f"  model (safetensors):  {files['model']}")
    print(f"  synthesised NIfTI:    {', '.join(files['nifti'])}")
    print(f"  metrics JSON:         {files['metrics']}")
    print(f"  orthogonal views PNG: {', '.join(files['figures'])}")
    print(f"  report (a browser):   {files['report']}")
    tables = [("target", summary["methods"])]
    if "methods_vs_clean_target" in summary:
        tables.append(("clean target (before its bias field and noise)", summary["methods_vs_clean_target"]))
    n = summary["methods"]["lifted"]["psnr"]["n"]
    for against, methods in tables:
        print(f"\n  against the {against}: mean over {n} held-out volumes, inside {summary['scored_inside']}, [0, 255]")
        print("  method           MAE     SSIM     PSNR   z-inconsistency   U-Net passes   s / volume")
        for method, stats in methods.items():
            values = [stats[k]["mean"] for k in ("mae", "ssim", "psnr", "z_inconsistency")]
            print(f"  {method:<11}" + "".join(f"{v:9.3f}" for v in values[:3]) + f"{values[3]:12.3f}"
                  + f"{summary['unet_evaluations'][method]:15d}{summary['seconds_per_volume'][method]:13.2f}")
    print("  (z-inconsistency: lower = fewer jumps between slices; U-Net passes per volume, all samples together)")
    z = {m: summary["methods"][m]["z_inconsistency"]["mean"] for m in ("slice-wise", "lifted")}
    change = z["lifted"] / z["slice-wise"] - 1.0
    print(f"\n  lifted vs slice-wise: z-inconsistency {change:+.1%}, "
          f"PSNR {summary['methods']['lifted']['psnr']['mean'] - summary['methods']['slice-wise']['psnr']['mean']:+.2f} dB")
