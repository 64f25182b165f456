"""Speed and memory of a lifted 2D diffusion U-Net against the 2D model and a native 3D U-Net (Benchmarks, part 2).

Make-A-Volume (Zhu et al., MICCAI 2023, sec. 2.3) claims volume awareness without paying for a 3D
network. For one volume of N slices of 64x64 latents this measures, in one run, the parameters, the
forward pass and a train step (forward + MSE + backward + AdamW step) of four models:

- ``2d``: the diffusers ``UNet2DModel`` run slice-wise (its slices flattened to a batch);
- ``lifted``: the same model after :func:`lift3d.lifting.inflate` (its defaults), everything trained;
- ``lifted:<kind>[:key=value,...]`` (``--kinds``): a layer kind and its settings, e.g. ``full``,
  ``low-rank:train_down=false``, ``full:where=resnet-coarse``, ``low-rank:recompute=true`` (recompute
  the layers' inputs in backward), ``full:fused=true`` (:func:`lift3d.lifting.fuse`, forward only);
- ``lifted-volumetric``: the lifted model with only its volumetric layers trained
  (``lift3d.set_trainable(model, "volumetric")``; its forward pass is ``lifted``'s);
- ``native3d``: the peer a user would pick instead, MONAI's ``DiffusionModelUNet(spatial_dims=3)``
  of the same widths (:func:`native3d_config` states the mapping), its depth zero-padded at the end
  to a multiple of ``2 ** (levels - 1)`` and the output cropped back, inside the timed region.

and the cost of sampling one volume with :func:`lift3d.sampling.synthesis.synthesize` (DDIM, 200 steps, the
source encoded and the result decoded by a KL autoencoder), extrapolated from a few steps when
``--sample-steps`` is below 200. The helpers of ``inflate_overhead.py`` are reused: each measurement
runs in a fresh forked process on CPU (its own peak RSS) and inline on CUDA (the allocator's peak),
the models are interleaved within each repeat in a rotated order, and every ratio is the median over
repeats of two figures measured back to back.

    python benchmarks/speed.py --device cpu --threads 1 --slices 35 100 --repeats 2 1 --train-repeats 1 \
        --skip-train-at 100 --skip 'native3d:forward:100' --sample-steps 1 --autoencoder tiny \
        --json benchmarks/results/speed_cpu.json
    python benchmarks/speed.py --device cuda --dtype bfloat16 --slices 35 100 --repeats 5 --sample-at 35 100 \
        --fit-check 100 --json benchmarks/results/speed_cuda.json
    python benchmarks/speed.py --small --slices 3 --repeats 1 --threads 1      # smoke test

The trade table of layer kinds (benchmarks/RESULTS.md) is one run of the ``medium`` size:

    python benchmarks/speed.py --size medium --slices 16 --threads 1 --repeats 3 --models 2d --sample-at \
        --kinds full low-rank low-rank:train_down=false depthwise full:where=resnet-coarse \
        low-rank:where=resnet-coarse full:recompute=true low-rank:recompute=true full:fused=true \
        low-rank:fused=true --json benchmarks/results/layer_kinds_speed_cpu.json
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import statistics
import sys
import time
from types import SimpleNamespace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from torch import nn

import lift3d
from lift3d.layers.registry import parse_kind
from lift3d.recipes.reports import machine_info, write_json
from inflate_overhead import (UNET_CONFIGS, MemoryProbe, _flop_counter, _sync, make_batch, make_step, run_forked,
                              run_inline)

try:
    from monai.networks.nets import DiffusionModelUNet
except ImportError:  # the optional `bench` extra
    DiffusionModelUNet = None

BASELINE = "2d"
MODELS = ("2d", "lifted", "lifted-volumetric", "native3d")
MODES = ("forward", "train")
FIT_BUDGET_BYTES = 24 * 2 ** 30
TARGETS = {"lifted/2d": 1.05, "lifted/native3d": 0.6}
"""Peak train-step memory the lifted model may use, as a fraction of the 2D and of the native 3D model's."""

AUTOENCODERS = {
    # The paper's first stage: LDM's KL-f4 (ch 128, ch_mult 1-2-4, 2 res blocks, 3 latent channels)
    # on one MRI channel, so 64x64 latents decode to 256x256 slices.
    "kl-f4": dict(image_channels=1, latent_channels=3, block_out_channels=(128, 256, 512), layers_per_block=2,
                  norm_num_groups=32),
    # tiny_kl_config's defaults (also f = 4): nearly free, for smoke tests.
    "tiny": dict(image_channels=1, latent_channels=3),
}


# ----------------------------------------------------------------------------------------------
# Models, built inside the workers.


def native3d_config(unet2d: dict[str, Any]) -> dict[str, Any]:
    """MONAI ``DiffusionModelUNet`` arguments matching a diffusers ``UNet2DModel`` config.

    Same widths, residual blocks per level (both put one more in each up level), attention levels
    (where the 2D model has ``Attn*Block2D``) and channels per head (diffusers' ``attention_head_dim``
    is channels per head, as MONAI's ``num_head_channels``), GroupNorm groups and eps. Both embed
    the timestep sinusoidally into ``4 x`` the first width, add it inside every residual block,
    downsample with a stride-2 conv, upsample nearest + conv, and have a resnet-attention-resnet
    mid block; attention goes through ``scaled_dot_product_attention`` in both (MONAI's
    ``use_flash_attention``). What differs is what a 3D network is: 3x3x3 kernels, downsampling
    along n as well, attention over all ``n x h x w`` positions of a level.
    """
    return dict(
        spatial_dims=3, in_channels=unet2d["in_channels"], out_channels=unet2d["out_channels"],
        channels=tuple(unet2d["block_out_channels"]), num_res_blocks=unet2d.get("layers_per_block", 2),
        attention_levels=tuple(block.startswith("Attn") for block in unet2d["down_block_types"]),
        num_head_channels=unet2d.get("attention_head_dim", 8), norm_num_groups=unet2d.get("norm_num_groups", 32),
        norm_eps=unet2d.get("norm_eps", 1e-5), resblock_updown=False, use_flash_attention=True,
    )


class NativeUNet3D(nn.Module):
    """A MONAI 3D diffusion U-Net behind the lifted model's call: ``(b, c, n, h, w)``, ``t (b,)``.

    The depth is zero-padded at the end to a multiple of the total downsampling and the output is
    cropped back to n slices, as a user of the 3D model must; returns an object with ``.sample``.
    """

    def __init__(self, unet: nn.Module, depth_multiple: int) -> None:
        super().__init__()
        self.unet, self.depth_multiple = unet, depth_multiple

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        n = x.shape[2]
        pad = -n % self.depth_multiple
        out = self.unet(F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x, t)
        return SimpleNamespace(sample=out[:, :, :n])


def kind_settings(name: str) -> dict[str, Any]:
    """The inflate keywords of a model name (``lifted`` = inflate's defaults)."""
    if name.startswith("lifted:"):
        return parse_kind(name[len("lifted:"):])
    return {}


def build_model(size: str, name: str) -> nn.Module:
    torch.manual_seed(0)
    config = UNET_CONFIGS[size]
    if name == "native3d":
        if DiffusionModelUNet is None:
            raise RuntimeError("native3d needs MONAI >= 1.4 (pip install 'lift3d[bench]')")
        return NativeUNet3D(DiffusionModelUNet(**native3d_config(config)), 2 ** (len(config["block_out_channels"]) - 1))
    model = UNet2DModel(**config)
    if name != BASELINE:
        settings = {k: v for k, v in kind_settings(name).items() if k != "fused"}
        lift3d.inflate(model, **settings)
    return model


def _volume_input(name: str) -> bool:
    """Whether the model takes the volume ``(b, c, n, h, w)``; the 2D model gets its slices flattened."""
    return name != BASELINE


def _lifted(name: str) -> bool:
    return name.startswith("lifted")


def _inflate_overhead_mode(name: str, mode: str) -> str:
    if mode == "forward":
        return "forward"
    return "train-volumetric" if name == "lifted-volumetric" else "train-all"


def _mixed_precision_train_step(model: nn.Module, device: torch.device) -> Callable[[tuple], None]:
    """What ``lift3d-finetune --optim.mixed_precision bf16`` does: fp32 weights and AdamW, bf16 autocast."""
    model.train()
    lift3d.set_trainable(model, "all")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def train_step(batch):
        x, t, target = batch
        with torch.autocast(device.type, dtype=torch.bfloat16):
            out = model(x, t).sample
        loss = F.mse_loss(out.float(), target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train_step


def _crop(batch: tuple, size: str) -> tuple:
    side = 2 ** len(UNET_CONFIGS[size]["block_out_channels"])  # 2 x 2 at the deepest level
    return tuple(t[..., :side, :side] if t.dim() >= 4 else t for t in batch)


def measure(job: dict) -> dict:
    """One model, one N, one mode, in this (fresh, on CPU) process: seconds per step and peak memory.

    The peak includes the model: the probe starts before the model is built (CPU: the worker's RSS
    at that point is the baseline) or before it is moved to the GPU (CUDA).
    """
    device = torch.device(job["device"])
    fit = job["mode"] == "fit"  # lifted, train all, bf16 autocast + gradient checkpointing
    dtype = torch.float32 if fit else getattr(torch, job["dtype"])
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    probe = MemoryProbe(device)
    if device.type == "cpu":
        probe.start()
    model = build_model(job["size"], job["model"])
    if dtype != torch.float32:
        model.to(dtype)
    if device.type == "cuda":
        probe.start()
    model.to(device)
    model_bytes = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if fit:
        model.enable_gradient_checkpointing()
        step = _mixed_precision_train_step(model, device)
    elif kind_settings(job["model"]).get("fused"):
        lift3d.fuse(model)
        step = make_step(model, "forward", True)
    else:
        step = make_step(model, _inflate_overhead_mode(job["model"], job["mode"]), _lifted(job["model"]))
    volume = _volume_input(job["model"])
    batch = make_batch(job["size"], job["n"], volume, device, dtype)
    # Lazy initialisation (the AdamW state, which counts towards the peak) on a small crop of two
    # slices, untimed: the native 3D model pads even that to a whole depth multiple.
    step(_crop(make_batch(job["size"], min(job["n"], 2), volume, device, dtype), job["size"]))
    for _ in range(job["warmup"]):
        step(batch)
    times = []
    for _ in range(job["iters"]):
        _sync(device)
        start = time.perf_counter()
        step(batch)
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"time_s": statistics.median(times), "iter_times_s": times, "peak_bytes": probe.peak(),
            "model_bytes": model_bytes, "baseline_bytes": probe.baseline, "peak_method": probe.method}


def describe(job: dict) -> dict:
    """Parameters (total, trainable) of every model, and the FLOPs of one forward over n slices
    (counted on the meta device, so nothing is computed)."""
    out = {}
    for name in job["models"]:
        with torch.device("meta"):
            model = build_model(job["size"], name).eval()
            x, t, _ = make_batch(job["size"], job["n"], _volume_input(name), torch.device("meta"), torch.float32)
        total = sum(p.numel() for p in model.parameters())
        trainable = total
        if name == "lifted-volumetric":
            trainable = lift3d.report(model).volumetric_parameters
        info: dict[str, Any] = {"parameters": total, "trainable": trainable}
        try:
            with torch.no_grad(), _flop_counter() as counter:
                model(x, t)
            info["flops"] = counter.get_total_flops()
        except Exception as exc:  # noqa: BLE001 - FLOPs are a nicety; say why they are missing
            info["flops_error"] = f"{type(exc).__name__}: {exc}"
        out[name] = info
    return {"models": out, "autoencoders": {name: autoencoder_flops(job["size"], name) for name in AUTOENCODERS},
            "torch_threads": torch.get_num_threads()}


def build_autoencoder(name: str) -> nn.Module:
    from lift3d_plugins.autoencoders import KLAutoencoder, tiny_kl_config

    torch.manual_seed(0)
    return KLAutoencoder.from_config(tiny_kl_config(**AUTOENCODERS[name])).requires_grad_(False).eval()


def autoencoder_flops(size: str, name: str) -> dict[str, Any]:
    """FLOPs of encoding and decoding one slice (meta device): what sampling adds per slice."""
    with torch.device("meta"):
        autoencoder = build_autoencoder(name)
        image = UNET_CONFIGS[size]["sample_size"] * autoencoder.downsampling_factor
        x = torch.zeros(1, autoencoder.image_channels, image, image)
    out: dict[str, Any] = {"parameters": sum(p.numel() for p in autoencoder.parameters()), "image_size": image}
    with torch.no_grad(), _flop_counter() as counter:
        z = autoencoder.encode(x)
    out["encode_flops_per_slice"] = counter.get_total_flops()
    with torch.no_grad(), _flop_counter() as counter:
        autoencoder.decode(z)
    out["decode_flops_per_slice"] = counter.get_total_flops()
    return out


# ----------------------------------------------------------------------------------------------
# Sampling: lift3d.sampling.synthesis on an in-process SynthesisModel.


def _timed(function: Callable, record: list[float], device: torch.device) -> Callable:
    def wrapper(*args, **kwargs):
        _sync(device)
        start = time.perf_counter()
        result = function(*args, **kwargs)
        _sync(device)
        record.append(time.perf_counter() - start)
        return result

    return wrapper


def sample(job: dict) -> dict:
    """Seconds to synthesise one volume of n slices: encode + ``steps`` DDIM steps + decode, and the
    DDIM-200 figure (measured when steps == 200, else encode + decode + 200 x the mean step)."""
    from diffusers import DDPMScheduler

    from lift3d.diffusion.conditioning import check_channels
    from lift3d.sampling.synthesis import SynthesisModel, synthesize

    device, dtype = torch.device(job["device"]), getattr(torch, job["dtype"])
    if job["threads"]:
        torch.set_num_threads(job["threads"])
    probe = MemoryProbe(device)
    if device.type == "cpu":
        probe.start()
    unet = build_model(job["size"], "lifted").requires_grad_(False).eval()
    autoencoder = build_autoencoder(job["autoencoder"])
    if device.type == "cuda":
        probe.start()
    for module in (unet, autoencoder):
        module.to(device)
        if dtype != torch.float32:
            module.to(dtype)
    scheduler_config = dict(DDPMScheduler(num_train_timesteps=1000).config)
    model = SynthesisModel(unet, autoencoder, {"conditioning": "concat", "autoencoder": {"name": "kl"}},
                           scheduler_config)
    check_channels(unet, autoencoder.latent_channels, "concat", where="speed.py")
    encode_s: list[float] = []
    decode_s: list[float] = []
    autoencoder.encode = _timed(autoencoder.encode, encode_s, device)
    autoencoder.decode = _timed(autoencoder.decode, decode_s, device)
    size = UNET_CONFIGS[job["size"]]["sample_size"] * autoencoder.downsampling_factor
    generator = torch.Generator().manual_seed(2)
    source = torch.rand(1, autoencoder.image_channels, job["n"], size, size, generator=generator) * 2 - 1
    # Lazy initialisation: one untimed step on a small crop of two slices.
    side = model.size_multiple
    synthesize(model, source[:, :, :2, :side, :side], solver="ddim", steps=1, progress=False)
    encode_s.clear()
    decode_s.clear()
    _sync(device)
    start = time.perf_counter()
    synthesize(model, source, solver="ddim", steps=job["steps"], progress=False)
    _sync(device)
    total = time.perf_counter() - start
    encode, decode = sum(encode_s), sum(decode_s)
    step = (total - encode - decode) / job["steps"]
    return {"n": job["n"], "steps": job["steps"], "autoencoder": job["autoencoder"],
            "autoencoder_config": AUTOENCODERS[job["autoencoder"]], "image_size": size,
            "total_s": total, "encode_s": encode, "decode_s": decode, "step_s": step,
            "ddim200_s": total if job["steps"] == 200 else encode + decode + 200 * step,
            "ddim200_extrapolated": job["steps"] != 200, "peak_bytes": probe.peak(), "peak_method": probe.method}


# ----------------------------------------------------------------------------------------------
# The parent: plan, interleave, summarise.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="weights and inputs of every model (the --fit-check run uses bf16 autocast instead)")
    parser.add_argument("--slices", type=int, nargs="+", default=[35, 100], help="N, slices of the one volume")
    parser.add_argument("--repeats", type=int, nargs="+", default=[3],
                        help="interleaved rounds, one value or one per --slices entry; ratios are medians over them")
    parser.add_argument("--train-repeats", type=int, default=None,
                        help="rounds that also run the train steps (default: all of them)")
    parser.add_argument("--skip-train-at", type=int, nargs="*", default=[], metavar="N",
                        help="slice counts at which only the forward pass is measured")
    parser.add_argument("--skip", nargs="*", default=[], metavar="MODEL:MODE:N",
                        help="measurements to leave out, shell-style patterns, e.g. native3d:train:* or "
                             f"native3d:forward:100 (models: {', '.join(MODELS)}; modes: {', '.join(MODES)})")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--kinds", nargs="*", default=[], metavar="KIND[:KEY=VALUE,...]",
                        help="more lifted models, one per layer kind and setting (see the module docstring); "
                             f"kinds: {', '.join(lift3d.layers.registry.names())}")
    parser.add_argument("--size", choices=tuple(UNET_CONFIGS), default=None,
                        help="U-Net widths and latent size (default full; --small is --size small)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps at full size per measurement (default: cpu 0, cuda 3)")
    parser.add_argument("--iters", type=int, default=None,
                        help="timed steps per measurement, median taken (default: cpu 1, cuda 10)")
    parser.add_argument("--sample-at", type=int, nargs="*", default=None, metavar="N",
                        help="slice counts to time DDIM sampling at (default: the first --slices entry; "
                             "none: no sampling)")
    parser.add_argument("--sample-steps", type=int, default=None,
                        help="DDIM steps actually run; below 200 the DDIM-200 time is extrapolated "
                             "(default: cuda 200, cpu 2)")
    parser.add_argument("--autoencoder", choices=list(AUTOENCODERS), default=None,
                        help="the KL autoencoder that encodes the source and decodes the result "
                             "(default: kl-f4, tiny with --small)")
    parser.add_argument("--fit-check", type=int, default=None, metavar="N",
                        help="also train the lifted model on one N-slice volume with bf16 autocast and gradient "
                             "checkpointing, against a 24 GiB budget (CUDA; on CPU only with --small)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in each worker")
    parser.add_argument("--small", action="store_true", help="tiny widths: a smoke test, not a benchmark")
    parser.add_argument("--json", default=None, help="write all figures to this file")
    args = parser.parse_args(argv)
    if len(args.repeats) not in (1, len(args.slices)) or min(args.repeats) < 1:
        parser.error(f"--repeats takes one positive count or one per --slices entry ({len(args.slices)}), "
                     f"got {args.repeats}")
    if any(n < 1 for n in args.slices):
        parser.error(f"--slices must be positive, got {args.slices}")
    for pattern in args.skip:
        parts = pattern.split(":")
        if len(parts) != 3 or not fnmatch.filter(MODELS, parts[0]) or not fnmatch.filter(MODES, parts[1]):
            parser.error(f"--skip takes MODEL:MODE:N patterns over models {', '.join(MODELS)} and modes "
                         f"{', '.join(MODES)}, got {pattern!r}")
    args.repeats = dict(zip(args.slices, args.repeats * len(args.slices) if len(args.repeats) == 1 else args.repeats))
    args.warmup = args.warmup if args.warmup is not None else (3 if args.device == "cuda" else 0)
    args.iters = args.iters if args.iters is not None else (10 if args.device == "cuda" else 1)
    args.sample_at = args.slices[:1] if args.sample_at is None else args.sample_at
    args.autoencoder = args.autoencoder or ("tiny" if args.small else "kl-f4")
    args.sample_steps = args.sample_steps or (200 if args.device == "cuda" else 2)
    if not 1 <= args.sample_steps <= 200:
        parser.error(f"--sample-steps must be from 1 to 200, got {args.sample_steps}")
    if BASELINE not in args.models:
        parser.error(f"--models must include {BASELINE!r}: every ratio is taken against it")
    for spec in args.kinds:
        try:
            settings = parse_kind(spec)
            lift3d.layers.registry.check_options(settings["kind"], {k: v for k, v in settings.items() if k not in
                                                                ("kind", "fused", "where", "recompute", "kernel_size",
                                                                 "padding_mode")})
        except ValueError as exc:
            parser.error(f"--kinds {spec!r}: {exc}")
    args.models = args.models + [f"lifted:{spec}" for spec in args.kinds]
    args.size = args.size or ("small" if args.small else "full")
    return args


def _skipped(args: argparse.Namespace, model: str, mode: str, n: int) -> str | None:
    """Why (model, mode, n) is not measured, or None."""
    if mode == "forward" and model == "lifted-volumetric":
        return None  # not a measurement: its forward pass is lifted's
    if mode == "train" and kind_settings(model).get("fused"):
        return "a fused model is for inference only"
    if mode == "forward" and kind_settings(model).get("recompute"):
        return "recompute changes only the train step"
    if model == "native3d" and DiffusionModelUNet is None:
        return "MONAI is not installed (pip install 'lift3d[bench]')"
    if mode == "train" and n in args.skip_train_at:
        return f"--skip-train-at {n}"
    for pattern in args.skip:
        if fnmatch.fnmatch(f"{model}:{mode}:{n}", pattern):
            return f"--skip {pattern}"
    return None


def plan(args: argparse.Namespace) -> tuple[list[tuple[int, int, str, str]], list[str]]:
    """(repeat, n, mode, model), interleaved: every model once per round, the order rotated from
    round to round so no model always runs first; and a line for each measurement left out."""
    jobs, skipped = [], []
    for n in args.slices:
        for mode in MODES:
            for model in args.models:
                if mode == "forward" and model == "lifted-volumetric":
                    continue
                reason = _skipped(args, model, mode, n)
                if reason:
                    skipped.append(f"{model} {mode} N={n}: {reason}")
    for repeat in range(max(args.repeats.values())):
        for n in args.slices:
            for mode in MODES:
                if repeat >= args.repeats[n] or (mode == "train" and args.train_repeats is not None
                                                  and repeat >= args.train_repeats):
                    continue
                chosen = [m for m in args.models if not (mode == "forward" and m == "lifted-volumetric")
                          and not _skipped(args, m, mode, n)]
                if len(chosen) < 2:
                    continue
                shift = repeat % len(chosen)
                jobs += [(repeat, n, mode, m) for m in chosen[shift:] + chosen[:shift]]
    return jobs, skipped


RATIOS = (("lifted", BASELINE), ("lifted-volumetric", BASELINE), ("native3d", BASELINE),
          ("lifted", "native3d"), ("lifted-volumetric", "native3d"))


def summarise(samples: list[dict], args: argparse.Namespace) -> dict:
    """``results[n][mode]``: per model the times and peaks, and per pair the per-repeat ratios."""
    by_key = {(s["repeat"], s["n"], s["mode"], s["model"]): s for s in samples}
    results: dict[str, dict] = {}
    for n in args.slices:
        for mode in MODES:
            entries: dict[str, Any] = {}
            for model in args.models:
                mine = [s for s in samples if (s["n"], s["mode"], s["model"]) == (n, mode, model)]
                if mine:
                    entries[model] = {
                        "times_s": [s["time_s"] for s in mine], "time_s": statistics.median(s["time_s"] for s in mine),
                        "peak_bytes_all": [s["peak_bytes"] for s in mine],
                        "peak_bytes": statistics.median(s["peak_bytes"] for s in mine),
                        "model_bytes": mine[0]["model_bytes"]}
            if not entries:
                continue
            ratios = {}
            pairs_wanted = list(RATIOS) + [(m, BASELINE) for m in args.models if m.startswith("lifted:")]
            for a, b in pairs_wanted:
                pairs = [(by_key[k], by_key.get((k[0], n, mode, b))) for k in by_key if k[1:] == (n, mode, a)]
                pairs = [(x, y) for x, y in pairs if y is not None]
                if pairs:
                    time_ratios = [x["time_s"] / y["time_s"] for x, y in pairs]
                    peak_ratios = [x["peak_bytes"] / y["peak_bytes"] for x, y in pairs if y["peak_bytes"] > 0]
                    ratios[f"{a}/{b}"] = {"time": statistics.median(time_ratios), "times": time_ratios,
                                          "peak": statistics.median(peak_ratios) if peak_ratios else None,
                                          "peaks": peak_ratios}
            results[str(n)] = results.get(str(n), {})
            results[str(n)][mode] = {"models": entries, "ratios": ratios}
    return results


def check_targets(results: dict) -> list[dict]:
    """The memory targets on every train-step measurement that has both sides."""
    checks = []
    for n, modes in results.items():
        ratios = modes.get("train", {}).get("ratios", {})
        for key, limit in TARGETS.items():
            for name in (key, key.replace("lifted", "lifted-volumetric")):
                if ratios.get(name, {}).get("peak") is not None:
                    value = ratios[name]["peak"]
                    checks.append({"n": int(n), "ratio": name, "peak_ratio": value, "limit": limit,
                                   "met": value <= limit})
    return checks


def _gib(value: float) -> str:
    return f"{value / 2 ** 30:.2f} GiB"


def _millions(value: int) -> str:
    return f"{value / 1e6:.4g} M"


def _seconds(value: float) -> str:
    return f"{value:.3g} s"


def markdown(report: dict) -> str:
    models, results = report["models"], report["results"]
    columns = [(n, mode) for n, modes in results.items() for mode in modes]
    rounds = {(n, mode): max(len(e["times_s"]) for e in results[n][mode]["models"].values()) for n, mode in columns}
    header = " | ".join(f"{mode} N={n} ({rounds[n, mode]}x)" for n, mode in columns)
    rule = " | ".join("---:" for _ in columns)
    names = [m for m in (*MODELS, *models) if m in models]
    names = list(dict.fromkeys(names))

    def cell(n: str, mode: str, name: str, what: str) -> str:
        entry = results[n][mode]["models"].get(name)
        if entry is None:
            return "-"
        value = _seconds(entry["time_s"]) if what == "time" else _gib(entry["peak_bytes"])
        ratio = results[n][mode]["ratios"].get(f"{name}/{BASELINE}", {}).get(what)
        return value + (f" ({ratio:.2f}x)" if ratio is not None else "")

    def ratio_row(a: str, b: str, what: str) -> str | None:
        cells = [results[n][mode]["ratios"].get(f"{a}/{b}", {}).get(what) for n, mode in columns]
        if all(c is None for c in cells):
            return None
        return f"| {a} / {b} | | | " + " | ".join("-" if c is None else f"{c:.2f}x" for c in cells) + " |"

    lines = []
    for what, title in (("time", "Seconds per step, median over interleaved repeats (their count in the header); "
                                 "(x 2D) is the median of per-repeat ratios to the 2D model"),
                        ("peak", f"Peak memory, model included ({report['peak_method']}); (x 2D) as above")):
        lines += [title, "", f"| model | params | trainable | {header} |", f"| --- | ---: | ---: | {rule} |"]
        for name in names:
            info = models[name]
            cells = " | ".join(cell(n, mode, name, what) for n, mode in columns)
            lines.append(f"| {name} | {_millions(info['parameters'])} | {_millions(info['trainable'])} | {cells} |")
        for a in ("lifted", "lifted-volumetric"):
            row = ratio_row(a, "native3d", what)
            if row:
                lines.append(row)
        lines.append("")
    flops = {name: info["flops"] for name, info in models.items() if "flops" in info}
    if BASELINE in flops:
        lines.append(f"FLOPs of one forward at N={report['describe_n']}: " + ", ".join(
            f"{name} {value / 1e9:,.4g} G ({value / flops[BASELINE]:.2f}x)" for name, value in flops.items()) + ".")
    if "lifted" in flops:
        step = flops["lifted"] / report["describe_n"]
        lines.append("Autoencoder FLOPs per slice (encode + decode, what sampling adds to 200 U-Net steps of "
                     f"{step / 1e9:,.4g} G per slice): " + ", ".join(
                         f"{name} {(ae['encode_flops_per_slice'] + ae['decode_flops_per_slice']) / 1e9:,.4g} G "
                         f"(= {(ae['encode_flops_per_slice'] + ae['decode_flops_per_slice']) / step:.2g} lifted steps)"
                         for name, ae in report["autoencoders"].items()) + ".")
    for check in report["targets"]:
        lines.append(f"Target {check['ratio']} train-step peak <= {check['limit']} at N={check['n']}: "
                     f"{check['peak_ratio']:.3f}x, {'met' if check['met'] else 'NOT met'}.")
    for s in report["sampling"]:
        if "error" in s:
            lines.append(f"Sampling N={s['n']}: failed ({s['error'].splitlines()[-1]}).")
            continue
        how = (f"extrapolated from {s['steps']} DDIM step(s): encode + decode + 200 x {s['step_s']:.3g} s"
               if s["ddim200_extrapolated"] else "measured")
        lines.append(f"Sampling one volume, lifted, DDIM-200, N={s['n']} ({s['image_size']}x{s['image_size']} slices, "
                     f"autoencoder {s['autoencoder']}): {_seconds(s['ddim200_s'])} ({how}; encode "
                     f"{_seconds(s['encode_s'])}, decode {_seconds(s['decode_s'])}).")
    fit = report["fit_check"]
    if fit is not None:
        if "skipped" in fit:
            lines.append(f"Fit check (lifted, N={fit['n']}, bf16 autocast + gradient checkpointing): skipped, "
                         f"{fit['skipped']}.")
        elif "error" in fit:
            lines.append(f"Fit check (lifted, N={fit['n']}): failed ({fit['error'].splitlines()[-1]}).")
        else:
            lines.append(f"Fit check (lifted, all trained, N={fit['n']}, bf16 autocast + gradient checkpointing): "
                         f"peak {_gib(fit['peak_bytes'])}, {fit['time_s']:.3g} s per step; "
                         f"{'within' if fit['peak_bytes'] <= FIT_BUDGET_BYTES else 'OVER'} 24 GiB.")
    for line in report["skipped"]:
        lines.append(f"Not measured: {line}.")
    for failure in report["failures"]:
        lines.append(f"Failed: {failure['job']}: {failure['error'].strip().splitlines()[-1]}.")
    load = report["load"]
    lines.append(f"Load average (1 min) during the run: min {load['min']:.1f}, median {load['median']:.1f}, "
                 f"max {load['max']:.1f} on {report['machine']['logical_cpus']} logical CPUs; "
                 f"runtime {report['runtime_s']:.0f} s.")
    return "\n".join(lines)


def _run_job(run: Callable, function: Callable, job: dict) -> tuple[dict | None, str | None]:
    """A job that dies (out of memory, say) is recorded and the run goes on."""
    try:
        return run(function, job), None
    except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
        return None, str(exc)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    size = args.size
    models = [m for m in args.models if m != "native3d" or DiffusionModelUNet is not None]
    common = {"size": size, "device": args.device, "dtype": args.dtype, "threads": args.threads,
              "warmup": args.warmup, "iters": args.iters}
    # CPU: a forked process per job, for its own peak RSS. CUDA: the allocator counts per job, and
    # a CUDA context must not be forked.
    run = run_forked if args.device == "cpu" else run_inline
    describe_n = args.slices[0]
    described = run(describe, {"size": size, "n": describe_n, "models": models})
    jobs, skipped = plan(args)
    loads, samples, failures = [], [], []

    def progress(label: str, result: dict | None, error: str | None) -> None:
        what = (f"{result['time_s']:8.3f} s  peak {_gib(result['peak_bytes'])}" if error is None and "time_s" in result
                else "failed" if error else f"DDIM-200 {result['ddim200_s']:.1f} s")
        print(f"[{time.perf_counter() - started:6.0f} s, load {loads[-1]:.1f}] {label:45s} {what}",
              file=sys.stderr, flush=True)

    for i, (repeat, n, mode, model) in enumerate(jobs, 1):
        loads.append(os.getloadavg()[0])
        job = {**common, "n": n, "mode": mode, "model": model}
        result, error = _run_job(run, measure, job)
        if error is None:
            samples.append({**result, "repeat": repeat, "n": n, "mode": mode, "model": model})
        else:
            failures.append({"job": f"{model} {mode} N={n} repeat {repeat}", "error": error})
        progress(f"{i}/{len(jobs)} repeat {repeat} N={n} {mode} {model}", result, error)
    sampling = []
    for n in args.sample_at:
        loads.append(os.getloadavg()[0])
        job = {**common, "n": n, "steps": args.sample_steps, "autoencoder": args.autoencoder}
        result, error = _run_job(run, sample, job)
        sampling.append(result if error is None else {"n": n, "error": error})
        progress(f"sampling N={n} ({args.sample_steps} DDIM steps)", result, error)
    fit = None
    if args.fit_check is not None:
        fit = {"n": args.fit_check, "budget_bytes": FIT_BUDGET_BYTES}
        if args.device != "cuda" and not args.small:
            fit["skipped"] = "it is a GPU figure (bf16 autocast, CUDA allocator); run with --device cuda"
        else:
            loads.append(os.getloadavg()[0])
            result, error = _run_job(run, measure, {**common, "n": args.fit_check, "mode": "fit", "model": "lifted"})
            fit.update(result if error is None else {"error": error})
            progress(f"fit check N={args.fit_check}", result, error)
    results = summarise(samples, args)
    report = {
        "benchmark": "speed",
        "command": " ".join(["python", os.path.relpath(__file__), *(sys.argv[1:] if argv is None else argv)]),
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "machine": machine_info(torch_threads=described["torch_threads"]),
        "unet2d_config": UNET_CONFIGS[size],
        "native3d_config": native3d_config(UNET_CONFIGS[size]) if "native3d" in models else None,
        "native3d_padding": "zeros appended along n to a multiple of 2 ** (levels - 1), output cropped back",
        "peak_method": (f"{samples[0]['peak_method']}, above the fresh worker's RSS before the model is built"
                        if args.device == "cpu" and samples else
                        "torch.cuda.max_memory_allocated from before the model is moved to the GPU"),
        "describe_n": describe_n,
        "models": described["models"],
        "autoencoders": described["autoencoders"],
        "results": results,
        "targets": check_targets(results),
        "sampling": sampling,
        "fit_check": fit,
        "skipped": skipped,
        "failures": failures,
        "load": {"samples": loads, "min": min(loads, default=0.0), "max": max(loads, default=0.0),
                 "median": statistics.median(loads) if loads else 0.0},
        "runtime_s": time.perf_counter() - started,
    }
    print(markdown(report))
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
