"""``lift3d demo``: the whole Make-A-Volume pipeline on the built-in phantom, on a CPU, in minutes.

stage 1 (slice-wise diffusion) -> inflate -> stage 2 (volumetric fine-tuning) -> synthesis of
held-out volumes, slice-wise and lifted, with the same seed -> evaluation and figures.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from lift3d.config import TrainConfig, apply
from lift3d.data import save_volume
from lift3d.figures import save_orthogonal_views
from lift3d.metrics import INTENSITY_RULE, evaluate_volumes, summarize
from lift3d.plugins import create
from lift3d.synthesis import load_synthesis_model, synthesize
from lift3d.training import train


@dataclass(frozen=True)
class DemoScale:
    size: int
    num_slices: int
    num_subjects: int
    stage1_steps: int
    stage2_steps: int
    sample_steps: int
    widths: tuple[int, ...]


SCALES = {
    # ~6-8 minutes on 2 CPU cores.
    "default": DemoScale(size=32, num_slices=16, num_subjects=10, stage1_steps=400, stage2_steps=120,
                         sample_steps=50, widths=(32, 64)),
    # Seconds: for tests and a first look.
    "quick": DemoScale(size=16, num_slices=8, num_subjects=4, stage1_steps=4, stage2_steps=2, sample_steps=3,
                       widths=(16, 32)),
}


def demo_config(out: Path, scale: DemoScale, stage: str, seed: int) -> TrainConfig:
    data = {"size": scale.size, "num_slices": scale.num_slices, "num_subjects": scale.num_subjects, "seed": seed,
            "cache": True}
    common = {
        "run": {"stage": stage, "output_dir": str(out / ("stage1" if stage == "slices" else "stage2")),
                "seed": seed, "log_every": 20, "checkpoint_every": 0},
        "data": {"dataset": "phantom", "options": data},
        # v-prediction: in pixel space after a few hundred steps, an epsilon model's samples are noise.
        "model": {"block_out_channels": list(scale.widths), "layers_per_block": 1, "prediction_type": "v_prediction"},
        "autoencoder": {"name": "identity"},
    }
    if stage == "slices":
        extra = {"run": {"max_steps": scale.stage1_steps}, "data": {"batch_size": 16},
                 "optim": {"learning_rate": 1e-3, "warmup_steps": min(20, scale.stage1_steps // 4),
                           "lr_scheduler": "cosine"}}
    else:
        extra = {"run": {"max_steps": scale.stage2_steps}, "data": {"batch_size": 1},
                 "model": {"pretrained": str(out / "stage1" / "model")},
                 "lift": {"trainable": "volumetric"}, "diffusion": {"timestep_sampler": "make-a-volume"},
                 "optim": {"learning_rate": 1e-4}}
    cfg = apply(TrainConfig(), common, "demo")
    return apply(cfg, extra, "demo")


def run_demo(out: str | Path, *, scale: str = "default", seed: int = 0) -> dict:
    """Run the pipeline into ``out``; returns the paths written and the metrics."""
    if scale not in SCALES:
        raise ValueError(f"Unknown demo scale {scale!r}; available: {', '.join(SCALES)}")
    s, out = SCALES[scale], Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"[1/5] stage 1: slice-wise diffusion U-Net on the phantom ({s.stage1_steps} steps)")
    train(demo_config(out, s, "slices", seed))
    print(f"[2/5] + [3/5] inflate and stage-2 volumetric fine-tuning ({s.stage2_steps} steps)")
    model_dir = train(demo_config(out, s, "volumes", seed))

    print(f"[4/5] synthesis of held-out volumes (DDIM, {s.sample_steps} steps), slice-wise and lifted")
    test = create("datasets", "phantom", split="test", size=s.size, num_slices=s.num_slices,
                  num_subjects=s.num_subjects, seed=seed)
    model = load_synthesis_model(model_dir)
    synth_dir, eval_dir = out / "synthesis", out / "evaluation"
    rows, files = {"slice-wise": [], "lifted": []}, {"model": str(model_dir), "nifti": [], "figures": []}
    for pair in test:
        source = pair.source[None]
        outputs = {}
        for method, slice_wise in (("slice-wise", True), ("lifted", False)):
            with torch.no_grad():
                volume = synthesize(model, source, scheduler="ddim", steps=s.sample_steps, seed=seed,
                                    slice_wise=slice_wise, progress=True)[0]
            outputs[method] = volume[0].float().numpy()
            path = save_volume(synth_dir / f"{pair.subject}_{method}.nii.gz", volume, pair.meta)
            files["nifti"].append(str(path))
        for name, vol in (("source", pair.source), ("target", pair.target)):
            save_volume(synth_dir / f"{pair.subject}_{name}.nii.gz", vol, pair.meta)
        target = pair.target[0].numpy()
        for method in rows:
            rows[method].append({"subject": pair.subject, **evaluate_volumes(outputs[method], target)})
        figure = eval_dir / "figures" / f"{pair.subject}.png"
        figure.parent.mkdir(parents=True, exist_ok=True)
        save_orthogonal_views(figure, {"source": pair.source[0].numpy(), "slice-wise": outputs["slice-wise"],
                                       "lifted": outputs["lifted"], "target": target},
                              title=f"{pair.subject}: phantom T1 -> T2, DDIM-{s.sample_steps}",
                              error_of=[("slice-wise", "target"), ("lifted", "target")])
        files["figures"].append(str(figure))

    print("[5/5] evaluation")
    summary = {"intensity_scale": INTENSITY_RULE, "scale": scale, "sampler": f"ddim-{s.sample_steps}",
               "methods": {method: summarize(r) for method, r in rows.items()}, "subjects": rows}
    metrics_path = eval_dir / "metrics.json"
    tmp = metrics_path.with_name(".metrics.json.tmp")
    tmp.write_text(json.dumps(summary, indent=2, default=str))
    tmp.replace(metrics_path)
    files["metrics"] = str(metrics_path)
    print_report(files, summary)
    return {"files": files, "summary": summary}


def print_report(files: dict, summary: dict) -> None:
    print("\nlift3d demo: done")
    print(f"  model (safetensors):  {files['model']}")
    print(f"  synthesised NIfTI:    {', '.join(files['nifti'])}")
    print(f"  metrics JSON:         {files['metrics']}")
    print(f"  orthogonal views PNG: {', '.join(files['figures'])}")
    print("\n  method       MAE      SSIM     PSNR     z-inconsistency   (mean over held-out volumes, [0, 255])")
    for method, stats in summary["methods"].items():
        values = [stats[k]["mean"] for k in ("mae", "ssim", "psnr", "z_inconsistency")]
        print(f"  {method:<11}" + "".join(f"{v:9.3f}" for v in values[:3]) + f"{values[3]:12.3f}")
