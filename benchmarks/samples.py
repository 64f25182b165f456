"""What K samples per volume cost: seconds per volume for K = 1, 4, 8, batched against unbatched.

Protocol
- Model: a lifted pixel-space U-Net of the ICBM benchmark's cpu scale (block_out_channels
  (16, 32, 64), one layer per block) on that benchmark's 48 x 48 x 24 grid and on a tiny
  16 x 16 x 8 one, random weights: speed does not depend on what the weights have learned. It is
  exported and loaded as ``lift3d-synthesize`` does.
- Methods: ``lift3d.sampling.synthesis.synthesize_posterior`` with K samples, all K through the U-Net at
  once (``sample_batch=K``) or one at a time (``sample_batch=1``), DPM-Solver++ 25 steps (the
  sampler the issue-14 averaging run used).
- Timing: one volume, each configuration (grid x K x batching) run ``--repeats`` times in
  interleaved rounds (so a change in machine load hits every configuration alike), the median
  kept; one untimed warm-up per grid first;
  ``--threads`` intra-op threads (1 by default, as on the shared 2-core machine).
- Report: seconds per volume and per sample, batched/unbatched ratios and the cost of K samples
  relative to one, all from the same run, with the load average before and after.

    .venv/bin/python benchmarks/samples.py                     # -> benchmarks/results/samples_cpu.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lift3d.recipes.reports import REPO, machine_info, write_json  # noqa: E402

import lift3d  # noqa: E402
from lift3d.training.config import TrainConfig  # noqa: E402
from lift3d.sampling.synthesis import load_synthesis_model, synthesize_posterior  # noqa: E402
from lift3d.training.export import export_model  # noqa: E402
from lift3d.training.unets import build_autoencoder, build_objective, new_unet2d  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--grids", nargs="+", default=["48x24", "16x8"], metavar="SIZExSLICES",
                        help="volume grids: in-plane size x slice count")
    parser.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64], help="U-Net block_out_channels")
    parser.add_argument("--scheduler", default="dpm", choices=("ddim", "dpm", "ddpm"))
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 4, 8], help="the K values")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median is kept")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/samples_cpu.json", help="JSON report, relative to the repo")
    return parser.parse_args(argv)


class _Dataset:
    def __init__(self, num_slices: int):
        self.num_slices = num_slices


def build_model(folder: Path, args: argparse.Namespace, size: int, num_slices: int):
    cfg = TrainConfig()
    cfg.run.stage = "volumes"
    cfg.model.block_out_channels = list(args.widths)
    cfg.model.layers_per_block = 1
    cfg.model.prediction_type = "v_prediction"
    cfg.data.options = {"size": size, "num_slices": num_slices}
    torch.manual_seed(0)
    unet = lift3d.inflate(new_unet2d(cfg, 2, 1, size))
    generator = torch.Generator().manual_seed(1)
    for _, layer in lift3d.volumetric_layers(unet):
        layer.init_random_(std=0.05, generator=generator)
    folder = export_model(cfg, unet, build_autoencoder(cfg), build_objective(cfg), _Dataset(num_slices), folder)
    return load_synthesis_model(folder, device=args.device)


def configurations(samples: list[int]) -> list[tuple[str, int, int]]:
    """(name, K, sample_batch): K = 1 once, every other K batched and unbatched."""
    out = []
    for k in samples:
        if k == 1:
            out.append(("K=1", 1, 1))
        else:
            out += [(f"K={k} batched", k, k), (f"K={k} unbatched", k, 1)]
    return out


def time_one(model, source, args, k: int, batch: int) -> float:
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    synthesize_posterior(model, source, samples=k, sample_batch=batch, solver=args.scheduler, steps=args.steps,
                         seed=0, progress=False)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine_info(load_average_before=os.getloadavg())
    grids = {}
    for text in args.grids:
        size, num_slices = (int(v) for v in text.lower().split("x"))
        with tempfile.TemporaryDirectory() as tmp:
            model = build_model(Path(tmp) / "model", args, size, num_slices)
        source = torch.rand(1, 1, num_slices, size, size, generator=torch.Generator().manual_seed(2)) * 2 - 1
        synthesize_posterior(model, source[:, :, :2], samples=2, sample_batch=2, solver=args.scheduler, steps=1,
                             progress=False)  # warm-up
        grids[f"{size}x{size}x{num_slices}"] = (model, source)
    configs = configurations(args.samples)
    times = {(grid, name): [] for grid in grids for name, _, _ in configs}
    for round_index in range(args.repeats):
        for grid, (model, source) in grids.items():
            for name, k, batch in configs:
                times[grid, name].append(time_one(model, source, args, k, batch))
                print(f"round {round_index + 1}/{args.repeats} {grid} {name}: {times[grid, name][-1]:.2f} s", flush=True)
    results: dict[str, dict] = {}
    for grid in grids:
        median = {name: statistics.median(times[grid, name]) for name, _, _ in configs}
        single = median.get("K=1")
        results[grid] = {}
        for name, k, batch in configs:
            row = {"samples": k, "sample_batch": batch, "s_per_volume": median[name],
                   "s_per_sample": median[name] / k, "runs_s": times[grid, name]}
            if single:
                row["cost_vs_one_sample"] = median[name] / single
            if batch == k > 1:
                row["batched_over_unbatched"] = median[name] / median[f"K={k} unbatched"]
            results[grid][name] = row
    command = "python " + " ".join([str(Path(sys.argv[0]).resolve().relative_to(REPO)), *sys.argv[1:]])
    report = {
        "command": command,
        "machine": info | {"load_average_after": os.getloadavg()},
        "protocol": __doc__.split("\n\n")[1],
        "setup": {"grids": list(grids), "widths": args.widths,
                  "layers_per_block": 1, "sampler": f"{args.scheduler}-{args.steps}", "threads": args.threads,
                  "device": args.device, "repeats": args.repeats, "statistic": "median over repeats"},
        "results": results,
    }
    out = REPO / args.out
    write_json(out, report)
    for grid, rows in results.items():
        for name, row in rows.items():
            extra = f", batched/unbatched {row['batched_over_unbatched']:.2f}" if "batched_over_unbatched" in row else ""
            print(f"{grid} {name:>14}: {row['s_per_volume']:.2f} s per volume, {row['s_per_sample']:.2f} s per "
                  f"sample{extra}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
