"""The demo's stage-2 schedule, chosen on the demo's validation subjects (never its test subjects).

Fine-tunes the stage 2 of ``lift3d demo`` (icbm152, default scale) from one trained demo stage 1,
once per ``--schedule LR:SCHEDULER``, with everything else as the demo has it. lift3d's sampled
validation (3 subjects, DPM-Solver++ 25, its fixed seed) scores every 100 steps; each run's best step
is what it would export, and the schedule with the best of those is the demo's. Prints the curves
and writes them as JSON.

    lift3d demo --out demo-out        # or any demo run: its stage 1 is reused, never retrained
    python benchmarks/demo_stage2.py --stage1 demo-out/stage1/model --out runs/demo-stage2 \\
        --json benchmarks/results/demo_stage2_cpu.json
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

from lift3d.recipes.reports import machine_info, write_json  # noqa: E402
from lift3d.training.tracking import validation_curve  # noqa: E402

SCHEDULES = ("2e-3:constant", "4e-3:cosine", "2e-3:cosine")  # the previous demo, the benchmark's winner, ...


def parse_schedule(text: str) -> tuple[float, str]:
    from lift3d.training.config import TrainConfig, apply

    lr, sep, scheduler = text.partition(":")
    try:
        if not sep:
            raise ValueError
        value = float(lr)
    except ValueError:
        raise ValueError(f"--schedule {text!r} is not LR:SCHEDULER, e.g. 2e-3:cosine") from None
    apply(TrainConfig(), {"optim": {"learning_rate": value, "lr_scheduler": scheduler}}, "--schedule")  # validates
    return value, scheduler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage1", type=Path, required=True, help="a demo's trained stage 1 (<demo out>/stage1/model)")
    parser.add_argument("--out", type=Path, default=Path("runs/demo-stage2"), help="one stage-2 folder per schedule here")
    parser.add_argument("--schedule", action="append", metavar="LR:SCHEDULER",
                        help=f"repeatable; default: {' '.join(SCHEDULES)}")
    parser.add_argument("--json", type=Path, help="write the curves and the choice here")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = parser.parse_args(argv)

    import torch

    from lift3d.training.config import apply
    from lift3d.recipes.demo import SCALES, demo_config
    from lift3d.training.loop import train

    try:
        schedules = [parse_schedule(s) for s in args.schedule or SCHEDULES]
        if not (args.stage1 / "lift3d_training.json").is_file():
            raise ValueError(f"--stage1 {args.stage1} is not a trained lift3d stage 1 (no lift3d_training.json)")
    except ValueError as exc:
        print(f"demo_stage2: error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    info = machine_info()
    runs = []
    for lr, scheduler in schedules:
        folder = args.out / f"{scheduler}-{lr:g}"
        scale = replace(SCALES["icbm152"]["default"], stage2_lr=lr, stage2_lr_scheduler=scheduler)
        cfg = apply(demo_config(args.out, scale, "volumes", seed=0),
                    {"run": {"output_dir": str(folder)}, "model": {"pretrained": str(args.stage1)}}, "demo_stage2")
        print(f"[stage 2] lr {lr:g} {scheduler}, {scale.stage2_steps} steps")
        tic = time.perf_counter()
        train(cfg)
        curve = validation_curve(folder)
        best = max(curve, key=lambda row: (row["val_psnr"], -row["step"]))
        runs.append({"learning_rate": lr, "lr_scheduler": scheduler, "train_s": time.perf_counter() - tic,
                     "best_step": best["step"], "best": best, "validation_curve": curve})
    chosen = max(runs, key=lambda r: r["best"]["val_psnr"])
    print("\nvalidation PSNR (dB) every 100 steps, best in brackets:")
    for r in runs:
        print(f"  lr {r['learning_rate']:g} {r['lr_scheduler']:<9} " + " ".join(f"{row['val_psnr']:.2f}" for row in r["validation_curve"])
              + f"  [{r['best']['val_psnr']:.2f} / SSIM {r['best']['val_ssim']:.4f} at step {r['best_step']}]")
    print(f"chosen: lr {chosen['learning_rate']:g} {chosen['lr_scheduler']}")
    if args.json:
        write_json(args.json, {
            "benchmark": "demo stage-2 schedule on the demo's validation subjects (val-00..02)",
            "command": "python benchmarks/demo_stage2.py " + " ".join(
                sys.argv[1:] if argv is None else argv),
            "machine": info, "stage1": str(args.stage1.resolve()),
            "rule": "each run's best validation PSNR (lift3d sampled validation, DPM-Solver++ 25, every 100 steps, "
                    "step 0 included); the schedule with the best of those is chosen",
            "runs": runs, "chosen": {"learning_rate": chosen["learning_rate"], "lr_scheduler": chosen["lr_scheduler"]}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
