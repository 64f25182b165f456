"""Volume metrics for cross-modality 3D synthesis: MAE, PSNR and SSIM as in Make-A-Volume
(MICCAI 2023, Tables 1-2), plus a through-plane consistency score for the slice striping of Fig. 3.

Volumes are numpy arrays ``(n, h, w)`` with the slice axis first.

Intensity scale (the one rule every metric here uses, see ``scale_to_target_range``):
both volumes are mapped linearly to ``[0, DATA_RANGE] = [0, 255]`` by the target's own
minimum and maximum over the whole volume (so the target spans exactly ``[0, 255]``), and the
mapped prediction is clipped to ``[0, 255]``. The paper's MAE (~5-10) and PSNR (25-30 dB) are
consistent with this scale. The metrics are therefore invariant to any positive affine change
of intensities applied to both volumes together.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import numpy as np
from skimage.metrics import structural_similarity

DATA_RANGE = 255.0
SSIM_WIN_SIZE = 7

INTENSITY_RULE = (
    "both volumes mapped linearly to [0, 255] by the target's whole-volume min and max "
    "(target spans exactly [0, 255]); the mapped prediction is clipped to [0, 255]; data_range=255"
)

# Name -> True when higher is better. Order is the column order of reports.
METRICS: dict[str, bool] = {"mae": False, "psnr": True, "ssim": True, "z_inconsistency": False}
# The viewing planes, named by the RAS axis their slices are perpendicular to (R, A, S).
PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")
# The scores of ``lift3d.evaluation.planes`` (``evaluate_all``): per plane, across slices, multi-scale.
# ``ms_ssim`` is None for a volume too small for it (``lift3d.evaluation.planes.ms_ssim_note`` says why).
PLANE_METRICS: dict[str, bool] = {
    **{f"psnr_{plane}": True for plane in PLANES},
    **{f"ssim_{plane}": True for plane in PLANES},
    "through_plane_mae": False,
    "through_plane_correlation": True,
    "ms_ssim": True,
}
# Scores of an uncertainty map (``uncertainty_scores``); None: no better direction (a magnitude).
UNCERTAINTY_METRICS: dict[str, bool | None] = {"std_mean": None, "std_error_spearman": True}


def _as_volume(array: np.ndarray, name: str) -> np.ndarray:
    volume = np.asarray(array)
    if volume.ndim != 3:
        raise ValueError(f"{name} must be a 3D volume (n, h, w); got shape {volume.shape}")
    if not (np.issubdtype(volume.dtype, np.floating) or np.issubdtype(volume.dtype, np.integer)):
        raise TypeError(f"{name} must hold real numbers; got dtype {volume.dtype}")
    volume = volume.astype(np.float64, copy=False)
    if not np.all(np.isfinite(volume)):
        raise ValueError(f"{name} contains {int(np.sum(~np.isfinite(volume)))} NaN or infinite voxels")
    return volume


def check_inputs(
    pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Float64 ``(n, h, w)`` copies of a prediction and its target (same shape, finite) and the mask
    (boolean, same shape, not empty), or a one-line error naming what is wrong."""
    pred = _as_volume(pred, "prediction")
    target = _as_volume(target, "target")
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} does not match target shape {target.shape}")
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            raise TypeError(f"mask must be a boolean array; got dtype {mask.dtype} (pass mask > 0)")
        if mask.shape != target.shape:
            raise ValueError(f"mask shape {mask.shape} does not match target shape {target.shape}")
        if not mask.any():
            raise ValueError("mask is empty: it selects no voxel")
    return pred, target, mask


def scale_to_target_range(
    pred: np.ndarray, target: np.ndarray, *, data_range: float = DATA_RANGE
) -> tuple[np.ndarray, np.ndarray]:
    """Map both volumes to ``[0, data_range]`` by the target's min/max; clip the prediction.

    Returns float64 copies ``(pred_scaled, target_scaled)``. A constant target has no range to
    scale by and raises ``ValueError``.
    """
    pred = _as_volume(pred, "prediction")
    target = _as_volume(target, "target")
    lo, hi = float(target.min()), float(target.max())
    if hi <= lo:
        raise ValueError(f"target is constant (every voxel is {lo}); it has no intensity range to scale by")
    scale = data_range / (hi - lo)
    target_scaled = (target - lo) * scale
    pred_scaled = np.clip((pred - lo) * scale, 0.0, data_range)
    return pred_scaled, target_scaled


def mean_absolute_error(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean ``|pred - target|`` over all voxels, or over the voxels where ``mask`` is True."""
    pred, target, mask = check_inputs(pred, target, mask)
    error = np.abs(pred - target)
    return float(error[mask].mean() if mask is not None else error.mean())


def peak_signal_to_noise_ratio(
    pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None, *, data_range: float = DATA_RANGE
) -> float:
    """``10 log10(data_range**2 / MSE)`` in dB, MSE within ``mask`` if given.

    Identical volumes have MSE 0 and give ``math.inf`` (not an error, not a large finite number).
    """
    pred, target, mask = check_inputs(pred, target, mask)
    squared = (pred - target) ** 2
    mse = float(squared[mask].mean() if mask is not None else squared.mean())
    if mse == 0.0:
        return math.inf
    return float(10.0 * np.log10(data_range**2 / mse))


def structural_similarity_3d(
    pred: np.ndarray,
    target: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    data_range: float = DATA_RANGE,
    win_size: int = SSIM_WIN_SIZE,
) -> float:
    """3D SSIM by ``skimage.metrics.structural_similarity`` (uniform ``win_size``**3 window).

    Without a mask this is exactly skimage's mean SSIM. With a mask, skimage's full SSIM map is
    averaged over the masked voxels, excluding (as skimage does) the border of
    ``(win_size - 1) // 2`` voxels where the window leaves the volume; so an all-True mask gives
    the unmasked value. Every axis must be at least ``win_size`` voxels long.
    """
    pred, target, mask = check_inputs(pred, target, mask)
    if min(target.shape) < win_size:
        raise ValueError(
            f"SSIM needs every axis to be at least win_size={win_size} voxels; got shape {target.shape}"
        )
    if mask is None:
        return float(structural_similarity(pred, target, data_range=data_range, win_size=win_size))
    _, ssim_map = structural_similarity(pred, target, data_range=data_range, win_size=win_size, full=True)
    pad = (win_size - 1) // 2
    interior = np.zeros_like(mask)
    interior[pad : mask.shape[0] - pad, pad : mask.shape[1] - pad, pad : mask.shape[2] - pad] = True
    selected = mask & interior
    if not selected.any():
        raise ValueError(
            f"mask selects no voxel at least {pad} voxels from the volume border, where SSIM is defined"
        )
    return float(ssim_map[selected].mean(dtype=np.float64))


def z_inconsistency(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Through-plane error relative to the target's own through-plane change (lower is better).

    ``mean |dz(pred) - dz(target)| / mean |dz(target)|`` with ``dz(v) = v[1:] - v[:-1]`` the
    difference between consecutive slices. With a mask, only voxel pairs whose two slices are
    both in the mask count. 0 for identical volumes; independent per-slice errors (striping in
    coronal/sagittal views) raise it much more than an error that varies smoothly along z.
    A target with no change along z gives 0 if the prediction has none either, else ``inf``.
    """
    pred, target, mask = check_inputs(pred, target, mask)
    if target.shape[0] < 2:
        raise ValueError(f"z_inconsistency needs at least 2 slices; got shape {target.shape}")
    dz_pred = np.diff(pred, axis=0)
    dz_target = np.diff(target, axis=0)
    if mask is not None:
        pairs = mask[1:] & mask[:-1]
        if not pairs.any():
            raise ValueError("mask has no voxel inside it in two consecutive slices")
        dz_pred, dz_target = dz_pred[pairs], dz_target[pairs]
    numerator = float(np.abs(dz_pred - dz_target).mean())
    denominator = float(np.abs(dz_target).mean())
    if denominator == 0.0:
        return 0.0 if numerator == 0.0 else math.inf
    return numerator / denominator


def evaluate_volumes(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> dict[str, float]:
    """All ``METRICS`` for one subject, after ``scale_to_target_range``."""
    pred, target, mask = check_inputs(pred, target, mask)
    pred, target = scale_to_target_range(pred, target)
    return {
        "mae": mean_absolute_error(pred, target, mask),
        "psnr": peak_signal_to_noise_ratio(pred, target, mask, data_range=DATA_RANGE),
        "ssim": structural_similarity_3d(pred, target, mask, data_range=DATA_RANGE),
        "z_inconsistency": z_inconsistency(pred, target, mask),
    }


def score_pair(pred, pair, reference: str = "target") -> dict[str, float | str]:
    """All ``METRICS`` of a prediction ``(n, h, w)`` for one ``VolumePair``:
    against its ``target``, or ``extra[reference]`` (``"clean_target"``), inside ``extra["mask"]`` where it has
    one. The row starts with the subject, as ``summarize`` and the reports expect."""
    extra = pair.extra or {}
    truth = pair.target if reference == "target" else extra[reference]
    mask = extra.get("mask")
    return {"subject": pair.subject, **evaluate_volumes(np.asarray(pred), truth[0].numpy(),
                                                        None if mask is None else mask[0].numpy())}


def uncertainty_scores(std: np.ndarray, pred: np.ndarray, target: np.ndarray,
                       mask: np.ndarray | None = None) -> dict[str, float]:
    """How well a per-voxel std map (the spread of K samples, ``lift3d.sampling.synthesis.synthesize_posterior``)
    points at the mean prediction's errors, on the metrics' [0, 255] scale (std x 255 / the target's range).

    ``std_mean``: the mean std over the (masked) voxels. ``std_error_spearman``: Spearman's rank
    correlation between std and ``|pred - target|`` over those voxels (``scipy.stats.spearmanr``);
    1 means the largest errors lie exactly where the samples disagree most, 0 that the map says
    nothing about where the errors are. A constant std map (or error) ranks nothing: 0.
    """
    from scipy.stats import spearmanr

    std = _as_volume(std, "std")
    pred, target, mask = check_inputs(pred, target, mask)
    if std.shape != target.shape:
        raise ValueError(f"std has shape {std.shape} but target has {target.shape}; they must match")
    if (std < 0).any():
        raise ValueError(f"std has {int((std < 0).sum())} negative voxels; a standard deviation is >= 0")
    lo, hi = float(target.min()), float(target.max())
    pred, target = scale_to_target_range(pred, target)
    std = std * (DATA_RANGE / (hi - lo))
    error = np.abs(pred - target)
    if mask is not None:
        std, error = std[mask], error[mask]
    std, error = std.ravel(), error.ravel()
    constant = np.ptp(std) == 0 or np.ptp(error) == 0
    return {"std_mean": float(std.mean()),
            "std_error_spearman": 0.0 if constant else float(spearmanr(std, error).statistic)}


def summarize(rows: Iterable[Mapping[str, object]], names: Iterable[str] | None = None) -> dict[str, dict[str, float]]:
    """Mean and population std (ddof=0) per metric over per-subject rows, plus the count ``n``.

    Each row is a mapping like ``evaluate_volumes``' result, optionally with
    ``PLANE_METRICS`` and ``UNCERTAINTY_METRICS``; other keys (a subject name, file paths) are
    ignored unless ``names`` lists them (``names`` replaces the known metrics, e.g. to add ``dice_*``
    columns). Every row must carry the same metrics. A None value is a score that could not be taken
    (``ms_ssim`` of a small volume): it is left out, ``n`` counts the others, and where every value is None
    the mean and std are NaN. If any value is infinite (a perfect PSNR), the mean is ``inf`` and the std ``nan``.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("summarize needs at least one row; got none")
    if names is None:
        names = [name for name in (*METRICS, *PLANE_METRICS, *UNCERTAINTY_METRICS) if name in rows[0]]
        if not names:
            raise ValueError(f"first row has none of the metrics {', '.join(METRICS)}; its keys: {', '.join(map(str, rows[0]))}")
    summary: dict[str, dict[str, float]] = {}
    for name in names:
        values = []
        for index, row in enumerate(rows):
            if name not in row:
                raise ValueError(f"row {index} has no '{name}' value; its keys: {', '.join(map(str, row))}")
            if row[name] is None:
                continue
            values.append(float(row[name]))  # type: ignore[arg-type]
            if math.isnan(values[-1]):
                raise ValueError(f"'{name}' is NaN in row {index}")
        array = np.asarray(values, dtype=np.float64)
        if not values:
            mean = std = math.nan
        elif np.isfinite(array).all():
            mean, std = float(array.mean()), float(array.std())
        else:
            mean, std = float(array.mean()), math.nan
        summary[name] = {"mean": mean, "std": std, "n": len(values)}
    return summary


def paired_differences(rows_a: Iterable[Mapping[str, object]], rows_b: Iterable[Mapping[str, object]],
                       confidence: float = 0.95, metrics: Mapping[str, bool] | None = None
                       ) -> dict[str, dict[str, object]]:
    """Per-metric paired differences ``b - a`` over the same subjects, with a Student-t interval.

    ``rows_a`` and ``rows_b`` are per-subject rows (``evaluate_volumes`` plus ``subject``) of
    two methods; they are paired by ``subject`` and must hold the same subjects. Per metric: the
    mean difference, its ``confidence`` interval (``scipy.stats.ttest_rel``; NaN bounds for one
    subject), how many subjects favour ``b`` (by the metric's direction) and each subject's
    difference. ``metrics`` maps names to whether higher is better (default ``METRICS``); a metric
    missing, or not scored (None) for any subject, is left out.
    """
    from scipy.stats import ttest_rel

    a = {str(row["subject"]): row for row in rows_a}
    b = {str(row["subject"]): row for row in rows_b}
    if sorted(a) != sorted(b):
        raise ValueError(f"paired differences need the same subjects; got {sorted(a)} and {sorted(b)}")
    subjects = sorted(a)
    result: dict[str, dict[str, object]] = {}
    for name, higher_is_better in (METRICS if metrics is None else metrics).items():
        if any(a[s].get(name) is None or b[s].get(name) is None for s in subjects):
            continue
        xa = np.asarray([float(a[s][name]) for s in subjects])
        xb = np.asarray([float(b[s][name]) for s in subjects])
        diff = xb - xa
        if len(subjects) > 1 and np.ptp(diff) > 0:
            interval = ttest_rel(xb, xa).confidence_interval(confidence)
            low, high = float(interval.low), float(interval.high)
        else:  # one subject, or the same difference everywhere: no spread to build an interval from
            low = high = float(diff.mean()) if len(subjects) > 1 else math.nan
        better = diff > 0 if higher_is_better else diff < 0
        result[name] = {"mean": float(diff.mean()), "ci": [low, high], "confidence": confidence,
                        "b_better": int(better.sum()), "n": len(subjects),
                        "per_subject": dict(zip(subjects, map(float, diff)))}
    return result
