"""The few-step frontier on the ICBM protocol: quality against U-Net evaluations per volume (Cost).

Data, grid, subjects and seeds are those of ``benchmarks/icbm_t1t2.py`` (13 training, 3 validation and 6
test subjects made from the ICBM 152 2009c template). Models:

- ``ddpm``: the protocol's own v-prediction stage 1, its lifted stage 2 (the variant its published run chose
  on validation), and the MONAI 3D U-Net (L1), from ``runs/icbm_t1t2-<scale>`` (trained there first if missing);
- ``flow``: the same recipe with the flow-matching objective (``--diffusion.objective flow``) in both stages,
  and a second stage 2 from the same stage 1 trained only on the timesteps a ``--matched-steps``-step Euler
  sampler visits (step-count-matched training, as in Fast-DDPM), from ``runs/icbm_t1t2-<scale>-flow``.

Candidates (all lifted, all through ``lift3d.sampling.synthesize``): today's DPM-Solver++ on the ddpm model at
1-8 steps, the mean of K few-step samples, and an informed start (SDEdit: the model's own one-pass estimate
noised to where the last ``strength`` of the steps begins); flow Euler and DPM-Solver++ on both flow models,
with the same variations. Selection: every candidate is scored on the validation subjects; for each budget of
1, 2, 4 and 8 U-Net evaluations per volume the best by validation PSNR is taken to the test subjects, and the
best of all within 8 evaluations is ``lifted-fast``. The test subjects also see today's reference points:
lifted DPM-25 (25 evaluations), DDIM-200 (200) and ``lifted-k8`` (8 x DPM-25 = 200, with the noise
correlation the protocol chose on validation), and the 3D U-Net. Paired 95 % intervals of every test row
against ``lifted-k8`` and against ``3d-unet``, on the noisy and the clean target. Seconds per volume: each
test method timed again in this run, one subject at a time, after a warm-up.

    python benchmarks/icbm_fast.py --scale smoke --out /tmp/icbm-fast-smoke                  # ~2 minutes
    python benchmarks/icbm_fast.py --scale cpu --publish                                     # 2 idle cores
    python benchmarks/icbm_fast.py --scale cpu --source T2 --target T1 --publish             # the other contrast

``--publish`` writes ``benchmarks/results/icbm_fast_<scale>[_t2t1].json`` and its plot, and adds
``lifted-fast`` (per-subject rows, ``unet_evaluations``, ``seconds_per_volume``) to the protocol's published
``icbm_<scale>[_t2t1].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

import icbm_t1t2 as protocol
from icbm_t1t2 import Method, Predictor, scored

from lift3d.evaluation.metrics import paired_differences, summarize
from lift3d.recipes.reports import REPO, machine_info, write_json

BUDGETS = (1, 2, 4, 8)
FAST_BUDGET = 8  # the bar: today's best quality at 8 U-Net evaluations or fewer


def candidates(ddpm: Method, flows: dict[str, Method]) -> dict[str, tuple[str, Method]]:
    """Every few-step setting tried on validation (at most 8 U-Net evaluations per volume), by name, with
    its family: ``ddpm`` or one of the flow models in ``flows`` (family -> model)."""
    out = []
    for k, steps in ((1, 1), (1, 2), (1, 4), (1, 8), (2, 4), (4, 2), (8, 1)):
        out.append(("ddpm", replace(ddpm, name=f"ddpm-dpm{steps}-k{k}", scheduler="dpm", steps=steps, samples=k)))
    for k, steps, strength in ((1, 8, 0.25), (1, 8, 0.5), (1, 16, 0.25), (2, 8, 0.25)):
        out.append(("ddpm", replace(ddpm, name=f"ddpm-dpm{steps}-estimate{strength:g}-k{k}", scheduler="dpm",
                                    steps=steps, samples=k, start="estimate", strength=strength)))
    for family, base in flows.items():
        for k, steps in ((1, 1), (1, 2), (1, 4), (1, 8), (2, 1), (2, 2), (2, 3), (3, 2), (2, 4), (4, 1), (4, 2),
                         (8, 1)):
            out.append((family, replace(base, name=f"{family}-euler{steps}-k{k}", scheduler="flow", steps=steps,
                                        samples=k)))
        for steps in (2, 4, 8):
            out.append((family, replace(base, name=f"{family}-dpm{steps}-k1", scheduler="dpm", steps=steps)))
        for start, steps, strength in (("estimate", 8, 0.25), ("estimate", 8, 0.5), ("source", 8, 0.5)):
            out.append((family, replace(base, name=f"{family}-euler{steps}-{start}{strength:g}-k1", scheduler="flow",
                                        steps=steps, start=start, strength=strength)))
    return {method.name: (family, method) for family, method in out}


def evaluations(method: Method) -> int:
    """U-Net passes per volume, counted as lift3d's sampler counts them (every built-in sampler here runs
    exactly ``steps`` steps)."""
    from lift3d.sampling.synthesis import evaluations_of

    return 1 if method.folder is None else evaluations_of(method.steps, method.samples, method.start, method.strength)


def validate(methods: dict[str, tuple[str, Method]], val_pairs, predict: Predictor) -> list[dict[str, Any]]:
    rows = []
    for family, method in methods.values():
        metrics = summarize(protocol.evaluate(predict(method, val_pairs).mean, val_pairs))
        rows.append({"method": method.name, "family": family, "sampler": method.sampler,
                     "unet_evaluations": evaluations(method), "metrics": metrics})
        print(protocol._line(f"{method.name} ({evaluations(method)} evaluations)", metrics))
    return rows


def best_within(rows: list[dict[str, Any]], budget: int, families: tuple[str, ...] | None = None) -> str | None:
    mine = [r for r in rows if r["unet_evaluations"] <= budget and (families is None or r["family"] in families)]
    if not mine:
        return None
    return max(mine, key=lambda r: (r["metrics"]["psnr"]["mean"], -r["unet_evaluations"]))["method"]


def time_method(method: Method, pairs, predict: Predictor, repeats: int) -> float:
    """Median seconds per volume, one subject at a time (a warm-up first), all K samples included."""
    from lift3d.sampling.synthesis import sample_seed, synthesize

    def once(pair) -> float:
        source = pair.source[None].to(predict.device)
        tic = time.perf_counter()
        with torch.no_grad():
            if method.folder is None:
                predict.baseline(source)
            else:
                model = predict.models.get(method.folder)
                if model is None:
                    from lift3d.sampling.synthesis import load_synthesis_model

                    model = predict.models[method.folder] = load_synthesis_model(method.folder, device=predict.device)
                for k in range(method.samples):
                    synthesize(model, source, solver=method.scheduler, steps=method.steps,
                               seed=sample_seed(predict.seed, k), noise_correlation=method.rho, start=method.start,
                               strength=method.strength, progress=False)
        return time.perf_counter() - tic

    once(pairs[0])  # warm-up
    return statistics.median(once(pairs[i % len(pairs)]) for i in range(repeats))


def plot(path: Path, frontier: list[dict[str, Any]], reference: dict[str, dict[str, Any]], title: str,
         families: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, metric, label in ((axes[0], "psnr", "PSNR (dB), test"), (axes[1], "ssim", "SSIM, test")):
        for fam, marker in zip(families, "os^vDP*"):
            pts = sorted((r["unet_evaluations"], r["summary"][metric]["mean"]) for r in frontier if r["family"] == fam)
            if pts:
                ax.plot(*zip(*pts), marker=marker, label=f"lifted, {fam} (best per budget on validation)")
        for name, row in reference.items():
            if name == "3d-unet":
                ax.axhline(row["summary"][metric]["mean"], color="k", ls="--", lw=1, label="3D U-Net (1 pass)")
            else:
                ax.scatter([row["unet_evaluations"]], [row["summary"][metric]["mean"]], marker="x", s=60, zorder=5,
                           label=f"{name} ({row['unet_evaluations']} evaluations)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("U-Net evaluations per volume")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(report: dict[str, Any]) -> str:
    """The frontier table and lifted-fast's paired differences, as ``benchmarks/results/few-steps.md`` shows them."""
    methods, chosen, fast = report["methods"], report["selection"]["chosen"], report["selection"]["lifted_fast"]
    seconds = report["seconds_per_volume"]
    k8 = next(name for name in methods if name.startswith("lifted-k"))

    def cells(name: str) -> str:
        s, c = methods[name]["summary"], methods[name]["clean_target"]["summary"]
        sec = seconds.get(name)
        return (f"{s['psnr']['mean']:.2f} | {s['ssim']['mean']:.4f} | {s['mae']['mean']:.2f} | "
                f"{s['z_inconsistency']['mean']:.3f} | {c['psnr']['mean']:.2f} / {c['ssim']['mean']:.4f} | "
                + ("" if sec is None else f"{sec:.3g}"))

    lines = ["| evaluations | best on validation | sampler | PSNR ↑ | SSIM ↑ | MAE ↓ | z-inc. ↓ | clean PSNR / SSIM "
             "| s / volume |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for budget in BUDGETS:
        names = [chosen[f"any@{budget}"]]
        if budget == FAST_BUDGET:
            names += [chosen[key] for key in chosen if key.endswith(f"@{budget}") and not key.startswith("any")]
        for name in dict.fromkeys(names):
            row, label = methods[name], methods[name]["family"]
            label += " (`lifted-fast`)" if name == fast else ""
            line = f"| {row['unet_evaluations']} | {label} | {row['sampler']} | {cells(name)} |"
            if name == fast:
                line = "| " + " | ".join(f"**{c.strip()}**" if c.strip() else "" for c in line.strip("|").split("|")) + " |"
            lines.append(line)
    for name, row in methods.items():
        if row["family"] == "reference":
            label = "3D U-Net (MONAI BasicUNet, L1)" if name == "3d-unet" else f"ddpm (`{name}`)"
            lines.append(f"| {row['unet_evaluations']} | {label} | {row['sampler']} | {cells(name)} |")

    def interval(d: dict[str, Any], digits: int) -> str:
        lo, hi = d["ci"]
        text = f"{d['mean']:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}] ({d['b_better']}/{d['n']})"
        return f"**{text}**" if lo > 0 or hi < 0 else text  # bold: the interval excludes zero

    lines += ["", f"`lifted-fast` ({fast}) paired with the references over the test subjects, mean [95 % t-interval] "
              "(subjects where `lifted-fast` is better):", "",
              "| against | target | PSNR (dB) | SSIM | MAE | z-inconsistency |", "| --- | --- | --- | --- | --- | --- |"]
    for base in (k8, "3d-unet"):
        for target, label in (("target", "noisy"), ("clean_target", "clean")):
            d = report["paired_differences"][f"{fast} vs {base}"][target]
            lines.append(f"| {base} | {label} | {interval(d['psnr'], 2)} | {interval(d['ssim'], 4)} | "
                         f"{interval(d['mae'], 2)} | {interval(d['z_inconsistency'], 3)} |")
    return "\n".join(lines)


def merged(protocol_run: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """The protocol's published report with ``lifted-fast`` added, paired with that report's own rows.

    The frontier run re-scores ``lifted-k8`` and the 3D U-Net itself. When it trained its models again on other
    hardware, those rows differ from the published ones; the published file then pairs ``lifted-fast`` with its
    own ``lifted-k8`` and ``3d-unet``, and says whether the references matched (``same_references``).
    """
    fast = report["selection"]["lifted_fast"]
    row = report["methods"][fast]
    seconds = report["seconds_per_volume"]
    whole = json.loads(json.dumps(protocol_run))
    k8 = next(name for name in report["methods"] if name.startswith("lifted-k") and name in whole["methods"])
    def psnrs(rows: list[dict[str, Any]]) -> dict[str, float]:
        return {row["subject"]: round(row["psnr"], 6) for row in rows}

    same = {name: psnrs(report["methods"][name]["subjects"]) == psnrs(whole["methods"][name]["subjects"])
            for name in (k8, "3d-unet")}
    whole["methods"]["lifted-fast"] = {
        **row, "label": f"lifted-fast ({fast})", "seconds_per_volume": seconds[fast],
        "unet_evaluations": row["unet_evaluations"],
        "chosen_by": "benchmarks/icbm_fast.py (validation PSNR, <= 8 evaluations)",
        "frontier_run": {"command": report["command"], "cpu": report["machine"]["cpu"], "same_references": same,
                         "references_in_that_run": {name: report["methods"][name]["summary"] for name in (k8, "3d-unet")}}}
    whole["methods"]["3d-unet"]["seconds_per_volume_same_run_as_lifted_fast"] = seconds["3d-unet"]
    whole.setdefault("paired_differences", {}).update({
        f"lifted-fast vs {base}": {target: paired_differences(
            *(m["subjects"] if target == "target" else m["clean_target"]["subjects"]
              for m in (whole["methods"][base], row)))
            for target in ("target", "clean_target")}
        for base in (k8, "3d-unet")})
    return whole


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=protocol.DEFAULT_DATA, help="the ICBM 152 2009c folder")
    parser.add_argument("--scale", choices=tuple(protocol.SCALES), default="cpu", help="the protocol's scale")
    parser.add_argument("--source", choices=("T1", "T2"), default="T1", help="input contrast (default T1)")
    parser.add_argument("--target", choices=("T1", "T2"), default="T2", help="target contrast (default T2)")
    parser.add_argument("--out", type=Path, default=None,
                        help="the protocol's run folder (default runs/icbm_t1t2-<scale>[-t2t1]); the flow models go "
                             "to the same name with -flow")
    parser.add_argument("--matched-steps", type=int, default=4,
                        help="the Euler steps the step-count-matched flow stage 2 trains for (default 4)")
    parser.add_argument("--flow-variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="another flow stage 2 to choose from on validation, trained from the same flow stage 1 "
                             "with icbm_t1t2's --variant keys, e.g. lr_scheduler=cosine,learning_rate=0.004 "
                             "(repeatable)")
    parser.add_argument("--timing-repeats", type=int, default=3, help="timed volumes per test method (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--publish", action="store_true", help="write the figures under benchmarks/results/")
    args = parser.parse_args(argv)
    if args.source == args.target:
        parser.error("--source and --target must differ")
    if not 1 <= args.matched_steps <= 50:
        parser.error(f"--matched-steps must be from 1 to 50, got {args.matched_steps}")
    for variant in args.flow_variant:
        try:
            protocol.parse_variant(variant)
        except ValueError as exc:
            parser.error(f"--flow-variant {variant!r}: {exc}")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    from lift3d.plugins import create

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scale = protocol.SCALES[args.scale]
    direction = "" if (args.source, args.target) == ("T1", "T2") else f"-{args.source.lower()}{args.target.lower()}"
    out = (args.out or REPO / "runs" / f"icbm_t1t2-{args.scale}{direction}").resolve()
    flow_out = out.with_name(out.name + "-flow")
    data = protocol.dataset_options(args.data, scale, args.source, args.target)
    datasets = {split: create("datasets", "icbm152", split=split, **data) for split in ("train", "val", "test")}
    pairs = {split: [ds[i] for i in range(len(ds))] for split, ds in datasets.items()}
    machine, start = machine_info(), time.perf_counter()

    # Models: reused when an earlier run trained them with the same key (icbm_t1t2's --reuse rule).
    # The protocol's published run chose its lifted stage 2 among variants on validation: the same one here.
    published = protocol.RESULTS / f"icbm_{args.scale}{direction.replace('-', '_')}.json"
    protocol_run = json.loads(published.read_text()) if published.is_file() else None
    chosen_variant = protocol_run["selection"]["chosen"]["variant"] if protocol_run else "default"
    overrides = {} if chosen_variant == "default" else protocol.parse_variant(chosen_variant)
    stage1 = protocol.train_stage1(out, scale, data, args.seed, True)
    stage2 = protocol.train_stage2(out, scale, data, args.seed, stage1, overrides, True)
    baseline, baseline_record = protocol.train_baseline(out, scale, data, pairs["train"], pairs["val"], args.seed,
                                                        device, True)
    flow1 = protocol.train_stage1(flow_out, scale, data, args.seed, True, objective="flow")
    flow2 = protocol.train_stage2(flow_out, scale, data, args.seed, flow1, {}, True)
    matched = protocol.train_stage2(flow_out, scale, data, args.seed, flow1, {"train_steps": args.matched_steps}, True)
    flows = {"flow": Method("flow", "lifted (flow)", flow2[0], flow2[1])}
    flow_stage2s = {"flow": {"folder": str(flow2[0]), "variant": "default"}}
    for i, variant in enumerate(args.flow_variant, 1):  # more flow stage 2s to choose from (e.g. a learning rate)
        tuned = protocol.train_stage2(flow_out, scale, data, args.seed, flow1, protocol.parse_variant(variant), True)
        tag = "flow-tuned" if len(args.flow_variant) == 1 else f"flow-tuned{i}"
        flows[tag] = Method(tag, f"lifted (flow, {variant})", tuned[0], tuned[1])
        flow_stage2s[tag] = {"folder": str(tuned[0]), "variant": variant}
    flows["flow-matched"] = Method("flow-matched", f"lifted (flow, trained for {args.matched_steps} steps)",
                                   matched[0], matched[1])
    trained_s = time.perf_counter() - start

    predict = Predictor(args.seed, device, out / "predictions", True, baseline)
    lifted = Method("lifted", "lifted (ddpm, v)", stage2[0], stage2[1])

    print(f"[validation] {len(pairs['val'])} subjects, every candidate at <= {FAST_BUDGET} U-Net evaluations")
    tic = time.perf_counter()
    tried = candidates(lifted, flows)
    val_rows = validate(tried, pairs["val"], predict)
    chosen = {}
    for budget in BUDGETS:
        for fams, tag in [(("ddpm",), "ddpm"), *(((fam,), fam) for fam in flows), (None, "any")]:
            name = best_within(val_rows, budget, fams)
            if name is not None:
                chosen[f"{tag}@{budget}"] = name
    fast = chosen[f"any@{FAST_BUDGET}"]
    validation_s = time.perf_counter() - tic
    print(f"  lifted-fast = {fast}")

    # The protocol's reference points on the test subjects (cached samples of the protocol run are reused).
    k8 = f"lifted-k{scale.samples}"
    rho = protocol_run["methods"][k8]["noise_correlation"] if protocol_run else 0.0
    reference = {
        f"lifted-ddim{scale.ddim_steps}": replace(lifted, name=f"lifted-ddim{scale.ddim_steps}", scheduler="ddim",
                                                  steps=scale.ddim_steps),
        f"lifted-dpm{scale.dpm_steps}": replace(lifted, name=f"lifted-dpm{scale.dpm_steps}", scheduler="dpm",
                                                steps=scale.dpm_steps),
        f"lifted-k{scale.samples}": replace(lifted, name=f"lifted-k{scale.samples}", scheduler="dpm",
                                            steps=scale.dpm_steps, samples=scale.samples, rho=rho),
        "3d-unet": Method("3d-unet", "3D U-Net, L1", None, baseline_record),
    }
    tests = {name: tried[name][1] for name in dict.fromkeys(chosen.values())}
    tic = time.perf_counter()
    results: dict[str, Any] = {}
    for name, method in {**tests, **reference}.items():
        print(f"[test] {name}: {method.sampler}")
        row = scored(method, predict(method, pairs["test"]), pairs["test"])
        row |= {"family": tried[name][0] if name in tests else "reference", "unet_evaluations": evaluations(method)}
        results[name] = row
        print(protocol._line(name, row["summary"]))
    test_s = time.perf_counter() - tic

    tic = time.perf_counter()
    timed = [fast, "3d-unet", f"lifted-dpm{scale.dpm_steps}", f"lifted-k{scale.samples}"]
    for name in timed:
        method = tests.get(name) or reference[name]
        repeats = 1 if evaluations(method) > 50 else args.timing_repeats
        results[name]["seconds_per_volume_timed"] = time_method(method, pairs["test"], predict, repeats)
        print(f"[timing] {name}: {results[name]['seconds_per_volume_timed']:.3f} s per volume")
    timing_s = time.perf_counter() - tic

    paired = {f"{name} vs {base}": {target: paired_differences(
        *(results[m]["subjects"] if target == "target" else results[m]["clean_target"]["subjects"] for m in (base, name)))
        for target in ("target", "clean_target")}
        for name in results for base in (k8, "3d-unet") if name != base}
    frontier = [{"method": name, "family": row["family"], "unet_evaluations": row["unet_evaluations"],
                 "sampler": row["sampler"], "summary": row["summary"],
                 "clean_summary": row["clean_target"]["summary"]}
                for name, row in results.items() if row["family"] != "reference"]
    seconds = {name: results[name]["seconds_per_volume_timed"] for name in timed}
    fast_row = results[fast]
    goals = {
        "psnr_at_least_k8": fast_row["summary"]["psnr"]["mean"] >= results[k8]["summary"]["psnr"]["mean"],
        "ssim_at_least_k8": fast_row["summary"]["ssim"]["mean"] >= results[k8]["summary"]["ssim"]["mean"],
        "z_no_worse_than_3d_unet": (fast_row["summary"]["z_inconsistency"]["mean"]
                                    <= results["3d-unet"]["summary"]["z_inconsistency"]["mean"]),
        "at_most_10x_3d_unet_seconds": seconds[fast] <= 10 * seconds["3d-unet"],
        "seconds_ratio_to_3d_unet": seconds[fast] / seconds["3d-unet"],
        "draws_distinct_samples": True,  # every candidate is a seeded diffusion sample (tests/test_objectives.py)
    }
    stretch = best_within([{"method": r["method"], "family": r["family"], "unet_evaluations": r["unet_evaluations"],
                            "metrics": r["summary"]} for r in frontier], 2)
    goals["stretch_at_2_evaluations"] = {
        "method": stretch,
        "met": bool(stretch) and all(results[stretch]["summary"][m]["mean"] >= results["3d-unet"]["summary"][m]["mean"]
                                     for m in ("psnr", "ssim"))}
    report = {
        "benchmark": "icbm_fast", "scale": args.scale, "direction": f"{args.source} -> {args.target}",
        "command": " ".join(["python benchmarks/icbm_fast.py", *map(shlex.quote, args.argv)]),
        "machine": machine | {"load_average_at_end": os.getloadavg()},
        "models": {"ddpm": str(stage2[0]), "ddpm_variant": chosen_variant, "flow": flow_stage2s, "flow_matched": str(matched[0]),
                   "flow_matched_steps": args.matched_steps, "baseline": str(out / "baseline")},
        "selection": {"rule": f"best validation PSNR within each budget of U-Net evaluations per volume; lifted-fast = "
                              f"the best within {FAST_BUDGET}", "validation_subjects": datasets["val"].subjects(),
                      "candidates": val_rows, "chosen": chosen, "lifted_fast": fast},
        "methods": results, "frontier": frontier, "paired_differences": paired, "seconds_per_volume": seconds,
        "goals": goals,
        "timing": {"models_s": trained_s, "validation_s": validation_s, "test_s": test_s, "timing_s": timing_s,
                   "total_s": time.perf_counter() - start},
    }
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "fast_results.json", report)
    (out / "fast_results.md").write_text(markdown(report) + "\n")
    title = (f"ICBM {args.source} -> {args.target}, {len(pairs['test'])} test subjects, {args.scale} scale: the few-step "
             f"frontier (settings chosen on validation)")
    plot(out / "fast_frontier.png", frontier, {n: results[n] for n in reference}, title, ["ddpm", *flows])
    if args.publish:
        name = f"icbm_fast_{args.scale}{direction.replace('-', '_')}"
        write_json(protocol.RESULTS / f"{name}.json", report)
        shutil.copyfile(out / "fast_frontier.png", protocol.RESULTS / f"{name}.png")
        if published.is_file():
            write_json(published, merged(json.loads(published.read_text()), report))
    print(f"\nlifted-fast = {fast} ({fast_row['unet_evaluations']} evaluations, {seconds[fast]:.2f} s per volume; "
          f"3D U-Net {seconds['3d-unet']:.3f} s)")
    for key, value in goals.items():
        print(f"  goal {key}: {value}")
    print(f"results: {out / 'fast_results.json'}, {out / 'fast_frontier.png'}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"icbm_fast: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
