"""Scores per viewing plane and across slices, as synthesis challenges report them beside the volume's
MAE, PSNR and SSIM: 2D PSNR and SSIM averaged over the axial, coronal and sagittal slices, the error of
the slice-to-slice differences (the striping of slice-wise synthesis, Make-A-Volume Fig. 3, MICCAI 2023),
and multi-scale SSIM (Wang, Simoncelli and Bovik, Asilomar 2003).

Volumes are ``(n, h, w)`` with the model's slice axis first (``lift3d.data.orientation.to_slices``);
which array axis holds which plane follows from that slice axis (``plane_axes``). The functions
score the volumes as given; ``evaluate_all`` first maps both to [0, 255] by the target's range
(``lift3d.evaluation.metrics.scale_to_target_range``), as every lift3d score does.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from scipy.stats import pearsonr
from skimage.metrics import peak_signal_noise_ratio, structural_similarity
from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

from lift3d.data.orientation import SLICE_AXES, check_slice_axis
from lift3d.evaluation.metrics import (DATA_RANGE, PLANES, SSIM_WIN_SIZE, check_inputs,
                                       evaluate_volumes, scale_to_target_range)
from lift3d.io.errors import Lift3dError

# The RAS axis each plane's slices are perpendicular to.
_PLANE_RAS_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}
# Wang et al. (2003): a Gaussian window of sigma 1.5 (11 voxels wide) at 5 scales with these weights.
MS_SSIM_SIGMA = 1.5
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def plane_axes(slice_axis: str = "axial") -> dict[str, int]:
    """Plane name -> the array axis of an ``(n, h, w)`` volume sliced along ``slice_axis`` whose slices
    are that plane. For ``"axial"`` (``n, h, w`` = S, A, R): axial 0, coronal 1, sagittal 2."""
    order = SLICE_AXES[check_slice_axis(slice_axis)]
    return {plane: order.index(_PLANE_RAS_AXIS[plane]) for plane in PLANES}


def _check_axis(axis: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or axis not in (0, 1, 2):
        raise Lift3dError(f"axis must be 0, 1 or 2 (the array axis whose slices are scored); got {axis!r}")
    return int(axis)


def mean_slice_psnr(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None, *, axis: int = 0,
                    data_range: float = DATA_RANGE) -> float:
    """The mean over the slices along ``axis`` of each slice's PSNR,
    ``10 log10(data_range**2 / MSE_slice)`` (``skimage.metrics.peak_signal_noise_ratio``).

    With a mask, each slice's MSE is over its masked voxels and slices without one are left out. A slice
    predicted exactly has PSNR ``inf``, which makes the mean ``inf`` (as a perfect volume's PSNR is):
    give a mask, so that slices of air outside the body do not count.
    """
    pred, target, mask = check_inputs(pred, target, mask)
    axis = _check_axis(axis)
    values = []
    with np.errstate(divide="ignore"):  # an exact slice: MSE 0, PSNR inf
        for index in range(target.shape[axis]):
            p, t = np.take(pred, index, axis), np.take(target, index, axis)
            if mask is not None:
                inside = np.take(mask, index, axis)
                if not inside.any():
                    continue
                p, t = p[inside], t[inside]
            values.append(float(peak_signal_noise_ratio(t, p, data_range=data_range)))
    return float(np.mean(values))


def mean_slice_ssim(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None, *, axis: int = 0,
                    data_range: float = DATA_RANGE, win_size: int = SSIM_WIN_SIZE) -> float:
    """The mean over the slices along ``axis`` of each slice's 2D SSIM
    (``skimage.metrics.structural_similarity``, uniform ``win_size``**2 window).

    A slice's SSIM is skimage's mean over the slice; with a mask, the mean of skimage's SSIM map over the
    slice's masked pixels at least ``(win_size - 1) // 2`` pixels from its border (where the window fits,
    as ``lift3d.evaluation.metrics.structural_similarity_3d`` does in 3D); slices without one are left
    out. Both in-slice axes must be at least ``win_size`` long.
    """
    pred, target, mask = check_inputs(pred, target, mask)
    axis = _check_axis(axis)
    in_slice = tuple(size for a, size in enumerate(target.shape) if a != axis)
    if min(in_slice) < win_size:
        raise Lift3dError(f"2D SSIM of the slices along axis {axis} needs slices at least {win_size} x {win_size} "
                          f"(win_size={win_size}); volume {target.shape} has slices {in_slice[0]} x {in_slice[1]}")
    mean, ssim_map = structural_similarity(pred, target, data_range=data_range, win_size=win_size,
                                           channel_axis=axis, full=True)
    if mask is None:
        return float(mean)  # skimage's mean over channels (slices) of each slice's mean SSIM
    pad = (win_size - 1) // 2
    interior = np.zeros_like(mask)
    index = [slice(pad, size - pad) for size in mask.shape]
    index[axis] = slice(None)
    interior[tuple(index)] = True
    selected = np.moveaxis(mask & interior, axis, 0).reshape(mask.shape[axis], -1)
    ssim_map = np.moveaxis(ssim_map, axis, 0).reshape(mask.shape[axis], -1)
    counted = selected.any(axis=1)
    if not counted.any():
        raise Lift3dError(f"mask selects no pixel at least {pad} pixels from the border of a slice along axis "
                          f"{axis}, where 2D SSIM is defined")
    per_slice = [ssim_map[i][selected[i]].mean(dtype=np.float64) for i in np.flatnonzero(counted)]
    return float(np.mean(per_slice))


def _slice_differences(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None,
                       metric: str) -> tuple[np.ndarray, np.ndarray]:
    """``dz(v) = v[1:] - v[:-1]`` of both volumes, over the voxel pairs whose two slices are both in the mask."""
    pred, target, mask = check_inputs(pred, target, mask)
    if target.shape[0] < 2:
        raise Lift3dError(f"{metric} needs at least 2 slices along the slice axis; got shape {target.shape}")
    dz_pred, dz_target = np.diff(pred, axis=0), np.diff(target, axis=0)
    if mask is None:
        return dz_pred.ravel(), dz_target.ravel()
    pairs = mask[1:] & mask[:-1]
    if not pairs.any():
        raise Lift3dError(f"{metric}: the mask has no voxel inside it in two consecutive slices")
    return dz_pred[pairs], dz_target[pairs]


def through_plane_mae(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    """``mean |dz(pred) - dz(target)|``, ``dz(v) = v[1:] - v[:-1]`` along the slice axis (axis 0): how far the
    prediction's change from one slice to the next is from the target's. With a mask, the voxel pairs whose
    two slices are both in it. In the volumes' units (0 for identical volumes; lower is better)."""
    dz_pred, dz_target = _slice_differences(pred, target, mask, "through_plane_mae")
    return float(np.abs(dz_pred - dz_target).mean())


def through_plane_correlation(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Pearson's correlation of ``dz(pred)`` with ``dz(target)`` over the same voxel pairs as
    ``through_plane_mae`` (``scipy.stats.pearsonr``): 1 where the prediction changes from slice to
    slice as the target does, up to a scale. A prediction whose ``dz`` is the same everywhere (no change from
    slice to slice) shares nothing with the target's: 0. A target whose ``dz`` is constant cannot be scored."""
    dz_pred, dz_target = _slice_differences(pred, target, mask, "through_plane_correlation")
    if np.ptp(dz_target) == 0:
        raise Lift3dError(f"through_plane_correlation: the target's slice-to-slice difference is {dz_target[0]} "
                          "at every voxel pair, so a correlation with it is undefined")
    if np.ptp(dz_pred) == 0:
        return 0.0
    return float(pearsonr(dz_pred, dz_target).statistic)


def _gaussian_window(sigma: float) -> int:
    """The width torchmetrics gives a Gaussian window of ``sigma`` (11 for 1.5)."""
    return int(3.5 * sigma + 0.5) * 2 + 1


def ms_ssim_minimum_size(sigma: float = MS_SSIM_SIGMA, betas: Sequence[float] = MS_SSIM_BETAS) -> int:
    """The fewest voxels every axis needs for ``multiscale_ssim``: the window (``k`` voxels) must fit in
    the coarsest of the ``M = len(betas)`` scales, ``size // 2**(M - 1) >= k``; torchmetrics also asks for
    ``size // max(1, (M - 1)**2) > k - 1`` and ``size >= 2**M``. 176 for the default (k = 11, M = 5)."""
    window, scales = _gaussian_window(sigma), len(betas)
    return max(window * 2 ** (scales - 1), window * max(1, (scales - 1) ** 2), 2**scales)


def ms_ssim_note(shape: Sequence[int], sigma: float = MS_SSIM_SIGMA, betas: Sequence[float] = MS_SSIM_BETAS) -> str | None:
    """None if a volume of ``shape`` is large enough for ``multiscale_ssim``, else the one line saying why not."""
    minimum = ms_ssim_minimum_size(sigma, betas)
    shape = tuple(int(size) for size in shape)
    if min(shape) >= minimum:
        return None
    window = _gaussian_window(sigma)
    return (f"ms_ssim not scored: volume {shape} has an axis shorter than the {minimum} voxels MS-SSIM needs "
            f"(Gaussian window of {window} voxels, sigma {sigma}, {len(betas)} scales: "
            f"size // {2 ** (len(betas) - 1)} >= {window})")


def _as_batch(volume: np.ndarray) -> torch.Tensor:
    """``(n, h, w)`` -> float32 ``(1, 1, n, h, w)``: torchmetrics' 3D layout; float64 convolutions are ~100x slower."""
    return torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]


def multiscale_ssim(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None, *,
                    data_range: float = DATA_RANGE, sigma: float = MS_SSIM_SIGMA,
                    betas: Sequence[float] = MS_SSIM_BETAS) -> float:
    """3D multi-scale SSIM by torchmetrics' ``multiscale_structural_similarity_index_measure`` (Gaussian
    window of ``sigma``, ``len(betas)`` scales halved by 2 x 2 x 2 average pooling, the scales' terms raised
    to ``betas``; float32). A scale whose mean contrast-structure term is negative counts as 0
    (``normalize="relu"``), so the score lies in [0, 1]. With a mask, both volumes are set to 0 outside it
    first: the multi-scale maps cannot be averaged over a mask. Every axis must be at least
    ``ms_ssim_minimum_size`` voxels long (176 for the defaults), or ``Lift3dError``.
    """
    pred, target, mask = check_inputs(pred, target, mask)
    note = ms_ssim_note(target.shape, sigma, betas)
    if note is not None:
        raise Lift3dError(note)
    if mask is not None:
        pred, target = np.where(mask, pred, 0.0), np.where(mask, target, 0.0)
    window = _gaussian_window(sigma)
    score = multiscale_structural_similarity_index_measure(
        _as_batch(pred), _as_batch(target), gaussian_kernel=True, sigma=sigma, kernel_size=window,
        data_range=data_range, betas=tuple(betas), normalize="relu")
    return float(score)


def plane_scores(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None, *,
                 slice_axis: str = "axial", data_range: float = DATA_RANGE) -> dict[str, float | None]:
    """All ``PLANE_METRICS`` of volumes as given (no rescaling); ``ms_ssim``
    is None where the volume is too small for it (``ms_ssim_note`` says why)."""
    axes = plane_axes(slice_axis)
    scores: dict[str, float | None] = {}
    for plane in PLANES:
        scores[f"psnr_{plane}"] = mean_slice_psnr(pred, target, mask, axis=axes[plane], data_range=data_range)
    for plane in PLANES:
        scores[f"ssim_{plane}"] = mean_slice_ssim(pred, target, mask, axis=axes[plane], data_range=data_range)
    scores["through_plane_mae"] = through_plane_mae(pred, target, mask)
    scores["through_plane_correlation"] = through_plane_correlation(pred, target, mask)
    small = ms_ssim_note(np.shape(target)) is not None
    scores["ms_ssim"] = None if small else multiscale_ssim(pred, target, mask, data_range=data_range)
    return scores


def evaluate_all(pred: np.ndarray, target: np.ndarray, mask: np.ndarray | None = None, *,
                 slice_axis: str = "axial") -> dict[str, float | None]:
    """Every score of a prediction ``(n, h, w)`` sliced along ``slice_axis``: the
    ``METRICS`` of ``evaluate_volumes``, then the
    ``PLANE_METRICS``, all after mapping both volumes to [0, 255] by the
    target's range. ``ms_ssim`` is None for a volume smaller than ``ms_ssim_minimum_size`` per axis."""
    pred, target, mask = check_inputs(pred, target, mask)
    scores: dict[str, float | None] = dict(evaluate_volumes(pred, target, mask))
    pred, target = scale_to_target_range(pred, target)
    return scores | plane_scores(pred, target, mask, slice_axis=slice_axis)


def score_pair_all(pred, pair, reference: str = "target") -> dict[str, object]:
    """``score_pair`` with every score of ``evaluate_all``: a prediction
    ``(n, h, w)`` against a ``VolumePair``'s ``target`` (or ``extra[reference]``),
    inside ``extra["mask"]`` where it has one, the planes named by ``pair.meta.slice_axis`` (axial without one)."""
    extra = pair.extra or {}
    truth = pair.target if reference == "target" else extra[reference]
    mask = extra.get("mask")
    slice_axis = getattr(pair.meta, "slice_axis", "axial")
    return {"subject": pair.subject, **evaluate_all(np.asarray(pred), truth[0].numpy(),
                                                    None if mask is None else mask[0].numpy(), slice_axis=slice_axis)}

