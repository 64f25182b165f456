"""The default layer kind, decided from ``benchmarks/layer_kinds.py`` runs at several learning rates.

Each kind takes its best learning rate by mean validation PSNR. The cheaper kind becomes the default if
its validation PSNR lies within the paired 95 % interval of ``full``'s, that is, if the interval of
(cheaper - full) over the validation subjects reaches 0 or above. Test-subject paired differences are
reported beside it, never used to choose.

    python benchmarks/layer_kinds_choice.py benchmarks/results/layer_kinds_floor_lr2e-3_cpu.json \\
        benchmarks/results/layer_kinds_floor_lr4e-3_cpu.json --json benchmarks/results/layer_kinds_choice_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from lift3d.evaluation.metrics import paired_differences
from lift3d.recipes.reports import write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="layer_kinds.py JSON files, one per learning rate")
    parser.add_argument("--reference", default="full", help="the kind the others must match (default full)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    runs = [json.loads(path.read_text()) for path in args.runs]
    best: dict[str, dict] = {}
    tried = []
    for run in runs:
        lr = run["recipe"]["lr"]
        for kind, entry in run["kinds"].items():
            val = statistics.fmean(row["psnr"] for row in entry["val"])
            tried.append({"kind": kind, "lr": lr, "val_psnr": val,
                          "val_z_inconsistency": statistics.fmean(r["z_inconsistency"] for r in entry["val"]),
                          "test_psnr": statistics.fmean(r["psnr"] for r in entry["test"])})
            if kind not in best or val > best[kind]["val_psnr"]:
                best[kind] = {"lr": lr, "val_psnr": val, "entry": entry}
    for row in tried:
        print(f"{row['kind']:<10} lr {row['lr']:g}: validation PSNR {row['val_psnr']:.3f}, "
              f"z {row['val_z_inconsistency']:.3f}; test PSNR {row['test_psnr']:.3f}")
    ref = best[args.reference]["entry"]
    decisions = {}
    for kind, chosen in best.items():
        if kind == args.reference:
            continue
        val = paired_differences(ref["val"], chosen["entry"]["val"])
        test = paired_differences(ref["test"], chosen["entry"]["test"])
        within = val["psnr"]["ci"][1] >= 0
        decisions[kind] = {"lr": chosen["lr"], "reference_lr": best[args.reference]["lr"], "validation": val,
                           "test": test, "within_reference_interval": within}
        low, high = val["psnr"]["ci"]
        print(f"{kind} (lr {chosen['lr']:g}) - {args.reference} (lr {best[args.reference]['lr']:g}) on validation: "
              f"PSNR {val['psnr']['mean']:+.3f} [{low:+.3f}, {high:+.3f}]; test PSNR {test['psnr']['mean']:+.3f} "
              f"[{test['psnr']['ci'][0]:+.3f}, {test['psnr']['ci'][1]:+.3f}], z {test['z_inconsistency']['mean']:+.3f}"
              f" -> {'within' if within else 'outside'} {args.reference}'s interval")
    if args.json:
        write_json(args.json, {"benchmark": "layer_kinds_choice", "command": "python benchmarks/layer_kinds_choice.py "
                               + " ".join(sys.argv[1:] if argv is None else argv), "tried": tried,
                               "decisions": decisions})
    return 0


if __name__ == "__main__":
    sys.exit(main())
