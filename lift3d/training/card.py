"""The model card every exported model folder carries (``README.md``): what the folder is, what it was trained
on, how, and the lines that load it, so that nobody mistakes a lifted model for a plain 2D one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lift3d.io.writing import write_text_atomic

CARD = "README.md"


def _training(config: dict[str, Any]) -> list[str]:
    run, data, model = config.get("run", {}), config.get("data", {}), config.get("model", {})
    options = data.get("options") or {}
    grid = " x ".join(str(options[k]) for k in ("num_slices", "size") if k in options)
    return [f"- data: dataset `{data.get('dataset')}`"
            + (f", {options['source']} -> {options['target']}" if {"source", "target"} <= set(options) else "")
            + (f", grid {grid}" if grid else ""),
            f"- U-Net widths {model.get('block_out_channels')}, {run.get('max_steps')} steps, seed {run.get('seed')}",
            "- the whole configuration: `lift3d_training.json` (`config`); the training log: the run folder's "
            "`logs/metrics.csv`"]


def write_model_card(folder: Path, settings: dict[str, Any], lifted: bool, shown: Path | None = None) -> Path:
    """Write ``folder/README.md`` for an export whose training settings are ``settings``; ``shown`` is the folder
    as the card names it (where the export ends up; default ``folder``)."""
    name = str(shown or folder)
    kind = ("a 2D diffusion U-Net lifted into a volume-aware 3D model (Make-A-Volume): volumetric layers along "
            "the slices, in `volumetric.safetensors` and the weights. It is **not** a plain diffusers model: "
            "`UNet2DModel.from_pretrained` on this folder returns the 2D model without its volumetric layers"
            if lifted else "a 2D diffusion U-Net trained slice by slice (diffusers' `UNet2DModel` folder)")
    lines = [
        f"# lift3d model ({settings.get('stage')})", "", f"This folder holds {kind}.", "",
        "Synthesise with it (NIfTI in, NIfTI out on the source's grid):", "", "```",
        f"lift3d-synthesize --model {name} --source T1.nii.gz --out synth --fast", "```", "",
        "Load it in Python:", "", "```",
        "from lift3d.sampling.model import load_synthesis_model",
        f"model = load_synthesis_model('{name}')" + ("  # the U-Net alone: lift3d.load_lifted(folder)"
                                                            if lifted else ""),
        "```", "", "## Training", "", f"- objective `{settings.get('objective', 'ddpm')}`, prediction "
        f"`{settings.get('prediction_type')}`, conditioning `{settings.get('conditioning')}`",
        *_training(settings.get("config") or {}), ""]
    path = folder / CARD
    write_text_atomic(path, "\n".join(lines))
    return path
