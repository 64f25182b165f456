"""Quality benchmark on real MRI: ICBM 152 2009c T1w -> T2w, with Make-A-Volume's protocol (Quality).

Make-A-Volume (Zhu et al., MICCAI 2023) reports MAE / SSIM / PSNR on RIRE T1 -> T2 (Tables 1-2):
17 volumes (14 train, 3 test) resized to 256 x 256 x 35, DDIM with 200 steps. This script runs the
same protocol on the one real T1w/T2w pair shipped in ``shared/data/icbm152-2009c`` and compares,
on the same test subjects with the same seeds and the same stage-1 weights:

(a) ``slice-wise``: the stage-1 2D diffusion U-Net, slice by slice (the paper's "w/o volumetric layers");
(b) ``lifted``: the stage-2 model, i.e. the stage-1 U-Net lifted with volumetric layers and fine-tuned on volumes;
(c) ``3d-unet``: a deterministic 3D U-Net trained with L1 on the same data (the paper's Pix2pix-3D role);
(d) the lifted model with DDIM-200 against DPM-Solver++ with 25 steps (and the slice-wise model too).

Subjects. There is one brain, so 17 subjects are made from it by the ``icbm152`` dataset plugin
(``plugins/datasets/icbm152.py``, the same subject maker as ``lift3d demo``), pointed at the 1 mm
files: T1 (masked by the brain mask) and T2 (brain only) are cropped to a square in-plane field of
view around the brain, block-averaged to the scale's generation voxel, then each subject gets a
random smooth deformation and a small random rotation, applied *identically* to T1, T2 and mask, and
a smooth multiplicative bias field and Gaussian noise drawn *independently* per modality. Seeds
(the plugin's, fixed by the protocol, not by ``--seed``): training ``1000 + i`` (13 subjects),
validation ``1500`` (1 held-out subject), test ``2000 + i`` (3 subjects), served as axial slices.
These are bit for bit the subjects of the first published runs, which wrote them as NIfTI and read
them back through ``paired-nifti``.

Selection rule: nothing is chosen by looking at the test subjects. The stage-2 export (each
``--variant`` run and the default, at each of the scale's step counts) is chosen by PSNR on the
validation subject (lifted, DPM-Solver++ 25 steps); the 3D U-Net keeps the weights with the lowest L1
on the validation subject. Both diffusion stages predict v (``v_prediction``): with epsilon, a
pixel-space model this small samples mostly noise (see benchmarks/RESULTS.md). ``--x0-clip`` clips
the samplers' x0 estimate to [-1, 1] at every step; it rescued the epsilon models, and made no
difference to the v models on the validation subject, so the published run leaves it off.
``--reuse`` takes finished phases from an earlier run in the same ``--out``.

Metrics (``lift3d.metrics``): on the training grid, inside the brain mask, volumes scaled to
[0, 255] by the target's range; 3D SSIM; z-inconsistency = through-plane error relative to the
target's own slice-to-slice change (lower is better).

    python benchmarks/icbm_t1t2.py --scale smoke --out /tmp/icbm-smoke         # < 1 minute
    python benchmarks/icbm_t1t2.py --scale cpu --publish \
        --variant trainable=all,learning_rate=1e-4                               # ~45 min, 2 idle CPU cores
    python benchmarks/icbm_t1t2.py --scale paper --device cuda --publish        # a GPU
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the sibling _common.py, also when loaded by path
from _common import machine_info, write_json  # noqa: E402

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "icbm152-2009c"
RESULTS = REPO / "benchmarks" / "results"
TEMPLATE_FILES = {"T1": "1mm_T1.nii.gz", "T2": "1mm_T2_brain.nii.gz", "mask": "1mm_brainmask.nii.gz"}

# The protocol's subjects (icbm152 seeds: train 1000 + i, val 1500, test 2000 + i). 13 + 1 = the paper's 14
# training volumes.
SUBJECT_COUNTS = {"num_train": 13, "num_val": 1, "num_test": 3}

# Make-A-Volume, Tables 1-2, RIRE T1 -> T2 (another dataset; for context only): MAE, SSIM, PSNR.
PAPER_RIRE = {
    "lifted (Make-A-Volume)": (10.619, 0.684, 25.458),
    "w/o volumetric layers": (10.925, 0.667, 24.623),
    "Pix2pix-3D": (11.369, 0.650, 22.854),
}
# The goal for lifted vs slice-wise.
GOAL = {"psnr_gain_db": 0.8, "ssim_gain": 0.017, "z_inconsistency_cut": 0.30}


@dataclass(frozen=True)
class Scale:
    voxel_mm: int  # generation grid: the 1 mm template block-averaged by this factor
    size: int  # training grid: size x size in-plane ...
    num_slices: int  # ... x num_slices axial slices
    widths: tuple[int, ...]  # UNet2DModel block_out_channels (pixel space: identity autoencoder)
    layers_per_block: int
    stage1_steps: int
    stage1_batch: int  # slices per step
    stage1_lr: float
    stage1_prediction: str  # what the U-Net predicts, in both stages: epsilon (the paper's eq. 4) or v_prediction
    stage2_candidates: tuple[int, ...]  # stage-2 step counts; the validation subject picks one
    stage2_lr: float
    baseline_features: tuple[int, ...]  # MONAI BasicUNet features (6 numbers)
    baseline_steps: int
    baseline_batch: int  # volumes per step
    baseline_lr: float
    baseline_val_every: int
    ddim_steps: int  # the paper's DDIM-200
    dpm_steps: int  # the fast solver
    selection_steps: int  # DPM-Solver++ steps used on the validation subject
    hardware: str


SCALES = {
    # About 45 minutes on 2 idle CPU cores (timed: ~0.25 s per stage-1 step of 16 slices, ~0.45 s per
    # stage-2 step of one volume); at load ~5 every step takes 3-10x longer. Stage-2 length and
    # learning rate were chosen on the validation subject (benchmarks/RESULTS.md).
    "cpu": Scale(voxel_mm=2, size=48, num_slices=24, widths=(16, 32, 64), layers_per_block=1,
                 stage1_steps=2000, stage1_batch=16, stage1_lr=1e-3, stage1_prediction="v_prediction",
                 stage2_candidates=(600, 1200), stage2_lr=2e-3,
                 baseline_features=(16, 16, 32, 64, 128, 16), baseline_steps=1000, baseline_batch=2,
                 baseline_lr=1e-3, baseline_val_every=50, ddim_steps=200, dpm_steps=25, selection_steps=25,
                 hardware="2 CPU cores"),
    # The paper's RIRE grid, 256 x 256 x 35, for one GPU. Pixel space (identity autoencoder): no
    # pretrained KL autoencoder (the paper's f = 4 latent space) is available here.
    "paper": Scale(voxel_mm=1, size=256, num_slices=35, widths=(64, 128, 256, 256), layers_per_block=2,
                   stage1_steps=30000, stage1_batch=32, stage1_lr=1e-4, stage1_prediction="v_prediction",
                   stage2_candidates=(1000, 2000, 4000),
                   stage2_lr=1e-4, baseline_features=(32, 32, 64, 128, 256, 32), baseline_steps=10000,
                   baseline_batch=1, baseline_lr=2e-4, baseline_val_every=500, ddim_steps=200, dpm_steps=25,
                   selection_steps=25, hardware="1 GPU"),
    # Seconds: every code path, learning nothing (for tests/test_benchmark_icbm.py).
    "smoke": Scale(voxel_mm=4, size=32, num_slices=16, widths=(16, 32), layers_per_block=1,
                   stage1_steps=3, stage1_batch=8, stage1_lr=1e-3, stage1_prediction="v_prediction", stage2_candidates=(1, 2), stage2_lr=5e-4,
                   baseline_features=(8, 8, 8, 16, 16, 8), baseline_steps=2, baseline_batch=2, baseline_lr=1e-3,
                   baseline_val_every=1, ddim_steps=3, dpm_steps=2, selection_steps=2, hardware="any"),
}


# --------------------------------------------------------------------------------------------
# Subjects: the icbm152 dataset plugin, pointed at the 1 mm template


def dataset_options(data: Path, scale: Scale) -> dict[str, Any]:
    """The ``icbm152`` options of the protocol: 1 mm files, block-averaged to the scale's voxel, 13/1/3 subjects."""
    return {"root": str(data), "files": TEMPLATE_FILES, "voxel_mm": scale.voxel_mm, **SUBJECT_COUNTS,
            "source": "T1", "target": "T2", "size": scale.size, "num_slices": scale.num_slices,
            "slice_axis": "axial", "cache": True}


# --------------------------------------------------------------------------------------------
# Phases: each records its key in its folder, so --reuse can take it from an earlier run


PHASE_FILE = "benchmark_phase.json"


def _plain(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


GRID_FIELDS = ("voxel_mm", "size", "num_slices")


def phase_key(scale: Scale, prefix: str, data: dict[str, Any], seed: int, **extra: Any) -> dict[str, Any]:
    """What a phase depends on: the grid, its own ``prefix*`` fields of the scale, the data and seed."""
    fields = {k: v for k, v in asdict(scale).items() if k in GRID_FIELDS or k.startswith(prefix)}
    return {"scale": fields, "data": data, "seed": seed, **extra}


def reusable(folder: Path, key: dict[str, Any], reuse: bool) -> dict[str, Any] | None:
    """The record of a finished phase in ``folder``, if ``reuse`` and it ran with exactly ``key``."""
    path = folder / PHASE_FILE
    if not reuse or not path.is_file():
        return None
    record = json.loads(path.read_text())
    if record.get("key") != _plain(key):
        return None
    print(f"[reuse] {folder} (from an earlier run: {record['wall_s'] / 60:.1f} min)")
    return {**record, "reused": True}


def finish(folder: Path, key: dict[str, Any], wall_s: float, **extra: Any) -> dict[str, Any]:
    record = {"key": _plain(key), "wall_s": wall_s, "run_id": str(time.time_ns()), **_plain(extra)}
    (folder / PHASE_FILE).write_text(json.dumps(record, indent=2))
    return {**record, "reused": False}


# Stage-2 variants (--variant): overrides of the [lift] section, plus the learning rate.
VARIANT_KEYS = {"kernel_size": int, "where": str, "padding_mode": str, "trainable": str, "learning_rate": float}


def parse_variant(text: str) -> dict[str, Any]:
    """``"trainable=all,kernel_size=5"`` -> ``{"trainable": "all", "kernel_size": 5}``."""
    overrides: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in VARIANT_KEYS:
            raise ValueError(f"--variant item {item!r} is not key=value with a key among {', '.join(VARIANT_KEYS)}")
        try:
            overrides[key] = VARIANT_KEYS[key](value)
        except ValueError:
            raise ValueError(f"--variant {key}={value!r} is not a valid {VARIANT_KEYS[key].__name__}") from None
    if not overrides:
        raise ValueError(f"--variant {text!r} names nothing; e.g. trainable=all or where=spatial,kernel_size=5")
    return overrides


def variant_name(overrides: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in overrides.items()) or "default"


def variant_folder(overrides: dict[str, Any]) -> str:
    return "stage2" + "".join(f"_{k}-{v}" for k, v in overrides.items())


# --------------------------------------------------------------------------------------------
# Training: the two diffusion stages (lift3d.training) and the 3D U-Net baseline


def diffusion_config(stage: str, folder: Path, scale: Scale, data: dict[str, Any], seed: int, steps: int,
                     stage1_model: Path | None = None, overrides: dict[str, Any] | None = None):
    from lift3d.config import TrainConfig, apply

    common = {
        "run": {"stage": stage, "output_dir": str(folder), "seed": seed, "max_steps": steps, "log_every": 10,
                "checkpoint_every": 0},
        "data": {"dataset": "icbm152", "options": data},
        "model": {"block_out_channels": list(scale.widths), "layers_per_block": scale.layers_per_block,
                  "prediction_type": scale.stage1_prediction},
        "autoencoder": {"name": "identity"},
    }
    if stage == "slices":
        extra = {"data": {"batch_size": scale.stage1_batch},
                 "optim": {"learning_rate": scale.stage1_lr, "lr_scheduler": "cosine",
                           "warmup_steps": min(20, max(steps // 4, 0))}}
    else:
        overrides = dict(overrides or {})
        lr = overrides.pop("learning_rate", scale.stage2_lr)
        extra = {"data": {"batch_size": 1}, "model": {"pretrained": str(stage1_model or "")},
                 "lift": {"trainable": "volumetric", **overrides},
                 "diffusion": {"timestep_sampler": "make-a-volume"},
                 "optim": {"learning_rate": lr, "lr_scheduler": "constant"}}
    cfg = apply(TrainConfig(), common, "icbm_t1t2")
    return apply(cfg, extra, "icbm_t1t2")


def train_stage1(out: Path, scale: Scale, data: dict[str, Any], seed: int, reuse: bool) -> tuple[Path, dict]:
    from lift3d.training import train

    folder = out / "stage1"
    key = phase_key(scale, "stage1", data, seed, unet={"widths": scale.widths, "layers": scale.layers_per_block})
    record = reusable(folder, key, reuse)
    if record and (folder / "model").is_dir():
        return folder / "model", record
    print(f"[stage 1] {scale.stage1_steps} steps x {scale.stage1_batch} slices")
    shutil.rmtree(folder, ignore_errors=True)
    tic = time.perf_counter()
    model = train(diffusion_config("slices", folder, scale, data, seed, scale.stage1_steps))
    return model, finish(folder, key, time.perf_counter() - tic)


def train_stage2(out: Path, scale: Scale, data: dict[str, Any], seed: int, stage1: tuple[Path, dict],
                 overrides: dict[str, Any], reuse: bool) -> tuple[dict[int, Path], dict]:
    """One stage-2 run, exported at every candidate step count (each segment resumes the last)."""
    from lift3d.training import train

    folder = out / variant_folder(overrides)
    exports = {steps: folder / f"model-step{steps}" for steps in scale.stage2_candidates}
    key = phase_key(scale, "stage2", data, seed, overrides=overrides, stage1=stage1[1]["run_id"])
    record = reusable(folder, key, reuse)
    if record and all(p.is_dir() for p in exports.values()):
        return exports, record
    print(f"[stage 2, {variant_name(overrides)}] exported at steps {list(scale.stage2_candidates)}")
    shutil.rmtree(folder, ignore_errors=True)
    tic, done = time.perf_counter(), 0
    for steps, export in exports.items():
        cfg = diffusion_config("volumes", folder, scale, data, seed, steps, stage1[0], overrides)
        cfg.run.checkpoint_every, cfg.run.checkpoints_keep = steps, 1
        cfg.run.resume = "latest" if done else ""
        shutil.copytree(train(cfg), export)
        done = steps
    return exports, finish(folder, key, time.perf_counter() - tic)


def build_baseline(features: tuple[int, ...]) -> tuple[nn.Module, str]:
    """MONAI's BasicUNet (3D) when MONAI is installed, else :class:`UNet3D`, the same layout by hand."""
    try:
        import monai
        from monai.networks.nets import BasicUNet
    except ImportError:
        return UNet3D(features), f"hand-written 3D U-Net (BasicUNet's layout; MONAI not installed), features {list(features)}"
    net = BasicUNet(spatial_dims=3, in_channels=1, out_channels=1, features=features)
    return net, f"MONAI {monai.__version__} BasicUNet(spatial_dims=3), features {list(features)}"


def double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(cin, cout, 3, padding=1), nn.InstanceNorm3d(cout, affine=True), nn.LeakyReLU(0.1),
                         nn.Conv3d(cout, cout, 3, padding=1), nn.InstanceNorm3d(cout, affine=True), nn.LeakyReLU(0.1))


class UNet3D(nn.Module):
    """BasicUNet's layout (four 2x poolings, concatenated skips, ``features[5]`` channels at the top
    level), for machines without MONAI. Odd sizes are handled by padding the upsampled features."""

    def __init__(self, features: tuple[int, ...]) -> None:
        super().__init__()
        f = list(features)
        self.down = nn.ModuleList([double_conv(1, f[0])] + [double_conv(f[i], f[i + 1]) for i in range(4)])
        ups = [(f[4], f[3], f[3]), (f[3], f[2], f[2]), (f[2], f[1], f[1]), (f[1], f[0], f[5])]
        self.up = nn.ModuleList([nn.ConvTranspose3d(cin, cin // 2, 2, stride=2) for cin, _, _ in ups])
        self.merge = nn.ModuleList([double_conv(cin // 2 + skip, cout) for cin, skip, cout in ups])
        self.head = nn.Conv3d(f[5], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool3d(x, 2))
            skips.append(x)
        x = skips.pop()
        for up, merge in zip(self.up, self.merge):
            skip = skips.pop()
            x = up(x)
            x = F.pad(x, [p for d in (4, 3, 2) for p in (0, skip.shape[d] - x.shape[d])], mode="replicate")
            x = merge(torch.cat([skip, x], dim=1))
        return self.head(x)


def train_baseline(out: Path, scale: Scale, data: dict[str, Any], train_pairs, val_pairs, seed: int, device,
                   reuse: bool) -> tuple[nn.Module, dict[str, Any]]:
    """L1 regression source -> target on whole volumes; keeps the weights best on the validation subject."""
    from safetensors.torch import load_file, save_file

    folder = out / "baseline"
    net, description = build_baseline(scale.baseline_features)
    key = phase_key(scale, "baseline", data, seed, model=description)
    record = reusable(folder, key, reuse)
    if record and (folder / "model.safetensors").is_file():
        net.load_state_dict(load_file(str(folder / "model.safetensors")))
        return net.to(device).eval(), record
    print(f"[3D U-Net] {scale.baseline_steps} steps x {scale.baseline_batch} volumes, L1")
    tic = time.perf_counter()
    torch.manual_seed(seed)
    net, description = build_baseline(scale.baseline_features)  # seeded weights
    net.to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=scale.baseline_lr)
    sources = torch.stack([p.source for p in train_pairs])
    targets = torch.stack([p.target for p in train_pairs])
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    best: tuple[float, int, dict] = (math.inf, 0, {})
    history = []
    for step in range(1, scale.baseline_steps + 1):
        if len(order) < scale.baseline_batch:
            order += torch.randperm(len(sources), generator=generator).tolist()
        batch, order = order[:scale.baseline_batch], order[scale.baseline_batch:]
        net.train()
        loss = (net(sources[batch].to(device)) - targets[batch].to(device)).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % scale.baseline_val_every == 0 or step == scale.baseline_steps:
            net.eval()
            with torch.no_grad():
                val = float(np.mean([(net(p.source[None].to(device)).clamp(-1, 1).cpu() - p.target[None]).abs().mean()
                                     for p in val_pairs]))
            history.append({"step": step, "train_l1": loss.item(), "val_l1": val})
            if val < best[0]:
                best = (val, step, {k: v.detach().cpu().clone() for k, v in net.state_dict().items()})
    net.load_state_dict(best[2])
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in best[2].items()}, str(folder / "model.safetensors"))
    info = {"model": description, "parameters": sum(p.numel() for p in net.parameters()), "loss": "L1",
            "steps": scale.baseline_steps, "batch_volumes": scale.baseline_batch, "lr": scale.baseline_lr,
            "chosen_step": best[1], "chosen_val_l1": best[0], "history": history}
    return net.eval(), finish(folder, key, time.perf_counter() - tic, info=info)


# --------------------------------------------------------------------------------------------
# Synthesis and evaluation


@dataclass
class Method:
    name: str
    label: str
    folder: Path | None  # a diffusion model folder; None for the 3D U-Net
    record: dict[str, Any]  # the phase record of the model (its run_id keys the prediction cache)
    scheduler: str = ""
    steps: int = 0
    x0_clip: bool = False  # clip the sampler's x0 estimate to [-1, 1] at every step

    @property
    def sampler(self) -> str:
        if self.folder is None:
            return "one pass"
        return f"{'DDIM' if self.scheduler == 'ddim' else 'DPM-Solver++'}-{self.steps}" + (", x0 clip" if self.x0_clip else "")


def predict(method: Method, pairs, seed: int, device, cache: Path, reuse: bool,
            baseline: nn.Module | None = None) -> tuple[torch.Tensor, float]:
    """``(b, 1, n, h, w)`` predictions for ``pairs`` and the sampling seconds per volume (model loading
    excluded); cached in ``cache`` by model run, sampler, seed and subjects, read back with ``reuse``."""
    from safetensors.torch import load_file, save_file

    from lift3d.synthesis import load_synthesis_model, synthesize

    key = {"model": str(method.folder), "run_id": method.record["run_id"], "scheduler": method.scheduler,
           "steps": method.steps, "seed": seed, "subjects": [p.subject for p in pairs]}
    if method.x0_clip:
        key["x0_clip"] = True
    name = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    tensors, meta = cache / f"{name}.safetensors", cache / f"{name}.json"
    if reuse and tensors.is_file() and meta.is_file():
        return load_file(str(tensors))["prediction"], json.loads(meta.read_text())["seconds_per_volume"]
    sources = torch.stack([p.source for p in pairs])
    if method.folder is None:
        tic = time.perf_counter()
        with torch.no_grad():
            pred = torch.cat([baseline(s[None].to(device)).clamp(-1, 1).cpu() for s in sources])
    else:
        model = load_synthesis_model(method.folder, device=device)
        tic = time.perf_counter()
        # All subjects in one batch: every method sees the same initial noise for the same subject.
        pred = synthesize(model, sources, scheduler=method.scheduler, steps=method.steps, seed=seed,
                          clip_x0=method.x0_clip, progress=False).cpu()
    seconds = (time.perf_counter() - tic) / len(pairs)
    cache.mkdir(parents=True, exist_ok=True)
    save_file({"prediction": pred.contiguous()}, str(tensors))
    meta.write_text(json.dumps({"key": key, "seconds_per_volume": seconds}, indent=2))
    return pred, seconds


def evaluate(pred: torch.Tensor, pairs) -> list[dict[str, Any]]:
    from lift3d.metrics import evaluate_volumes

    return [{"subject": p.subject, **evaluate_volumes(pred[i, 0].numpy(), p.target[0].numpy(),
                                                      p.extra["mask"][0].numpy())} for i, p in enumerate(pairs)]


def select(stage1: Method, stage2: dict[str, tuple[dict[int, Path], dict]], val_pairs, scale: Scale, seed: int,
           device, cache: Path, reuse: bool) -> list[dict[str, Any]]:
    """Validation metrics of the slice-wise model and of every (variant, stage-2 steps) export."""
    from lift3d.metrics import summarize

    sampler = {"scheduler": "dpm", "steps": scale.selection_steps, "x0_clip": stage1.x0_clip}
    entries = [("slice-wise", "-", 0, replace(stage1, **sampler))]
    for variant, (exports, record) in stage2.items():
        entries += [("lifted", variant, k, Method("lifted", "", f, record, **sampler)) for k, f in exports.items()]
    rows = []
    for model, variant, steps, method in entries:
        pred, _ = predict(method, val_pairs, seed, device, cache, reuse)
        rows.append({"model": model, "variant": variant, "stage2_steps": steps, "folder": str(method.folder),
                     "metrics": summarize(evaluate(pred, val_pairs))})
        m = rows[-1]["metrics"]
        print(f"  {model} [{variant}] {steps or ''}: PSNR {m['psnr']['mean']:.3f}, SSIM {m['ssim']['mean']:.4f}, "
              f"MAE {m['mae']['mean']:.3f}, z {m['z_inconsistency']['mean']:.3f}")
    return rows


def choose(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The lifted export with the best validation PSNR (ties: fewer stage-2 steps, then the first variant)."""
    lifted = [r for r in rows if r["model"] == "lifted"]
    return max(lifted, key=lambda r: (r["metrics"]["psnr"]["mean"], -r["stage2_steps"]))


# --------------------------------------------------------------------------------------------
# Reporting


def goal_check(summary: dict[str, Any], lifted: str, slice_wise: str) -> dict[str, Any]:
    a, b = summary[slice_wise], summary[lifted]
    observed = {"psnr_gain_db": b["psnr"]["mean"] - a["psnr"]["mean"],
                "ssim_gain": b["ssim"]["mean"] - a["ssim"]["mean"],
                "mae_reduction": a["mae"]["mean"] - b["mae"]["mean"],
                "z_inconsistency_cut": 1.0 - b["z_inconsistency"]["mean"] / a["z_inconsistency"]["mean"]}
    passed = {"psnr": observed["psnr_gain_db"] >= GOAL["psnr_gain_db"], "ssim": observed["ssim_gain"] >= GOAL["ssim_gain"],
              "mae": observed["mae_reduction"] > 0, "z_inconsistency": observed["z_inconsistency_cut"] >= GOAL["z_inconsistency_cut"]}
    return {"compared": f"{lifted} vs {slice_wise}", "goal": GOAL, "observed": observed, "passed": passed,
            "met": all(passed.values())}


def fmt(stats: dict[str, float], digits: int) -> str:
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    """The RESULTS.md table for one run."""
    s, m, t = report["settings"], report["machine"], report["timing"]
    where = m.get("gpu") or f"{m['logical_cpus']} cores, {m['torch_threads']} torch threads"
    lines = [
        f"Scale `{report['scale']}`: {s['grid']} axial grid; {s['unet']}. Machine: {m['cpu']} ({where}), "
        f"torch {m['torch']}. Wall time {t['total_with_reused_s'] / 60:.1f} min end to end.",
        "",
        "| method | sampler | MAE ↓ | SSIM ↑ | PSNR ↑ (dB) | z-inconsistency ↓ | s / volume |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for entry in report["methods"].values():
        st = entry["summary"]
        lines.append(f"| {entry['label']} | {entry['sampler']} | {fmt(st['mae'], 2)} | {fmt(st['ssim'], 3)} | "
                     f"{fmt(st['psnr'], 2)} | {fmt(st['z_inconsistency'], 3)} | {entry['seconds_per_volume']:.1f} |")
    val = report["selection"]
    tried = "; ".join(f"{r['model']}" + (f" [{r['variant']}] {r['stage2_steps']} steps" if r["model"] == "lifted" else "")
                      + f": {r['metrics']['psnr']['mean']:.2f} dB / {r['metrics']['ssim']['mean']:.3f}"
                      for r in val["validation"])
    lines += [
        "",
        f"Training: stage 1 {t['stage1_s'] / 60:.1f} min ({s['stage1']}); stage 2 {t['stage2_s'] / 60:.1f} min "
        f"({s['stage2']}); 3D U-Net {t['baseline_s'] / 60:.1f} min ({s['baseline']}).",
        "",
        f"Selection on the validation subject {', '.join(val['validation_subject'])} ({val['rule']}), PSNR / SSIM: "
        f"{tried}.",
        "",
        f"Command: `{report['command']}`",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The benchmark


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="the ICBM 152 2009c folder (1mm_T1, 1mm_T2_brain, 1mm_brainmask .nii.gz), read by the "
                             "icbm152 dataset plugin (default: ../shared/data/icbm152-2009c next to the repository)")
    parser.add_argument("--scale", choices=tuple(SCALES), default="cpu",
                        help="cpu: ~45 minutes on 2 idle CPU cores; paper: 256 x 256 x 35 on a GPU; smoke: seconds, for tests")
    parser.add_argument("--out", type=Path, default=None,
                        help="work folder: subjects, models, results.json, views.png (default: runs/icbm_t1t2-<scale>)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    parser.add_argument("--seed", type=int, default=0,
                        help="seeds weights, training noise and sampling (the subjects' seeds are fixed by the protocol)")
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="an extra stage-2 run to choose from on the validation subject, e.g. trainable=all, "
                             "where=spatial, kernel_size=5, learning_rate=1e-3 (repeatable)")
    parser.add_argument("--x0-clip", action="store_true",
                        help="clip the samplers' x0 estimate to [-1, 1] at every step (diffusers' thresholding at "
                             "1.0), as pixel-space DDPM/DDIM do; the exported scheduler config has it off")
    parser.add_argument("--reuse", action="store_true",
                        help="take finished phases (models, predictions) from an earlier run in --out when they ran "
                             "with the same settings")
    parser.add_argument("--publish", action="store_true",
                        help="also copy results.json and views.png to benchmarks/results/icbm_<scale>{.json,_views.png}")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"unknown --device {name!r}; valid: auto, cpu, cuda, cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available here; use --device cpu")
    return torch.device(name)


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.device == "cpu":  # Accelerate (lift3d.training) would otherwise take a GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    from lift3d.demo import grid_spacing
    from lift3d.figures import save_orthogonal_views
    from lift3d.metrics import INTENSITY_RULE, summarize
    from lift3d.plugins import create

    device = resolve_device(args.device)
    scale = SCALES[args.scale]
    variants = [{}] + [parse_variant(v) for v in args.variant]
    out = (args.out or REPO / "runs" / f"icbm_t1t2-{args.scale}").resolve()
    data = dataset_options(args.data, scale)
    tic = time.perf_counter()
    datasets = {split: create("datasets", "icbm152", split=split, **data) for split in ("train", "val", "test")}
    data_s = time.perf_counter() - tic  # a missing or unreadable template file has failed by now
    for overrides in variants:  # a bad variant fails now, not after stage 1
        diffusion_config("volumes", out, scale, {}, args.seed, 1, None, overrides)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "predictions"
    start, load_before, machine = time.perf_counter(), os.getloadavg(), machine_info()  # the commit at start
    timing: dict[str, Any] = {"data_s": data_s}
    stage1_model, stage1_record = train_stage1(out, scale, data, args.seed, args.reuse)
    stage2 = {variant_name(o): train_stage2(out, scale, data, args.seed, (stage1_model, stage1_record), o, args.reuse)
              for o in variants}
    pairs = {split: [ds[i] for i in range(len(ds))] for split, ds in datasets.items()}
    baseline, baseline_record = train_baseline(out, scale, data, pairs["train"], pairs["val"], args.seed, device,
                                               args.reuse)

    print(f"[selection] stage-2 export by PSNR on the validation subject (DPM-Solver++ {scale.selection_steps})")
    tic = time.perf_counter()
    slice_wise = Method("slice-wise", "(a) slice-wise (stage 1 only)", stage1_model, stage1_record, "ddim",
                        scale.ddim_steps, args.x0_clip)
    validation = select(slice_wise, stage2, pairs["val"], scale, args.seed, device, cache, args.reuse)
    chosen = choose(validation)
    chosen_record = stage2[chosen["variant"]][1]
    timing["selection_s"] = time.perf_counter() - tic

    lifted_folder = Path(chosen["folder"])
    methods = [
        slice_wise,
        Method("lifted", "(b) lifted (stage 2)", lifted_folder, chosen_record, "ddim", scale.ddim_steps, args.x0_clip),
        Method("3d-unet", "(c) 3D U-Net, L1", None, baseline_record),
        Method("lifted-dpm", "(d) lifted (stage 2)", lifted_folder, chosen_record, "dpm", scale.dpm_steps,
               args.x0_clip),
        Method("slice-wise-dpm", "(d) slice-wise (stage 1 only)", stage1_model, stage1_record, "dpm", scale.dpm_steps,
               args.x0_clip),
    ]
    done: dict[str, Any] = {}
    predictions = {}
    tic = time.perf_counter()
    # Cheapest first, each written as it finishes: a run cut short still reports what it did.
    for method in sorted(methods, key=lambda m: m.steps * (2 if m.folder == lifted_folder else 1)):
        print(f"[test] {method.label}: {method.sampler}")
        pred, seconds = predict(method, pairs["test"], args.seed, device, cache, args.reuse, baseline)
        rows = evaluate(pred, pairs["test"])
        predictions[method.name] = pred
        done[method.name] = {"label": method.label, "sampler": method.sampler,
                             "model": str(method.folder or out / "baseline"), "seconds_per_volume": seconds,
                             "subjects": rows, "summary": summarize(rows)}
        (out / "partial_results.json").write_text(json.dumps({"validation": validation, "chosen": chosen,
                                                               "methods": done}, indent=2, default=str))
    results = {m.name: done[m.name] for m in methods}
    timing["test_s"] = time.perf_counter() - tic

    pair = pairs["test"][0]
    views = out / "views.png"
    volumes = {"T1 (source)": pair.source[0].numpy(), "T2 (target)": pair.target[0].numpy()}
    volumes |= {name: predictions[name][0, 0].numpy() for name in ("slice-wise", "lifted", "3d-unet")}
    save_orthogonal_views(views, volumes, spacing=grid_spacing(pair),
                          error_of=[(name, "T2 (target)") for name in ("slice-wise", "lifted", "3d-unet")],
                          title=f"ICBM T1 -> T2, {pair.subject} (test), scale {args.scale}; diffusion: "
                                f"DDIM-{scale.ddim_steps}")
    timing["total_s"] = time.perf_counter() - start
    trained = {"stage1_s": stage1_record, "stage2_s": chosen_record, "baseline_s": baseline_record}
    timing |= {name: record["wall_s"] for name, record in trained.items()}
    timing["stage2_variants_s"] = {name: record["wall_s"] for name, (_, record) in stage2.items()}
    timing["reused"] = [name for name, record in trained.items() if record["reused"]]
    timing["total_with_reused_s"] = timing["total_s"] + sum(
        record["wall_s"] for name, record in trained.items() if record["reused"])

    overrides = variants[[variant_name(o) for o in variants].index(chosen["variant"])]
    lift = {"trainable": "volumetric", "where": "resnet", "kernel_size": 3, "padding_mode": "zeros",
            "learning_rate": scale.stage2_lr} | overrides
    report = {
        "benchmark": "icbm_t1t2", "scale": args.scale,
        "command": " ".join(["python benchmarks/icbm_t1t2.py", *map(shlex.quote, args.argv)]),
        "machine": machine | {"load_average_at_start": load_before, "load_average_at_end": os.getloadavg()},
        "data": {"dataset": "icbm152", "folder": os.path.relpath(Path(args.data).resolve(), REPO),
                 "files": TEMPLATE_FILES,
                 "subjects": {name: {"split": split, "seed": seed} for split, ds in datasets.items()
                              for name, seed in ds.seeds().items()},
                 "generation_voxel_mm": scale.voxel_mm, "corruption": asdict(datasets["train"].corruption),
                 "how": "one template brain; per subject a random smooth deformation + rotation applied identically "
                        "to T1, T2 and mask, and a bias field + Gaussian noise drawn independently per modality"},
        "settings": {
            "grid": f"{scale.size} x {scale.size} x {scale.num_slices}",
            "unet": f"UNet2DModel block_out_channels {list(scale.widths)}, layers_per_block {scale.layers_per_block}, "
                    "pixel space (identity autoencoder), source concatenated on channels",
            "stage1": f"{scale.stage1_steps} steps x {scale.stage1_batch} slices, AdamW lr {scale.stage1_lr}, cosine",
            "stage2": f"trainable {lift['trainable']}, placement {lift['where']}, kernel {lift['kernel_size']}, "
                      f"1 volume per step, AdamW lr {lift['learning_rate']}, make-a-volume timesteps; "
                      f"{chosen['stage2_steps']} steps chosen from {list(scale.stage2_candidates)}"
                      + (f" and variants {[variant_name(o) for o in variants]}" if len(variants) > 1 else ""),
            "baseline": f"{baseline_record['info']['model']}, {scale.baseline_steps} steps x {scale.baseline_batch} "
                        f"volumes, Adam lr {scale.baseline_lr}, weights of step {baseline_record['info']['chosen_step']}"
                        " (best validation L1)",
            "sampling": "all test subjects in one batch, seed --seed: the same initial noise for every method; "
                        + ("x0 clipped to [-1, 1] at every step" if args.x0_clip else "no x0 clipping"),
            "metrics": f"training grid, inside the brain mask; {INTENSITY_RULE}",
            "scale": asdict(scale),
        },
        "selection": {"rule": "the lifted export (variant, stage-2 steps) with the highest validation PSNR, "
                              f"DPM-Solver++ {scale.selection_steps}; 3D U-Net: lowest validation L1",
                      "validation_subject": datasets["val"].subjects(), "validation": validation,
                      "chosen": {k: chosen[k] for k in ("variant", "stage2_steps", "folder")},
                      "baseline_history": baseline_record["info"]["history"]},
        "methods": results,
        "goal": goal_check({k: v["summary"] for k, v in results.items()}, "lifted", "slice-wise"),
        "paper_rire_other_dataset": {k: dict(zip(("mae", "ssim", "psnr"), v)) for k, v in PAPER_RIRE.items()},
        "timing": timing,
    }
    write_json(out / "results.json", report)
    (out / "results.md").write_text(markdown(report) + "\n")
    if args.publish:
        RESULTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "results.json", RESULTS / f"icbm_{args.scale}.json")
        shutil.copyfile(views, RESULTS / f"icbm_{args.scale}_views.png")
    goal = report["goal"]
    print("\n" + markdown(report))
    print(f"\ngoal (lifted vs slice-wise: PSNR +{GOAL['psnr_gain_db']} dB, SSIM +{GOAL['ssim_gain']}, z-inconsistency "
          f"-{GOAL['z_inconsistency_cut']:.0%}): {'met' if goal['met'] else 'NOT met'}; observed "
          + ", ".join(f"{k} {v:+.4f}" for k, v in goal["observed"].items()))
    print(f"results: {out / 'results.json'}, {views}")
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"icbm_t1t2: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
