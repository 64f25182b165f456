"""Paired differences between methods of two ``benchmarks/icbm_t1t2.py`` runs on the same test subjects.

Every run of the protocol scores the same test subjects (icbm152 seeds ``2000 + i``) with the same
sampling seed, so methods of two runs pair subject by subject: pixel against latent space on one
grid, or a 2.5D stage 1 against the published one. Each ``--pair`` names ``b`` and ``a`` as
``RUN:METHOD`` (``RUN`` is a ``results.json``); the table gives ``b - a`` with a 95 % t-interval,
against the noisy and the clean target, plus each side's training time and seconds per volume.

    python benchmarks/icbm_compare.py \\
        --pair runs/icbm14-context1/results.json:lifted runs/icbm14/results.json:lifted \\
        --out benchmarks/results/icbm_cpu_compare.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from lift3d.recipes.reports import REPO, machine_info, write_json  # noqa: E402

from lift3d.evaluation.metrics import paired_differences  # noqa: E402


def load(spec: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``RUN:METHOD`` -> (label, the run's report, the method's entry)."""
    path, sep, method = spec.rpartition(":")
    if not sep or not path:
        raise ValueError(f"{spec!r} is not RUN:METHOD, e.g. runs/icbm14/results.json:lifted")
    report_path = Path(path)
    if not report_path.is_file():
        raise FileNotFoundError(f"no benchmark report at {report_path}")
    report = json.loads(report_path.read_text())
    if method not in report["methods"]:
        raise ValueError(f"{report_path} has no method {method!r}; valid: {', '.join(report['methods'])}")
    return f"{report_path.parent.name}:{method}", report, report["methods"][method]


def training_minutes(report: dict[str, Any], method: dict[str, Any]) -> float:
    """The training time behind ``method``: the 3D U-Net's own, or stages 1 and 2 of the diffusion model."""
    t = report["timing"]
    keys = ("baseline_s",) if method["model"] == "baseline" else ("stage1_s", "stage2_s")
    return sum(t.get(k, 0.0) for k in keys) / 60


def compare(b_spec: str, a_spec: str) -> dict[str, Any]:
    (b_name, b_report, b), (a_name, a_report, a) = load(b_spec), load(a_spec)
    if b_report["data"]["test_subjects"] != a_report["data"]["test_subjects"]:
        raise ValueError(f"{b_name} and {a_name} were scored on different test subjects")
    return {"b": b_name, "a": a_name,
            "sides": {name: {"sampler": m["sampler"], "grid": r["settings"]["grid"], "unet": r["settings"]["unet"],
                             "psnr": m["summary"]["psnr"]["mean"], "ssim": m["summary"]["ssim"]["mean"],
                             "z_inconsistency": m["summary"]["z_inconsistency"]["mean"],
                             "seconds_per_volume": m["seconds_per_volume"],
                             "training_min": training_minutes(r, m)}
                      for name, r, m in ((b_name, b_report, b), (a_name, a_report, a))},
            "target": paired_differences(a["subjects"], b["subjects"]),
            "clean_target": paired_differences(a["clean_target"]["subjects"], b["clean_target"]["subjects"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", nargs=2, action="append", required=True, metavar=("B", "A"),
                        help="RUN:METHOD of b, then of a (repeatable)")
    parser.add_argument("--out", type=Path, help="write the comparisons as JSON here")
    args = parser.parse_args(argv)
    try:
        rows = [compare(b, a) for b, a in args.pair]
    except (ValueError, FileNotFoundError) as exc:
        print(f"icbm_compare: error: {exc}", file=sys.stderr)
        return 2
    for row in rows:
        print(f"{row['b']} - {row['a']}:")
        for target in ("target", "clean_target"):
            cells = ", ".join(f"{m} {d['mean']:+.3f} [{d['ci'][0]:+.3f}, {d['ci'][1]:+.3f}] ({d['b_better']}/{d['n']})"
                              for m, d in row[target].items())
            print(f"  {target}: {cells}")
        for name, side in row["sides"].items():
            print(f"  {name}: {side['grid']}, {side['sampler']}, {side['seconds_per_volume']:.1f} s / volume, "
                  f"trained {side['training_min']:.1f} min")
    if args.out:
        write_json(args.out, {"command": "python benchmarks/icbm_compare.py " + " ".join(
            f"--pair {b} {a}" for b, a in args.pair) + f" --out {os.path.relpath(args.out.resolve(), REPO)}",
                              "machine": machine_info(), "comparisons": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
