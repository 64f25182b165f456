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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lift3d.evaluation.figures import save_orthogonal_views
from lift3d.evaluation.metrics import INTENSITY_RULE, summarize
from lift3d.evaluation.planes import score_pair_all
from lift3d.evaluation.report import SubjectViews, write_report
from lift3d.plugins import create
from lift3d.recipes.make_a_volume import CHAIN, Recipe, chain_configs, link_of
from lift3d.recipes.folders import write_pairs, write_predictions, write_std
from lift3d.sampling.synthesis import load_synthesis_model, synthesize_posterior
from lift3d.training.config import TrainConfig
from lift3d.training.loop import check_config, train

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
    """The config of one stage of the demo's chain (``CHAIN``), run into
    ``out/<its folder>`` from the previous stage's model."""
    configs = chain_configs(demo_recipe(scale, seed, dataset), out, seed)
    return configs[CHAIN.index(link_of(stage))]


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

    Everything that can be refused (the options, the seed, the data, every stage's config) is checked before
    ``out`` is made, and a failure that leaves ``out`` empty removes it again.

    ``threads``: torch's CPU threads; None keeps torch's default; ``"auto"`` (the default) is torch's
    default unless the machine is busy (1-minute load average >= its CPU count), then 1: on 2 cores
    shared with other jobs, 2 threads made a stage-1 step 17x slower than 1 thread (5.7 s against 0.34 s).
    """
    check_choice("dataset", dataset, DATASETS)
    check_choice("scale", scale, SCALES[dataset])
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed must be a whole number from 0 to {2**32 - 1}, got {seed!r}")
    set_threads(threads)
    s, out = SCALES[dataset][scale], Path(out)
    start = time.perf_counter()
    test = create("datasets", dataset, split="test", **dataset_options(dataset, s, seed))  # bad data fails here
    configs = chain_configs(demo_recipe(s, seed, dataset), out, seed)
    for cfg in configs:
        check_config(cfg)
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        model_dir = train_chain(configs, announcements(s, dataset))
        sampler = sampler_text(s)
        print(f"[4/5] synthesis of {len(test)} held-out volumes ({sampler}), slice-wise and lifted")
        record = synthesize_test(load_synthesis_model(model_dir), test, s, seed, out, dataset, sampler)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a refused run leaves no empty --out behind
        raise
    print("[5/5] evaluation")
    write_subjects(out / "data", dataset, s, seed)
    summary = demo_summary(dataset, scale, seed, s, sampler, record)
    summary["wall_s"] = time.perf_counter() - start
    files = write_results(out / "evaluation", summary, record, f"lift3d demo: {dataset} test subjects, {sampler}")
    files = {"model": str(model_dir), "nifti": record.nifti, "figures": record.figures, "data": str(out / "data"),
             **files}
    print_report(files, summary)
    return {"files": files, "summary": summary}


def write_subjects(folder: Path, dataset: str, s: DemoScale, seed: int) -> Path:
    """Every subject of the demo (training, validation and test) as a ``paired-nifti`` folder on the training grid:
    ``T1.nii.gz``, ``T2.nii.gz`` and, where the dataset has one, ``brainmask.nii.gz`` per subject."""
    for split in ("train", "val", "test") if s.num_val else ("train", "test"):
        subjects = create("datasets", dataset, split=split, **dataset_options(dataset, s, seed))
        write_pairs(folder, (subjects[i] for i in range(len(subjects))), source="T1", target="T2")
    return folder


def announcements(s: DemoScale, dataset: str) -> tuple[str, ...]:
    """What the demo prints before each stage of its chain, in the chain's order."""
    what = "ICBM 152 subjects (real anatomy)" if dataset == "icbm152" else "the phantom"
    return (f"[1/5] stage 1: slice-wise diffusion U-Net on {what}, {s.num_train} training subjects, "
            f"{s.num_slices} slices of {s.size} x {s.size} ({s.stage1_steps} steps"
            + (f"; 2.5D: {2 * s.source_context + 1} source slices per target slice)" if s.source_context else ")"),
            f"[2/5] + [3/5] inflate and stage-2 volumetric fine-tuning ({s.stage2_steps} steps, "
            f"trainable {s.stage2_trainable}, lr {s.stage2_lr:g} {s.stage2_lr_scheduler}"
            + (f"; the step best on {s.num_val} validation subjects is exported)" if s.num_val else ")"))


def train_chain(configs: list[TrainConfig], lines: tuple[str, ...]) -> Path:
    """Train each stage in turn (each starts from the one before); returns the last one's model folder."""
    model_dir = Path()
    for cfg, line in zip(configs, lines):
        print(line)
        model_dir = train(cfg)
    return model_dir


def sampler_text(s: DemoScale) -> str:
    names = {"ddim": "DDIM", "dpm": "DPM-Solver++", "flow": "flow Euler", "ddpm": "DDPM"}
    return (f"{names[s.sampler]}-{s.sample_steps}" + (f", mean of {s.samples}" if s.samples > 1 else "")
            + (f", rho {s.noise_correlation:g}" if s.noise_correlation else ""))


METHODS = (("slice-wise", True), ("lifted", False))


@dataclass
class Record:
    """What the demo gathers over the test subjects, per method."""

    rows: dict[str, list] = field(default_factory=lambda: {m: [] for m, _ in METHODS})
    clean_rows: dict[str, list] = field(default_factory=lambda: {m: [] for m, _ in METHODS})
    seconds: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m, _ in METHODS})
    evaluations: dict[str, int] = field(default_factory=dict)
    views: dict[str, SubjectViews] = field(default_factory=dict)
    nifti: list[str] = field(default_factory=list)
    figures: list[str] = field(default_factory=list)


def synthesize_test(model, test, s: DemoScale, seed: int, out: Path, dataset: str, sampler: str) -> Record:
    """Synthesise every test subject both ways, write the volumes and figures, and score them."""
    record = Record()
    synth_dir, figures = out / "synthesis", out / "evaluation" / "figures"
    modality = "T1 -> T2" if dataset == "icbm152" else "phantom T1 -> T2"
    for pair in test:
        outputs, stds = synthesize_pair(model, pair, s, seed, synth_dir, record)
        for method in record.rows:
            record.rows[method].append(score_pair_all(outputs[method], pair))
            if "clean_target" in pair.extra:
                record.clean_rows[method].append(score_pair_all(outputs[method], pair, "clean_target"))
        record.views[pair.subject] = SubjectViews(pair.target[0].numpy(), outputs, source=pair.source[0].numpy(),
                                                  stds=stds, spacing=pair.meta.grid_spacing)
        figure = figures / f"{pair.subject}.png"
        figure.parent.mkdir(parents=True, exist_ok=True)
        save_orthogonal_views(figure, {"source": pair.source[0].numpy(), "slice-wise": outputs["slice-wise"],
                                       "lifted": outputs["lifted"], "target": pair.target[0].numpy()},
                              title=f"{pair.subject} ({dataset} test): {modality}, {sampler}",
                              error_of=[("slice-wise", "target"), ("lifted", "target")],
                              uncertainty={"lifted": stds["lifted"]} if stds else None, spacing=pair.meta.grid_spacing)
        record.figures.append(str(figure))
    return record


def synthesize_pair(model, pair, s: DemoScale, seed: int, synth_dir: Path, record: Record) -> tuple[dict, dict]:
    """One subject, slice-wise and lifted with the same seed: the mean of K samples (and their std) is written
    as ``synthesis/<method>/<subject>_synth.nii.gz`` on the training grid, the grid it is scored on (so
    ``lift3d-evaluate`` scores the file as the demo did); returns the means and stds as arrays, per method."""
    outputs, stds = {}, {}
    for method, slice_wise in METHODS:
        tic = time.perf_counter()
        with torch.no_grad():
            estimate = synthesize_posterior(model, pair.source[None], samples=s.samples, solver=s.sampler,
                                            steps=s.sample_steps, seed=seed, slice_wise=slice_wise,
                                            noise_correlation=s.noise_correlation, progress=True)
        record.seconds[method].append(time.perf_counter() - tic)
        record.evaluations[method] = estimate.unet_evaluations
        outputs[method] = estimate.mean[0, 0].float().numpy()
        record.nifti += map(str, write_predictions(synth_dir / method, [pair], {pair.subject: outputs[method]}))
        if estimate.std is not None:
            stds[method] = estimate.std[0, 0].float().numpy()
            record.nifti.append(str(write_std(synth_dir / method / "std", pair, stds[method])))
    return outputs, stds


def demo_summary(dataset: str, scale: str, seed: int, s: DemoScale, sampler: str, record: Record) -> dict:
    """``metrics.json``: the settings, and the scores per method and per subject."""
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
               "methods": {method: summarize(r) for method, r in record.rows.items()}, "subjects": record.rows,
               "seconds_per_volume": {m: sum(v) / len(v) for m, v in record.seconds.items()},
               "unet_evaluations": record.evaluations}
    if any(record.clean_rows.values()):
        summary["methods_vs_clean_target"] = {method: summarize(r) for method, r in record.clean_rows.items()}
        summary["subjects_vs_clean_target"] = record.clean_rows
    return summary


def write_results(eval_dir: Path, summary: dict, record: Record, title: str) -> dict[str, str]:
    """Write ``metrics.json`` (whole or not at all) and the HTML report; returns their paths."""
    metrics_path = eval_dir / "metrics.json"
    tmp = metrics_path.with_name(".metrics.json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    tmp.replace(metrics_path)
    report_rows = [{"method": method, **row} for method, per_subject in record.rows.items() for row in per_subject]
    report = write_report(eval_dir / "report.html", report_rows, views=record.views, title=title)
    return {"metrics": str(metrics_path), "report": str(report)}


def print_report(files: dict, summary: dict) -> None:
    print("\nlift3d demo: done")
    print(f"  model (safetensors):  {files['model']}")
    print(f"  synthesised NIfTI:    {', '.join(files['nifti'])}")
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
