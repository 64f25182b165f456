"""What a fit leaves to read: ``results.json``, ``results.md`` and ``report.html`` in the run folder."""

from __future__ import annotations

import json
from typing import Any

from lift3d.io.writing import write_text_atomic
from lift3d.recipes.fit_setup import FitContext
from lift3d.recipes.methods import Prediction

SHOWN = ("psnr", "ssim", "mae", "z_inconsistency")


def _cell(stats: dict[str, Any] | None, digits: int) -> str:
    return "" if not stats else f"{stats['mean']:.{digits}f}"


def uncertainty_lines(results: dict[str, Any]) -> list[str]:
    """For each method with K >= 2 samples, how well its std map predicts the error."""
    lines = []
    for name, entry in results.items():
        u = entry.get("uncertainty")
        if u:
            across = "n/a" if u["subject_std_mae_spearman"] is None else f"{u['subject_std_mae_spearman']:+.2f}"
            lines.append(f"{name}'s std map against |error|: voxel-wise Spearman positive on "
                         f"{u['std_error_spearman_positive']}/{u['subjects']} subjects (lowest "
                         f"{u['std_error_spearman_min']:+.2f}); across subjects, mean std against MAE {across}")
    return lines


def markdown(results: dict[str, Any], paired: dict[str, Any]) -> str:
    """The results table a reader takes in at a glance, and the paired differences with their intervals."""
    lines = ["| method | solver | passes | s / volume | PSNR | SSIM | MAE | z-inconsistency |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, entry in results.items():
        s = entry["summary"]
        lines.append(f"| {name} | {entry['solver']} | {entry['unet_evaluations']} | "
                     f"{entry['seconds_per_volume']:.2f} | {_cell(s.get('psnr'), 2)} | {_cell(s.get('ssim'), 4)} | "
                     f"{_cell(s.get('mae'), 2)} | {_cell(s.get('z_inconsistency'), 3)} |")
    lines += [f"\n{line}" for line in uncertainty_lines(results)]
    lines += ["", "Paired differences, test subjects (the first method minus the second: mean [95 % interval], "
              "subjects where the first is better):", ""]
    for comparison, metrics in paired.items():
        shown = []
        for name in SHOWN:
            if name in metrics:
                m = metrics[name]
                low, high = m["ci"]
                shown.append(f"{name} {m['mean']:+.3f} [{low:+.3f}, {high:+.3f}] ({m['b_better']}/{m['n']})")
        lines.append(f"- {comparison}: " + "; ".join(shown))
    return "\n".join(lines)


def write_results(ctx: FitContext, results: dict[str, Any], paired: dict[str, Any],
                  predictions: dict[str, Prediction], test) -> dict[str, Any]:
    """Write ``results.json``, ``results.md`` and ``report.html`` (orthogonal views of every test subject)."""
    from lift3d.evaluation.report import SubjectViews, write_report

    out = ctx.request.out
    report = {"plan": ctx.plan.model_dump(mode="json", exclude_none=True), "split": ctx.splits,
              "methods": results, "paired_differences": paired}
    write_text_atomic(out / "results.json", json.dumps(report, indent=1, default=str))
    table = markdown(results, paired)
    write_text_atomic(out / "results.md", table + "\n")
    rows = [{"method": name, **row} for name, entry in results.items() for row in entry["subjects"]]
    views = {p.subject: SubjectViews(p.target[0].numpy(), {n: pr.mean[i, 0].numpy() for n, pr in predictions.items()},
                                     source=p.source[0].numpy(), spacing=p.meta.grid_spacing,
                                     stds={n: pr.std[i, 0].numpy() for n, pr in predictions.items()
                                           if pr.std is not None})
             for i, p in enumerate(test)}
    request = ctx.request
    write_report(out / "report.html", rows, views=views, notes=uncertainty_lines(results),
                 title=f"lift3d fit: {request.source} -> {request.target}, {len(test)} test subjects")
    request.log("\n" + table)
    request.log(f"[report] {out / 'report.html'}; NIfTI results in {out / 'test'}")
    return report
