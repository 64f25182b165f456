"""Loss curves and seconds per step of both training stages, on the phantom and on real MRI (Training).

For each dataset this runs Make-A-Volume's (Zhu et al., MICCAI 2023) stage 1 (``run.stage =
"slices"``, a 2D U-Net on shuffled slices, sec. 2.2), then stage 2 twice from the stage-1 export
(``run.stage = "volumes"``, the lifted U-Net on whole volumes, sec. 2.3): once with only the
volumetric layers trainable and once with everything trainable. It goes through the Python API
(``TrainConfig`` + ``apply`` + ``train``), starting from ``examples/configs/phantom-stage{1,2}.toml``
so the figures describe the shipped examples, and reads each run's ``logs/metrics.csv``.

Checked and reported: the training loss and the fixed-volume validation loss fall in stage 1 and in
stage 2; stage 2's validation loss at step 0 equals stage 1's final one exactly (the lifted U-Net is
the 2D one at initialisation); seconds per step (the median of the logged ``steps_per_s``, inverted).
After each run the exported model is also scored at 20 fixed timesteps with fixed noise, since
training's ``val_loss`` uses one t per volume (see :func:`timestep_grid_loss`). A control run trains the stage-1 model on in 2D for as many steps as stage 2 (``--no-control`` skips
it): stage 2's fall in validation loss means something only next to that one's.

Datasets: ``phantom`` (built in) and ICBM 152 2009c (``--data``; one real brain, T1w masked with
the brain mask -> T2w brain, both at 1 mm, resampled to the training grid). With a single subject
the ICBM runs train and validate on the same volume: its curves show that training works on real
intensities, not that it generalises.

    python benchmarks/train_curves.py --threads 1      # a CPU shared with other jobs
    python benchmarks/train_curves.py --steps1 40 --steps2 10 --datasets phantom --out /tmp/smoke
    python benchmarks/train_curves.py --device cuda --mixed-precision bf16 --tag gpu-bf16
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lift3d.recipes.reports import machine_info, write_json  # noqa: E402

import torch  # CUDA starts on first use, so main() can still hide the GPU for --device cpu

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "configs"
DEFAULT_DATA = Path("/work/shared/data/icbm152-2009c")
DATASETS = ("phantom", "icbm")
# (run name, stage, lift.trainable); the later runs start from the stage-1 export of the same dataset.
# The control trains the 2D model on for as many steps as stage 2, with stage 2's optimizer settings and
# as many slices per step: what stage 2 gains beyond "more training" is the gap to it.
RUNS = (("stage1", "slices", None), ("stage2-volumetric", "volumes", "volumetric"), ("stage2-all", "volumes", "all"),
        ("stage1-continued", "slices", None))
# The timesteps of the fixed-noise probe run after each training run (see timestep_grid_loss).
T_GRID = tuple(range(25, 1000, 50))
T_GRID_SEED = 4321
STAGE_LABELS = {"stage1": "stage 1 (2D, slices)", "stage2-volumetric": "stage 2, volumetric layers only",
                "stage2-all": "stage 2, all parameters", "stage1-continued": "control: stage 1 continued (2D)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Writes <out>/train_curves[-<tag>].json and .png; exits 1 "
                                            "if a check fails (the results are written first).")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="the ICBM 152 2009c folder (1mm_T1, 1mm_T2_brain, 1mm_brainmask .nii.gz); "
                             "if it is absent, ICBM is skipped with a message (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results",
                        help="folder for train_curves[-<tag>].json and .png (default: benchmarks/results)")
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the training runs and the ICBM layout (default: a temp folder, "
                             "deleted at the end unless --keep-runs)")
    parser.add_argument("--keep-runs", action="store_true", help="keep the run folders (models, logs)")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS),
                        help="which datasets to run (default: both)")
    parser.add_argument("--steps1", type=int, default=300, help="stage-1 optimizer steps (default: %(default)s)")
    parser.add_argument("--steps2", type=int, default=60,
                        help="optimizer steps of each stage-2 run (default: %(default)s)")
    parser.add_argument("--size", type=int, default=32, help="in-plane size of the training grid (default: %(default)s)")
    parser.add_argument("--slices", type=int, default=16, help="slices per volume (default: %(default)s)")
    parser.add_argument("--batch1", type=int, default=16,
                        help="stage-1 batch, in slices (default: %(default)s, as the example config)")
    parser.add_argument("--batch2", type=int, default=1,
                        help="stage-2 batch, in volumes (default: %(default)s, as the example config)")
    parser.add_argument("--log-every", type=int, default=10,
                        help="log the windowed loss and steps/s every K steps (default: %(default)s)")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon",
                        help="what both stages predict; the example configs say v_prediction, the published "
                        "figures were taken with epsilon, the paper's eq. 4 (default: %(default)s)")
    parser.add_argument("--lr2", type=float, default=None,
                        help="learning rate of the stage-2 runs and the control (default: the stage-2 example's)")
    parser.add_argument("--warmup2", type=int, default=None,
                        help="warm-up steps of the stage-2 runs and the control (default: the stage-2 example's)")
    parser.add_argument("--tag", default="",
                        help="suffix of the output names: train_curves-<tag>.json/.png (default: none)")
    parser.add_argument("--replot", type=Path, metavar="JSON", default=None,
                        help="only redraw the figure from a train_curves JSON written earlier (next to it)")
    parser.add_argument("--seed", type=int, default=0, help="run.seed of every run (default: %(default)s)")
    parser.add_argument("--control", action=argparse.BooleanOptionalAction, default=True,
                        help="also train the stage-1 model on in 2D for --steps2 steps, the baseline stage 2 "
                             "must beat (default: on)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice, one per core). On a CPU shared "
                             "with other jobs use 1: oversubscribed threads can make a step 10x slower")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="'cpu' hides any GPU; 'cuda' requires one; 'auto' uses a GPU when there is one "
                             "(default: %(default)s)")
    parser.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no",
                        help="optim.mixed_precision of every run (default: %(default)s)")
    args = parser.parse_args(argv)
    for name in ("steps1", "steps2", "size", "slices", "batch1", "batch2", "log_every", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    if args.steps1 < 2 * args.log_every or args.steps2 < 2 * args.log_every:
        parser.error(f"--steps1 and --steps2 must be at least twice --log-every ({args.log_every}) "
                     "so that a curve has a first and a last window")
    return args


# --------------------------------------------------------------------------------------------
# Data


def layout_icbm(data: Path, work: Path) -> Path:
    """``<work>/icbm-root/icbm/{T1,T2}.nii.gz`` for ``paired-nifti``: the 1 mm T1w masked with the
    brain mask (the T2w file is brain-only already, so both show the same tissue)."""
    import nibabel as nib
    import numpy as np

    subject = work / "icbm-root" / "icbm"
    subject.mkdir(parents=True, exist_ok=True)
    t1 = nib.load(str(data / "1mm_T1.nii.gz"))
    mask = nib.load(str(data / "1mm_brainmask.nii.gz"))
    if t1.shape != mask.shape or not np.allclose(t1.affine, mask.affine):
        raise ValueError(f"{data}: 1mm_T1 {t1.shape} and 1mm_brainmask {mask.shape} are not on one grid")
    masked = np.asanyarray(t1.dataobj) * (np.asanyarray(mask.dataobj) > 0)
    out = nib.Nifti1Image(masked.astype(t1.get_data_dtype()), t1.affine, t1.header)
    nib.save(out, str(subject / "T1.nii.gz"))
    shutil.copyfile(data / "1mm_T2_brain.nii.gz", subject / "T2.nii.gz")
    return subject.parent


def dataset_settings(name: str, args: argparse.Namespace, icbm_root: Path | None) -> dict[str, Any]:
    """``[data]`` for one dataset; ``cache = true`` so a step times training, not volume loading."""
    grid = {"size": args.size, "num_slices": args.slices, "cache": True}
    if name == "phantom":
        return {"dataset": "phantom", "options": {**grid, "num_subjects": 10}}
    # One subject: the explicit train list puts it in the train split (the default test_size=0.2
    # would round to zero test subjects too, but saying it is clearer).
    return {"dataset": "paired-nifti", "options": {**grid, "root": str(icbm_root), "source": "T1", "target": "T2",
                                                   "train": ["icbm"]}}


# --------------------------------------------------------------------------------------------
# Runs


def run_config(run: str, stage: str, trainable: str | None, data: dict[str, Any], folder: Path,
               stage1_model: Path | None, args: argparse.Namespace):
    from lift3d.training.config import TrainConfig, apply, load_toml

    example = EXAMPLES / ("phantom-stage1.toml" if stage == "slices" else "phantom-stage2.toml")
    cfg = apply(TrainConfig(), load_toml(example), str(example))
    first = run == "stage1"
    overrides: dict[str, dict[str, Any]] = {
        "run": {"stage": stage, "output_dir": str(folder), "seed": args.seed, "log_every": args.log_every,
                "max_steps": args.steps1 if first else args.steps2, "checkpoint_every": 0, "tracker": "csv"},
        "data": {**data, "batch_size": args.batch1 if stage == "slices" else args.batch2},
        "optim": {"mixed_precision": args.mixed_precision},
        "model": {"prediction_type": args.prediction_type},
    }
    if not first:
        overrides["model"]["pretrained"] = str(stage1_model)
    if stage == "volumes":
        overrides["lift"] = {"trainable": trainable}
    if run == "stage1-continued":  # stage 2's optimizer settings and slices per step
        stage2 = apply(TrainConfig(), load_toml(EXAMPLES / "phantom-stage2.toml"), "phantom-stage2.toml")
        overrides["data"]["batch_size"] = args.batch2 * args.slices
        overrides["optim"].update(learning_rate=stage2.optim.learning_rate, warmup_steps=stage2.optim.warmup_steps,
                                  lr_scheduler=stage2.optim.lr_scheduler)
    if not first and args.lr2 is not None:
        overrides["optim"]["learning_rate"] = args.lr2
    if not first and args.warmup2 is not None:
        overrides["optim"]["warmup_steps"] = args.warmup2
    return apply(cfg, overrides, f"train_curves.py ({run})")


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``{column: [(step, value), ...]}`` for the non-empty cells of ``logs/metrics.csv``."""
    series: dict[str, list[tuple[int, float]]] = {}
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            step = int(row["step"])
            for key, value in row.items():
                if key != "step" and value not in ("", None):
                    series.setdefault(key, []).append((step, float(value)))
    return series


def count_parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    files = [p for p in model_dir.glob("*.safetensors") if p.name != "volumetric.safetensors"]
    total = 0
    for p in files:
        with safe_open(str(p), "pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def summarise(run: str, cfg, metrics: dict[str, list[tuple[int, float]]], wall_s: float) -> dict[str, Any]:
    loss, val, rate = metrics["loss"], metrics["val_loss"], metrics["steps_per_s"]
    if val[0][0] != 0 or len(val) < 2:
        raise RuntimeError(f"{run}: expected val_loss at step 0 and at the end in metrics.csv, got steps "
                           f"{[s for s, _ in val]}")
    # The last window may be shorter than log_every (max_steps not a multiple): its rate is noisier.
    seconds = [1.0 / v for _, v in rate]
    return {
        "stage": cfg.run.stage, "pretrained": bool(cfg.model.pretrained),
        "trainable": cfg.lift.trainable if cfg.run.stage == "volumes" else "all (2D)",
        "steps": cfg.run.max_steps, "batch": cfg.data.batch_size,
        "batch_unit": "slices" if cfg.run.stage == "slices" else ("volume" if cfg.data.batch_size == 1 else "volumes"),
        "learning_rate": cfg.optim.learning_rate, "warmup_steps": cfg.optim.warmup_steps,
        "loss_first": loss[0][1], "loss_last": loss[-1][1],
        "val_loss_start": val[0][1], "val_loss_end": val[-1][1],
        "s_per_step_median": statistics.median(seconds), "s_per_step_windows": seconds,
        "wall_s": wall_s, "loss": loss, "val_loss": val, "lr": metrics.get("lr", []),
    }


def run_dataset(name: str, data: dict[str, Any], work: Path, args: argparse.Namespace) -> dict[str, Any]:
    from lift3d.training.loop import train

    results: dict[str, Any] = {"data": data, "runs": {}}
    stage1_model = None
    for run, stage, trainable in RUNS:
        if run == "stage1-continued" and not args.control:
            continue
        folder = work / name / run
        shutil.rmtree(folder, ignore_errors=True)  # the CSV tracker appends to an existing metrics.csv
        cfg = run_config(run, stage, trainable, data, folder, stage1_model, args)
        print(f"\n== {name}: {STAGE_LABELS[run]} ({cfg.run.max_steps} steps) ==", flush=True)
        tic, cpu_tic = time.perf_counter(), time.process_time()
        model = train(cfg)
        wall, cpu = time.perf_counter() - tic, time.process_time() - cpu_tic
        summary = summarise(run, cfg, read_metrics(folder / "logs" / "metrics.csv"), wall)
        # CPU seconds of this process per step, set-up, validation and export included: on a CPU shared
        # with other jobs it moves far less than wall-clock time (with --threads 1 it is the compute).
        summary["cpu_s_per_step"] = cpu / cfg.run.max_steps
        summary["parameters"] = count_parameters(model)
        results["runs"][run] = summary
        if run == "stage1":
            stage1_model = model
        tic = time.perf_counter()
        summary["t_grid"] = timestep_grid_loss(cfg, model, name)
        print(f"{run}: fixed-noise loss over t = {T_GRID[0]}..{T_GRID[-1]} on {summary['t_grid']['volumes']} "
              f"{summary['t_grid']['split']} volume(s): mean {summary['t_grid']['mean']:.6f} "
              f"({time.perf_counter() - tic:.0f} s)", flush=True)
    return results


@torch.no_grad()
def timestep_grid_loss(cfg, model_dir: Path, name: str) -> dict[str, Any]:
    """Eq. 4 on whole volumes with fixed noise at each t of :data:`T_GRID`, for the exported model.

    Training's ``val_loss`` draws one t per volume (for seed 1234: t = 879 and 477 on the phantom,
    904 on ICBM), where the noise is easy to predict and slice-to-slice consistency barely matters;
    this probe covers the whole range. The phantom is scored on its held-out test subjects; ICBM
    has only its one training volume.
    """
    from lift3d.data.dataset import stack_items
    from lift3d.plugins import create
    from lift3d.training.data_order import LatentEncoder
    from lift3d.training.losses import diffusion_loss
    from lift3d.training.unets import build_autoencoder, build_objective, build_unet

    cfg = copy.deepcopy(cfg)
    cfg.model.pretrained = str(model_dir)
    split = "test" if name == "phantom" else "train"
    dataset = create("datasets", cfg.data.dataset, **{**cfg.data.options, "split": split})
    autoencoder = build_autoencoder(cfg)
    unet = build_unet(cfg, autoencoder, dataset[0].source.shape[-1] // autoencoder.downsampling_factor).eval()
    view = dataset.volumes()
    batch = stack_items([view[i] for i in range(len(view))])
    batch["index"] = list(range(len(view)))
    latents, source = LatentEncoder(autoencoder, cache=False)(batch, torch.device("cpu"))
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(T_GRID_SEED))
    objective = build_objective(cfg)
    losses = []
    for t in T_GRID:
        timesteps = torch.full(latents.shape[:1] + latents.shape[2:3], t, dtype=torch.int64)
        losses.append(float(diffusion_loss(unet, objective, latents, source if cfg.model.conditioning == "concat" else None,
                                           noise, timesteps)))
    return {"split": split, "volumes": len(view), "t": list(T_GRID), "loss": losses,
            "mean": statistics.fmean(losses)}


def checks_for(name: str, runs: dict[str, Any]) -> list[dict[str, Any]]:
    """What the curves must show. ``required`` ones make the script exit 1 when they fail."""
    s1 = runs["stage1"]
    out = [
        {"check": "stage 1 training loss falls (last logged window < first)", "required": True,
         "ok": s1["loss_last"] < s1["loss_first"], "values": [s1["loss_first"], s1["loss_last"]]},
        {"check": "stage 1 val_loss falls", "required": True,
         "ok": s1["val_loss_end"] < s1["val_loss_start"], "values": [s1["val_loss_start"], s1["val_loss_end"]]},
    ]
    for run in ("stage2-volumetric", "stage2-all"):
        s2 = runs[run]
        out.append({"check": f"{run} val_loss at step 0 == stage 1 final val_loss (exactly)", "required": True,
                    "ok": s2["val_loss_start"] == s1["val_loss_end"],
                    "values": [s2["val_loss_start"], s1["val_loss_end"]]})
        # Stage 2 starts from a trained model and runs few steps: a fall is expected but small, and
        # the fixed-volume loss uses one t per volume on two volumes, so it is reported, not required.
        out.append({"check": f"{run} val_loss falls", "required": False,
                    "ok": s2["val_loss_end"] < s2["val_loss_start"],
                    "values": [s2["val_loss_start"], s2["val_loss_end"]]})
        out.append({"check": f"{run} training loss falls (last logged window < first)", "required": False,
                    "ok": s2["loss_last"] < s2["loss_first"], "values": [s2["loss_first"], s2["loss_last"]]})
        if "stage1-continued" in runs:
            control = runs["stage1-continued"]
            out.append({"check": f"{run} final val_loss < the 2D control's (stage 1 continued as long)",
                        "required": False, "ok": s2["val_loss_end"] < control["val_loss_end"],
                        "values": [s2["val_loss_end"], control["val_loss_end"]]})
    if "stage1-continued" in runs:
        control = runs["stage1-continued"]
        out.append({"check": "stage1-continued val_loss at step 0 == stage 1 final val_loss (exactly)",
                    "required": True, "ok": control["val_loss_start"] == s1["val_loss_end"],
                    "values": [control["val_loss_start"], s1["val_loss_end"]]})
    return [{"dataset": name, **c} for c in out]


# --------------------------------------------------------------------------------------------
# Report


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    names = list(results)
    fig, axes = plt.subplots(2, len(names), figsize=(6.5 * len(names), 8.4), squeeze=False,
                             gridspec_kw={"height_ratios": [1.25, 1]})
    colours = {"stage1": "tab:blue", "stage2-volumetric": "tab:orange", "stage2-all": "tab:green",
               "stage1-continued": "0.45"}
    for ax, name in zip(axes[0], names):
        runs = results[name]["runs"]
        offset = runs["stage1"]["steps"]
        for run, summary in runs.items():
            shift = 0 if run == "stage1" else offset
            steps, values = zip(*summary["loss"])
            ax.plot([s + shift for s in steps], values, "--" if run == "stage1-continued" else "-",
                    color=colours[run], lw=1.2 if run == "stage1-continued" else 1.6,
                    label=f"{STAGE_LABELS[run]}: training loss ({summary['batch']} {summary['batch_unit']}/step)")
            vsteps, vvalues = zip(*summary["val_loss"])  # only at the start and the end: no line between
            ax.plot([s + shift for s in vsteps], vvalues, {"stage1": "D", "stage1-continued": "s"}.get(run, "o"),
                    color=colours[run], ls="none", mfc="none" if run == "stage2-all" else colours[run],
                    ms=8 if run == "stage2-all" else 6, label=f"{STAGE_LABELS[run]}: fixed-volume val_loss")
        ax.axvline(offset, color="0.5", lw=0.8, ls="--")
        ax.text(offset, 0.985, "stage 1 | stage 2", transform=ax.get_xaxis_transform(), ha="center", va="top",
                fontsize=8, color="0.35", bbox={"fc": "white", "ec": "none", "pad": 1})
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step (stage 2 continues from the end of stage 1)")
        ax.set_ylabel("MSE on epsilon (log scale)")
        title = {"phantom": "phantom (8 generated subjects)",
                 "icbm": "ICBM 152 2009c, 1 mm T1w (masked) -> T2w (1 subject)"}[name]
        n, size = results[name]["data"]["options"]["num_slices"], results[name]["data"]["options"]["size"]
        ax.set_title(f"{title}\n{n} x {size} x {size}, pixel space (identity autoencoder)", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper right", bbox_to_anchor=(1.0, 0.93))
    for ax, name in zip(axes[1], names):
        runs = results[name]["runs"]
        base = runs["stage1"]["t_grid"]
        for run, summary in runs.items():
            grid = summary["t_grid"]
            if run == "stage1":
                continue  # the reference, drawn as the line at 1
            ratio = [a / b for a, b in zip(grid["loss"], base["loss"])]
            ax.plot(grid["t"], ratio, "--" if run == "stage1-continued" else "-", color=colours[run],
                    lw=1.6, marker=".", label=f"{STAGE_LABELS[run]} (mean over t: {grid['mean']:.4f})")
        ax.plot([], [], color="tab:blue", label=f"{STAGE_LABELS['stage1']} = 1 (mean over t: {base['mean']:.4f})")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        low, high = ax.get_ylim()
        ax.set_yticks([t for t in (0.5, 0.7, 1, 1.5, 2, 3, 5) if low <= t <= high])
        ax.axhline(1.0, color="tab:blue", lw=1.0)
        ax.set_xlabel("diffusion timestep t (the same t for every slice; fixed noise)")
        ax.set_ylabel("loss / stage-1 model's loss")
        where = (f"{base['volumes']} held-out test subjects" if base["split"] == "test"
                 else "on the training volume" if base["volumes"] == 1 else f"{base['volumes']} training volumes")
        ax.set_title(f"after training: loss at each t relative to the stage-1 model, {where}", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def print_table(results: dict[str, Any]) -> None:
    header = ("dataset", "run", "steps", "batch", "loss first", "loss last", "val start", "val end", "s/step",
              "CPU s/step")
    print("\n" + " | ".join(header))
    for name, result in results.items():
        for run, s in result["runs"].items():
            print(" | ".join([name, run, str(s["steps"]), f"{s['batch']} {s['batch_unit']}", f"{s['loss_first']:.4f}",
                              f"{s['loss_last']:.4f}", f"{s['val_loss_start']:.6f}", f"{s['val_loss_end']:.6f}",
                              f"{s['s_per_step_median']:.3f}", f"{s['cpu_s_per_step']:.3f}"]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.replot is not None:
        plot(json.loads(args.replot.read_text())["datasets"], args.replot.with_suffix(".png"))
        print(f"wrote {args.replot.with_suffix('.png')}")
        return 0
    if args.device == "cpu":  # before anything initialises CUDA; training picks the GPU whenever it sees one
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("train_curves.py: --device cuda, but torch sees no GPU", file=sys.stderr)
        return 2
    names = list(args.datasets)
    if "icbm" in names and not (args.data / "1mm_T1.nii.gz").is_file():
        print(f"train_curves.py: skipping ICBM: {args.data}/1mm_T1.nii.gz not found "
              "(pass --data <icbm152-2009c folder>)", file=sys.stderr)
        names.remove("icbm")
    if not names:
        print("train_curves.py: no dataset left to run", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="lift3d-train-curves-")) if args.work is None else args.work
    work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    import accelerate

    machine = machine_info(accelerate=accelerate.__version__, mixed_precision=args.mixed_precision,
                           device="cuda" if torch.cuda.is_available() else "cpu")  # before the runs: the code at start
    started, load_before = time.perf_counter(), os.getloadavg()
    results: dict[str, Any] = {}
    try:
        for name in names:
            icbm_root = layout_icbm(args.data, work) if name == "icbm" else None
            results[name] = run_dataset(name, dataset_settings(name, args, icbm_root), work, args)
    except (ValueError, OSError) as exc:  # lift3d's config, data and checkpoint errors are ValueErrors
        print(f"train_curves.py: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    finally:
        if args.work is None and not args.keep_runs:
            shutil.rmtree(work, ignore_errors=True)
        elif results:
            print(f"runs kept in {work}")
    checks = [c for name in results for c in checks_for(name, results[name]["runs"])]
    report = {
        "command": "python benchmarks/train_curves.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {**machine, "load_average_1_5_15_min": {"start": load_before, "end": os.getloadavg()}},
        "total_wall_s": time.perf_counter() - started,
        "icbm": {"files": "1mm_T1.nii.gz masked with 1mm_brainmask.nii.gz -> 1mm_T2_brain.nii.gz",
                 "subjects": "one (train = val)"} if "icbm" in results else None,
        "base_configs": ["examples/configs/phantom-stage1.toml", "examples/configs/phantom-stage2.toml"],
        "checks": checks, "datasets": results,
    }
    stem = args.out / ("train_curves" + (f"-{args.tag}" if args.tag else ""))  # a tag may hold dots
    write_json(f"{stem}.json", report)
    plot(results, Path(f"{stem}.png"))
    print_table(results)
    for c in checks:
        mark = "ok  " if c["ok"] else ("FAIL" if c["required"] else "no  ")
        print(f"{mark} {c['dataset']}: {c['check']}: {c['values']}")
    print(f"total {report['total_wall_s']:.0f} s; wrote {stem}.json and .png")
    return 1 if any(c["required"] and not c["ok"] for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
