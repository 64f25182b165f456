"""Loss curves and seconds per step of both training stages, on the phantom and on real MRI (Training).

Per dataset (the phantom; ICBM 152 2009c's 1 mm T1w masked with its brain mask -> T2w brain, one subject): stage 1
(``examples/configs/phantom-stage1.toml``), then from its export stage 2 (``phantom-stage2.toml``) with the
volumetric layers or all trainable, and a 2D control (stage 1 continued with stage 2's optimizer). Each export is
scored with eq. 4 at t = 25, 75, ..., 975 with fixed noise (the t-grid). Exit 1 unless stage 1's losses fall
(give each stage at least two --log-every windows) and every later run starts at stage 1's final val_loss exactly.

    python benchmarks/train_curves.py --threads 1 --lr2 1e-3     # results/training.md (stage-2 lr then 1e-3)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch  # CUDA starts on first use, so main() can still hide the GPU for --device cpu

from lift3d.recipes.reports import REPO, machine_info, write_json
from lift3d.training.config import TrainConfig, apply, load_toml

RUNS = {"stage1": "stage 1 (2D, slices)", "stage2-volumetric": "stage 2, volumetric layers only",
        "stage2-all": "stage 2, all parameters", "stage1-continued": "control: stage 1 continued (2D)"}
T_GRID, T_GRID_SEED = tuple(range(25, 1000, 50)), 4321
ICBM_CSV = "subject,source,target,mask,split\nicbm,1mm_T1.nii.gz,1mm_T2_brain.nii.gz,1mm_brainmask.nii.gz,train\n"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared/data/icbm152-2009c", help="ICBM 152 2009c folder")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks/results", help="for train_curves[-<tag>].json, .png")
    p.add_argument("--datasets", nargs="+", choices=("phantom", "icbm"), default=["phantom", "icbm"])
    for flag, default, text in (("steps1", 300, "stage-1 steps"), ("steps2", 60, "steps of each later run"),
                                ("size", 32, "in-plane size"), ("slices", 16, "slices per volume"),
                                ("batch1", 16, "stage-1 slices per step"), ("log-every", 10, "steps per logged window")):
        p.add_argument(f"--{flag}", type=int, default=default, help=f"{text} (default {default})")
    p.add_argument("--lr2", type=float, help="learning rate of the later runs (default: the stage-2 example's)")
    p.add_argument("--warmup2", type=int, help="warm-up steps of the later runs (default: the stage-2 example's)")
    p.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon", help="of every run")
    p.add_argument("--threads", type=int, help="torch threads; 1 on a CPU shared with other jobs")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="'cpu' hides any GPU")
    p.add_argument("--mixed-precision", choices=("no", "fp16", "bf16"), default="no", help="optim.mixed_precision")
    p.add_argument("--tag", default="", help="output names train_curves-<tag>.json/.png")
    args = p.parse_args(argv)
    if "icbm" in args.datasets and not (args.data / "1mm_T1.nii.gz").is_file():
        p.error(f"no {args.data}/1mm_T1.nii.gz: pass --data <icbm152-2009c folder>, or --datasets phantom")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no GPU")
    return args


def run_config(run: str, data: dict, folder: Path, args) -> TrainConfig:
    """The stage-1 example (stage 1, the control) or the stage-2 example with this grid, steps and logging; every
    run after stage 1 starts from its export with stage 2's optimizer settings (or --lr2 / --warmup2)."""
    ex = {n: apply(TrainConfig(), load_toml(REPO / f"examples/configs/phantom-{n}.toml"), n) for n in ("stage1", "stage2")}
    first, volumes, optim = run == "stage1", run.startswith("stage2"), ex["stage2"].optim
    later = {"learning_rate": optim.learning_rate if args.lr2 is None else args.lr2, "lr_scheduler": optim.lr_scheduler,
             "warmup_steps": optim.warmup_steps if args.warmup2 is None else args.warmup2}
    return apply(ex["stage2" if volumes else "stage1"], {
        "run": {"stage": "volumes" if volumes else "slices", "output_dir": str(folder), "seed": 0, "tracker": "csv",
                "log_every": args.log_every, "max_steps": args.steps1 if first else args.steps2, "checkpoint_every": 0},
        "data": {**data, "batch_size": args.batch1 if first else 1 if volumes else args.slices},
        "model": {"prediction_type": args.prediction_type, "pretrained": "" if first else f"{folder.parent}/stage1/model"},
        "optim": {"mixed_precision": args.mixed_precision, **({} if first else later)},
        **({"lift": {"trainable": run.split("-")[1]}} if volumes else {})}, f"train_curves.py ({run})")


@torch.no_grad()
def t_grid(cfg: TrainConfig, split: str) -> tuple[dict, int]:
    """Eq. 4 for a finished run's export on every volume of ``split``, at each t of ``T_GRID`` (one t for all slices,
    fixed noise), on the CPU; and the export's parameter count."""
    from lift3d.data.dataset import stack_items
    from lift3d.plugins import create
    from lift3d.training.data_order import LatentEncoder
    from lift3d.training.losses import diffusion_loss
    from lift3d.training.unets import build_autoencoder, build_objective, build_unet

    cfg.model.pretrained = f"{cfg.run.output_dir}/model"  # the run is over: its config now describes the export
    view = create("datasets", cfg.data.dataset, **{**cfg.data.options, "split": split}).volumes()
    unet = build_unet(cfg, autoencoder := build_autoencoder(cfg), 0).eval()  # read from the export: no size needed
    latents, source = LatentEncoder(autoencoder, cache=False)(stack_items([view[i] for i in range(len(view))]), "cpu")
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(T_GRID_SEED))
    objective, condition = build_objective(cfg), source if cfg.model.conditioning == "concat" else None
    losses = [float(diffusion_loss(unet, objective, latents, condition, noise,
                                   torch.full((latents.shape[0], latents.shape[2]), t))) for t in T_GRID]
    grid = {"split": split, "volumes": len(view), "t": list(T_GRID), "loss": losses, "mean": statistics.fmean(losses)}
    return grid, sum(p.numel() for p in unet.parameters())


def run_dataset(name: str, data: dict, work: Path, args) -> dict:
    """Every run of ``RUNS`` on one dataset, summed up from its ``logs/metrics.csv`` (s/step: the median logged
    ``steps_per_s``, inverted) and its t-grid (the phantom's held-out test subjects; ICBM's one volume)."""
    from lift3d.training.loop import train
    from lift3d.training.tracking import read_rows

    runs: dict = {}
    for run in RUNS:
        cfg = run_config(run, data, work / name / run, args)
        tic, cpu_tic, steps = time.perf_counter(), time.process_time(), cfg.run.max_steps
        train(cfg)
        wall, cpu, batch = time.perf_counter() - tic, time.process_time() - cpu_tic, cfg.data.batch_size
        rows = read_rows(work / name / run / "logs" / "metrics.csv")[1]
        loss, val, rate = ([(int(r["step"]), float(r[k])) for r in rows if r.get(k)]
                           for k in ("loss", "val_loss", "steps_per_s"))
        runs[run] = {"steps": steps, "batch": batch, "learning_rate": cfg.optim.learning_rate, "wall_s": wall,
                     "batch_unit": "slices" if cfg.run.stage == "slices" else "volume" if batch == 1 else "volumes",
                     "warmup_steps": cfg.optim.warmup_steps, "loss_first": loss[0][1], "loss_last": loss[-1][1],
                     "val_loss_start": val[0][1], "val_loss_end": val[-1][1], "loss": loss, "val_loss": val,
                     "s_per_step_median": statistics.median(1 / v for _, v in rate), "cpu_s_per_step": cpu / steps}
        runs[run]["t_grid"], runs[run]["parameters"] = t_grid(cfg, "test" if name == "phantom" else "train")
    s1 = runs["stage1"]
    checks = {"stage 1 training loss falls (last logged window < first)": s1["loss_last"] < s1["loss_first"],
              "stage 1 val_loss falls": s1["val_loss_end"] < s1["val_loss_start"],
              **{f"{run} val_loss at step 0 == stage 1 final val_loss (exactly)":
                 runs[run]["val_loss_start"] == s1["val_loss_end"] for run in list(RUNS)[1:]}}
    return {"data": data, "runs": runs, "checks": [{"dataset": name, "check": c, "ok": ok} for c, ok in checks.items()]}


def plot(results: dict, path: Path) -> None:
    """Top: training loss windows and val_loss, the later runs after stage 1. Bottom: t-grid over stage 1's."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend

    axes = (fig := Figure(figsize=(6.5 * len(results), 8.4), layout="constrained")).subplots(2, len(results), squeeze=False)
    for (top, bottom), (name, result) in zip(axes.T, results.items()):
        runs, grid, offset = result["runs"], result["data"]["options"], result["runs"]["stage1"]["steps"]
        base = runs["stage1"]["t_grid"]
        for i, (run, s) in enumerate(runs.items()):
            shift, line, colour = offset * (run != "stage1"), "--" if run == "stage1-continued" else "-", f"C{i}"
            top.plot(*zip(*[(x + shift, y) for x, y in s["loss"]]), line, color=colour,
                     label=f"{RUNS[run]}: training loss ({s['batch']} {s['batch_unit']}/step)")
            top.plot(*zip(*[(x + shift, y) for x, y in s["val_loss"]]), "o", color=colour,
                     mfc="none" if run == "stage2-all" else colour, label=f"{RUNS[run]}: val_loss")
            bottom.plot(T_GRID, [a / b for a, b in zip(s["t_grid"]["loss"], base["loss"])], line, color=colour,
                        marker="." * (run != "stage1"), label=f"{RUNS[run]} (mean over t: {s['t_grid']['mean']:.4f})")
        top.axvline(offset, color="0.5", lw=0.8, ls="--")
        top.set(yscale="log", xlabel="optimizer step (stage 2 goes on from the end of stage 1)", ylabel="MSE (log)",
                title=f"{name}: {grid['num_slices']} x {grid['size']} x {grid['size']}, pixel space")
        bottom.set(yscale="log", xlabel="diffusion timestep t (the same t for every slice; fixed noise)",
                   ylabel="loss / stage-1 model's", title=f"after training: {base['split']} split, {base['volumes']} vol.")
        for ax in (top, bottom):
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":  # before anything starts CUDA: training takes a GPU whenever it sees one
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.set_num_threads(args.threads or torch.get_num_threads())
    import accelerate
    machine = machine_info(accelerate=accelerate.__version__, mixed_precision=args.mixed_precision,
                           device="cuda" if torch.cuda.is_available() else "cpu")
    started, load_before = time.perf_counter(), os.getloadavg()
    grid = {"size": args.size, "num_slices": args.slices, "cache": True}  # cache: a step times training, not loading
    with tempfile.TemporaryDirectory(prefix="lift3d-train-curves-") as tmp:
        (Path(tmp) / "icbm.csv").write_text(ICBM_CSV)  # apply_mask: the T1w masked; the T2w is brain-only already
        data = {"phantom": {"dataset": "phantom", "options": {**grid, "num_subjects": 10}},
                "icbm": {"dataset": "paired-nifti", "options": {**grid, "csv": f"{tmp}/icbm.csv",
                                                                "root": str(args.data), "apply_mask": True}}}
        results = {name: run_dataset(name, data[name], Path(tmp), args) for name in dict.fromkeys(args.datasets)}
    checks = [c for result in results.values() for c in result.pop("checks")]
    stem = args.out / ("train_curves" + (f"-{args.tag}" if args.tag else ""))  # a tag may hold dots
    write_json(f"{stem}.json", {
        "command": "python benchmarks/train_curves.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {**machine, "load_average_1_5_15_min": {"start": load_before, "end": os.getloadavg()}},
        "total_wall_s": time.perf_counter() - started, "checks": checks, "datasets": results})
    plot(results, Path(f"{stem}.png"))
    print("\n".join(f"{'ok  ' if c['ok'] else 'FAIL'} {c['dataset']}: {c['check']}" for c in checks))
    print(f"total {time.perf_counter() - started:.0f} s; wrote {stem}.json and .png")
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
