"""Quality of each kind of volumetric layer from the same stage-1 weights (the trade table), and the default kind
chosen from such sweeps at several learning rates (``--choose``).

Sweep. Data and stage 1: a finished stage-1 run folder (``--stage1``, with ``model/`` and ``logs/config.json``),
such as the ICBM protocol's of ``benchmarks/icbm.py --scale cpu`` (the protocol through the library recipe
``lift3d.recipes.fit``; its stage 1 is ``runs/icbm-cpu-flow/stage1``, or ``runs/icbm-cpu-ddpm/stage1`` with
``--objective ddpm``), taken as it is. For every ``--kinds`` entry the stage-1 U-Net is lifted
(``lift3d.lifting.checkpoint.lift_export``, what ``lift3d inflate`` runs) and fine-tuned for ``--steps`` stage-2
steps with the recipe's stage 2 (``lift3d.recipes.make_a_volume``: volumetric layers only, AdamW at ``--lr``,
constant, make-a-volume timesteps, one volume per step), each run from the same seed. Metrics
(``lift3d.recipes.methods``): the slice-wise stage 1 and every kind sampled with the objective's few-step solver
(DPM-Solver++ for DDPM, Euler for flow; ``--sampler-steps``) on the validation and test subjects, all in one
batch with the same seed, so every model sees the same initial noise per subject. Report: per kind and subject
PSNR, SSIM, MAE, z-inconsistency, and the paired differences to the ``--reference`` kind.

Choice. Each kind takes its best learning rate by mean validation PSNR. A cheaper kind becomes the default if it
lies within the paired 95 % interval of the reference's (``full``), that is, if the interval of (cheaper - full)
over the validation subjects reaches 0 or above. Test-subject differences are reported beside it, never used.

    python benchmarks/icbm.py --scale cpu --objective ddpm     # stopped after stage 1: the sweep needs only that
    python benchmarks/layer_kinds.py --stage1 runs/icbm-cpu-ddpm/stage1 --out runs/kinds-lr2e-3 --kinds full low-rank \\
        --lr 2e-3 --threads 1 --json benchmarks/results/layer_kinds_floor_lr2e-3_cpu.json      # and --lr 4e-3
    python benchmarks/layer_kinds.py --choose benchmarks/results/layer_kinds_floor_lr2e-3_cpu.json \\
        benchmarks/results/layer_kinds_floor_lr4e-3_cpu.json --json benchmarks/results/layer_kinds_choice_cpu.json
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

import torch

from lift3d.evaluation.metrics import paired_differences
from lift3d.layers.registry import parse_kind
from lift3d.recipes.reports import REPO, machine_info, write_json


def mean(rows: list[dict[str, Any]], metric: str) -> float:
    return statistics.fmean(row[metric] for row in rows)


def stage1_config(stage1: Path) -> dict[str, Any]:
    """Stage 1's resolved options (``logs/config.json``, one JSON text per section)."""
    saved = json.loads((stage1 / "logs" / "config.json").read_text())
    return {k: json.loads(v) if isinstance(v, str) else v for k, v in saved.items()}


def stage2_config(saved: dict[str, Any], start: Path, output: Path, args: argparse.Namespace):
    """The recipe's stage 2 on stage 1's own data and U-Net settings, from the lifted ``start``."""
    from lift3d.recipes.make_a_volume import Recipe, stage_config

    model = saved["model"]
    recipe = Recipe(dataset=saved["data"]["dataset"], data_options=saved["data"]["options"],
                    widths=tuple(model["block_out_channels"]), layers_per_block=model["layers_per_block"],
                    prediction_type=model["prediction_type"], autoencoder=saved["autoencoder"], stage1_steps=0,
                    stage2_steps=args.steps, stage2_lr=args.lr, stage2_lr_scheduler="constant", name="layer_kinds")
    return stage_config(recipe, "volumes", output, args.seed, start)


def score(predictor, name: str, folder: Path, pairs: dict[str, list], steps: int) -> dict[str, Any]:
    """Per split: every subject's metrics for one model folder, and the sampling seconds per volume."""
    from lift3d.diffusion.export import read_training_settings
    from lift3d.diffusion.objectives import OBJECTIVES, objective_name
    from lift3d.recipes.methods import Method, score_subjects

    solver = OBJECTIVES.get(objective_name(read_training_settings(folder).objective)).fast["solver"]
    # A retrained folder is a new folder (written whole): its time stamp keeps the predictor's cache apart.
    method = Method(name, folder, run_id=str(folder.stat().st_mtime_ns), solver=solver, steps=steps)
    out: dict[str, Any] = {"solver": f"{solver}-{steps}"}
    for split, rows in pairs.items():
        prediction = predictor(method, rows)
        out[split], out[f"{split}_s_per_volume"] = score_subjects(prediction, rows), prediction.seconds_per_volume
    return out


def markdown(report: dict[str, Any]) -> str:
    ref = report["reference"]
    lines = [f"| kind | val PSNR | val SSIM | val z-inc. | test PSNR | test SSIM | test z-inc. | test PSNR - {ref} (per "
             f"subject) | test z-inc. - {ref} |" + "\n| --- |" + " ---: |" * 8]
    for name, entry in {"slice-wise (stage 1)": report["slice_wise"], **report["kinds"]}.items():
        val, test, d = entry["val"], entry["test"], entry.get("test_vs_reference")
        diff = {m: ", ".join(f"{v:+.3f}" for v in d[m]["per_subject"].values()) if d else "-"
                for m in ("psnr", "z_inconsistency")}
        lines.append(f"| {name} | {mean(val, 'psnr'):.2f} | {mean(val, 'ssim'):.4f} | {mean(val, 'z_inconsistency'):.3f} "
                     f"| {mean(test, 'psnr'):.2f} | {mean(test, 'ssim'):.4f} | {mean(test, 'z_inconsistency'):.3f} "
                     f"| {diff['psnr']} | {diff['z_inconsistency']} |")
    return "\n".join(lines)


def sweep(args: argparse.Namespace) -> int:
    os.environ["CUDA_VISIBLE_DEVICES"] = ""
    torch.set_num_threads(args.threads)
    from lift3d.lifting.checkpoint import lift_export
    from lift3d.plugins import create
    from lift3d.recipes.methods import Predictor
    from lift3d.training.loop import train

    started, saved = time.perf_counter(), stage1_config(args.stage1)
    report: dict[str, Any] = {
        "benchmark": "layer_kinds", "command": " ".join(["python benchmarks/layer_kinds.py", *args.argv]),
        "machine": machine_info(), "load_average_at_start": os.getloadavg(),
        "stage1": os.path.relpath(args.stage1.resolve(), REPO),
        "recipe": {"steps": args.steps, "lr": args.lr, "trainable": "volumetric", "timesteps": "make-a-volume",
                   "sampler_steps": args.sampler_steps, "seed": args.seed, "threads": args.threads},
        "reference": args.reference, "kinds": {}}
    datasets = {split: create("datasets", saved["data"]["dataset"], split=split, **saved["data"]["options"])
                for split in ("val", "test")}
    pairs = {split: [d[i] for i in range(len(d))] for split, d in datasets.items()}
    predictor = Predictor(args.seed, torch.device("cpu"), args.out / "samples")
    report["slice_wise"] = score(predictor, "slice-wise", args.stage1 / "model", pairs, args.sampler_steps)
    for spec in args.kinds:
        settings, folder = parse_kind(spec), args.out / spec.replace(":", "_").replace(",", "_").replace("=", "-")
        export, tic = folder / "run" / "model", time.perf_counter()
        if not (args.reuse and export.is_dir()):
            shutil.rmtree(folder, ignore_errors=True)
            print(f"[{spec}] stage 2, {args.steps} steps", flush=True)
            start = lift_export(args.stage1 / "model", folder / "start", seed=args.seed, **settings)
            train(stage2_config(saved, start, folder / "run", args))
        entry = report["kinds"][spec] = {"settings": settings, "train_s": time.perf_counter() - tic,
                                         "model": os.path.relpath(export.resolve(), REPO)}
        entry |= score(predictor, spec, export, pairs, args.sampler_steps)
        print(f"[{spec}] val PSNR {mean(entry['val'], 'psnr'):.3f}, test PSNR {mean(entry['test'], 'psnr'):.3f} "
              f"({entry['train_s'] / 60:.1f} min)", flush=True)
        if args.json:
            write_json(args.json, report)  # a run cut short still reports what it did
    reference = report["kinds"][args.reference]
    for spec, entry in report["kinds"].items():
        if spec != args.reference:  # paired by subject: this kind - the reference
            entry |= {f"{s}_vs_reference": paired_differences(reference[s], entry[s]) for s in ("val", "test")}
    report |= {"runtime_s": time.perf_counter() - started, "load_average_at_end": os.getloadavg()}
    print(markdown(report))
    if args.json:
        write_json(args.json, report)
    return 0


def choose(args: argparse.Namespace) -> int:
    """The default kind from sweeps at several learning rates (see the module's text)."""
    tried, best = [], {}
    for path in args.choose:
        run = json.loads(path.read_text())
        for kind, entry in run["kinds"].items():
            row = {"kind": kind, "lr": run["recipe"]["lr"], "val_psnr": mean(entry["val"], "psnr"),
                   "val_z_inconsistency": mean(entry["val"], "z_inconsistency"), "test_psnr": mean(entry["test"], "psnr")}
            tried.append(row)
            print(f"{kind:<10} lr {row['lr']:g}: validation PSNR {row['val_psnr']:.3f}, z {row['val_z_inconsistency']:.3f};"
                  f" test PSNR {row['test_psnr']:.3f}")
            if kind not in best or row["val_psnr"] > best[kind][0]["val_psnr"]:
                best[kind] = (row, entry)
    if args.reference not in best:
        print(f"layer_kinds.py: no run has the reference kind {args.reference!r}; kinds: {', '.join(best)}", file=sys.stderr)
        return 2
    ref_row, ref = best.pop(args.reference)
    decisions = {}
    for kind, (row, entry) in best.items():
        val, test = (paired_differences(ref[split], entry[split]) for split in ("val", "test"))
        within = val["psnr"]["ci"][1] >= 0
        decisions[kind] = {"lr": row["lr"], "reference_lr": ref_row["lr"], "validation": val, "test": test,
                           "within_reference_interval": within}
        (low, high), (test_low, test_high) = val["psnr"]["ci"], test["psnr"]["ci"]
        print(f"{kind} (lr {row['lr']:g}) - {args.reference} (lr {ref_row['lr']:g}) on validation: PSNR "
              f"{val['psnr']['mean']:+.3f} [{low:+.3f}, {high:+.3f}]; test PSNR {test['psnr']['mean']:+.3f} "
              f"[{test_low:+.3f}, {test_high:+.3f}], z {test['z_inconsistency']['mean']:+.3f} -> "
              f"{'within' if within else 'outside'} {args.reference}'s interval")
    if args.json:
        write_json(args.json, {"benchmark": "layer_kinds_choice", "tried": tried, "decisions": decisions,
                               "command": " ".join(["python benchmarks/layer_kinds.py", *args.argv])})
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage1", type=Path, help="a finished stage-1 run folder (model/, logs/config.json), "
                   "e.g. benchmarks/icbm.py's runs/icbm-cpu-flow/stage1")
    p.add_argument("--out", type=Path, help="work folder of the stage-2 runs and the samples")
    p.add_argument("--choose", nargs="+", type=Path, metavar="RUN_JSON",
                   help="no sweep: choose the default kind from sweeps' --json reports, one per learning rate")
    p.add_argument("--kinds", nargs="+", default=["full", "low-rank"], metavar="KIND[:KEY=VALUE,...]",
                   help="layer kinds and their settings (inflate keywords), e.g. low-rank:train_down=false")
    p.add_argument("--reference", default=None,
                   help="the kind the others are compared with (default: the first of --kinds; with --choose: full)")
    p.add_argument("--steps", type=int, default=600, help="stage-2 steps per kind (default %(default)s)")
    p.add_argument("--lr", type=float, default=2e-3, help="stage-2 AdamW learning rate (default %(default)s)")
    p.add_argument("--sampler-steps", type=int, default=25, help="solver steps for scoring (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared CPU)")
    p.add_argument("--reuse", action="store_true", help="keep a kind's finished stage-2 export")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.reference = args.reference or ("full" if args.choose else args.kinds[0])
    if not args.choose and not (args.stage1 and args.out):
        p.error("a sweep needs --stage1 and --out (or give --choose RUN_JSON ...)")
    if not args.choose and args.reference not in args.kinds:
        p.error(f"--reference {args.reference!r} is not among --kinds {args.kinds}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return choose(args) if args.choose else sweep(args)


if __name__ == "__main__":
    sys.exit(main())
