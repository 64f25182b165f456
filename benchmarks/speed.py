"""What lifting a 2D diffusion U-Net costs: parameters, FLOPs, time and peak memory against the 2D model.

For one volume of N slices, one interleaved run measures the forward pass and a train step (forward + MSE + backward +
AdamW) of each of ``--models``: ``2d``, a diffusers ``UNet2DModel``, run on the slices as a batch; lifted models, made
by :func:`lift3d.lifting.inflate` (Make-A-Volume, Zhu et al., MICCAI 2023) with any settings; ``native3d``, MONAI's
``DiffusionModelUNet(spatial_dims=3)`` of the same widths. A ratio is the median over repeats of two figures measured
back to back. Also: DDIM sampling of one volume and a bf16 fit check. On CPU (Linux) each measurement runs in a fresh
forked process, for a peak RSS of its own. The published commands are in benchmarks/RESULTS.md; a smoke test:

    python benchmarks/speed.py --size small --slices 3 --repeats 1 --threads 1
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import gc
import multiprocessing
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import lift3d
from lift3d.layers.registry import names, parse_kind
from lift3d.recipes.reports import machine_info, write_json

try:
    from monai.networks.nets import DiffusionModelUNet
except ImportError:  # the optional `bench` extra
    DiffusionModelUNet = None

_LEVELS = {"down_block_types": ("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"), "in_channels": 6,
           "up_block_types": ("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), "out_channels": 3,
           "layers_per_block": 2}
UNET_CONFIGS: dict[str, dict[str, Any]] = {  # full: attention at 16x16 and in the mid block, as DDPM (Ho et al., 2020)
    "full": {"sample_size": 64, "block_out_channels": (128, 256, 512, 512), **_LEVELS},
    "medium": {"sample_size": 32, "block_out_channels": (64, 128, 256, 256), **_LEVELS},  # 1/16 of full's FLOPs
    "small": {**_LEVELS, "sample_size": 16, "block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8,
              "down_block_types": ("DownBlock2D", "AttnDownBlock2D"), "up_block_types": ("AttnUpBlock2D", "UpBlock2D")},
}
AUTOENCODERS = {"kl-f4": {"image_channels": 1, "latent_channels": 3, "block_out_channels": (128, 256, 512),
                          "layers_per_block": 2, "norm_num_groups": 32},  # LDM's first stage: 64x64 latents -> 256x256
                "tiny": {"image_channels": 1, "latent_channels": 3}}  # for smoke tests
BASELINE, MODES, UNLIFTED = "2d", ("forward", "train"), ("2d", "native3d")
DEFAULT_MODELS = ("2d", "lifted", "lifted-volumetric", "native3d")
FIGURES = {"time": ("time_s", "Seconds per step"), "cpu": ("cpu_s", "Process CPU seconds per step"),
           "peak": ("peak_bytes", "Peak memory, model included"), "peak_above_setup": (
               "peak_above_setup_bytes", "Peak memory above what is in use once model, optimizer and inputs exist")}


def native3d_config(unet2d: dict[str, Any]) -> dict[str, Any]:
    """MONAI ``DiffusionModelUNet`` arguments of a ``UNet2DModel`` config: widths, blocks, attention, heads, norms."""
    return {"spatial_dims": 3, "in_channels": unet2d["in_channels"], "out_channels": unet2d["out_channels"],
            "channels": tuple(unet2d["block_out_channels"]), "num_res_blocks": unet2d.get("layers_per_block", 2),
            "attention_levels": tuple(block.startswith("Attn") for block in unet2d["down_block_types"]),
            "num_head_channels": unet2d.get("attention_head_dim", 8), "norm_eps": unet2d.get("norm_eps", 1e-5),
            "norm_num_groups": unet2d.get("norm_num_groups", 32), "resblock_updown": False, "use_flash_attention": True}


class NativeUNet3D(nn.Module):
    """A MONAI 3D U-Net behind the lifted model's call ``(b, c, n, h, w), t``: depth padded, output cropped."""

    def __init__(self, unet: nn.Module, depth_multiple: int) -> None:
        super().__init__()
        self.unet, self.depth_multiple = unet, depth_multiple

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        n, pad = x.shape[2], -x.shape[2] % self.depth_multiple
        return SimpleNamespace(sample=self.unet(F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x, t)[:, :, :n])


def model_settings(name: str) -> dict[str, Any]:
    """inflate's keywords and this script's keys in a model's name (no ``kind``: inflate's default)."""
    settings = parse_kind(name)
    if settings["kind"] in ("lifted", "lifted-volumetric", *UNLIFTED):
        settings |= {"trainable": "volumetric"} if settings.pop("kind") == "lifted-volumetric" else {}
    return settings


def build_model(size: str, name: str) -> nn.Module:
    torch.manual_seed(0)
    config, settings = UNET_CONFIGS[size], model_settings(name)
    if name == "native3d":  # MONAI >= 1.4: pip install 'lift3d[bench]'
        return NativeUNet3D(DiffusionModelUNet(**native3d_config(config)), 2 ** (len(config["block_out_channels"]) - 1))
    model = UNet2DModel(**config)
    if name != BASELINE:
        lift3d.inflate(model, **{k: v for k, v in settings.items() if k not in ("trainable", "fused", "naive")})
    for _, layer in lift3d.volumetric_layers(model) if settings.get("naive") else ():
        layer.forward = layer.forward_reference  # per instance: no other model is touched
    return model


def make_batch(size: str, n: int, volume: bool, device: torch.device | str, dtype: torch.dtype) -> tuple:
    """``(x, t, target)``: one volume of n slices, or for the 2D model (``volume=False``) its n slices."""
    cfg, generator = UNET_CONFIGS[size], torch.Generator().manual_seed(1)
    x, target = (torch.randn(1, cfg[c], n, cfg["sample_size"], cfg["sample_size"], generator=generator)
                 for c in ("in_channels", "out_channels"))
    if not volume:  # (b c n h w) -> (b n) c h w, outside the timed region
        x, target = (v.transpose(1, 2).flatten(0, 1).contiguous() for v in (x, target))
    return x.to(device, dtype), torch.tensor([500] * (1 if volume else n), device=device), target.to(device, dtype)


def memory(device: torch.device, peak: bool = False, reset: bool = False) -> int:
    """Bytes in use, or at most since the last reset: CUDA's allocator, or the RSS (peak: VmHWM, since the fork)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        (torch.cuda.empty_cache(), torch.cuda.reset_peak_memory_stats(device)) if reset else None
        return (torch.cuda.max_memory_allocated if peak else torch.cuda.memory_allocated)(device)
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5") if reset else None
    return int(Path("/proc/self/status").read_text().split("VmHWM:" if peak else "VmRSS:")[1].split()[0]) * 1024


def clock(record: list, device: torch.device, function: Callable, *args, **kwargs) -> Any:
    """``function(*args, **kwargs)``, appending its seconds (wall clock, process CPU of all threads) to record."""
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    start, cpu_start = time.perf_counter(), time.process_time()
    result = function(*args, **kwargs)
    torch.cuda.synchronize(device) if device.type == "cuda" else None
    record.append((time.perf_counter() - start, time.process_time() - cpu_start))
    return result


def build(job: dict, dtype: torch.dtype, *makers: Callable[[], nn.Module]) -> tuple[int, list[nn.Module]]:
    """The models of a job, and the memory in use before they were built (CPU) or moved to the GPU (CUDA)."""
    device = torch.device(job["device"])
    torch.set_num_threads(job["threads"] or torch.get_num_threads())
    baseline, models = memory(device, reset=True), [nn.Module.to(make(), dtype) for make in makers]
    baseline = memory(device, reset=True) if device.type == "cuda" else baseline
    return baseline, [model.to(device) for model in models]


def measure(job: dict) -> dict:
    """One model, N and mode (``forward``: no_grad, eval; ``train``: + MSE, backward, AdamW on what the model trains;
    ``fit``: ``train`` in bf16 autocast with gradient checkpointing): seconds per step (wall, CPU), peak memory."""
    name, mode, size, n, device = job["model"], job["mode"], job["size"], job["n"], torch.device(job["device"])
    dtype, settings = torch.float32 if mode == "fit" else getattr(torch, job["dtype"]), model_settings(name)
    baseline, (model,) = build(job, dtype, lambda: build_model(size, name))
    if mode == "forward":
        model = (lift3d.fuse(model) if settings.get("fused") else model).eval().requires_grad_(False)
        step = torch.no_grad()(lambda batch: model(*batch[:2]))
    else:
        model.enable_gradient_checkpointing() if mode == "fit" else None
        lift3d.set_trainable(model, settings.get("trainable", "all")) if name not in UNLIFTED else None
        optimizer = torch.optim.AdamW([p for p in model.train().parameters() if p.requires_grad], lr=1e-6)

        def step(batch: tuple) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "fit"):
                out = model(*batch[:2]).sample
            F.mse_loss(out.float(), batch[2].float()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    batch, setup = make_batch(size, n, name != BASELINE, device, dtype), memory(device) - baseline
    # Lazy initialisation, untimed, on a crop of two slices; AdamW's state counts towards the peak.
    side = 2 ** len(UNET_CONFIGS[size]["block_out_channels"])
    step(tuple(v[..., :side, :side] if v.dim() > 3 else v for v in make_batch(size, min(n, 2), name != BASELINE, device,
                                                                                dtype)))
    record: list[tuple[float, float]] = []
    for i in range(job["warmup"] + job["iters"]):
        clock(record if i >= job["warmup"] else [], device, step, batch)
    (times, cpu_times), peak = zip(*record), memory(device, peak=True) - baseline
    return {"time_s": statistics.median(times), "iter_times_s": times, "cpu_s": statistics.median(cpu_times),
            "peak_bytes": peak, "peak_above_setup_bytes": peak - setup}


def describe(job: dict) -> dict:
    """Parameters, layers and FLOPs (on the meta device) of every model and autoencoder (encode + decode a slice)."""
    from lift3d_plugins.autoencoders import KLAutoencoder, tiny_kl_config

    def flops(function: Callable, *args) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            function(*args)
        return counter.get_total_flops()

    out, autoencoders = {}, {}
    for name in job["models"]:
        with torch.device("meta"):
            model = build_model(job["size"], name).eval()
            x, t, _ = make_batch(job["size"], job["n"], name != BASELINE, "meta", torch.float32)
        info: dict[str, Any] = {"parameters": sum(p.numel() for p in model.parameters())}
        if name not in UNLIFTED:
            lift3d.set_trainable(model, model_settings(name).get("trainable", "all"))
            report, layers = lift3d.report(model), [layer for _, layer in lift3d.volumetric_layers(model)]
            grouped = [layer for layer in layers if hasattr(layer, "groups")]
            info |= {"layers": report.num_layers, "volumetric_parameters": report.volumetric_parameters,
                     "param_overhead": report.overhead, "groups": None if not grouped else "channels" if all(
                         layer.groups == layer.channels for layer in grouped) else grouped[0].groups}
            if ranks := {layer.channels: layer.rank for layer in layers if hasattr(layer, "rank")}:
                info["ranks"] = {str(c): ranks[c] for c in sorted(ranks)}  # low-rank: the rank per host width
        info["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        out[name] = info | {"flops": flops(model, x, t)}
    for name, config in AUTOENCODERS.items():
        with torch.device("meta"):
            coder = KLAutoencoder.from_config(tiny_kl_config(**config))
            side = UNET_CONFIGS[job["size"]]["sample_size"] * coder.downsampling_factor
            image = torch.zeros(1, coder.image_channels, side, side)
        autoencoders[name] = {"parameters": sum(p.numel() for p in coder.parameters()), "image_size": side,
                              "encode_flops_per_slice": flops(coder.encode, image),
                              "decode_flops_per_slice": flops(coder.decode, coder.encode(image))}
    return {"models": out, "autoencoders": autoencoders, "torch_threads": torch.get_num_threads()}


def sample(job: dict) -> dict:
    """Seconds to synthesise one volume with the lifted model: encode, DDIM steps, decode; DDIM-200 extrapolated."""
    from diffusers import DDPMScheduler
    from lift3d_plugins.autoencoders import KLAutoencoder, tiny_kl_config

    from lift3d.sampling.synthesis import SynthesisModel, synthesize
    device, parts = torch.device(job["device"]), {"encode": [], "decode": [], "total": []}
    coder_config = tiny_kl_config(**AUTOENCODERS[job["autoencoder"]])
    baseline, (unet, coder) = build(job, getattr(torch, job["dtype"]), lambda: build_model(job["size"], "lifted"),
                                    lambda: KLAutoencoder.from_config(coder_config))
    model = SynthesisModel(unet.requires_grad_(False).eval(), coder.requires_grad_(False).eval(), {
        "conditioning": "concat", "autoencoder": {"name": "kl"}}, dict(DDPMScheduler(num_train_timesteps=1000).config))
    for part, function in (("encode", coder.encode), ("decode", coder.decode)):
        setattr(coder, part, lambda *a, _f=function, _r=parts[part], **k: clock(_r, device, _f, *a, **k))
    side = UNET_CONFIGS[job["size"]]["sample_size"] * coder.downsampling_factor
    source = torch.rand(1, coder.image_channels, job["n"], side, side, generator=torch.manual_seed(2)) * 2 - 1
    crop = model.size_multiple  # lazy initialisation: one untimed step on a crop of two slices
    synthesize(model, source[:, :, :2, :crop, :crop], solver="ddim", steps=1, progress=False)
    [record.clear() for record in parts.values()]
    clock(parts["total"], device, synthesize, model, source, solver="ddim", steps=job["steps"], progress=False)
    total, encode, decode = (sum(wall for wall, _ in parts[part]) for part in ("total", "encode", "decode"))
    step = (total - encode - decode) / job["steps"]
    return {"steps": job["steps"], "autoencoder": job["autoencoder"], "image_size": side, "total_s": total,
            "encode_s": encode, "decode_s": decode, "step_s": step, "ddim200_s": encode + decode + 200 * step,
            "ddim200_extrapolated": job["steps"] != 200, "peak_bytes": memory(device, peak=True) - baseline}


def run(function: Callable[[dict], dict], job: dict) -> dict:
    """``function(job)``, on CPU in a fresh forked process (its own peak RSS, no thread pool inherited)."""
    if job["device"] == "cuda":
        return function(job)
    gc.freeze()  # the child's collections skip the parent's objects (and do not copy their pages)
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
        return pool.submit(function, job).result()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add = parser.add_argument
    add("--device", choices=("cpu", "cuda"), default="cpu")
    add("--dtype", choices=("float32", "bfloat16"), default="float32", help="of every model (not of --fit-check's)")
    add("--size", choices=tuple(UNET_CONFIGS), default="full", help="U-Net widths, latent size (small: a smoke test)")
    add("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="MODEL",
        help="2d (the baseline, required), lifted, lifted-volumetric, native3d or KIND[:KEY=VALUE,...] with inflate's "
             "keywords and trainable=volumetric, fused=true, naive=true (the layers' forward_reference); kinds: "
             + ", ".join(names()))
    add("--slices", type=int, nargs="+", default=[35, 100], help="N, slices of the one volume")
    add("--repeats", type=int, nargs="+", default=[3], help="interleaved rounds, one value or one per --slices entry")
    add("--train-repeats", type=int, help="rounds that also run the train steps (None: all)")
    add("--skip", nargs="*", default=[], metavar="MODEL:MODE:N",
        help="measurements to leave out, shell patterns, e.g. '*:train:100' 'native3d:forward:*'")
    add("--warmup", type=int, help="untimed full-size steps per measurement (None: cpu 0, cuda 3)")
    add("--iters", type=int, help="timed steps per measurement, median taken (None: cpu 1, cuda 10)")
    add("--threads", type=int, help="torch.set_num_threads in each worker")
    add("--sample-at", type=int, nargs="*", metavar="N", help="slice counts to time sampling at (None: 1st N)")
    add("--sample-steps", type=int, help="DDIM steps run, extrapolated to 200 (None: cuda 200, cpu 2)")
    add("--autoencoder", choices=list(AUTOENCODERS), help="of the sampling (None: kl-f4; tiny with --size small)")
    add("--fit-check", type=int, metavar="N", help="train lifted on N slices, bf16 autocast, gradient checkpointing")
    add("--json", help="write all figures to this file")
    args = parser.parse_args(argv)
    if len(args.repeats) not in (1, len(args.slices)) or min(args.repeats + args.slices) < 1:
        parser.error(f"--slices must be positive, --repeats one count or one per --slices: {args.repeats}")
    if BASELINE not in args.models:
        parser.error(f"--models must include {BASELINE!r}: every ratio is taken against it")
    if bad := [p for p in args.skip if p.count(":") < 2 or not fnmatch.filter(MODES, p.rsplit(":", 2)[1])]:
        parser.error(f"--skip takes MODEL:MODE:N patterns, MODE one of {', '.join(MODES)}; got {bad}")
    cuda, repeats = args.device == "cuda", args.repeats * len(args.slices) if len(args.repeats) == 1 else args.repeats
    args.repeats, args.iters, args.warmup = dict(zip(args.slices, repeats)), args.iters or (10 if cuda else 1), (
        (3 if cuda else 0) if args.warmup is None else args.warmup)
    args.sample_at = args.slices[:1] if args.sample_at is None else args.sample_at
    args.autoencoder = args.autoencoder or ("tiny" if args.size == "small" else "kl-f4")
    args.sample_steps = min(args.sample_steps or (200 if cuda else 2), 200)
    return args


def plan(args: argparse.Namespace) -> list[tuple[int, int, str, str]]:
    """(repeat, n, mode, model), every model once per round in an order rotated from round to round. Not measured:
    --skip, native3d without MONAI, fused train steps, forward passes of recompute=true or trainable=volumetric."""
    jobs = []
    for repeat in range(max(args.repeats.values())):
        for n, mode in ((n, mode) for n in args.slices for mode in MODES):
            chosen = [m for m, s in ((m, model_settings(m)) for m in args.models) if not (
                mode == "train" and s.get("fused") or mode == "forward" and (s.get("recompute") or s.get("trainable")
                == "volumetric") or m == "native3d" and DiffusionModelUNet is None
                or any(fnmatch.fnmatch(f"{m}:{mode}:{n}", pattern) for pattern in args.skip))]
            trained = mode == "train" and args.train_repeats is not None and repeat >= args.train_repeats
            if repeat < args.repeats[n] and len(chosen) > 1 and not trained:
                jobs += [(repeat, n, mode, m) for m in chosen[repeat % len(chosen):] + chosen[:repeat % len(chosen)]]
    return jobs


def summarise(samples: list[dict], args: argparse.Namespace) -> dict:
    """``results[n][mode]``: medians per model; per pair (model/2d, lifted/native3d) per-repeat ratios and median."""
    by_key, results = {(s["repeat"], s["n"], s["mode"], s["model"]): s for s in samples}, {}
    for n in args.slices:
        for mode in MODES:
            mine = {m: [s for s in samples if (s["n"], s["mode"], s["model"]) == (n, mode, m)] for m in args.models}
            entries = {m: {"times_s": [s["time_s"] for s in ss], **{field: statistics.median(s[field] for s in ss)
                                                                     for field, _ in FIGURES.values()}}
                       for m, ss in mine.items() if ss}
            ratios = {}
            for a, b in [(m, BASELINE) for m in entries if m != BASELINE] + [
                    (m, "native3d") for m in ("lifted", "lifted-volumetric") if {m, "native3d"} <= entries.keys()]:
                pairs = [(s, by_key[other]) for s in mine[a] if (other := (s["repeat"], n, mode, b)) in by_key]
                for key, (field, _) in FIGURES.items() if pairs else ():
                    values = [x[field] / y[field] for x, y in pairs if y[field] > 0]
                    ratios.setdefault(f"{a}/{b}", {})[key] = statistics.median(values) if values else None
                    ratios[f"{a}/{b}"][f"{key}s"] = values
            if entries:
                results.setdefault(str(n), {})[mode] = {"models": entries, "ratios": ratios}
    return results


def markdown(report: dict) -> str:
    models, results, base, load = report["models"], report["results"], report["models"][BASELINE], report["load"]
    lines = ["| model | params | trainable | layers | groups (ranks) | params overhead | FLOPs (x 2d) |",
             "| --- |" + " ---: |" * 6]
    for name, info in models.items():
        groups = ", ".join(f"C={c}: r={r}" for c, r in info["ranks"].items()) if "ranks" in info else info.get("groups")
        overhead = "-" if name in UNLIFTED else f"+{info['param_overhead']:.1%}"
        lines.append(f"| {name} | {info['parameters']:,} | {info['trainable']:,} | {info.get('layers', '-')} | "
                     f"{groups or '-'} | {overhead} | {info['flops'] / 1e9:,.4g} G "
                     f"({info['flops'] / base['flops']:.3f}x) |")
    columns = [(n, mode, max(len(e["times_s"]) for e in modes[mode]["models"].values()))
               for n, modes in results.items() for mode in modes]
    header = "| model | " + " | ".join(f"{mode} N={n} ({rounds}x)" for n, mode, rounds in columns) + " |"
    rows = [(m, m, f"{m}/{BASELINE}") for m in models] + [(f"{m} / native3d", "", f"{m}/native3d")
                                                          for m in ("lifted", "lifted-volumetric")]
    for key, (field, title) in FIGURES.items():
        if key == "cpu" and report["settings"]["device"] == "cuda":
            continue
        lines += ["", f"{title}; (x 2d): median over the repeats (count in the header) of ratios to 2d in each repeat",
                  "", header, "| --- |" + " ---: |" * len(columns)]
        for label, name, pair in rows:
            cells = [(results[n][mode]["models"].get(name, {}).get(field),
                      results[n][mode]["ratios"].get(pair, {}).get(key)) for n, mode, _ in columns]
            show = (lambda v: f"{v / 2 ** 30:.3g} GiB ") if "peak" in key else (lambda v: f"{v:.3g} s ")
            text = [(show(v) if v is not None else "") + (f"({r:.2f}x)" if r else "") or "-" for v, r in cells]
            lines += [f"| {label} | " + " | ".join(t.strip() for t in text) + " |"] if set(text) != {"-"} else []
    lines += ["", f"Peak memory: {report['peak_method']}."]
    if "lifted" in models:  # what sampling adds to each of its U-Net steps
        step = models["lifted"]["flops"] / report["describe_n"]
        lines.append("Autoencoder FLOPs per slice, encode + decode: " + ", ".join(
            f"{k} {(f := a['encode_flops_per_slice'] + a['decode_flops_per_slice']) / 1e9:,.4g} G (= {f / step:.2g} "
            "lifted U-Net steps)" for k, a in report["autoencoders"].items()))
    for title, entry in [*(("Sampling, lifted", s) for s in report["sampling"]), ("Fit check", report["fit_check"])]:
        lines += [f"{title}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {str(v)[-300:]}"
                                           for k, v in entry.items() if k != "iter_times_s")] if entry else []
    lines += [f"Failed: {f['job']}: {f['error'][-300:]}" for f in report["failures"]]
    return "\n".join([*lines, (f"Load average (1 min): min {load['min']:.1f}, median {load['median']:.1f}, max "
                               f"{load['max']:.1f}; runtime {report['runtime_s']:.0f} s")])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started, loads, samples, failures, sampling, fit = time.perf_counter(), [os.getloadavg()[0]], [], [], [], None
    models = [m for m in args.models if m != "native3d" or DiffusionModelUNet is not None]
    common = {"size": args.size, "device": args.device, "dtype": args.dtype, "threads": args.threads,
              "warmup": args.warmup, "iters": args.iters}
    described = run(describe, {**common, "n": args.slices[0], "models": models})  # fails early on a wrong model

    def job(label: str, function: Callable, **settings) -> dict:
        loads.append(os.getloadavg()[0])
        try:
            result = run(function, {**common, **settings})
            done = f"{result.get('time_s', result.get('ddim200_s')):8.3f} s, {result['peak_bytes'] / 2**30:.3g} GiB"
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on (BrokenProcessPool: killed for memory?)
            result, done = {"error": f"{type(exc).__name__}: {exc}"}, "failed"
        print(f"[{time.perf_counter() - started:6.0f} s, load {loads[-1]:.1f}] {label:50s} {done}", file=sys.stderr)
        return result

    for i, (repeat, n, mode, model) in enumerate(jobs := plan(args), 1):
        result = job(f"{i}/{len(jobs)} repeat {repeat} N={n} {mode} {model}", measure, n=n, mode=mode, model=model)
        if "error" in result:
            failures.append({"job": f"{model} {mode} N={n} repeat {repeat}", "error": result["error"]})
        else:
            samples.append({**result, "repeat": repeat, "n": n, "mode": mode, "model": model})
    for n in args.sample_at:
        sampling.append({"n": n, **job(f"sampling N={n} (DDIM-200 from {args.sample_steps} steps)", sample, n=n,
                                       steps=args.sample_steps, autoencoder=args.autoencoder)})
    if args.fit_check is not None:  # lifted, all trained, bf16 autocast + gradient checkpointing; budget 24 GiB
        fit = {"n": args.fit_check, **job(f"fit check N={args.fit_check}", measure, n=args.fit_check, mode="fit",
                                          model="lifted")}
    report = {
        "benchmark": "speed", "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "command": " ".join(["python", os.path.relpath(__file__), *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_info(torch_threads=described["torch_threads"]), "unet2d_config": UNET_CONFIGS[args.size],
        "native3d_config": native3d_config(UNET_CONFIGS[args.size]) if "native3d" in models else None,
        "peak_method": "torch.cuda.max_memory_allocated from before the model is moved to the GPU" if args.device ==
        "cuda" else "peak RSS (VmHWM after clear_refs) of a fresh forked worker, above its RSS before the model exists",
        "describe_n": args.slices[0], "models": described["models"], "autoencoders": described["autoencoders"],
        "results": summarise(samples, args), "sampling": sampling, "fit_check": fit, "failures": failures,
        "load": {"samples": loads, "min": min(loads), "max": max(loads), "median": statistics.median(loads)},
        "runtime_s": time.perf_counter() - started,
    }
    print(markdown(report))
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
