"""The GPU check: lift3d's training steps and synthesis on one GPU, in one command, in at most 8 minutes.

Random-weight models at the ``paper`` scale of ``benchmarks/icbm.py`` (pixel space) on ``phantom`` volumes of 256 x
256 x N: ``stage1`` (2D), ``stage2`` (lifted), ``unet3d`` (MONAI BasicUNet; skipped without MONAI). In this order, so
that ``--budget-s`` cuts the least needed: (1) ``FAST`` at N = 128, eager: ``lifted-fast`` (flow, Euler 4 steps, mean
of 2: 8 passes), a distilled student's ``two-pass`` and ``one-pass`` (Euler 1 step, K = 2 / 1; it has its teacher's
lifted architecture), the 3D U-Net's pass; (2) training steps, N = 35 and 100, bf16 and fp16; (3) ``FAST`` compiled;
(4) ``SYNTHESIS`` at N = 100, lifted and 2D; (5) the training steps compiled. Synthesis as ``lift3d-synthesize --dtype
bfloat16``. The JSON ($OUT/gpu_check_<device>.json) is rewritten after each measurement; failures are recorded.

    python benchmarks/gpu_check.py                           # one GPU, <= 8 minutes
    python benchmarks/gpu_check.py --smoke --device cpu      # every code path at a tiny size, in seconds
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

import lift3d
from lift3d.data.dataset import stack_items
from lift3d.plugins import create
from lift3d.recipes.make_a_volume import Recipe, stage_config
from lift3d.recipes.reports import machine_info, write_json
from lift3d.recipes.unet3d import build_unet3d
from lift3d.sampling.synthesis import SynthesisModel, synthesize_posterior, unet_evaluations
from lift3d.training.config import apply
from lift3d.training.stages import get_stage
from lift3d.training.unets import build_objective, build_unet

MODELS, PRECISIONS, PARTS = ("stage2", "stage1", "unet3d"), ("bf16", "fp16"), ("fast", "train", "synthesis")
FIELDS = ("objective", "solver", "steps", "samples")  # of a sampler: the U-Net's objective, lift3d's solver, K
SYNTHESIS = {"flow-euler-4": ("flow", "flow", 4, 1), "dpm-25": ("ddpm", "dpm", 25, 1),  # lift3d-synthesize's default
             "ddim-200": ("ddpm", "ddim", 200, 1)}  # the paper's; a new sampler is one more line
FAST = {"one-pass": ("flow", "flow", 1, 1), "two-pass": ("flow", "flow", 1, 2), "lifted-fast": ("flow", "flow", 4, 2)}
SAMPLERS = {**SYNTHESIS, **FAST}
# warmup: warm-up steps (and compiled runs); steps: timed (and FAST runs); max_steps: a sampler's. BasicUNet: N >= 16.
SCALES = {"gpu": dict(size=256, slices=(35, 100), synthesis_slices=100, fast_slices=128, widths=(64, 128, 256, 256),
                      layers_per_block=2, unet3d_features=(32, 32, 64, 128, 256, 32), warmup=2, steps=3, budget_s=450,
                      max_steps=None)}
SCALES["tiny"] = dict(SCALES["gpu"], size=32, slices=(16, 20), synthesis_slices=16, fast_slices=20, widths=(16, 32),
                      layers_per_block=1, unet3d_features=(8, 8, 8, 16, 16, 8), steps=1, budget_s=600, max_steps=2)

def measurement(what: str, model: str, n: int, precision: str | None = None, compiled: bool = False,
                setting: str | None = None, fast: bool = False) -> argparse.Namespace:
    name = (f"train {model} {precision} N={n} {'compiled' if compiled else 'eager'}" if what == "train" else
            f"synthesis {model} {setting or 'forward'} N={n}" + " compiled" * compiled)
    return argparse.Namespace(name=name, what=what, model=model, n=n, precision=precision, compiled=compiled,
                              setting=setting, fast=fast)

def timed(device: torch.device, function) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = sync() or time.perf_counter()
    function()
    return sync() or time.perf_counter() - start

def probe(device: torch.device):
    """Peak memory from now on (CUDA's allocator). None on the CPU: a process's allocator reuses what was freed."""
    gc.collect()
    if device.type != "cuda":
        return lambda: None
    torch.cuda.synchronize(device), torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    return lambda: torch.cuda.max_memory_allocated(device) - base

def dataset(ctx: argparse.Namespace, n: int, stage: str | None = None, **sections: dict[str, Any]):
    """The phantom volume pair of N slices; with ``stage`` (slices, volumes), lift3d's recipe config at this scale."""
    options = {"size": ctx.scale.size, "num_slices": n, "num_subjects": 1, "test_size": 0}
    if stage is None:  # made once per N
        ctx.datasets[n] = ctx.datasets.get(n) or create("datasets", "phantom", split="train", **options)
        return ctx.datasets[n]
    recipe = Recipe(dataset="phantom", data_options=options, widths=ctx.scale.widths, stage1_steps=1, stage2_steps=1,
                    layers_per_block=ctx.scale.layers_per_block, stage1_batch=n, name="gpu_check")
    return apply(stage_config(recipe, stage, ctx.workdir / stage, seed=0), sections, "gpu_check")

def train_steps(m: argparse.Namespace, ctx: argparse.Namespace, checkpointing: bool) -> dict[str, Any]:
    """The loop's step, timed: Accelerate (mixed precision, dynamo_backend), clip 1, AdamW (3D U-Net: L1, Adam)."""
    AcceleratorState._reset_state(reset_partial_state=True)  # one run per setting, as the loop does
    accelerator = Accelerator(cpu=ctx.device.type == "cpu", mixed_precision=m.precision,
                              dynamo_backend=ctx.backend if m.compiled else "no")
    device, data, info = accelerator.device, dataset(ctx, m.n), {}
    if m.model == "unet3d":
        peak, _ = probe(device), torch.manual_seed(0)
        net, info["model_description"] = build_unet3d(ctx.scale.unet3d_features)
        source, target = (getattr(data[0], key)[None].to(device) for key in ("source", "target"))
        params = list(net.parameters())
        net, optimizer = accelerator.prepare(net.to(device), torch.optim.Adam(params, lr=2e-4))
        loss = lambda micro: (net(source).float() - target).abs().mean()  # noqa: E731
    else:
        stage = "volumes" if m.model == "stage2" else "slices"
        cfg = dataset(ctx, m.n, stage, model={"gradient_checkpointing": checkpointing},
                      optim={"mixed_precision": m.precision})
        make_task, peak = get_stage(stage).prepare(cfg, data, ctx.workdir / stage), probe(device)
        task = make_task(accelerator)
        params, batch = task.params, stack_items([task.view[i] for i in range(cfg.data.batch_size)])
        model, optimizer = accelerator.prepare(task.model, torch.optim.AdamW(params, cfg.optim.learning_rate))
        info.update(lift=vars(cfg.lift) if stage == "volumes" else None, batch=f"{cfg.data.batch_size} {stage}")
        loss = lambda micro: task.loss(model, batch, micro)[0]  # noqa: E731

    def step(micro: int) -> None:
        accelerator.backward(loss(micro))
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step(), optimizer.zero_grad(set_to_none=True)

    warmup_s = timed(device, lambda: [step(i) for i in range(ctx.scale.warmup)])
    times = [timed(device, lambda i=i: step(ctx.scale.warmup + i)) for i in range(ctx.scale.steps)]
    scaler = getattr(accelerator, "scaler", None)  # fp16's loss scaler
    return {**info, "s_per_step": statistics.median(times), "step_times_s": times, "warmup_s": warmup_s,
            "peak_bytes": peak(), "gradient_checkpointing": checkpointing, "loss_scale": scaler and scaler.get_scale(),
            "trained_parameters": sum(p.numel() for p in params)}

def synthesis(m: argparse.Namespace, ctx: argparse.Namespace) -> dict[str, Any]:
    """Seconds per volume: the source encoded, every solver step of every sample, decoded (or the 3D U-Net's pass).
    Warm-up: a 1-step run (compiled: ``warmup`` of them, which compile); timed: 1 run (FAST: median of ``steps``)."""
    device, dtype, scale, source = ctx.device, ctx.dtype, ctx.scale, dataset(ctx, m.n)[0].source[None]
    peak, _ = probe(device), torch.manual_seed(0)
    if m.model == "unet3d":
        net, description = build_unet3d(scale.unet3d_features)
        net, x = net.requires_grad_(False).eval().to(device, dtype), source.to(device, dtype)
        full = warm = lambda: net(x)  # noqa: E731
        info: dict[str, Any] = {"model_description": description, "unet_evaluations": 1}
    else:
        objective, solver, steps, samples = SAMPLERS[m.setting]
        steps = min(steps, scale.max_steps or steps)
        cfg = dataset(ctx, m.n, "volumes" if m.model == "stage2" else "slices", diffusion={"objective": objective})
        autoencoder = create("autoencoders", cfg.autoencoder.name, **cfg.autoencoder.options).eval().to(device)
        stage = get_stage(cfg.run.stage)  # stage 2 lifts the U-Net it builds
        net = build_unet(cfg, autoencoder, scale.size, lift=stage.lift(stage.own(cfg))).requires_grad_(False).eval()
        net.to(device, **({"dtype": dtype} if dtype != torch.float32 else {}))  # (diffusers warns on any .to(dtype))
        if lift3d.is_lifted(net):
            lift3d.fuse(net)  # what load_synthesis_model (lift3d-synthesize) does
        settings = {"format": 2, "conditioning": "concat", "autoencoder": {"name": cfg.autoencoder.name},
                    "prediction_type": cfg.model.prediction_type, "objective": objective}
        model = SynthesisModel(net, autoencoder, settings, dict(build_objective(cfg).scheduler.config))
        options = {"solver": solver, "samples": samples, "seed": 0, "progress": False, "window": 0}
        full = lambda: synthesize_posterior(model, source, steps=steps, **options)  # noqa: E731
        warm = lambda: synthesize_posterior(model, source, steps=1, **options)  # noqa: E731 (the same shapes)
        info = dict(zip(FIELDS, (objective, solver, steps, samples), strict=True), fused=lift3d.is_lifted(net),
                    unet_evaluations=unet_evaluations(model, solver, steps, samples=samples))
    if m.compiled:
        net.compile(backend=ctx.backend)  # in place: lift3d still sees the module (is_lifted, volume_batch)
    with torch.no_grad():
        warmup_s = timed(device, lambda: [warm() for _ in range(scale.warmup if m.compiled else 1)])
        times = [timed(device, full) for _ in range(scale.steps if m.fast else 1)]
    seconds = statistics.median(times)
    return {**info, "seconds": seconds, "times_s": times, "warmup_s": warmup_s, "peak_bytes": peak(),
            "s_per_pass": seconds / info["unet_evaluations"], "s_per_step": seconds / info.get("steps", 1),
            "dtype": str(dtype).removeprefix("torch."), "compiled_with": m.compiled and ctx.backend}

def run_one(m: argparse.Namespace, ctx: argparse.Namespace) -> dict[str, Any]:
    try:  # a training step out of memory is tried again with gradient checkpointing (not the 3D U-Net's)
        return synthesis(m, ctx) if m.what == "synthesis" else train_steps(m, ctx, checkpointing=False)
    except torch.OutOfMemoryError:
        if m.what == "synthesis" or m.model == "unet3d":
            raise
    gc.collect(), torch.cuda.empty_cache()
    return {**train_steps(m, ctx, checkpointing=True), "without_checkpointing": "out of memory"}

def plan(a: argparse.Namespace, monai_missing: str | None) -> list[tuple[argparse.Namespace, str | None]]:
    """Every measurement in order, with why it is left out before the run starts (or None)."""
    fast, train = ({c: [measurement("synthesis", "stage2" if s else "unet3d", a.scale.fast_slices, None, c, s, True)
                        for s in [*FAST, None]] for c in (False, True)},
                   {c: [measurement("train", model, n, precision, c) for n in a.scale.slices for precision in PRECISIONS
                        for model in MODELS] for c in (False, True)})
    sampled = [measurement("synthesis", model, a.scale.synthesis_slices, setting=s) for s in [*SYNTHESIS, None]
               for model in (("stage2", "stage1") if s else ("unet3d",))]
    return [(m, next((reason for failed, reason in [
        (("fast" if m.fast else m.what) not in a.parts, f"--parts {' '.join(a.parts)}"),
        (m.precision == "fp16" and a.device == "cpu", "fp16 needs CUDA (lift3d refuses it on the CPU)"),
        (a.compile == ("off" if m.compiled else "on") and (m.fast or m.what == "train"), f"--compile {a.compile}"),
        (m.model == "unet3d" and monai_missing, monai_missing)] if failed), None))
        for m in [*fast[False], *train[False], *fast[True], *sampled, *train[True]]]

def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """stage2/stage1 (and unet3d/stage2 of the training steps) per setting; ``fast``: seconds, eager and compiled."""
    ok, ratios = {r["name"]: r for r in results if r["status"] == "ok"}, {}
    for r in (r for r in ok.values() if r["fast"] and "seconds" in r):
        row = ratios.setdefault("fast", {}).setdefault(r["setting"] or "unet3d forward", {"N": r["n"]})
        row["unet_evaluations"], row[("eager_s", "compiled_s")[r["compiled"]]] = r.get("unet_evaluations"), r["seconds"]
        if {"eager_s", "compiled_s"} <= row.keys():
            row["compile_speedup"] = row["eager_s"] / row["compiled_s"]
    for r in (r for r in ok.values() if r["model"] == "stage2" and not r["fast"]):
        for other, key in (("stage1", "stage2/stage1"), ("unet3d", "unet3d/stage2"))[:2 if r["what"] == "train" else 1]:
            if peer := ok.get(r["name"].replace(" stage2 ", f" {other} ")):
                x, y = (r, peer) if other == "stage1" else (peer, r)
                value = "s_per_step" if r["what"] == "train" else "seconds"
                ratios.setdefault(key, {})[r["name"].replace(" stage2", "")] = {"time": x[value] / y[value]}
    return ratios

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    add("--smoke", "--tiny", dest="tiny", action="store_true", help="tiny sizes, 2 sampler steps: every path, seconds")
    add("--compile", choices=("both", "on", "off"), default="both", help="training and FAST: eager, compiled, both")
    add("--compile-backend", default=None, help="torch.compile's backend (default inductor; eager on the CPU)")
    add("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="the measurements to run (default all)")
    add("--budget-s", type=float, default=None, help="seconds; then the measurement in flight is stopped, the rest "
        "skipped (default 450 on the GPU: under 8 minutes with the set-up; 600 tiny)")
    add("--json", type=Path, default=None, help="the report (default $OUT/gpu_check_<device>.json)")
    a = parser.parse_args(argv)
    a.scale = argparse.Namespace(**SCALES["tiny" if a.tiny else "gpu"])
    a.budget_s = a.scale.budget_s if a.budget_s is None else a.budget_s
    a.compile_backend = a.compile_backend or ("inductor" if a.device == "cuda" else "eager")
    a.json = a.json or Path(os.environ.get("OUT") or tempfile.mkdtemp()) / f"gpu_check_{a.device}.json"
    a.command = " ".join(["python benchmarks/gpu_check.py", *(sys.argv[1:] if argv is None else argv)])
    return a

def out_of_time(signum, frame) -> None:  # SIGALRM: the measurement in flight ran past the budget
    raise TimeoutError("stopped at the time budget")

def main(argv: list[str] | None = None) -> int:
    a, started = parse_args(argv), time.perf_counter()
    monai_missing = None if importlib.util.find_spec("monai") else "MONAI is not installed: pip install 'lift3d[bench]'"
    report: dict[str, Any] = {
        "benchmark": "gpu_check", "finished": False, "command": a.command, "machine": machine_info(),
        "device": a.device, "scale": vars(a.scale), "budget_s": a.budget_s, "compile_backend": a.compile_backend,
        "samplers": {k: dict(zip(FIELDS, v, strict=True)) for k, v in SAMPLERS.items()}, "measurements": [],
        "ratios": {}}
    results, tmp = report["measurements"], a.json.with_name(f".{a.json.name}.tmp")
    save = lambda: (write_json(tmp, report), os.replace(tmp, a.json))  # noqa: E731 (a kill leaves the last report)
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as workdir:
        ctx = argparse.Namespace(scale=a.scale, device=torch.device(a.device), workdir=Path(workdir), datasets={},
                                 backend=a.compile_backend, dtype=(torch.float32, torch.bfloat16)[a.device == "cuda"])
        for m, reason in plan(a, monai_missing):
            entry, elapsed = vars(m).copy(), time.perf_counter() - started
            if reason is not None or elapsed >= a.budget_s:
                results.append({**entry, "status": "skipped", "reason": reason or f"{a.budget_s:.0f} s budget spent"})
                continue
            print(f"[{elapsed:5.0f} s] {m.name}", end="", file=sys.stderr, flush=True)
            tic, previous = time.perf_counter(), signal.signal(signal.SIGALRM, out_of_time)
            signal.setitimer(signal.ITIMER_REAL, a.budget_s - elapsed)
            try:
                entry.update(run_one(m, ctx), status="ok")
            except Exception as exc:  # noqa: BLE001 (out of time or memory, a compile error: recorded, the rest go on)
                status = "out of memory" if isinstance(exc, torch.OutOfMemoryError) else "failed"
                status = "timed out" if time.perf_counter() - started >= a.budget_s else status
                entry.update(status=status, reason=f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
                torch._dynamo.reset() if m.compiled else None  # each compiles afresh (no recompile limit reached)
                gc.collect(), torch.cuda.empty_cache() if torch.cuda.is_available() else None
            results.append({**entry, "wall_s": time.perf_counter() - tic})
            report.update(ratios=summarise(results), runtime_s=time.perf_counter() - started)
            save()
            print(f": {entry['status']}, {entry.get('seconds', entry.get('s_per_step', '-'))} s", file=sys.stderr)
    report.update(finished=True, ratios=summarise(results), runtime_s=time.perf_counter() - started)
    save()
    counts = {s: sum(r["status"] == s for r in results) for s in sorted({r["status"] for r in results})}
    print(f"gpu_check: {counts} in {report['runtime_s']:.0f} s; {a.json}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
