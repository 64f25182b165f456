"""The model card every fitted model folder carries (``README.md``): what it is, what it was trained on, its
plan, its test scores, and the lines that load it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lift3d.io.writing import write_text_atomic


def _scores(results: dict[str, Any]) -> list[str]:
    lines = ["| method | PSNR | SSIM | MAE | network passes |", "| --- | --- | --- | --- | --- |"]
    for name, entry in results.get("methods", {}).items():
        s = entry["summary"]
        lines.append(f"| {name} | {s['psnr']['mean']:.2f} | {s['ssim']['mean']:.4f} | {s['mae']['mean']:.2f} | "
                     f"{entry['unet_evaluations']} |")
    return lines


def write_fit_card(folder: Path, ctx: Any, lifted: Any, results: dict[str, Any]) -> Path:
    """Write ``folder/README.md`` for the lifted model ``lifted`` of the fit ``ctx`` with its ``results``."""
    request, plan = ctx.request, ctx.plan
    data = request.options.get("root", request.dataset)
    text = "\n".join([
        f"# lift3d model: {request.source} -> {request.target}",
        "",
        "A 2D diffusion U-Net lifted into a volume-aware 3D model by lift3d (Make-A-Volume): stage 1 trained "
        "slice-wise, stage 2 fine-tuned on whole volumes with volumetric layers. It is **not** a plain "
        "`diffusers` model: `UNet2DModel.from_pretrained` on this folder would drop the volumetric layers. "
        "Load it with lift3d:",
        "",
        "```",
        f"lift3d predict --model {ctx.request.out} --source {request.source}.nii.gz --out predictions",
        "```",
        "",
        "```",
        "from lift3d.recipes.predict import predict_volume",
        f"result = predict_volume('{ctx.request.out}', '{request.source}.nii.gz')  # .image: on the input's grid",
        "```",
        "",
        "## Training",
        "",
        f"- data: `{request.dataset}` ({Path(str(data)).name}), source `{request.source}`, target `{request.target}`; "
        f"{len(ctx.splits['train'])} training, {len(ctx.splits['val'])} validation, {len(ctx.splits['test'])} "
        "test subjects (`split.json` of the run)",
        f"- grid: {plan.num_slices} {plan.slice_axis} slices of {plan.size} x {plan.size}; U-Net widths "
        f"{plan.widths}; objective `{plan.objective}`",
        f"- stage 1: {plan.stage1_steps} steps x {plan.stage1_batch} slices; stage 2: {plan.stage2_steps} steps, "
        "the variant and step best on validation",
        *([f"- distilled ({lifted.folder.parent.name.removeprefix('distill-')}) from the chosen lifted model into "
           "this one- or two-pass student, the family and sampling best on validation (`choose_student.json`)"]
          if lifted.name == "lifted-student" else []),
        f"- sampling (chosen on validation): {lifted.description}, {lifted.evaluations} network passes per volume",
        "",
        "## Test scores",
        "",
        *_scores(results),
        "",
    ])
    path = folder / "README.md"
    write_text_atomic(path, text)
    return path
