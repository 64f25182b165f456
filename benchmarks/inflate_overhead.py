"""What lifting a 2D diffusion U-Net costs: parameters, lifted/2D time and peak memory (Core, item 8).

Builds a diffusers ``UNet2DModel`` from a config (never a hub), lifts copies of it with
:func:`lift3d.lifting.inflate` (Make-A-Volume, Zhu et al., MICCAI 2023, sec. 2.3) and measures, for a batch
of one volume of N slices, the forward pass and a train step of each placement preset, and of each
layer kind given with ``--kinds`` (``KIND[:key=value,...]``, inflate's keywords, ``recompute=true``
included), against the plain 2D model run on the same N slices.

On CPU every measurement runs in a fresh process forked from this one before it computes anything,
so its peak RSS belongs to one configuration; on CUDA the allocator's peak is reset per measurement.
Within each repeat the configurations are interleaved, in an order rotated from repeat to repeat, so
a machine whose load drifts slows 2D and lifted alike: a ratio is the median over repeats of
lifted/2D measured back to back.

    python benchmarks/inflate_overhead.py --device cpu --slices 35 100 --repeats 2 1 --skip-train-at 100 \
        --train-repeats 1 --train-presets resnet --json benchmarks/results/inflate_overhead_cpu.json
    python benchmarks/inflate_overhead.py --device cuda --dtype bfloat16 --slices 35 100 --repeats 5
    python benchmarks/inflate_overhead.py --small --slices 3 --repeats 1 --threads 1   # smoke test

The cost of candidate default lifts (issue: "the default lift at 1.10x") on the held-out U-Net
(``--size medium``: widths 64-256, attention at one level, 16 slices of 32x32):

    python benchmarks/inflate_overhead.py --size medium --slices 16 --repeats 3 --threads 1 --warmup 1 --presets \
        --modes forward train-all --kinds full full:recompute=true low-rank:rank_min=1 low-rank:rank_min=16 \
        low-rank:rank_min=32 low-rank:rank_min=1,recompute=true low-rank:rank_min=16,recompute=true \
        low-rank:rank_min=32,recompute=true low-rank:rank_min=16,train_down=false \
        --json benchmarks/results/inflate_overhead_kinds_cpu.json
"""

from __future__ import annotations

import argparse
import gc
import math
import multiprocessing
import os
import resource
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from functools import reduce
from typing import Any, Callable

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from einops import rearrange
from torch.utils.flop_counter import FlopCounterMode

import lift3d

from lift3d.layers.registry import parse_kind
from lift3d.recipes.reports import machine_info, write_json  # noqa: E402

UNET_CONFIGS: dict[str, dict[str, Any]] = {
    # Realistic width for 64x64 latents. Self-attention at 16x16 only, as in DDPM (Ho et al., 2020),
    # plus the mid block's; the up blocks mirror the down blocks.
    "full": dict(
        sample_size=64, in_channels=6, out_channels=3, block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    ),
    # Half the widths on 32x32 latents (1/16 of the FLOPs): the trade table of layer kinds, where
    # every kind must be measured in one run on a shared CPU.
    "medium": dict(
        sample_size=32, in_channels=6, out_channels=3, block_out_channels=(64, 128, 256, 256),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
    ),
    # The smoke-test size: the same kinds of blocks, a few milliseconds per step.
    "small": dict(
        sample_size=16, in_channels=6, out_channels=3, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    ),
}

MODES = ("forward", "train-all", "train-volumetric")
"""``forward``: no_grad, eval. ``train-all``: forward + MSE + backward + AdamW step on every
parameter. ``train-volumetric``: the same with only the volumetric layers trainable
(``lift3d.set_trainable(model, "volumetric")``), compared against the 2D model's ``train-all``."""

VARIANTS = ("fast", "naive", "grouped")
"""``fast``: ``VolumetricConv`` as shipped (a 1x1 conv per tap, shifted and summed). ``naive``: the
same layers running ``forward_reference``, the paper's literal einops -> Conv1d -> einops.
``grouped``: ``inflate(groups=g)`` with g the largest single int dividing every host's channels."""

BASELINE = "2d"


@dataclass(frozen=True)
class Configuration:
    """One model to measure: the plain 2D U-Net (``preset=None``, ``kind=None``), one lifted with a
    placement preset, or one lifted with ``inflate(**parse_kind(kind))`` (``kind``: ``KIND[:key=value,...]``)."""

    preset: str | None
    variant: str = "fast"
    kind: str | None = None

    @property
    def lifted(self) -> bool:
        return self.preset is not None or self.kind is not None

    @property
    def name(self) -> str:
        if self.kind is not None:
            return self.kind
        if self.preset is None:
            return BASELINE
        return self.preset if self.variant == "fast" else f"{self.preset}/{self.variant}"

    def runs(self, mode: str, train_presets: list[str]) -> bool:
        if self.kind is not None:  # recompute changes only what backward keeps
            return mode != "forward" or not parse_kind(self.kind).get("recompute", False)
        if mode == "forward":
            return True
        if self.preset is None:
            return mode == "train-all"
        return self.variant == "fast" and self.preset in train_presets


# ----------------------------------------------------------------------------------------------
# Work done inside the forked children.


def _host_channels(model: torch.nn.Module, preset: str) -> list[int]:
    modules = dict(model.named_modules())
    return [modules[name].out_channels for name in lift3d.PRESETS[preset](model)]


def build_model(size: str, config: Configuration) -> torch.nn.Module:
    torch.manual_seed(0)
    model = UNet2DModel(**UNET_CONFIGS[size])
    if config.kind is not None:
        lift3d.inflate(model, **parse_kind(config.kind))
    elif config.preset is not None:
        groups = 1
        if config.variant == "grouped":
            groups = reduce(math.gcd, _host_channels(model, config.preset))
        lift3d.inflate(model, where=config.preset, groups=groups)
        if config.variant == "naive":
            # Per instance, so no other model in any process is touched.
            for _, layer in lift3d.volumetric_layers(model):
                layer.forward = layer.forward_reference
    return model


def make_batch(size: str, n: int, lifted: bool, device: torch.device, dtype: torch.dtype):
    """``(x, t, target)`` for one volume of n slices: 5D for a lifted model, flattened slices for 2D."""
    cfg = UNET_CONFIGS[size]
    s = cfg["sample_size"]
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(1, cfg["in_channels"], n, s, s, generator=generator)
    target = torch.randn(1, cfg["out_channels"], n, s, s, generator=generator)
    t = torch.tensor([500])
    if not lifted:  # the 2D model gets its slices already flattened, outside the timed region
        x = rearrange(x, "b c n h w -> (b n) c h w").contiguous()
        target = rearrange(target, "b c n h w -> (b n) c h w").contiguous()
        t = t.repeat(n)
    return x.to(device, dtype), t.to(device), target.to(device, dtype)


def make_step(model: torch.nn.Module, mode: str, lifted: bool) -> Callable[[tuple], None]:
    if mode == "forward":
        model.eval().requires_grad_(False)

        def forward(batch):
            x, t, _ = batch
            with torch.no_grad():
                model(x, t)

        return forward
    model.train()
    if lifted:
        lift3d.set_trainable(model, "volumetric" if mode == "train-volumetric" else "all")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def train_step(batch):
        x, t, target = batch
        loss = F.mse_loss(model(x, t).sample.float(), target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train_step


class MemoryProbe:
    """Peak memory of what runs between :meth:`start` and :meth:`peak`, above the level at start.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the process's peak resident set (``VmHWM``,
    reset to the current RSS through ``/proc/self/clear_refs``), falling back to ``ru_maxrss``,
    which also covers the model build, where ``clear_refs`` is unavailable.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.method = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "VmHWM-after-clear_refs"
        self.baseline = 0

    def current(self) -> int:
        """Memory in use now, above the level at :meth:`start`."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.memory_allocated(self.device) - self.baseline
        return _rss_bytes() - self.baseline

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        self.baseline = _rss_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.method = "ru_maxrss"

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        if self.method == "ru_maxrss":
            scale = 1 if sys.platform == "darwin" else 1024
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale - self.baseline
        with open("/proc/self/status") as f:
            hwm = next(line for line in f if line.startswith("VmHWM:"))
        return int(hwm.split()[1]) * 1024 - self.baseline


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(job: dict) -> dict:
    """One configuration, one N, one mode, in this (fresh) process: seconds per step and peak memory,
    both above the memory in use once the model, optimizer and inputs exist (``peak_bytes``) and with
    the model's weights included (``peak_with_model_bytes``: the probe starts before the model is
    built on CPU, before it is moved to the GPU on CUDA)."""
    device, dtype = torch.device(job["device"]), getattr(torch, job["dtype"])
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    config = Configuration(job["preset"], job["variant"], job.get("kind"))
    lifted = config.lifted
    probe = MemoryProbe(device)
    if device.type == "cpu":
        probe.start()
    model = build_model(job["size"], config)
    if device.type == "cuda":
        probe.start()
    model.to(device)
    if dtype != torch.float32:
        model.to(dtype)
    step = make_step(model, job["mode"], lifted)
    batch = make_batch(job["size"], job["n"], lifted, device, dtype)
    # Lazy initialisation (kernels, AdamW state) on a two-slice volume, so it is not timed but
    # the AdamW state does count towards peak memory.
    warm = make_batch(job["size"], min(job["n"], 2), lifted, device, dtype)
    setup = probe.current()
    step(warm)
    for _ in range(job["warmup"]):
        step(batch)
    _sync(device)
    times, cpu_times = [], []
    for _ in range(job["iters"]):
        _sync(device)
        start, cpu_start = time.perf_counter(), time.process_time()
        step(batch)
        _sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    # CPU seconds of this process (all threads): less sensitive than wall time to other processes
    # on a shared machine, though spin-waiting threads still count.
    peak = probe.peak()
    return {"time_s": statistics.median(times), "iter_times_s": times, "cpu_s": statistics.median(cpu_times),
            "peak_bytes": peak - setup, "peak_with_model_bytes": peak,
            "baseline_bytes": probe.baseline + setup, "peak_method": probe.method}


def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """The two matmuls of attention; FlopCounterMode has no formula for the CPU flash kernel."""
    b, h, s_q, d = query
    return 2 * b * h * s_q * key[-2] * (d + value[-1])


def _flop_counter() -> FlopCounterMode:
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return FlopCounterMode(display=False, custom_mapping={cpu_sdpa: _sdpa_flops} if cpu_sdpa else None)


def describe(job: dict) -> dict:
    """Parameters and FLOPs of every configuration (FLOPs of one forward over n slices)."""
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    n, out = job["n"], {}
    for preset, variant, kind in job["configurations"]:
        config = Configuration(preset, variant, kind)
        model = build_model(job["size"], config).eval()
        x, t, _ = make_batch(job["size"], n, config.lifted, torch.device("cpu"), torch.float32)
        with torch.no_grad(), _flop_counter() as counter:
            model(x, t)
        info: dict[str, Any] = {"preset": preset, "variant": variant, "kind": kind, "flops": counter.get_total_flops(),
                                "parameters": sum(p.numel() for p in model.parameters())}
        if config.lifted:
            report = lift3d.report(model)
            _, layer = next(lift3d.volumetric_layers(model))
            info.update(layers=report.num_layers, volumetric_parameters=report.volumetric_parameters,
                        param_overhead=report.overhead, groups=getattr(layer, "groups", None))
            ranks = {str(layer.channels): layer.rank for _, layer in lift3d.volumetric_layers(model)
                     if hasattr(layer, "rank")}
            if ranks:  # low-rank: the rank per host width
                info["ranks"] = dict(sorted(ranks.items(), key=lambda item: int(item[0])))
            if variant == "fast" and kind is None:
                # groups=channels in every layer: not expressible through inflate(groups=int) when
                # the hosts have different widths, so counted here and not timed.
                k = layer.kernel_size
                info["depthwise_parameters"] = sum(c * k + c for _, c in report.hosts)
        out[config.name] = info
        del model
        gc.collect()
    return {"configs": out, "torch_threads": torch.get_num_threads()}


def _child(connection, function: Callable[[dict], dict], job: dict) -> None:
    try:
        connection.send(("ok", function(job)))
    except BaseException:  # noqa: BLE001 - reported to the parent, which names the job
        connection.send(("error", traceback.format_exc()))
    finally:
        connection.close()


def run_inline(function: Callable[[dict], dict], job: dict) -> dict:
    """On CUDA every job runs in this process: the allocator's peak statistics reset per job."""
    try:
        return function(job)
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_forked(function: Callable[[dict], dict], job: dict) -> dict:
    """Run ``function(job)`` in a fresh forked process, for a peak RSS of its own (CPU). The parent
    never computes with torch, so the child starts without thread pools to inherit."""
    context = multiprocessing.get_context("fork")
    gc.freeze()  # the child's collections then skip the parent's objects (and do not copy their pages)
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(send, function, job))
    process.start()
    send.close()
    try:
        status, payload = receive.recv()
    except EOFError:
        status, payload = "error", "the worker died without a result (killed for memory?)"
    process.join()
    if status != "ok":
        raise RuntimeError(f"benchmark job {job} failed:\n{payload}")
    return payload


# ----------------------------------------------------------------------------------------------
# The parent: plan, interleave, summarise.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--slices", type=int, nargs="+", default=[35, 100], help="N, slices per volume")
    parser.add_argument("--repeats", type=int, nargs="+", default=[3],
                        help="interleaved rounds, one value or one per --slices entry; ratios are medians over them")
    parser.add_argument("--train-repeats", type=int, default=None,
                        help="rounds that also run the train steps (default: all of them)")
    parser.add_argument("--presets", nargs="*", default=list(lift3d.PRESETS), choices=list(lift3d.PRESETS),
                        help="placement presets of the default kind (none: only --kinds)")
    parser.add_argument("--kinds", nargs="*", default=[], metavar="KIND[:KEY=VALUE,...]",
                        help="lifted models by kind and inflate keywords, e.g. full, low-rank:rank_min=16, "
                             "low-rank:recompute=true (recompute: train steps only)")
    parser.add_argument("--size", choices=tuple(UNET_CONFIGS), default=None,
                        help="U-Net widths and latent size (default full; --small is --size small)")
    parser.add_argument("--variant", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="fast runs on every preset; naive and grouped on --variant-presets, forward only")
    parser.add_argument("--variant-presets", nargs="+", default=None, choices=list(lift3d.PRESETS),
                        help="presets on which the naive and grouped variants run (default: resnet if chosen, else the first preset)")
    parser.add_argument("--skip-train-at", type=int, nargs="*", default=[], metavar="N",
                        help="slice counts at which only the forward pass is measured")
    parser.add_argument("--train-presets", nargs="+", default=None, choices=list(lift3d.PRESETS),
                        help="presets whose train steps are measured (default: --presets)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps at full size per measurement (default: cpu 0, cuda 3)")
    parser.add_argument("--iters", type=int, default=None,
                        help="timed steps per measurement, median taken (default: cpu 1, cuda 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each worker")
    parser.add_argument("--small", action="store_true", help="tiny widths: a smoke test, not a benchmark")
    parser.add_argument("--json", default=None, help="write all figures to this file")
    args = parser.parse_args(argv)
    if len(args.repeats) not in (1, len(args.slices)) or min(args.repeats) < 1:
        parser.error(f"--repeats takes one positive count or one per --slices entry ({len(args.slices)}), "
                     f"got {args.repeats}")
    args.repeats = dict(zip(args.slices, args.repeats * len(args.slices) if len(args.repeats) == 1 else args.repeats))
    if any(n < 1 for n in args.slices):
        parser.error(f"--slices must be positive, got {args.slices}")
    if "train-volumetric" in args.modes and "train-all" not in args.modes:
        parser.error("--modes train-volumetric is compared with the 2D model's train-all step; add train-all")
    args.warmup = args.warmup if args.warmup is not None else (3 if args.device == "cuda" else 0)
    args.iters = args.iters if args.iters is not None else (10 if args.device == "cuda" else 1)
    args.variant_presets = args.variant_presets or (["resnet"] if "resnet" in args.presets else args.presets[:1])
    args.train_presets = args.train_presets if args.train_presets is not None else args.presets
    if not args.presets and not args.kinds:
        parser.error("nothing to measure: give --presets or --kinds")
    for spec in args.kinds:
        try:
            settings = parse_kind(spec)
            lift3d.layers.registry.check_options(settings["kind"], {k: v for k, v in settings.items() if k not in
                                                                ("kind", "where", "recompute", "kernel_size",
                                                                 "padding_mode")})
        except ValueError as exc:
            parser.error(f"--kinds {spec!r}: {exc}")
    args.size = args.size or ("small" if args.small else "full")
    return args


def configurations(args: argparse.Namespace) -> list[Configuration]:
    configs = [Configuration(None)]
    if "fast" in args.variant:
        configs += [Configuration(p) for p in args.presets]
    configs += [Configuration(p, v) for v in args.variant if v != "fast" for p in args.variant_presets]
    return configs + [Configuration(None, kind=spec) for spec in args.kinds]


def plan(args: argparse.Namespace, configs: list[Configuration]) -> list[tuple[int, int, str, Configuration]]:
    """(repeat, n, mode, configuration), interleaved: every configuration once per round, the
    order rotated from round to round so no configuration always runs first or last."""
    jobs = []
    for repeat in range(max(args.repeats.values())):
        for n in args.slices:
            for mode in args.modes:
                if repeat >= args.repeats[n]:
                    continue
                if mode != "forward" and (n in args.skip_train_at or
                                          (args.train_repeats is not None and repeat >= args.train_repeats)):
                    continue
                chosen = [c for c in configs if c.runs(mode, args.train_presets)]
                if not any(c.lifted for c in chosen):
                    continue
                shift = repeat % len(chosen)
                jobs += [(repeat, n, mode, c) for c in chosen[shift:] + chosen[:shift]]
    return jobs


def summarise(samples: list[dict], configs: list[Configuration], args: argparse.Namespace) -> dict:
    """``results[n][mode][name]``: times, peaks and, for lifted models, per-repeat lifted/2D ratios."""
    baseline_mode = {"forward": "forward", "train-all": "train-all", "train-volumetric": "train-all"}
    by_key = {(s["repeat"], s["n"], s["mode"], s["name"]): s for s in samples}
    results: dict[str, dict] = {}
    for n in args.slices:
        for mode in args.modes:
            for config in configs:
                mine = [s for s in samples if (s["n"], s["mode"], s["name"]) == (n, mode, config.name)]
                if not mine:
                    continue
                entry: dict[str, Any] = {
                    "times_s": [s["time_s"] for s in mine], "time_s": statistics.median(s["time_s"] for s in mine),
                    "cpu_s": statistics.median(s["cpu_s"] for s in mine),
                    "peak_bytes_all": [s["peak_bytes"] for s in mine],
                    "peak_bytes": statistics.median(s["peak_bytes"] for s in mine),
                    "peak_with_model_bytes": statistics.median(s["peak_with_model_bytes"] for s in mine),
                    "peak_method": mine[0]["peak_method"]}
                if config.lifted:
                    pairs = [(s, by_key.get((s["repeat"], n, baseline_mode[mode], BASELINE))) for s in mine]
                    pairs = [(s, b) for s, b in pairs if b is not None]
                    if pairs:
                        entry["ratios"] = [s["time_s"] / b["time_s"] for s, b in pairs]
                        entry["ratio"] = statistics.median(entry["ratios"])
                        entry["cpu_ratios"] = [s["cpu_s"] / b["cpu_s"] for s, b in pairs]
                        entry["cpu_ratio"] = statistics.median(entry["cpu_ratios"])
                        entry["peak_ratios"] = [s["peak_bytes"] / b["peak_bytes"] for s, b in pairs
                                                if b["peak_bytes"] > 0]
                        if entry["peak_ratios"]:
                            entry["peak_ratio"] = statistics.median(entry["peak_ratios"])
                        entry["peak_with_model_ratios"] = [s["peak_with_model_bytes"] / b["peak_with_model_bytes"]
                                                           for s, b in pairs if b["peak_with_model_bytes"] > 0]
                        if entry["peak_with_model_ratios"]:
                            entry["peak_with_model_ratio"] = statistics.median(entry["peak_with_model_ratios"])
                results.setdefault(str(n), {}).setdefault(mode, {})[config.name] = entry
    return results


def _mib(value: float) -> str:
    return f"{value / 2 ** 20:,.0f}"


def markdown(report: dict) -> str:
    configs, results = report["configs"], report["results"]
    base = configs[BASELINE]
    lines = ["Parameters and FLOPs (FLOPs of one forward; lifted/2D does not depend on N)", "",
             "| configuration | layers | groups (ranks) | volumetric params | params overhead | FLOPs lifted/2D |",
             "| --- | ---: | ---: | ---: | ---: | ---: |",
             f"| {BASELINE} | - | - | - ({base['parameters']:,} base) | - | 1.00x |"]
    for name, info in configs.items():
        if name == BASELINE:
            continue
        groups = (", ".join(f"C={c}: r={r}" for c, r in info["ranks"].items()) if "ranks" in info
                  else "-" if info["groups"] is None else info["groups"])
        lines.append(f"| {name} | {info['layers']} | {groups} | {info['volumetric_parameters']:,} | "
                     f"+{100 * info['param_overhead']:.1f}% | {info['flops'] / base['flops']:.3f}x |")
    for name, info in configs.items():
        if "depthwise_parameters" in info:
            dw = info["depthwise_parameters"]
            lines.append(f"| {name}/depthwise (counted, not timed) | {info['layers']} | channels | {dw:,} | "
                         f"+{100 * dw / base['parameters']:.2f}% | - |")
    columns = [(n, mode) for n, modes in results.items() for mode in modes]
    def samples(n: str, mode: str) -> int:
        return max(len(entry["times_s"]) for entry in results[n][mode].values())

    header = " | ".join(f"{mode} N={n} ({samples(n, mode)}x)" for n, mode in columns)
    rule = " | ".join("---:" for _ in columns)
    time_rows, memory_rows, total_rows = [], [], []
    show_cpu = report["settings"]["device"] == "cpu"
    for name in configs:
        cells_t, cells_m, cells_w = [], [], []
        for n, mode in columns:
            entry = results[n][mode].get(name)
            if entry is None:
                cells_t.append("-")
                cells_m.append("-")
                cells_w.append("-")
            elif name == BASELINE:
                cells_t.append(f"{entry['time_s']:.3g} s")
                cells_m.append(f"{_mib(entry['peak_bytes'])} MiB")
                cells_w.append(f"{_mib(entry['peak_with_model_bytes'])} MiB")
            else:
                ratio = entry.get("peak_with_model_ratio")
                cells_w.append(f"{_mib(entry['peak_with_model_bytes'])} MiB" + (f" ({ratio:.2f}x)" if ratio else ""))
                cpu = f" ({entry['cpu_ratio']:.2f}x)" if "cpu_ratio" in entry and show_cpu else ""
                cells_t.append(f"{entry['ratio']:.2f}x{cpu}" if "ratio" in entry else "-")
                ratio = f" ({entry['peak_ratio']:.2f}x)" if "peak_ratio" in entry else ""
                cells_m.append(f"{_mib(entry['peak_bytes'])} MiB{ratio}")
        time_rows.append(f"| {name} | " + " | ".join(cells_t) + " |")
        memory_rows.append(f"| {name} | " + " | ".join(cells_m) + " |")
        total_rows.append(f"| {name} | " + " | ".join(cells_w) + " |")
    cpu_note = "; in brackets the same ratio of process CPU seconds" if show_cpu else ""
    lines += ["", "Time: lifted/2D wall clock, median over interleaved repeats (their count in the header; 2D "
              f"row: median seconds per step; train-volumetric is compared with the 2D train-all step{cpu_note})", "",
              f"| configuration | {header} |", f"| --- | {rule} |", *time_rows,
              "", f"Peak memory above the model's resident baseline ({report['peak_method']}), median; "
              "(lifted/2D)", "", f"| configuration | {header} |", f"| --- | {rule} |", *memory_rows,
              "", "Peak memory with the model's weights (the probe starts before the model is built), median; "
              "(lifted/2D)", "", f"| configuration | {header} |", f"| --- | {rule} |", *total_rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    machine = machine_info()  # now: the children run the lift3d imported at start
    size = args.size
    configs = configurations(args)
    common = {"size": size, "device": args.device, "dtype": args.dtype, "threads": args.threads,
              "warmup": args.warmup, "iters": args.iters}
    # CPU: a forked process per job, for its own peak RSS. CUDA: the allocator counts per job, and
    # a CUDA context must not be forked.
    run = run_forked if args.device == "cpu" else run_inline
    described = run(describe, {"size": size, "n": 2, "threads": args.threads,
                                      "configurations": [(c.preset, c.variant, c.kind) for c in configs]})
    jobs = plan(args, configs)
    samples, loads = [], []
    for i, (repeat, n, mode, config) in enumerate(jobs, 1):
        loads.append(os.getloadavg()[0])
        job = {**common, "n": n, "mode": mode, "preset": config.preset, "variant": config.variant, "kind": config.kind}
        try:
            result = run(measure, job)
        except RuntimeError as error:
            print(f"inflate_overhead: {config.name} {mode} at N={n} failed: {error}", file=sys.stderr)
            return 1
        samples.append({**result, "repeat": repeat, "n": n, "mode": mode, "name": config.name})
        print(f"[{i}/{len(jobs)} {time.perf_counter() - started:6.0f} s] repeat {repeat} N={n} {mode:16s} "
              f"{config.name:20s} {result['time_s']:8.3f} s  peak +{_mib(result['peak_bytes'])} MiB",
              file=sys.stderr, flush=True)
    report = {
        "benchmark": "inflate_overhead",
        "command": " ".join(["python", os.path.relpath(__file__), *(sys.argv[1:] if argv is None else argv)]),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "machine": machine | {"torch_threads": described["torch_threads"]},
        "model": {"size": size, "config": UNET_CONFIGS[size],
                  "parameters": described["configs"][BASELINE]["parameters"]},
        "peak_method": samples[0]["peak_method"] if samples else None,
        "configs": described["configs"],
        "results": summarise(samples, configs, args),
        "load_average_1min": {"min": min(loads, default=0.0), "max": max(loads, default=0.0),
                              "median": statistics.median(loads) if loads else 0.0},
        "runtime_s": time.perf_counter() - started,
    }
    print(markdown(report))
    print(f"\nruntime {report['runtime_s']:.0f} s", file=sys.stderr)
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
