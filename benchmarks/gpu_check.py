"""The GPU check: lift3d's training steps and synthesis on one GPU, in one command and at most 8 minutes.

Data: one ``phantom`` volume pair (lift3d's generated dataset) of S x S x N voxels, S = 256 and N = 35
(the paper's RIRE grid) and 100. Models, at the ``paper`` scale of ``benchmarks/icbm_t1t2.py`` (pixel
space, v-prediction, a ``UNet2DModel`` of widths 64/128/256/256 with 2 residual blocks per level):

- ``stage1``: lift3d's stage-1 training step, the 2D U-Net on N slices (a timestep per slice);
- ``stage2``: stage 2's step, that U-Net lifted with ``lift3d.inflate``'s defaults, on the volume (one
  timestep, the volumetric layers trained, as the recipe does);
- ``unet3d``: the 3D U-Net baseline of :mod:`lift3d.recipes.unet3d` (MONAI ``BasicUNet``, L1 from source
  to target), recorded as skipped where MONAI is not installed.

A training step is the loop's own: the stage's loss (:mod:`lift3d.training.stages`), Accelerate's mixed
precision (bf16, or fp16 with its loss scaler), gradient clipping at 1 and AdamW (Adam for the 3D U-Net),
eager and under ``torch.compile`` (Accelerate's ``dynamo_backend="inductor"``, what ``accelerate launch
--dynamo_backend inductor`` gives). A step that runs out of memory is tried again with gradient
checkpointing. Synthesis of one S x S x 100 volume: every :data:`SYNTHESIS` setting with the lifted
model (fused, as ``lift3d-synthesize`` runs it) and with the 2D model slice-wise; the 3D U-Net's one
forward pass. Metrics: seconds per step (median of the timed steps; the 2 warm-up steps are reported
apart: they hold the compilation, and the one recompilation that einops' growing backend cache triggers
on the second call) and peak memory (``torch.cuda.max_memory_allocated`` from before the model
reaches the GPU: weights, optimizer state, activations). Report: stage2/stage1 and unet3d/stage2 ratios.

The JSON is rewritten after every measurement (``finished`` stays false until the end), so a killed run
leaves what it measured. A measurement that would not end within ``--budget-s`` is not started, and
one that overruns it is stopped; both are recorded with the reason.

    python benchmarks/gpu_check.py --json benchmarks/results/gpu_check_cuda.json      # one GPU, <= 8 min
    python benchmarks/gpu_check.py --tiny --device cpu --compile off --json /tmp/gpu_check.json   # seconds
"""

from __future__ import annotations

import argparse
import gc
import os
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from lift3d.io.errors import Lift3dError
from lift3d.recipes.reports import REPO, machine_info, write_json

MODELS = ("stage2", "stage1", "unet3d")
PRECISIONS = ("bf16", "fp16")


@dataclass(frozen=True)
class SynthesisSetting:
    """One way to synthesise a volume: the objective the U-Net is trained with and lift3d's sampler for it."""

    name: str
    objective: str  # an ``objectives`` plugin: ddpm, flow
    scheduler: str  # a solver name, lift3d.sampling.solvers.SOLVERS
    steps: int


SYNTHESIS = [
    # Cheapest first: its time per step sizes the budget check of the longer ones. A new fast sampler
    # (or objective) is one more line here.
    SynthesisSetting("flow-euler-4", "flow", "flow", 4),  # the fast path: flow matching, Euler, 4 steps
    SynthesisSetting("dpm-25", "ddpm", "dpm", 25),  # DPM-Solver++, lift3d-synthesize's default
    SynthesisSetting("ddim-200", "ddpm", "ddim", 200),  # the paper's
]


@dataclass(frozen=True)
class Scale:
    size: int
    slices: tuple[int, ...]
    synthesis_slices: int
    widths: tuple[int, ...]
    layers_per_block: int
    unet3d_features: tuple[int, ...]
    warmup: int
    steps: int
    max_sampler_steps: int | None  # caps every SYNTHESIS setting's steps (the tiny scale)
    budget_s: float


SCALES = {
    "gpu": Scale(size=256, slices=(35, 100), synthesis_slices=100, widths=(64, 128, 256, 256), layers_per_block=2,
                 unet3d_features=(32, 32, 64, 128, 256, 32), warmup=2, steps=3, max_sampler_steps=None,
                 budget_s=450),
    # BasicUNet pools depth 4 times: 16 slices at least.
    "tiny": Scale(size=32, slices=(16, 20), synthesis_slices=16, widths=(16, 32), layers_per_block=1,
                  unet3d_features=(8, 8, 8, 16, 16, 8), warmup=2, steps=1, max_sampler_steps=2, budget_s=120),
}


@dataclass(frozen=True)
class Measurement:
    what: str  # "train" or "synthesis"
    model: str  # MODELS
    n: int
    precision: str | None = None  # train: bf16 or fp16
    compiled: bool = False
    setting: str | None = None  # synthesis: a SYNTHESIS name

    @property
    def name(self) -> str:
        if self.what == "train":
            return f"train {self.model} {self.precision} N={self.n} {'compiled' if self.compiled else 'eager'}"
        return f"synthesis {self.model} {self.setting or 'forward'} N={self.n}"


class OutOfTime(Exception):
    """The measurement ran past the time left in the budget."""


# ----------------------------------------------------------------------------------------------
# Memory and the clock


class Probe:
    """Peak memory from :meth:`start`, CUDA's allocator peak. On the CPU it is not measured (``None``):
    in one process the allocator reuses what earlier measurements freed, so an RSS peak would be
    meaningless (``benchmarks/inflate_overhead.py`` forks a process per measurement for that)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.baseline = device, 0
        self.method = "torch.cuda.max_memory_allocated" if device.type == "cuda" else None

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)

    def peak(self) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, function: Callable[[], Any]) -> float:
    sync(device)
    start = time.perf_counter()
    function()
    sync(device)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# What is measured


class Context:
    """What the measurements share: the scale, the device, the phantom datasets (one per N)."""

    def __init__(self, scale: Scale, device: torch.device, workdir: Path, synthesis_dtype: torch.dtype) -> None:
        self.scale, self.device, self.workdir, self.synthesis_dtype = scale, device, workdir, synthesis_dtype
        self._datasets: dict[int, Any] = {}

    def data_options(self, n: int) -> dict[str, Any]:
        return {"size": self.scale.size, "num_slices": n, "num_subjects": 1, "test_size": 0}

    def dataset(self, n: int):
        from lift3d.plugins import create

        if n not in self._datasets:
            self._datasets[n] = create("datasets", "phantom", split="train", **self.data_options(n))
        return self._datasets[n]

    def config(self, stage: str, n: int, **sections: dict[str, Any]):
        """The training config of stage ``slices`` or ``volumes``: lift3d's recipe at this scale."""
        from lift3d.recipes.make_a_volume import Recipe, stage_config
        from lift3d.training.config import apply

        recipe = Recipe(dataset="phantom", data_options=self.data_options(n), widths=self.scale.widths,
                        stage1_steps=1, stage2_steps=1, layers_per_block=self.scale.layers_per_block,
                        stage1_batch=n, name="gpu_check")
        return apply(stage_config(recipe, stage, self.workdir / stage, seed=0), sections, "gpu_check")


def make_accelerator(device: torch.device, precision: str, compiled: bool):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # one run per setting, as the loop does
    return Accelerator(cpu=device.type == "cpu", mixed_precision=precision,
                       dynamo_backend="inductor" if compiled else "no")


def train_steps(m: Measurement, ctx: Context, checkpointing: bool) -> dict[str, Any]:
    """Warm-up and timed training steps of one model, precision and compile setting."""
    accelerator = make_accelerator(ctx.device, m.precision, m.compiled)
    device = accelerator.device
    probe = Probe(device)
    dataset = ctx.dataset(m.n)
    info: dict[str, Any] = {}
    if m.model == "unet3d":
        from lift3d.recipes.unet3d import build_unet3d

        probe.start()
        torch.manual_seed(0)
        net, info["model_description"] = build_unet3d(ctx.scale.unet3d_features)
        params = list(net.parameters())
        optimizer = torch.optim.Adam(params, lr=2e-4)
        net, optimizer = accelerator.prepare(net.to(device), optimizer)
        pair = dataset[0]
        source, target = pair.source[None].to(device), pair.target[None].to(device)

        def loss(micro: int):
            return (net(source).float() - target).abs().mean()
    else:
        from lift3d.data.dataset import stack_items
        from lift3d.training.stages import get_stage

        stage = "volumes" if m.model == "stage2" else "slices"
        cfg = ctx.config(stage, m.n, model={"gradient_checkpointing": checkpointing},
                         optim={"mixed_precision": m.precision})
        make_task = get_stage(stage).prepare(cfg, dataset, ctx.workdir / stage)
        probe.start()
        task = make_task(accelerator)
        task.model.to(device)
        params = task.params
        optimizer = torch.optim.AdamW(params, lr=cfg.optim.learning_rate)
        model, optimizer = accelerator.prepare(task.model, optimizer)
        batch = stack_items([task.view[i] for i in range(cfg.data.batch_size)])
        info.update(lift=asdict(cfg.lift) if stage == "volumes" else None,
                    trained_parameters=sum(p.numel() for p in params),
                    batch=f"{cfg.data.batch_size} {'volume' if stage == 'volumes' else 'slices'}")

        def loss(micro: int):
            return task.loss(model, batch, micro)[0]

    def step(micro: int) -> None:
        value = loss(micro)
        accelerator.backward(value)
        accelerator.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    warmup_s = timed(device, lambda: [step(i) for i in range(ctx.scale.warmup)])
    times = [timed(device, lambda i=i: step(ctx.scale.warmup + i)) for i in range(ctx.scale.steps)]
    scaler = getattr(accelerator, "scaler", None)
    return {**info, "s_per_step": statistics.median(times), "step_times_s": times, "warmup_s": warmup_s,
            "peak_bytes": probe.peak(), "peak_method": probe.method, "gradient_checkpointing": checkpointing,
            "loss_scale": None if scaler is None else float(scaler.get_scale()),
            "trained_parameters": info.get("trained_parameters", sum(p.numel() for p in params))}


def synthesis(m: Measurement, ctx: Context) -> dict[str, Any]:
    """Seconds to synthesise one volume (its source encoded, every sampler step, decoded)."""
    device, dtype = ctx.device, ctx.synthesis_dtype
    probe = Probe(device)
    source = ctx.dataset(m.n)[0].source[None]
    if m.model == "unet3d":
        from lift3d.recipes.unet3d import build_unet3d

        probe.start()
        torch.manual_seed(0)
        net = build_unet3d(ctx.scale.unet3d_features)[0].requires_grad_(False).eval().to(device, dtype)
        x = source.to(device, dtype)
        with torch.no_grad():
            warmup_s = timed(device, lambda: net(x))
            seconds = timed(device, lambda: net(x))
        return {"seconds": seconds, "warmup_s": warmup_s, "peak_bytes": probe.peak(), "peak_method": probe.method,
                "unet_evaluations": 1, "dtype": str(dtype).removeprefix("torch.")}

    import lift3d
    from lift3d.plugins import create
    from lift3d.sampling.synthesis import SynthesisModel, synthesize, unet_evaluations
    from lift3d.training.stages import get_stage
    from lift3d.training.unets import build_objective, build_unet

    setting = next(s for s in SYNTHESIS if s.name == m.setting)
    steps = min(setting.steps, ctx.scale.max_sampler_steps or setting.steps)
    cfg = ctx.config("volumes" if m.model == "stage2" else "slices", m.n, diffusion={"objective": setting.objective})
    autoencoder = create("autoencoders", cfg.autoencoder.name, **cfg.autoencoder.options).eval()
    probe.start()
    torch.manual_seed(0)
    stage = get_stage(cfg.run.stage)  # stage 2 lifts the U-Net it builds
    unet = build_unet(cfg, autoencoder, ctx.scale.size, lift=stage.lift(stage.own(cfg)))
    unet = unet.requires_grad_(False).eval().to(device)
    if dtype != torch.float32:  # (diffusers warns on any .to(dtype))
        unet.to(dtype=dtype)
    if lift3d.is_lifted(unet):
        lift3d.fuse(unet)  # what load_synthesis_model (lift3d-synthesize) does
    objective = build_objective(cfg)
    settings = {"format": 2, "conditioning": "concat", "autoencoder": {"name": cfg.autoencoder.name},
                "prediction_type": cfg.model.prediction_type, "objective": setting.objective}
    model = SynthesisModel(unet, autoencoder.to(device), settings, dict(objective.scheduler.config))
    options = {"solver": setting.scheduler, "seed": 0, "progress": False, "window": 0}
    side = model.size_multiple
    warmup_s = timed(device, lambda: synthesize(model, source[:, :, :2, :side, :side], steps=1, **options))
    seconds = timed(device, lambda: synthesize(model, source, steps=steps, **options))
    return {"seconds": seconds, "steps": steps, "s_per_step": seconds / steps, "warmup_s": warmup_s,
            "peak_bytes": probe.peak(), "peak_method": probe.method, "objective": setting.objective,
            "scheduler": setting.scheduler, "fused": lift3d.is_lifted(unet),
            "unet_evaluations": unet_evaluations(model, setting.scheduler, steps),
            "dtype": str(dtype).removeprefix("torch.")}


def run_one(m: Measurement, ctx: Context) -> dict[str, Any]:
    if m.what == "synthesis":
        return synthesis(m, ctx)
    try:
        return train_steps(m, ctx, checkpointing=False)
    except torch.OutOfMemoryError:
        if m.model == "unet3d":
            raise
    release()
    return {**train_steps(m, ctx, checkpointing=True), "without_checkpointing": "out of memory"}


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------
# Plan, budget, report


def plan(args: argparse.Namespace) -> list[Measurement]:
    """Eager training first, then synthesis, then the compiled steps (whose compilation costs most):
    what the budget cuts is the least needed."""
    train = lambda compiled: [Measurement("train", model, n, precision, compiled)  # noqa: E731
                              for n in args.slices for precision in PRECISIONS for model in MODELS]
    sampling = [Measurement("synthesis", model, args.synthesis_slices, setting=s.name)
                for s in SYNTHESIS for model in ("stage2", "stage1")]
    return [*train(False), *sampling, Measurement("synthesis", "unet3d", args.synthesis_slices), *train(True)]


def not_planned(m: Measurement, args: argparse.Namespace, monai_missing: str | None) -> str | None:
    """Why ``m`` is left out before the run starts, or None."""
    if m.model not in args.models:
        return f"--models {' '.join(args.models)}"
    if m.what == "train" and m.precision not in args.precisions:
        return f"--precisions {' '.join(args.precisions)}"
    if m.what == "train" and m.precision == "fp16" and args.device == "cpu":
        return "fp16 needs CUDA: lift3d refuses optim.mixed_precision = 'fp16' on the CPU"
    if m.what == "train" and args.compile != "both" and m.compiled != (args.compile == "on"):
        return f"--compile {args.compile}"
    if m.setting is not None and m.setting not in args.synthesis:
        return f"--synthesis {' '.join(args.synthesis)}"
    if m.model == "unet3d" and monai_missing:
        return monai_missing
    return None


def estimate_s(m: Measurement, done: list[dict[str, Any]], device: str) -> float:
    """Seconds ``m`` will likely take: the slowest like it so far (synthesis: per sampler step), else a guess."""
    if m.what == "synthesis" and m.setting is not None:
        rates = [d["s_per_step"] for d in done if d.get("what") == "synthesis" and d["model"] == m.model
                 and "s_per_step" in d]
        steps = next(s.steps for s in SYNTHESIS if s.name == m.setting)
        if rates:
            return max(rates) * steps * 1.2 + 5
    like = [d["wall_s"] for d in done if d.get("what") == m.what and d.get("compiled") == m.compiled
            and d.get("status") == "ok" and d.get("n", 0) >= m.n]
    if like:
        return max(like)
    return (90.0 if m.compiled else 15.0) if device == "cuda" else 1.0


def check_monai() -> str | None:
    try:
        import monai  # noqa: F401
    except ImportError:
        return "MONAI is not installed (pip install 'lift3d[bench]'): no 3D U-Net baseline"
    return None


def summarise(results: list[dict[str, Any]]) -> dict[str, Any]:
    """stage2/stage1 and unet3d/stage2 per training setting, stage2/stage1 per synthesis setting."""
    ok = {r["name"]: r for r in results if r["status"] == "ok"}
    ratios: dict[str, Any] = {}
    for r in ok.values():
        if r["model"] != "stage2":
            continue
        for other, key in (("stage1", "stage2/stage1"), ("unet3d", "unet3d/stage2")):
            peer = ok.get(r["name"].replace(" stage2 ", f" {other} "))
            if peer is None or (r["what"] == "synthesis" and other == "unet3d"):
                continue
            a, b = (r, peer) if key == "stage2/stage1" else (peer, r)
            value = "s_per_step" if r["what"] == "train" else "seconds"
            entry = {"time": a[value] / b[value]}
            if a.get("peak_bytes") and b.get("peak_bytes"):
                entry["peak_memory"] = a["peak_bytes"] / b["peak_bytes"]
            ratios.setdefault(key, {})[r["name"].replace(" stage2", "")] = entry
    return ratios


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes, a few sampler steps: the CPU test")
    parser.add_argument("--compile", choices=("both", "on", "off"), default="both",
                        help="training steps eager, compiled (torch.compile, inductor) or both")
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--synthesis", nargs="*", choices=[s.name for s in SYNTHESIS],
                        default=[s.name for s in SYNTHESIS])
    parser.add_argument("--slices", type=int, nargs="+", default=None, help="N of the training volumes")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="no measurement starts that would not end within this many seconds of the start "
                             "(default: 450 on the GPU scale, leaving room under 8 minutes; 120 tiny)")
    parser.add_argument("--json", type=Path, default=None,
                        help="the report (default benchmarks/results/gpu_check_<device>.json)")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but CUDA is not available here; use --device cpu (with --tiny)")
    scale = SCALES["tiny" if args.tiny else "gpu"]
    args.slices = tuple(args.slices or scale.slices)
    if min(args.slices) < 2:
        parser.error(f"--slices must be >= 2, got {list(args.slices)}")
    args.synthesis_slices = scale.synthesis_slices
    args.budget_s = scale.budget_s if args.budget_s is None else args.budget_s
    args.json = args.json or REPO / "benchmarks" / "results" / f"gpu_check_{args.device}.json"
    return args


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Atomically: a kill while writing leaves the previous report."""
    tmp = path.with_name(f".{path.name}.tmp")
    write_json(tmp, report)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    scale = SCALES["tiny" if args.tiny else "gpu"]
    scale = Scale(**{**asdict(scale), "slices": args.slices})
    device = torch.device(args.device)
    monai_missing = check_monai()
    report: dict[str, Any] = {
        "benchmark": "gpu_check", "finished": False,
        "command": " ".join(["python", os.path.relpath(__file__, REPO), *args.argv]),
        "machine": machine_info(), "device": args.device, "scale": asdict(scale), "budget_s": args.budget_s,
        "synthesis_settings": [asdict(s) for s in SYNTHESIS],
        "protocol": {"data": "phantom, one volume pair", "space": "pixel (identity autoencoder)",
                     "stage1": "2D U-Net, N slices per step, a timestep per slice",
                     "stage2": "lifted with inflate's defaults, one volume per step, volumetric layers trained",
                     "unet3d": "lift3d.recipes.unet3d: MONAI BasicUNet, L1, Adam",
                     "step": "Accelerate mixed precision, clip 1.0, AdamW", "compile": "dynamo_backend inductor",
                     "peak_memory": "from before the model reaches the device"},
        "measurements": [], "ratios": {},
    }
    results: list[dict[str, Any]] = report["measurements"]
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as workdir:
        ctx = Context(scale, device, Path(workdir), torch.bfloat16 if args.device == "cuda" else torch.float32)
        for m in plan(args):
            entry: dict[str, Any] = {"name": m.name, **asdict(m)}
            reason = not_planned(m, args, monai_missing)
            elapsed = time.perf_counter() - started
            needed = estimate_s(m, results, args.device)
            if reason is None and elapsed + needed > args.budget_s:
                reason = f"time budget: {args.budget_s - elapsed:.0f} s left of {args.budget_s:.0f}, ~{needed:.0f} s needed"
            if reason is not None:
                results.append({**entry, "status": "skipped", "reason": reason})
                continue
            print(f"[{elapsed:5.0f} s] {m.name}", file=sys.stderr, flush=True)
            tic = time.perf_counter()
            previous = signal.signal(signal.SIGALRM, _out_of_time)
            signal.setitimer(signal.ITIMER_REAL, max(args.budget_s - elapsed, 1.0))
            try:
                entry.update(run_one(m, ctx), status="ok")
            except OutOfTime:
                entry.update(status="timed out", reason=f"stopped at the {args.budget_s:.0f} s budget")
            except torch.OutOfMemoryError as exc:
                entry.update(status="out of memory", reason=str(exc).splitlines()[0][:300])
            except (Lift3dError, RuntimeError, ValueError) as exc:
                entry.update(status="failed", reason=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
                if m.compiled:
                    torch._dynamo.reset()
                release()
            entry["wall_s"] = time.perf_counter() - tic
            results.append(entry)
            report["ratios"] = summarise(results)
            report["runtime_s"] = time.perf_counter() - started
            write_report(args.json, report)
            shown = entry.get("s_per_step" if m.what == "train" else "seconds")
            print(f"         {entry['status']}" + (f", {shown:.3g} s" if shown is not None else ""), file=sys.stderr)
    report.update(finished=True, ratios=summarise(results), runtime_s=time.perf_counter() - started)
    write_report(args.json, report)
    counts = {s: sum(r["status"] == s for r in results) for s in sorted({r["status"] for r in results})}
    print(f"gpu_check: {counts} in {report['runtime_s']:.0f} s; {os.path.relpath(args.json, REPO)}")
    return 0


def _out_of_time(signum, frame) -> None:
    raise OutOfTime()


if __name__ == "__main__":
    sys.exit(main())
