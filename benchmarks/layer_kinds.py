"""Quality of each kind of volumetric layer from the same stage-1 weights (issue 15's trade table).

Data and stage 1: the ICBM T1 -> T2 protocol of ``benchmarks/icbm_t1t2.py`` (``icbm152`` subjects,
48 x 48 x 24, a pixel-space v-prediction ``UNet2DModel`` of widths 16/32/64), whose stage-1 folder
this script takes as it is (``--stage1``). Methods: for every ``--kinds`` entry the stage-1 U-Net
is lifted with ``lift3d.inflate(unet, kind, ...)`` and fine-tuned for ``--steps`` stage-2 steps
(volumetric layers only, AdamW at ``--lr``, constant, make-a-volume timesteps, one volume per
step: the icbm_t1t2 cpu recipe), each run from the same seed. Metrics: ``lift3d.evaluation.metrics`` on the
validation subject(s) and, as the subject-to-subject spread against which a difference is judged,
on the test subjects, all sampled with DPM-Solver++ (``--sampler-steps``) in one batch with the same
seed, so every kind sees the same initial noise per subject. Report: per kind and subject PSNR,
SSIM, MAE, z-inconsistency, and the paired differences to the ``--reference`` kind.

    python benchmarks/icbm_t1t2.py --scale cpu --out runs/layer-kinds     # stopped after stage 1
    python benchmarks/layer_kinds.py --stage1 runs/layer-kinds/stage1 --out runs/layer-kinds/kinds \\
        --kinds full low-rank low-rank:train_down=false depthwise --threads 1 \\
        --json benchmarks/results/layer_kinds_quality_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from lift3d.layers.registry import parse_kind  # noqa: E402
from lift3d.recipes.reports import REPO, machine_info, write_json  # noqa: E402

import torch  # noqa: E402

METRICS = ("psnr", "ssim", "mae", "z_inconsistency")


def lifted_start(stage1_model: Path, folder: Path, settings: dict[str, Any], seed: int) -> Path:
    """The stage-1 U-Net lifted with ``settings`` (identity, so the same function), as the model folder
    stage 2 fine-tunes (``lift3d inflate``'s library function)."""
    from lift3d.lifting.checkpoint import lift_export

    shutil.rmtree(folder, ignore_errors=True)
    return lift_export(stage1_model, folder, seed=seed, **settings)


def stage1_config(stage1: Path) -> dict[str, Any]:
    """Stage 1's resolved options (``logs/config.json``, one JSON text per section)."""
    saved = json.loads((stage1 / "logs" / "config.json").read_text())
    return {k: json.loads(v) if isinstance(v, str) else v for k, v in saved.items()}


def stage2_config(stage1: Path, start: Path, output: Path, steps: int, lr: float, seed: int):
    """The icbm_t1t2 stage-2 recipe on stage 1's own data and U-Net settings."""
    from lift3d.training.config import TrainConfig, apply

    saved = stage1_config(stage1)
    overrides = {
        "run": {"stage": "volumes", "output_dir": str(output), "seed": seed, "max_steps": steps, "log_every": 10,
                "checkpoint_every": 0},
        "data": {"dataset": saved["data"]["dataset"], "options": saved["data"]["options"], "batch_size": 1},
        "model": {"pretrained": str(start), "prediction_type": saved["model"]["prediction_type"]},
        "autoencoder": {"name": saved["autoencoder"]["name"]},
        "lift": {"trainable": "volumetric"},
        "diffusion": {"timestep_sampler": "make-a-volume"},
        "optim": {"learning_rate": lr, "lr_scheduler": "constant"},
    }
    return apply(TrainConfig(), overrides, "layer_kinds")


def subjects(stage1: Path, split: str) -> list:
    from lift3d.plugins import create

    saved = stage1_config(stage1)
    dataset = create("datasets", saved["data"]["dataset"], split=split, **saved["data"]["options"])
    return [dataset[i] for i in range(len(dataset))]


def score(model_folder: Path, pairs: list, steps: int, seed: int) -> tuple[list[dict[str, Any]], float]:
    """Per-subject metrics of one model (DPM-Solver++ ``steps``, all subjects in one batch)."""
    from lift3d.evaluation.metrics import score_pair
    from lift3d.sampling.synthesis import load_synthesis_model, synthesize

    model = load_synthesis_model(model_folder, device="cpu")
    sources = torch.stack([p.source for p in pairs])
    tic = time.perf_counter()
    pred = synthesize(model, sources, solver="dpm", steps=steps, seed=seed, progress=False)
    seconds = (time.perf_counter() - tic) / len(pairs)
    rows = [score_pair(pred[i, 0].numpy(), p) for i, p in enumerate(pairs)]
    return rows, seconds


def paired(rows: list[dict[str, Any]], reference: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per metric: the mean and spread of (this - reference) over the same subjects."""
    out = {}
    for metric in METRICS:
        diffs = [a[metric] - b[metric] for a, b in zip(rows, reference)]
        out[metric] = {"mean": statistics.fmean(diffs), "diffs": diffs,
                       "std": statistics.pstdev(diffs) if len(diffs) > 1 else 0.0}
    return out


def markdown(report: dict[str, Any]) -> str:
    ref = report["reference"]
    lines = [f"| kind | val PSNR | val SSIM | val z-inc. | test PSNR | test SSIM | test z-inc. | "
             f"test PSNR - {ref} (per subject) | test z-inc. - {ref} |", "| --- |" + " ---: |" * 8]
    for name, entry in report["kinds"].items():
        val, test = entry["val"], entry["test"]

        def mean(rows, metric):
            return statistics.fmean(r[metric] for r in rows)

        d = entry.get("test_vs_reference")
        diff_psnr = ", ".join(f"{v:+.2f}" for v in d["psnr"]["diffs"]) if d else "-"
        diff_z = ", ".join(f"{v:+.3f}" for v in d["z_inconsistency"]["diffs"]) if d else "-"
        lines.append(f"| {name} | {mean(val, 'psnr'):.2f} | {mean(val, 'ssim'):.4f} | {mean(val, 'z_inconsistency'):.3f} | "
                     f"{mean(test, 'psnr'):.2f} | {mean(test, 'ssim'):.4f} | {mean(test, 'z_inconsistency'):.3f} | "
                     f"{diff_psnr} | {diff_z} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage1", type=Path, required=True,
                        help="a finished stage-1 run folder (with model/ and logs/config.json)")
    parser.add_argument("--out", type=Path, required=True, help="work folder for the stage-2 runs")
    parser.add_argument("--kinds", nargs="+", default=["full", "low-rank"], metavar="KIND[:KEY=VALUE,...]",
                        help="layer kinds and their settings (inflate keywords), e.g. low-rank:train_down=false")
    parser.add_argument("--reference", default=None, help="the kind the others are compared with (default: the first)")
    parser.add_argument("--steps", type=int, default=600, help="stage-2 steps per kind (icbm_t1t2 cpu: 600)")
    parser.add_argument("--lr", type=float, default=2e-3, help="stage-2 AdamW learning rate (icbm_t1t2 cpu: 2e-3)")
    parser.add_argument("--sampler-steps", type=int, default=25, help="DPM-Solver++ steps for scoring")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared CPU)")
    parser.add_argument("--reuse", action="store_true", help="keep a kind's finished stage-2 export")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.reference = args.reference or args.kinds[0]
    if args.reference not in args.kinds:
        parser.error(f"--reference {args.reference!r} is not among --kinds {args.kinds}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.set_num_threads(args.threads)
    from lift3d.training.loop import train

    started, load_before, machine = time.perf_counter(), os.getloadavg(), machine_info()
    stage1_model = args.stage1 / "model"
    pairs = {split: subjects(args.stage1, split) for split in ("val", "test")}
    report: dict[str, Any] = {
        "benchmark": "layer_kinds",
        "command": " ".join(["python", os.path.relpath(__file__, REPO), *args.argv]),
        "machine": machine, "load_average_at_start": load_before,
        "stage1": os.path.relpath(args.stage1.resolve(), REPO),
        "recipe": {"steps": args.steps, "lr": args.lr, "trainable": "volumetric", "timesteps": "make-a-volume",
                   "sampler": f"DPM-Solver++ {args.sampler_steps}", "seed": args.seed, "threads": args.threads},
        "reference": args.reference, "kinds": {}, "slice_wise": {},
    }
    for split, rows in pairs.items():
        report["slice_wise"][split], _ = score(stage1_model, rows, args.sampler_steps, args.seed)
    for spec in args.kinds:
        settings = parse_kind(spec)
        folder = args.out / spec.replace(":", "_").replace(",", "_").replace("=", "-")
        export = folder / "run" / "model"
        tic = time.perf_counter()
        if not (args.reuse and export.is_dir()):
            start = lifted_start(stage1_model, folder / "start", settings, args.seed)
            shutil.rmtree(folder / "run", ignore_errors=True)
            print(f"[{spec}] stage 2, {args.steps} steps", flush=True)
            train(stage2_config(args.stage1, start, folder / "run", args.steps, args.lr, args.seed))
        train_s = time.perf_counter() - tic
        entry: dict[str, Any] = {"settings": settings, "train_s": train_s,
                                 "model": os.path.relpath(export.resolve(), REPO)}
        for split, rows in pairs.items():
            entry[split], entry[f"{split}_s_per_volume"] = score(export, rows, args.sampler_steps, args.seed)
        report["kinds"][spec] = entry
        val = statistics.fmean(r["psnr"] for r in entry["val"])
        print(f"[{spec}] val PSNR {val:.3f}, test PSNR {statistics.fmean(r['psnr'] for r in entry['test']):.3f} "
              f"({train_s / 60:.1f} min)", flush=True)
        if args.json:
            write_json(args.json, report)  # a run cut short still reports what it did
    for spec, entry in report["kinds"].items():
        if spec != args.reference:
            for split in ("val", "test"):
                entry[f"{split}_vs_reference"] = paired(entry[split], report["kinds"][args.reference][split])
    report["runtime_s"] = time.perf_counter() - started
    report["load_average_at_end"] = os.getloadavg()
    print(markdown(report))
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
