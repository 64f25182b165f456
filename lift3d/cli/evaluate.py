"""``lift3d-evaluate``: score synthesized NIfTI volumes against their targets (MAE, PSNR, SSIM of
Make-A-Volume's Tables 1-2, plus a z-consistency score; per-plane, through-plane and multi-scale scores
of ``lift3d.evaluation.planes``; with ``--segmenter``, tissue Dice of ``lift3d.evaluation.segmentation``)
and draw Fig. 3-style orthogonal views.

Writes ``metrics.csv`` (one row per subject, text cells safe to open in a spreadsheet),
``summary.json`` (mean and std per metric, and the intensity-scale rule), ``figures/<subject>.png`` and,
with ``--report``, ``report.html`` (one self-contained page, ``lift3d.evaluation.report.write_report``)
into ``--out``. Everything is written into a hidden staging folder first and published together only
when every subject succeeded: the figures folder is replaced whole (no figure of an earlier run stays
beside new results), and a failed publication puts the earlier results back. No output path may be a
link. Predictions are matched to their targets by ``lift3d.cli._matching``. Every file is read
through ``lift3d.data.nifti.open_nifti``, which checks its header (and the memory its voxels need)
before any voxel is read; folders are listed without hidden files, so a temporary left by a killed
writer is never taken for a prediction.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path
from typing import Sequence

import nibabel as nib
import numpy as np
from tqdm import tqdm

from lift3d.cli._common import UserError, run_cli
from lift3d.cli._matching import NAME_FIELD, Subject, collect_subjects
from lift3d.data.align import field_of_view_overlap, world_bounds
from lift3d.data.nifti import load_image, open_nifti
from lift3d.io.errors import Lift3dError
from lift3d.io.tables import spreadsheet_safe, write_rows
from lift3d.io.writing import clean_stale_temporaries, commit_together, open_new, refuse_links, temporary_path
from lift3d.data.orientation import SLICE_AXES, to_slices
from lift3d.evaluation.figures import save_orthogonal_views
from lift3d.evaluation.metrics import (DATA_RANGE, INTENSITY_RULE, METRICS, PLANE_METRICS, SSIM_WIN_SIZE, UNCERTAINTY_METRICS,
                            summarize, uncertainty_scores)
from lift3d.evaluation.planes import evaluate_all, ms_ssim_minimum_size, ms_ssim_note
from lift3d.evaluation.report import REPORT_NAME, write_report
from lift3d.evaluation.segmentation import PREFIXES as DICE_PREFIXES, file_tissue_dice, load_segmenter

CSV_NAME = "metrics.csv"
SUMMARY_NAME = "summary.json"
FIGURES_DIR = "figures"

# Column titles of the figure (in-plane view, then the two through-plane views) per slice axis.
PLANE_NAMES = {
    "axial": ("axial", "coronal", "sagittal"),
    "coronal": ("coronal", "axial", "sagittal"),
    "sagittal": ("sagittal", "axial", "coronal"),
}

NON_FINITE_RULE = "non-finite numbers (a perfect PSNR is inf) are written as the strings \"inf\", \"-inf\", \"nan\""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lift3d-evaluate",
        description=(
            "Compare predicted 3D volumes with their targets. Metrics: MAE, PSNR (dB), 3D SSIM, "
            "z_inconsistency (mean |dz(pred) - dz(target)| / mean |dz(target)|, dz = difference of "
            "consecutive slices; lower is better); per plane, psnr_/ssim_axial,coronal,sagittal (2D scores averaged "
            "over the slices of that plane); through_plane_mae and through_plane_correlation (of dz(pred) with "
            f"dz(target)); ms_ssim (3D multi-scale SSIM, n/a for a volume under {ms_ssim_minimum_size()} voxels along "
            "an axis). "
            "Intensity scale: " + INTENSITY_RULE + "."
        ),
        epilog=(
            f"Outputs in --out: {CSV_NAME} (one row per subject), {SUMMARY_NAME} (mean and population std "
            f"per metric, the intensity rule; {NON_FINITE_RULE}) and {FIGURES_DIR}/<subject>.png "
            "(axial/coronal/sagittal mid-planes of source, prediction, target, |error| and, with --std, the std "
            f"map); with --report, {REPORT_NAME}. A score that cannot be taken (ms_ssim of a small volume) is an "
            "empty cell in the CSV, n/a in the printed table, and a printed note says why. "
            "Nothing is written unless every subject is evaluated."
        ),
    )
    _add_volume_options(parser)
    parser.add_argument(
        "--slice-axis", choices=tuple(PLANE_NAMES), default="axial",
        help="the axis the 2D model sliced along. Every volume is reoriented to the closest canonical (RAS) "
        "orientation and this axis is put first; z_inconsistency differences along it (default: axial)",
    )
    parser.add_argument(
        "--report", action="store_true",
        help=f"also write {REPORT_NAME}: one self-contained HTML page (images embedded, no network) with the "
        "scores in tables sortable by a click on a header, their distributions and every subject's figure",
    )
    parser.add_argument(
        "--segmenter", metavar="DIR",
        help="a segmenter folder (lift3d-finetune --run.stage segmenter writes one; a plugin's own folder names its "
        "plugin in segmenter.json): segment prediction and target and score, per tissue, the Dice of the two "
        "segmentations (dice_csf, dice_gm, dice_wm, dice_mean; within --mask where given)",
    )
    parser.add_argument(
        "--labels", nargs="+", metavar="PATH",
        help="with --segmenter, tissue label maps (whole numbers: 0 = background, then 1, 2, ... in the segmenter's "
        "class order): one per subject in --pred order, or a directory matched by file name; adds dice_label_* (the "
        "prediction's segmentation against them) and dice_target_label_* (the target's: the segmenter's own ceiling)",
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR",
        help="output directory; created if missing. The outputs of an earlier run there are replaced together "
        f"(the whole {FIGURES_DIR}/ folder included); none of them may be a link",
    )
    return parser


def _add_volume_options(parser: argparse.ArgumentParser) -> None:
    """--pred, and the volumes matched to each prediction (``lift3d.cli._matching``)."""
    parser.add_argument(
        "--pred", nargs="+", required=True, metavar="PATH",
        help="predicted NIfTI files (.nii or .nii.gz), or one directory of them (lift3d-synthesize's --out: "
        "<name>_synth.nii.gz; std maps beside them, <name>_synth_std.nii.gz, are not predictions); the subject "
        "name is the file name",
    )
    parser.add_argument(
        "--target", nargs="+", required=True, metavar="PATH",
        help="target NIfTI files: one per --pred file in the same order; the one target of a --pred directory "
        "holding one prediction; files matched by name to a --pred directory's predictions (<name>.nii.gz, or "
        "<name>/T2.nii.gz as in a paired-nifti folder: --target data/*/T2.nii.gz); one directory holding, per "
        "prediction, a file of the same name or <name>.nii.gz (<name>_synth.nii.gz -> <name>.nii.gz); or a "
        f"pattern where {NAME_FIELD} stands for <name> ('data/{NAME_FIELD}/T2.nii.gz'). --mask, --source, --std "
        "and --labels are matched the same way",
    )
    parser.add_argument(
        "--mask", nargs="+", metavar="PATH",
        help="optional masks (voxels > 0 count): one file for every subject, one file per subject in --pred "
        "order, or a directory matched by file name. MAE and PSNR use the masked voxels, SSIM averages its "
        "map over them, z_inconsistency uses voxels inside the mask in both neighbouring slices",
    )
    parser.add_argument(
        "--source", nargs="+", metavar="PATH",
        help="optional source-modality volumes, shown in the figures only: one per subject in --pred order, "
        "or a directory matched by file name",
    )
    parser.add_argument(
        "--std", nargs="+", metavar="PATH",
        help="optional per-voxel std maps of the predictions (lift3d-synthesize --samples K writes them to "
        "<out>/std/<name>_std.nii.gz): one per subject in --pred order, or a directory holding, per prediction "
        "<stem>.nii.gz, a file of the same name, or <stem>_std.nii.gz (<name>_std.nii.gz for "
        "<name>_synth.nii.gz). Each figure gets a std row, and metrics.csv the columns std_mean (0-255 scale) and "
        "std_error_spearman (rank correlation of std with |error|: 1 = the map points at the errors, 0 = it "
        "says nothing about them)",
    )


def _load_header(path: Path, role: str) -> nib.Nifti1Image:
    """Open a NIfTI lazily (its header checked, no voxel read) to check it is 3D before any work."""
    try:
        image = open_nifti(path)
    except Lift3dError as exc:  # a VolumeError, or a BudgetError for a header past the memory budget
        raise type(exc)(f"cannot read {role} {exc}") from None
    shape = image.shape
    # (x, y, z, 1) is a 3D volume stored with a singleton time axis.
    if len(shape) < 3 or any(size != 1 for size in shape[3:]):
        raise UserError(f"{role} {path} is not a 3D image: shape {shape}")
    return image


def load_volume(path: Path, slice_axis: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a 3D image as float32 ``(n, h, w)`` for ``slice_axis`` (the project's one convention,
    ``lift3d.data.orientation.to_slices``) and its voxel spacing in the same axis order."""
    canonical = nib.as_closest_canonical(load_image(path))
    zooms = canonical.header.get_zooms()[:3]
    spacing = tuple(float(zooms[axis]) for axis in SLICE_AXES[slice_axis])
    return to_slices(canonical, slice_axis), spacing  # type: ignore[return-value]


def _canonical_grid(image: nib.Nifti1Image) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine after reorientation to RAS, from the header alone (no voxel is read)."""
    ornt = nib.io_orientation(image.affine)
    affine = image.affine @ nib.orientations.inv_ornt_aff(ornt, image.shape[:3])
    shape = tuple(int(image.shape[int(axis)]) for axis in ornt[:, 0])
    return shape, affine


def _same_canonical_grid(a: nib.Nifti1Image, b: nib.Nifti1Image, tolerance: float = 0.01) -> bool:
    """Voxel-aligned once both are reoriented to RAS, as evaluation compares them (``same_grid`` after
    ``as_closest_canonical``)."""
    (shape_a, affine_a), (shape_b, affine_b) = _canonical_grid(a), _canonical_grid(b)
    return shape_a == shape_b and bool(np.allclose(affine_a, affine_b, rtol=0.0, atol=tolerance))


def check_shapes(subjects: list[Subject]) -> None:
    """Fail before any work if a subject's files disagree in shape or grid, or are not 3D (headers only).

    Scores compare voxel with voxel, so every file must lie on the target's grid: the same shape and,
    within 0.01 mm, the same affine.
    """
    for subject in subjects:
        target = _load_header(subject.target, "target")
        others = [("prediction", subject.prediction), ("mask", subject.mask), ("source", subject.source),
                  ("std", subject.std), ("labels", subject.labels)]
        for role, path in others:
            if path is None:
                continue
            image = _load_header(path, role)
            if image.shape[:3] != target.shape[:3]:
                raise UserError(
                    f"shape mismatch for subject '{subject.name}': {role} {path} has shape {image.shape[:3]} "
                    f"but target {subject.target} has shape {target.shape[:3]}"
                )
            if not _same_canonical_grid(image, target):
                overlap = field_of_view_overlap(image, target)
                raise UserError(
                    f"grid mismatch for subject '{subject.name}': {role} {path} lies elsewhere in space than target "
                    f"{subject.target} (affines differ; the fields of view share {overlap:.0%}; in world mm, "
                    f"{role}: {world_bounds(image)}; target: {world_bounds(target)}). Scores compare voxel with "
                    "voxel: resample it onto the target's grid first"
                )


def check_labels(subjects: list[Subject], classes: tuple[str, ...]) -> None:
    """Refuse --labels files whose voxels are not whole numbers in 0..len(classes), before any work
    (a label of 0.5 or 1.5 would otherwise be rounded and scored)."""
    for subject in subjects:
        if subject.labels is None:
            continue
        data = np.asarray(load_image(subject.labels).dataobj)
        fractional = data[data != np.round(data)]
        outside = data[(data < 0) | (data > len(classes))]
        valid = f"valid: whole numbers 0 (background) to {len(classes)} ({', '.join(classes)})"
        if fractional.size:
            raise UserError(f"labels {subject.labels}: {fractional.size} voxel(s) are not whole numbers (e.g. "
                            f"{float(fractional.flat[0]):g}); {valid}")
        if outside.size:
            raise UserError(f"labels {subject.labels}: {outside.size} voxel(s) lie outside 0..{len(classes)} "
                            f"(e.g. {float(outside.flat[0]):g}); {valid}")


def evaluate_subject(subject: Subject, slice_axis: str, figure_path: Path, segmenter=None) -> dict[str, object]:
    target, spacing = load_volume(subject.target, slice_axis)
    prediction, _ = load_volume(subject.prediction, slice_axis)
    if prediction.shape != target.shape:
        raise UserError(
            f"orientation mismatch for subject '{subject.name}': after reorienting, prediction {subject.prediction} "
            f"has shape {prediction.shape} but target {subject.target} has {target.shape}"
        )
    mask = None if subject.mask is None else load_volume(subject.mask, slice_axis)[0] > 0
    try:
        metrics = evaluate_all(prediction, target, mask, slice_axis=slice_axis)
    except ValueError as exc:
        raise UserError(f"subject '{subject.name}': {exc}") from None
    volumes = {}
    if subject.source is not None:
        volumes["source"] = load_volume(subject.source, slice_axis)[0]
    volumes["prediction"] = prediction
    volumes["target"] = target
    uncertainty = None
    if subject.std is not None:
        std = load_volume(subject.std, slice_axis)[0]
        try:
            metrics |= uncertainty_scores(std, prediction, target, mask)
        except ValueError as exc:
            raise UserError(f"subject '{subject.name}': std map {subject.std}: {exc}") from None
        uncertainty = {"prediction": std}
    if segmenter is not None:  # downstream segmentation: Dice per tissue (lift3d.evaluation.segmentation)
        metrics |= file_tissue_dice(segmenter, subject.prediction, subject.target, subject.labels, subject.mask,
                                    slice_axis)
    save_orthogonal_views(
        figure_path, volumes, title=subject.name, error_of=("prediction", "target"), uncertainty=uncertainty,
        spacing=spacing, plane_names=PLANE_NAMES[slice_axis],
    )
    return {
        "subject": subject.name,
        **metrics,
        "prediction": str(subject.prediction),
        "target": str(subject.target),
        "mask": "" if subject.mask is None else str(subject.mask),
        **({} if subject.std is None else {"std": str(subject.std)}),
    }


def _dice_columns(rows: list[dict[str, object]]) -> list[str]:
    """The --segmenter's scores (dice_*), in the order ``lift3d.evaluation.segmentation.tissue_dice`` gives them."""
    return [name for name in rows[0] if name.startswith(DICE_PREFIXES["segmentation"])]


def _json_number(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def build_summary(rows: list[dict[str, object]], slice_axis: str, notes: Sequence[str] = ()) -> dict[str, object]:
    dice = _dice_columns(rows)
    summary = summarize(rows) | (summarize(rows, dice) if dice else {})
    return {
        "n_subjects": len(rows),
        "slice_axis": slice_axis,
        "intensity_scale": INTENSITY_RULE,
        "data_range": DATA_RANGE,
        "ssim": f"skimage.metrics.structural_similarity on the 3D volume, uniform {SSIM_WIN_SIZE}^3 window",
        "z_inconsistency": "mean |dz(pred) - dz(target)| / mean |dz(target)|, dz along the slice axis; lower is better",
        "per_plane": f"psnr_<plane>, ssim_<plane>: skimage's 2D PSNR and SSIM (uniform {SSIM_WIN_SIZE}^2 window) of "
                     "each slice of that plane (within the mask), averaged over the slices",
        "through_plane": "through_plane_mae: mean |dz(pred) - dz(target)| on the 0-255 scale; through_plane_correlation: "
                         "Pearson r of dz(pred) with dz(target); dz along the slice axis",
        "ms_ssim": f"torchmetrics' 3D multi-scale SSIM (Gaussian sigma 1.5, 5 scales, normalize='relu'); null (not "
                   f"scored) for a volume under {ms_ssim_minimum_size()} voxels along an axis",
        "notes": list(notes),
        "std": "population standard deviation (ddof=0) over subjects",
        "non_finite": NON_FINITE_RULE,
        **({"dice": "torchmetrics' Dice per tissue of the --segmenter's labels: dice_<tissue> of the prediction's with "
                    "the target's segmentation, dice_label_<tissue> of the prediction's and dice_target_label_<tissue> of "
                    "the target's with --labels; dice_*_mean over the tissues; nan: a tissue absent from both"}
           if dice else {}),
        "higher_is_better": {name: (METRICS | PLANE_METRICS | UNCERTAINTY_METRICS | dict.fromkeys(dice, True)).get(name)
                             for name in summary},
        "metrics": {  # a metric no subject could be scored by: mean and std null
            name: {"mean": _json_number(stats["mean"]) if stats["n"] else None,
                   "std": _json_number(stats["std"]) if stats["n"] else None, "n": stats["n"]}
            for name, stats in summary.items()
        },
    }


OUTPUTS = (FIGURES_DIR, REPORT_NAME, CSV_NAME, SUMMARY_NAME)


def _prepare_out(out: Path) -> tuple[Path, bool]:
    """Create ``out`` if needed and a staging folder inside it; return (staging, created_out).
    ``out`` may be a link (the user chose it); none of the outputs in it may be."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    refuse_links(out, *OUTPUTS)
    if (out / FIGURES_DIR).exists() and not (out / FIGURES_DIR).is_dir():
        raise UserError(f"--out {out}: {out / FIGURES_DIR} exists and is not a folder; the figures go there")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        clean_stale_temporaries(out)  # what a killed run left
        staging = temporary_path(out / "evaluation")
        staging.mkdir()
    except OSError as exc:
        raise UserError(f"cannot write to --out {out}: {exc.strerror or exc}") from None
    return staging, created


def _publish(staging: Path, out: Path) -> None:
    """Move the staged outputs into ``out`` together (``lift3d.io.writing.commit_together``): the
    figures folder whole, replacing the earlier one, and the CSV and summary last, so their presence means
    the figures (and the report) are there. A report of an earlier run goes unless this run wrote one."""
    names = [name for name in OUTPUTS if (staging / name).exists()]
    stale = [out / REPORT_NAME] if REPORT_NAME not in names and (out / REPORT_NAME).exists() else []
    commit_together([(staging / name, out / name) for name in names], remove=stale)


def _write_csv(path: Path, rows: list[dict[str, object]]) -> None:
    scored = [name for name in UNCERTAINTY_METRICS if name in rows[0]]
    planes = [name for name in PLANE_METRICS if name in rows[0]]
    columns = ["subject", *METRICS, *planes, *scored, *_dice_columns(rows), "prediction", "target", "mask",
               *(["std"] if scored else [])]
    # A score not taken (None) is an empty cell; a number is written in full; text (a subject name from a
    # file name) that a spreadsheet would run as a formula is neutralised.
    cells = [{key: (repr(row[key]) if isinstance(row[key], float) else spreadsheet_safe(row[key])) for key in columns}
             for row in rows]
    with open_new(path, newline="") as handle:
        write_rows(handle, columns, cells, neutralise=False)


def _format(value: float | str | None) -> str:
    return "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else value


def score_notes(subjects: list[Subject], rows: list[dict[str, object]], slice_axis: str) -> list[str]:
    """One line per reason a score could not be taken (ms_ssim of a small volume), with how many subjects it hit."""
    reasons: dict[str, int] = {}
    for subject, row in zip(subjects, rows):
        if row.get("ms_ssim", 0.0) is None:
            shape, _ = _canonical_grid(_load_header(subject.target, "target"))
            note = ms_ssim_note(tuple(shape[axis] for axis in SLICE_AXES[slice_axis]))
            reasons[str(note)] = reasons.get(str(note), 0) + 1
    return [f"{note}; {count} of {len(rows)} subjects" for note, count in reasons.items()]


@run_cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    subjects, skipped = collect_subjects(args)
    check_shapes(subjects)
    segmenter = load_segmenter(args.segmenter) if args.segmenter else None  # a bad folder stops here, in one line
    if segmenter is not None:
        check_labels(subjects, tuple(segmenter.classes))
    if skipped:
        print(f"lift3d-evaluate: {len(skipped)} std map(s) beside the predictions are not scored as predictions "
              f"({', '.join(p.name for p in skipped[:3])}{', ...' if len(skipped) > 3 else ''}); give --std "
              f"{skipped[0].parent} to score them as std maps")
    out = Path(args.out)
    staging, created_out = _prepare_out(out)
    try:
        (staging / FIGURES_DIR).mkdir()
        rows = []
        for subject in tqdm(subjects, desc="lift3d-evaluate", unit="subject", disable=None):
            rows.append(evaluate_subject(subject, args.slice_axis, staging / FIGURES_DIR / f"{subject.name}.png",
                                         segmenter))
        _write_csv(staging / CSV_NAME, rows)
        notes = score_notes(subjects, rows, args.slice_axis)
        summary = build_summary(rows, args.slice_axis, notes)
        if args.report:
            write_report(staging / REPORT_NAME, rows, title=f"lift3d-evaluate: {len(rows)} subjects", notes=notes,
                         views={s.name: staging / FIGURES_DIR / f"{s.name}.png" for s in subjects})
        (staging / SUMMARY_NAME).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        _publish(staging, out)
    except OSError as exc:  # named by its final path, not the staging folder's
        where = Path(exc.filename) if exc.filename else out
        if staging in where.parents:
            where = out / where.relative_to(staging)
        raise UserError(f"cannot write {where}: {exc.strerror or exc}; the earlier results in {out} are kept") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created_out and not any(out.iterdir()):
            out.rmdir()
    report = f", {out / REPORT_NAME}" if args.report else ""
    print(f"{len(rows)} subjects -> {out / CSV_NAME}, {out / SUMMARY_NAME}, {out / FIGURES_DIR}/{report}")
    for name, stats in summary["metrics"].items():  # type: ignore[union-attr]
        score = f"{_format(stats['mean'])} +/- {_format(stats['std'])}" if stats["n"] else "n/a (not scored, see the note)"
        print(f"  {name:26s} {score}")
    for note in notes:
        print(f"note: {note}")
    return 0
