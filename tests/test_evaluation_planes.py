"""Tests for lift3d/evaluation/planes.py: per-plane PSNR and SSIM, the through-plane difference scores and
MS-SSIM, each against a value computed by hand on a tiny volume, and each refusing what it cannot score."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lift3d.evaluation.metrics import METRICS, PLANE_METRICS, evaluate_volumes, scale_to_target_range, summarize
from lift3d.evaluation.planes import (evaluate_all, mean_slice_psnr, mean_slice_ssim, ms_ssim_minimum_size,
                                      ms_ssim_note, multiscale_ssim, plane_axes, plane_scores, score_pair_all,
                                      through_plane_correlation, through_plane_mae)
from lift3d.io.errors import Lift3dError

C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2  # SSIM's constants for data_range 255


def blob(shape=(8, 16, 16), seed=0) -> np.ndarray:
    """Structure along every axis, values in [0, 1] with 0 and 1 both present."""
    n, h, w = shape
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, s) for s in (n, h, w)), indexing="ij")
    volume = np.exp(-2 * (x**2 + y**2 + z**2)) + 0.05 * np.random.default_rng(seed).random(shape)
    return (volume - volume.min()) / np.ptp(volume)


def test_plane_axes_follow_the_slice_axis_and_the_figures_columns():
    from lift3d.cli.evaluate import PLANE_NAMES

    assert plane_axes("axial") == {"axial": 0, "coronal": 1, "sagittal": 2}  # (n, h, w) = (S, A, R)
    assert plane_axes("sagittal") == {"sagittal": 0, "axial": 1, "coronal": 2}  # (R, S, A)
    assert plane_axes("coronal") == {"coronal": 0, "axial": 1, "sagittal": 2}  # (A, S, R)
    for slice_axis, columns in PLANE_NAMES.items():  # the figure's columns show the planes of axes 0, 1, 2
        axes = plane_axes(slice_axis)
        assert [axes[name] for name in columns] == [0, 1, 2]
    with pytest.raises(ValueError, match="Unknown slice axis 'transverse'; valid: axial, coronal, sagittal"):
        plane_axes("transverse")


def test_mean_slice_psnr_by_hand():
    rng = np.random.default_rng(0)
    target = rng.uniform(50, 200, (3, 4, 5))
    offsets = np.array([1.0, 2.0, 4.0])
    pred = target + offsets[:, None, None]
    # Along axis 0 every slice has its own error; along 1 and 2 every slice holds all three offsets.
    expected_0 = np.mean([20 * math.log10(255 / d) for d in offsets])
    expected_other = 10 * math.log10(255**2 / np.mean(offsets**2))
    assert mean_slice_psnr(pred, target, axis=0) == pytest.approx(expected_0, rel=1e-12)
    assert mean_slice_psnr(pred, target, axis=1) == pytest.approx(expected_other, rel=1e-12)
    assert mean_slice_psnr(pred, target, axis=2) == pytest.approx(expected_other, rel=1e-12)
    mask = np.zeros(target.shape, dtype=bool)
    mask[[0, 2], 1:3, 1:4] = True  # slice 1 has no masked voxel: it does not count
    assert mean_slice_psnr(pred, target, mask, axis=0) == pytest.approx((20 * math.log10(255) * 2 - 20 * math.log10(4)) / 2)
    pred[1] = target[1]  # one exact slice: its PSNR, and so the mean, is inf
    assert mean_slice_psnr(pred, target, axis=0) == math.inf


def test_mean_slice_ssim_by_hand_on_slices_of_one_grey():
    """A slice of one grey level a, predicted as a + c: no variance, so SSIM is its luminance term."""
    greys, c = np.array([50.0, 100.0, 150.0]), 10.0
    target = np.broadcast_to(greys[:, None, None], (3, 7, 8)).copy()
    pred = target + c
    by_hand = [(2 * a * (a + c) + C1) / (a**2 + (a + c) ** 2 + C1) for a in greys]
    assert mean_slice_ssim(pred, target, axis=0) == pytest.approx(np.mean(by_hand), rel=1e-12)
    mask = np.zeros(target.shape, dtype=bool)
    mask[1] = True
    mask[2, 0, 0] = True  # a border pixel only: outside where the 7 x 7 window fits, so slice 2 does not count
    assert mean_slice_ssim(pred, target, mask, axis=0) == pytest.approx(by_hand[1], rel=1e-12)


def test_mean_slice_ssim_is_skimages_2d_ssim_averaged_over_the_slices():
    from skimage.metrics import structural_similarity

    target = blob((8, 9, 10)) * 255
    pred = np.clip(target + np.random.default_rng(1).normal(0, 20, target.shape), 0, 255)
    for axis in range(3):
        slices = [structural_similarity(np.take(pred, i, axis), np.take(target, i, axis), data_range=255, win_size=7)
                  for i in range(target.shape[axis])]
        assert mean_slice_ssim(pred, target, axis=axis) == pytest.approx(np.mean(slices), rel=1e-12)
        everything = np.ones(target.shape, dtype=bool)  # an all-True mask gives the unmasked value
        assert mean_slice_ssim(pred, target, everything, axis=axis) == pytest.approx(np.mean(slices), rel=1e-12)


def test_through_plane_scores_by_hand():
    target = np.zeros((2, 1, 4))
    target[1, 0] = [1, -1, 1, -1]  # dz(target)
    pred = np.zeros((2, 1, 4))
    pred[1, 0] = [1, 1, 1, -1]  # dz(pred): wrong at one voxel pair, by 2
    assert through_plane_mae(pred, target) == pytest.approx(0.5)
    # means 0 and 0.5; covariance sum 2, variance sums 4 and 3: r = 2 / sqrt(12)
    assert through_plane_correlation(pred, target) == pytest.approx(1 / math.sqrt(3), rel=1e-12)
    mask = np.ones(target.shape, dtype=bool)
    mask[1, 0, 1] = False  # the pair with the error leaves
    assert through_plane_mae(pred, target, mask) == 0.0
    assert through_plane_correlation(pred, target, mask) == pytest.approx(1.0)
    flat = np.zeros_like(target)
    assert through_plane_correlation(flat, target) == 0.0  # no change from slice to slice: shares nothing


def test_ms_ssim_minimum_size_and_the_note_that_says_why():
    assert ms_ssim_minimum_size() == 176  # 11-voxel window, 5 scales: size // 16 >= 11
    assert ms_ssim_minimum_size(sigma=0.3, betas=(0.7, 0.3)) == 6  # 3-voxel window, 2 scales: size // 2 >= 3
    assert ms_ssim_note((176, 180, 200)) is None
    note = ms_ssim_note((100, 256, 256))
    assert note.startswith("ms_ssim not scored: volume (100, 256, 256)") and "176 voxels" in note
    assert "\n" not in note


def test_ms_ssim_by_hand_on_a_checkerboard_against_a_flat_grey():
    """Target: a 0/255 checkerboard; prediction: 127.5 everywhere. At scale 1 the prediction has no variance and
    no covariance with the target, so the contrast-structure term is C2 / (var + C2), var the target's variance
    under the Gaussian window; from scale 2 on (2 x 2 x 2 means) both are 127.5 everywhere: every term is 1.
    On a checkerboard every voxel sees the same variance, 255^2 p (1 - p), p the window's weight on the
    voxels of the other colour: per axis E = w(0), O = 2 w(1); p = 3 E^2 O + O^3."""
    sigma, betas = 0.3, (0.7, 0.3)
    i, j, k = np.indices((8, 8, 8))
    target = 255.0 * ((i + j + k) % 2)
    pred = np.full(target.shape, 127.5)
    e = math.exp(-1 / (2 * sigma**2))
    even, odd = 1 / (1 + 2 * e), 2 * e / (1 + 2 * e)
    other = 3 * even**2 * odd + odd**3
    variance = 255**2 * other * (1 - other)
    expected = (C2 / (variance + C2)) ** betas[0]
    assert multiscale_ssim(pred, target, sigma=sigma, betas=betas) == pytest.approx(expected, rel=1e-3)  # float32
    assert multiscale_ssim(target, target, sigma=sigma, betas=betas) == pytest.approx(1.0, abs=1e-6)


def test_ms_ssim_with_a_mask_scores_the_volumes_zeroed_outside_it():
    sigma, betas = 0.3, (0.7, 0.3)
    target = blob((8, 8, 8)) * 255
    pred = np.clip(target + np.random.default_rng(2).normal(0, 15, target.shape), 0, 255)
    mask = np.zeros(target.shape, dtype=bool)
    mask[1:7, 2:6, 1:7] = True
    masked = multiscale_ssim(pred, target, mask, sigma=sigma, betas=betas)
    assert masked == pytest.approx(multiscale_ssim(pred * mask, target * mask, sigma=sigma, betas=betas))
    assert masked != pytest.approx(multiscale_ssim(pred, target, sigma=sigma, betas=betas))


def test_evaluate_all_adds_the_plane_scores_after_the_volume_metrics():
    target = blob()
    pred = target + np.random.default_rng(0).normal(0, 0.05, (8, 1, 1))  # one offset per slice: striping
    scores = evaluate_all(pred, target)
    assert list(scores) == [*METRICS, *PLANE_METRICS]
    assert {k: scores[k] for k in METRICS} == evaluate_volumes(pred, target)
    scaled_pred, scaled_target = scale_to_target_range(pred, target)
    assert scores["psnr_coronal"] == mean_slice_psnr(scaled_pred, scaled_target, axis=1)
    assert scores["ms_ssim"] is None  # 8 x 16 x 16 is too small
    # An offset per axial slice: each axial slice keeps its structure, the through-plane views are striped.
    assert scores["ssim_axial"] > scores["ssim_coronal"] and scores["ssim_axial"] > scores["ssim_sagittal"]
    perfect = evaluate_all(target.copy(), target)
    assert perfect["psnr_axial"] == perfect["psnr_sagittal"] == math.inf
    assert perfect["ssim_coronal"] == pytest.approx(1.0) and perfect["through_plane_mae"] == 0.0
    assert perfect["through_plane_correlation"] == pytest.approx(1.0)
    # Positive affine changes of both volumes leave every score alone (the [0, 255] rule).
    changed = evaluate_all(3 * pred + 7, 3 * target + 7)
    assert changed["ms_ssim"] is None
    scored = {k: v for k, v in scores.items() if v is not None}
    assert {k: changed[k] for k in scored} == pytest.approx(scored)


def test_score_pair_all_names_the_planes_by_the_pairs_slice_axis():
    target = blob()
    pred = target + np.random.default_rng(3).normal(0, 0.05, target.shape)
    pair = SimpleNamespace(subject="s-01", target=torch.from_numpy(target)[None], extra={},
                           meta=SimpleNamespace(slice_axis="sagittal"))
    row = score_pair_all(pred, pair)
    assert row["subject"] == "s-01"
    assert row == {"subject": "s-01", **evaluate_all(pred, target, slice_axis="sagittal")}
    scaled_pred, scaled_target = scale_to_target_range(pred, target)
    assert row["psnr_sagittal"] == mean_slice_psnr(scaled_pred, scaled_target, axis=0)


def test_summarize_leaves_out_scores_not_taken():
    rows = [{"mae": 1.0, "ms_ssim": None}, {"mae": 3.0, "ms_ssim": 0.9}, {"mae": 2.0, "ms_ssim": None}]
    summary = summarize(rows)
    assert summary["ms_ssim"] == {"mean": 0.9, "std": 0.0, "n": 1} and summary["mae"]["n"] == 3
    nothing = summarize([{"mae": 1.0, "ms_ssim": None}])["ms_ssim"]
    assert nothing["n"] == 0 and math.isnan(nothing["mean"]) and math.isnan(nothing["std"])
    assert summarize([{"mae": 1.0, "dice_wm": 0.5}], names=["dice_wm"]) == {"dice_wm": {"mean": 0.5, "std": 0.0, "n": 1}}


@pytest.mark.parametrize("call, message", [
    (lambda: mean_slice_psnr(np.zeros((2, 3, 3)), np.ones((2, 3, 3)), axis=3), r"axis must be 0, 1 or 2.*got 3"),
    (lambda: mean_slice_psnr(np.zeros((2, 3, 3)), np.ones((2, 3, 4))), r"shape \(2, 3, 3\) does not match .*\(2, 3, 4\)"),
    (lambda: mean_slice_ssim(np.zeros((3, 7, 8)), np.ones((3, 7, 8)), axis=1),
     r"slices along axis 1 needs slices at least 7 x 7 .*\(3, 7, 8\) has slices 3 x 8"),
    (lambda: mean_slice_ssim(np.zeros((8, 8, 8)), np.ones((8, 8, 8)), np.pad(np.ones((8, 8, 1), bool), ((0, 0), (0, 0), (0, 7)))),
     r"no pixel at least 3 pixels from the border"),
    (lambda: through_plane_mae(np.zeros((1, 4, 4)), np.ones((1, 4, 4))), r"at least 2 slices.*\(1, 4, 4\)"),
    (lambda: through_plane_mae(np.zeros((3, 2, 2)), np.ones((3, 2, 2)), np.eye(3, dtype=bool)[:, :2, None].repeat(2, 2)),
     r"no voxel inside it in two consecutive slices"),
    (lambda: through_plane_correlation(np.zeros((3, 2, 2)), np.arange(3.0)[:, None, None] * np.ones((3, 2, 2))),
     r"slice-to-slice difference is 1.0 at every voxel pair"),
    (lambda: multiscale_ssim(np.zeros((8, 16, 16)), np.ones((8, 16, 16))),
     r"ms_ssim not scored: volume \(8, 16, 16\) has an axis shorter than the 176 voxels"),
    (lambda: mean_slice_psnr(np.full((2, 3, 3), np.nan), np.ones((2, 3, 3))), r"NaN or infinite"),
])
def test_every_score_refuses_what_it_cannot_score_in_one_line(call, message):
    with pytest.raises(ValueError, match=message) as error:
        call()
    assert "\n" not in str(error.value)


def test_the_new_scores_raise_lift3d_errors():
    with pytest.raises(Lift3dError):
        multiscale_ssim(np.zeros((8, 16, 16)), np.ones((8, 16, 16)))
    with pytest.raises(Lift3dError):
        plane_scores(np.zeros((1, 8, 8)), np.ones((1, 8, 8)))
