"""The demo's sampler, chosen on the demo's validation subjects (never its test subjects): today's recipe
(v-prediction, the mean of 4 DPM-Solver++ 25 samples: 100 U-Net evaluations per volume) against the same
recipe trained with the flow-matching objective and sampled in a few steps.

Both demo models are trained with ``lift3d demo``'s own settings (icbm152, default scale: 13 training
subjects, 3 validation subjects, 32 x 32 x 24), the second with ``objective = "flow"`` in both stages, and
scored on the 3 validation subjects (the same seed for every candidate). A candidate at 8 U-Net evaluations
or fewer replaces today's rule when its validation PSNR is at least today's.

    python benchmarks/demo_fast.py --out runs/demo-fast --json benchmarks/results/demo_fast_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from lift3d.recipes.reports import machine_info, write_json

FAST_BUDGET = 8


def trained(out: Path, scale, seed: int) -> Path:
    """The demo's two stages into ``out`` (kept if already there)."""
    from lift3d.recipes.demo import demo_config
    from lift3d.training.loop import train

    if not (out / "stage2" / "model").is_dir():
        train(demo_config(out, scale, "slices", seed))
        train(demo_config(out, scale, "volumes", seed))
    return out / "stage2" / "model"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="work folder (the two demo runs)")
    parser.add_argument("--scale", choices=("default", "quick"), default="default", help="the demo's scale")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="write the scores here")
    args = parser.parse_args(argv)

    import torch

    from lift3d.evaluation.metrics import score_pair, summarize
    from lift3d.plugins import create
    from lift3d.recipes.demo import SCALES, dataset_options
    from lift3d.sampling.synthesis import load_synthesis_model, synthesize_posterior

    machine, start = machine_info(), time.perf_counter()
    today = SCALES["icbm152"][args.scale]
    today = replace(today, objective="ddpm", sampler="dpm", sample_steps=25, samples=4)  # the recipe it is measured against
    flow = replace(today, objective="flow")
    models = {"ddpm": trained(args.out / "ddpm", today, args.seed), "flow": trained(args.out / "flow", flow, args.seed)}
    val = create("datasets", "icbm152", split="val", **dataset_options("icbm152", today, args.seed))
    pairs = [val[i] for i in range(len(val))]
    source = torch.stack([p.source for p in pairs])
    candidates = [("ddpm", "dpm", 25, 4, "noise", None), ("ddpm", "dpm", 8, 1, "noise", None),
                  ("ddpm", "dpm", 4, 2, "noise", None)]
    candidates += [("flow", "flow", steps, k, "noise", None) for steps, k in ((1, 1), (2, 1), (4, 1), (8, 1), (4, 2),
                                                                               (2, 4), (1, 8))]
    candidates += [("flow", "dpm", 4, 1, "noise", None), ("flow", "flow", 8, 1, "estimate", 0.25)]
    rows = []
    for objective, scheduler, steps, k, start_from, strength in candidates:
        model = load_synthesis_model(models[objective], device="cpu")
        tic = time.perf_counter()
        with torch.no_grad():
            out = synthesize_posterior(model, source, samples=k, solver=scheduler, steps=steps, seed=args.seed,
                                       start=start_from, strength=strength, progress=False)
        seconds = (time.perf_counter() - tic) / len(pairs)
        metrics = summarize([score_pair(out.mean[i, 0].numpy(), p) for i, p in enumerate(pairs)])
        rows.append({"objective": objective, "scheduler": scheduler, "steps": steps, "samples": k, "start": start_from,
                     "strength": strength, "unet_evaluations": out.unet_evaluations, "seconds_per_volume": seconds,
                     "metrics": metrics})
        print(f"{objective:5} {scheduler:4} {steps:3} steps x {k} ({start_from}): {out.unet_evaluations:3d} evaluations, "
              f"PSNR {metrics['psnr']['mean']:.3f}, SSIM {metrics['ssim']['mean']:.4f}, "
              f"z {metrics['z_inconsistency']['mean']:.3f}, {seconds:.2f} s/volume", flush=True)
    reference = rows[0]
    fast = [r for r in rows if r["unet_evaluations"] <= FAST_BUDGET]
    best = max(fast, key=lambda r: (r["metrics"]["psnr"]["mean"], -r["unet_evaluations"]))
    wins = best["metrics"]["psnr"]["mean"] >= reference["metrics"]["psnr"]["mean"]
    verdict = (f"{best['objective']} {best['scheduler']}-{best['steps']} x {best['samples']} "
               f"({best['unet_evaluations']} evaluations): validation PSNR {best['metrics']['psnr']['mean']:.3f} against "
               f"{reference['metrics']['psnr']['mean']:.3f} for today's rule; "
               + ("the demo switches to it" if wins else "today's rule stays"))
    print(verdict)
    if args.json:
        write_json(args.json, {"benchmark": "demo_fast", "command": "python benchmarks/demo_fast.py "
                               + " ".join(sys.argv[1:] if argv is None else argv), "machine": machine,
                               "validation_subjects": [p.subject for p in pairs], "candidates": rows,
                               "chosen": best, "fast_wins": wins, "verdict": verdict,
                               "wall_s": time.perf_counter() - start})
    return 0


if __name__ == "__main__":
    sys.exit(main())
