"""ICBM 152 benchmark: lift3d's fit recipe (``lift3d.recipes.fit``) on the built-in ``icbm152`` subjects, with
the published protocol's plan, and what only a benchmark adds.

The recipe does the protocol: stage 1, the stage-2 variants chosen on validation, the few-step sampler chosen on
validation within 8 U-Net passes (``lifted-fast``), its distilled one- and two-pass students (``lifted-1pass`` /
``lifted-2pass``, the family chosen on validation; also the published ``lifted-fast`` sampler, Euler 4 x 2), the 3D
U-Net baseline (MONAI BasicUNet, L1) and the test scores with paired intervals. Subjects
(``plugins/datasets/icbm152.py``): the 1 mm template in ``shared/data/icbm152-2009c``, block-averaged to the
scale's voxel, each subject a random smooth deformation with its own bias fields and noise; seeds fixed by the
plugin (train ``1000 + i``, 13 subjects; validation ``1500 + i``, 3; test ``2000 + i``, 6). Validation picks, test
reports.

The benchmark adds: the reference ``lifted-k8`` (the chosen model, DPM-Solver++ 25 steps, mean of 8 = 200 passes);
the tissue Dice of a segmenter trained on the training subjects' real targets; the 1-8 pass frontier (each budget's
best on validation, scored on test); seconds per volume for every method, one subject at a time after a warm-up, in
the same run as the 3D U-Net; the goals of a one- or two-pass method; the paired differences of this run's
``lifted-fast`` and winner against the published rows; and with ``--publish`` the winner as a row of the published
protocol's JSON (``icbm_cpu.json``, ``icbm_cpu_t2t1.json``).

    python benchmarks/icbm.py --scale smoke --out /tmp/icbm-smoke              # about 2 minutes
    python benchmarks/icbm.py --scale cpu --publish                             # about 80 min, 2 idle cores
    python benchmarks/icbm.py --scale cpu --source T2 --target T1 --publish     # the other direction
    python benchmarks/icbm.py --scale paper --device cuda --publish             # one GPU
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from lift3d.recipes.reports import REPO, machine_info, write_json

DEFAULT_DATA = REPO.parent / "shared" / "data" / "icbm152-2009c"
RESULTS = REPO / "benchmarks" / "results"
TEMPLATE_FILES = {"T1": "1mm_T1.nii.gz", "T2": "1mm_T2_brain.nii.gz", "mask": "1mm_brainmask.nii.gz"}
SUBJECTS = {"num_train": 13, "num_val": 3, "num_test": 6}

SCALES: dict[str, dict[str, Any]] = {
    # 2 CPU cores: the published protocol (48 x 48 x 24 axial at 2 mm).
    "cpu": {"voxel_mm": 2, "reference": (25, 8), "segmenter_steps": 600, "repeats": 3,
            "plan": {"size": 48, "num_slices": 24}},
    # The paper's RIRE grid, 256 x 256 x 35, on one GPU.
    "paper": {"voxel_mm": 1, "reference": (25, 8), "segmenter_steps": 3000, "repeats": 5,
              "plan": {"device": "cuda", "size": 256, "num_slices": 35, "widths": [64, 128, 256, 256],
                       "layers_per_block": 2, "stage1_steps": 30000, "stage1_batch": 32, "stage1_lr": 1e-4,
                       "stage2_steps": 4000, "stage2_val_every": 500, "stage2_lr": 1e-4, "baseline_steps": 10000,
                       "baseline_batch": 1, "baseline_lr": 2e-4, "baseline_val_every": 500,
                       "baseline_features": [32, 32, 64, 128, 256, 32], "distill_steps": 2000,
                       "distill_val_every": 250}},
    # Seconds: every code path, learning nothing (tests/test_benchmark_icbm.py).
    "smoke": {"voxel_mm": 4, "reference": (2, 2), "segmenter_steps": 3, "repeats": 1,
              "plan": {"size": 32, "num_slices": 16, "widths": [16, 32], "stage1_steps": 3, "stage1_batch": 8,
                       "stage2_steps": 2, "stage2_val_every": 1, "baseline_steps": 2, "baseline_val_every": 1,
                       "baseline_features": [8, 8, 8, 16, 16, 8], "distill_steps": 2, "distill_val_every": 1,
                       "evaluation_budget": 2, "solver_steps": [1, 2], "solver_samples": [1, 2]}},
}
CPU_PROTOCOL = {"stage1_steps": 2000, "stage1_batch": 16, "stage1_lr": 1e-3, "stage2_steps": 1200,
                "stage2_val_every": 150, "stage2_lr": 2e-3, "baseline_steps": 1000, "baseline_batch": 2,
                "baseline_lr": 1e-3, "baseline_val_every": 50, "distill_steps": 800, "distill_val_every": 100,
                "distill_lr": 5e-4, "distill_student_steps": [1]}
"""The published cpu protocol's steps and rates, written out: the automatic CPU plan may change, the protocol not."""


def protocol_plan(scale: str, objective: str, seed: int, baseline: bool, teacher_samples: int = 1,
                  families: tuple[str, ...] = ("direct",)):
    """The protocol's plan: the paper's full-rank volumetric layer (pinned: inflate's default changed after the
    protocol was published), stage 2 at the default rate and at cosine decay from 4e-3, chosen on validation."""
    from lift3d.recipes.plan import Plan, StageTwoVariant

    values = {**(CPU_PROTOCOL if scale == "cpu" else {}), **SCALES[scale]["plan"]}
    variants = [StageTwoVariant(kind="full"), StageTwoVariant(kind="full", lr_scheduler="cosine", learning_rate=4e-3)]
    return Plan(seed=seed, objective=objective, baseline=baseline, stage2_variants=variants,
                distill=list(families), distill_teacher_samples=teacher_samples, **values)


def segmenter(fitted, scale: str):
    """The tissue segmenter (CSF, GM, WM) on the real target of the training subjects, as a keyed phase."""
    from lift3d.evaluation.segmentation import load_segmenter
    from lift3d.recipes.segmenter import train_tissue_segmenter

    ctx, steps = fitted.ctx, SCALES[scale]["segmenter_steps"]
    key = {"data": ctx.data, "steps": steps, "seed": ctx.plan.seed}
    ctx.phases.run("segmenter", key, lambda folder: {"model": str(train_tissue_segmenter(
        "icbm152", ctx.data, folder, seed=ctx.plan.seed, steps=steps, overwrite=True))})
    return load_segmenter(ctx.phases.folder("segmenter") / "model")


def frontier(fitted) -> list[Any]:
    """Per budget of U-Net passes, the method best on validation among the chosen model's sampler candidates and
    the students' (``choose_solver.json``, ``choose_student.json``)."""
    out, phases = fitted.ctx.request.out, fitted.ctx.phases
    rows = [{**r, "method": replace(fitted.lifted, solver=r["solver"], steps=r["steps"], samples=r["samples"],
                                    antithetic=r.get("antithetic", False), name="lifted")}
            for r in json.loads((out / "choose_solver.json").read_text())["candidates"]]
    if fitted.student is not None:
        rows += [{**r, "method": replace(fitted.student, folder=phases.folder(f"distill-{r['family']}") / "model",
                                         run_id=phases.record(f"distill-{r['family']}")["run_id"], steps=r["steps"],
                                         samples=r["samples"], antithetic=r.get("antithetic", False),
                                         name=f"student-{r['family']}")}
                 for r in json.loads((out / "choose_student.json").read_text())["candidates"]]
    best = {}
    for row in rows:
        n = row["evaluations"]
        if n not in best or row["val_psnr"] > best[n]["val_psnr"]:
            best[n] = row
    return [best[n] for n in sorted(best)]


def seconds_per_volume(predictor, method, pairs, repeats: int) -> float:
    """One subject at a time after a warm-up: the median over subjects and repeats of one volume's K samples."""
    import torch

    times = []
    for pair in pairs:
        for r in range(repeats + 1):
            tic = time.perf_counter()
            for k in range(method.samples):
                predictor.draw(method, k, pair.source[None])
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            if r:  # the first draw of each subject warms up
                times.append(time.perf_counter() - tic)
    return statistics.median(times)


PUBLISHED = {"T1 -> T2": "icbm_cpu.json", "T2 -> T1": "icbm_cpu_t2t1.json"}
"""The published protocol's rows per direction: this benchmark compares against them and adds its winner."""


def published_rows(direction: str) -> dict[str, Any] | None:
    name = PUBLISHED.get(direction)
    return json.loads((RESULTS / name).read_text())["methods"] if name and (RESULTS / name).is_file() else None


def _suffix(direction: str) -> str:
    """``""`` for the published direction T1 -> T2, else ``"_t2t1"`` and the like (the results' file names)."""
    source, target = direction.split(" -> ")
    return "" if (source, target) == ("T1", "T2") else f"_{source.lower()}{target.lower()}"


def publish_winner(report: dict[str, Any], winner: str) -> Path:
    """The one- or two-pass winner as a row of the published protocol's JSON (``icbm_cpu.json``): its test
    scores, its passes and its seconds per volume timed in this run with the 3D U-Net (whose same-run time
    joins the published 3D U-Net row), and its paired differences against that file's ``lifted-k8``,
    ``lifted-fast`` and ``3d-unet`` (same subjects and targets); this run's own references stay with it."""
    path = RESULTS / PUBLISHED[report["direction"]]
    data = json.loads(path.read_text())
    for old in [m for m in data["methods"] if m.endswith("pass")]:  # an earlier winner's row and its differences
        del data["methods"][old]
        data["paired_differences"] = {k: v for k, v in data["paired_differences"].items()
                                      if not k.startswith(f"{old} vs ")}
    results = report["methods"]
    row = dict(results[winner])
    references = {name: {"sampler": results[name]["solver"], "summary": results[name]["summary"],
                         "seconds_per_volume": results[name]["seconds_per_volume"]}
                  for name in ("lifted-fast", "lifted-k8", "3d-unet") if name in results}
    row |= {"label": f"{winner} ({report['selection']['choose_student']['chosen']['family']} student)",
            "sampler": row["solver"], "seconds_per_volume_timed": row["seconds_per_volume"],
            "chosen_by": "lift3d fit (validation PSNR, <= 2 passes; benchmarks/icbm.py)",
            "frontier_run": {"command": report["command"], "cpu": report["machine"].get("cpu"),
                             "machine": report["machine"], "run_s": report["total_s"], "phases_s": report["phases_s"],
                             "report": f"icbm_recipe_{report['scale']}{_suffix(report['direction'])}.json",
                             "same_references": {name: False for name in references},
                             "references_in_that_run": references,
                             "paired_differences": {k: v for k, v in report["paired_differences"].items()
                                                    if k.startswith(f"{winner} vs ") and "published" not in k}}}
    data["methods"][winner] = row
    if "3d-unet" in results:
        data["methods"]["3d-unet"][f"seconds_per_volume_same_run_as_{winner.replace('-', '_')}"] = \
            results["3d-unet"]["seconds_per_volume"]
    for name in ("lifted-k8", "lifted-fast", "3d-unet"):
        if f"{winner} vs published {name}" in report["paired_differences"]:
            data["paired_differences"][f"{winner} vs {name}"] = report["paired_differences"][
                f"{winner} vs published {name}"]
    write_json(path, data)
    return path


def goals(results: dict[str, Any], winner: str) -> dict[str, Any]:
    """The few-pass goals: the winner against the 3D U-Net and lifted-fast (test subjects, noisy target)."""
    s = {name: entry["summary"] for name, entry in results.items()}
    w, unet, fast = s[winner], s.get("3d-unet"), s["lifted-fast"]
    checks = {"passes <= 2": results[winner]["unet_evaluations"] <= 2,
              "PSNR >= lifted-fast - 0.1 dB": w["psnr"]["mean"] >= fast["psnr"]["mean"] - 0.1}
    if unet:
        checks |= {"PSNR >= 3d-unet": w["psnr"]["mean"] >= unet["psnr"]["mean"],
                   "SSIM >= 3d-unet": w["ssim"]["mean"] >= unet["ssim"]["mean"],
                   "z-inconsistency <= 3d-unet": w["z_inconsistency"]["mean"] <= unet["z_inconsistency"]["mean"],
                   "seconds <= 2x 3d-unet": results[winner]["seconds_per_volume"]
                   <= 2 * results["3d-unet"]["seconds_per_volume"]}
        if "dice_mean" in w:
            checks["tissue Dice >= 3d-unet"] = w["dice_mean"]["mean"] >= unet["dice_mean"]["mean"]
    checks["std Spearman > 0 on every subject (K >= 2)"] = all(
        e["uncertainty"]["std_error_spearman_positive"] == e["uncertainty"]["subjects"]
        for e in results.values() if e.get("uncertainty"))
    return {"winner": winner, "checks": checks, "met": all(checks.values())}


def markdown(report: dict[str, Any]) -> str:
    """The tables of a results page: every method on test, the frontier, the paired differences and the goals."""
    def cell(stats, key, digits):
        return f"{stats[key]['mean']:.{digits}f}" if key in stats else ""

    lines = ["| method | sampler | passes | s / volume | PSNR | SSIM | MAE | z-inc. | Dice | clean PSNR / SSIM |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, e in report["methods"].items():
        s, c = e["summary"], e["clean_target"]["summary"]
        seconds = f"{e['seconds_per_volume']:.3f}" if e.get("timed") else ""
        lines.append(f"| {name} | {e['solver']} | {e['unet_evaluations']} | {seconds} | "
                     f"{cell(s, 'psnr', 2)} | {cell(s, 'ssim', 4)} | {cell(s, 'mae', 2)} | "
                     f"{cell(s, 'z_inconsistency', 3)} | {cell(s, 'dice_mean', 3)} | {cell(c, 'psnr', 2)} / "
                     f"{cell(c, 'ssim', 4)} |")
    lines += ["", "| passes | best on validation | validation PSNR | test PSNR | test SSIM |", "| --- | --- | --- | --- | --- |"]
    for r in report["frontier"]:
        who = (f"{r.get('family', 'lifted')} {r.get('solver', 'flow')}-{r['steps']} x {r['samples']}"
               + " antithetic" * r.get("antithetic", False))
        lines.append(f"| {r['evaluations']} | {who} | {r['val_psnr']:.2f} | {r['test']['psnr']['mean']:.2f} | "
                     f"{r['test']['ssim']['mean']:.4f} |")
    lines += ["", "Paired differences on the test subjects (first minus second, mean [95 % interval], first better on):", ""]
    for comparison, refs in report["paired_differences"].items():
        for ref, metrics in refs.items():
            shown = [f"{m} {metrics[m]['mean']:+.3f} [{metrics[m]['ci'][0]:+.3f}, {metrics[m]['ci'][1]:+.3f}] "
                     f"({metrics[m]['b_better']}/{metrics[m]['n']})" for m in ("psnr", "ssim", "z_inconsistency",
                                                                             "dice_mean") if m in metrics]
            lines.append(f"- {comparison} ({ref.replace('_', ' ')}): " + "; ".join(shown))
    goals = report["goals"]
    lines += ["", f"Goals for `{goals['winner']}`: " + "; ".join(f"{k}: {'yes' if v else 'NO'}"
                                                             for k, v in goals["checks"].items())]
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> dict[str, Any]:
    from lift3d.evaluation.metrics import METRICS, PLANE_METRICS, paired_differences
    from lift3d.recipes.fit import FitRequest, run_fit
    from lift3d.recipes.methods import Method, scored

    direction, scale = f"{args.source} -> {args.target}", SCALES[args.scale]
    suffix = _suffix(direction).replace("_", "-")
    out = (args.out or REPO / "runs" / f"icbm-{args.scale}{suffix}-{args.objective}").resolve()
    options = {"root": str(args.data), "files": TEMPLATE_FILES, "voxel_mm": scale["voxel_mm"], **SUBJECTS}
    plan = protocol_plan(args.scale, args.objective, args.seed, not args.no_baseline, args.teacher_samples,
                         args.distill)
    tag = f"_mean{args.teacher_samples}" if args.teacher_samples > 1 else ""
    start, load_before, machine = time.perf_counter(), os.getloadavg(), machine_info()
    fitted = run_fit(FitRequest(out, args.source, args.target, dataset="icbm152", options=options, device=args.device,
                                seed=args.seed, baseline=not args.no_baseline, plan=plan))
    ctx, predictor = fitted.ctx, fitted.predictor
    test = ctx.pairs("test")
    seg = segmenter(fitted, args.scale)
    steps, k = scale["reference"]
    methods = {"slice-wise-fast": fitted.slice_wise, "lifted-fast": fitted.lifted,
               f"lifted-k{k}": replace(fitted.lifted, solver="dpm", steps=steps, samples=k, antithetic=False)}
    if args.objective == "flow":  # the published lifted-fast's settings (Euler 4 x 2), whatever this run chose
        methods["lifted-euler4-k2"] = replace(fitted.lifted, solver="flow", steps=4, samples=2, antithetic=False)
    if fitted.student is not None:
        methods[f"lifted-{fitted.student.evaluations}pass"] = fitted.student
    if predictor.baseline is not None:
        methods["3d-unet"] = Method("3d-unet", None)
    front = frontier(fitted)
    methods |= {f"frontier-{r['evaluations']}": r["method"] for r in front}
    results = {}
    for name, method in methods.items():
        print(f"[test] {name}: {method.description}")
        results[name] = scored(replace(method, name=name), predictor(method, test), test, segmenter=seg)
        if name in ("lifted-fast", "3d-unet") or name.endswith("pass"):
            results[name]["seconds_per_volume"] = seconds_per_volume(predictor, method, test, scale["repeats"])
            results[name]["timed"] = True  # the others' seconds are their batched sampling, as drawn
    winner = next((n for n in results if n.endswith("pass")), "lifted-fast")
    scores = {**METRICS, **PLANE_METRICS, **{k: True for k in results["lifted-fast"]["subjects"][0]
                                             if k.startswith("dice")}}

    def paired(b_rows, a_rows):
        return paired_differences(a_rows, b_rows, metrics=scores)

    comparisons = [(winner, other) for other in (f"lifted-k{k}", "lifted-fast", "3d-unet")
                   if other in results and other != winner] + [("lifted-fast", "slice-wise-fast")]
    differences = {f"{b} vs {a}": {"target": paired(results[b]["subjects"], results[a]["subjects"]),
                                   "clean_target": paired(results[b]["clean_target"]["subjects"],
                                                          results[a]["clean_target"]["subjects"])}
                   for b, a in comparisons}
    published = published_rows(direction) if args.scale == "cpu" else None
    for name in ("lifted-fast", "lifted-k8", "3d-unet") if published else ():  # same subjects, same targets
        mine_ = ["lifted-fast", winner] + ["lifted-euler4-k2"] * (name == "lifted-fast")
        for mine in dict.fromkeys(m for m in mine_ if m in results):
            differences[f"{mine} vs published {name}"] = {
                "target": paired(results[mine]["subjects"], published[name]["subjects"]),
                "clean_target": paired(results[mine]["clean_target"]["subjects"],
                                       published[name]["clean_target"]["subjects"])}
    report = {
        "benchmark": "icbm", "scale": args.scale, "direction": direction, "objective": args.objective,
        "command": " ".join(["python benchmarks/icbm.py", *map(shlex.quote, args.argv)]),
        "machine": machine | {"load_average_at_start": load_before, "load_average_at_end": os.getloadavg()},
        "plan": plan.model_dump(mode="json"), "split": ctx.splits,
        "selection": {name: json.loads((out / f"{name}.json").read_text())
                      for name in ("choose_stage2", "choose_solver", "choose_student") if (out / f"{name}.json").is_file()},
        "frontier": [{k: v for k, v in r.items() if k != "method"} | {"test": results[f"frontier-{r['evaluations']}"]
                                                                      ["summary"]} for r in front],
        "methods": results, "paired_differences": differences, "goals": goals(results, winner),
        "phases_s": {p.name: json.loads((p / "phase.json").read_text())["wall_s"]
                     for p in sorted(out.iterdir()) if (p / "phase.json").is_file()},
        "total_s": time.perf_counter() - start,
    }
    write_json(out / f"benchmark{tag}.json", report)
    (out / f"benchmark{tag}.md").write_text(markdown(report))
    if args.publish:
        name = f"icbm_recipe_{args.scale}{_suffix(direction)}{tag}.json"
        write_json(RESULTS / name, report)
        print(f"[publish] {RESULTS / name}")
        if winner.endswith("pass") and args.scale == "cpu" and published is not None:  # the protocol's rows exist
            print(f"[publish] {publish_winner(report, winner)} ({winner})")
    for name, entry in results.items():
        s = entry["summary"]
        print(f"{name:>18}: {entry['unet_evaluations']:>3} passes, {entry['seconds_per_volume']:.3f} s/vol, PSNR "
              f"{s['psnr']['mean']:.2f}, SSIM {s['ssim']['mean']:.4f}, z-inc {s['z_inconsistency']['mean']:.3f}"
              + (f", Dice {s['dice_mean']['mean']:.3f}" if "dice_mean" in s else ""))
    print(f"goals: {report['goals']}")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", choices=sorted(SCALES), default="cpu", help="smoke, cpu (the protocol) or paper")
    parser.add_argument("--source", default="T1", choices=("T1", "T2"), help="the input contrast")
    parser.add_argument("--target", default="T2", choices=("T1", "T2"), help="the contrast to synthesise")
    parser.add_argument("--objective", default="flow", choices=("flow", "ddpm"), help="what both stages learn")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the folder of the 1 mm ICBM files")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default runs/icbm-SCALE...)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0, help="weights, data order and sampling noise")
    parser.add_argument("--teacher-samples", type=int, default=1, choices=range(1, 17), metavar="K",
                        help="distil from the teacher's K-sample mean (default 1: one teacher solve per noise)")
    parser.add_argument("--distill", nargs="+", default=["direct"], choices=("direct", "reflow"),
                        help="the distillation families to train and choose among on validation")
    parser.add_argument("--no-baseline", action="store_true", help="skip the 3D U-Net")
    parser.add_argument("--publish", action="store_true", help="write the report to benchmarks/results")
    args = parser.parse_args(argv)
    if args.source == args.target:
        parser.error(f"--source and --target are both {args.source}; give two contrasts")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: list[str] | None = None) -> int:
    from lift3d.io.errors import Lift3dError

    try:
        run(parse_args(argv))
    except (Lift3dError, ValueError, FileNotFoundError) as exc:
        print(f"icbm: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
