"""Tests for lift3d/evaluation/metrics.py: the [0, 255] scaling rule, MAE/PSNR/SSIM, masks, z_inconsistency."""

from __future__ import annotations

import math

import numpy as np
import pytest
from skimage.metrics import structural_similarity

from lift3d.evaluation.metrics import (
    DATA_RANGE,
    METRICS,
    evaluate_volumes,
    mean_absolute_error,
    peak_signal_to_noise_ratio,
    scale_to_target_range,
    structural_similarity_3d,
    summarize,
    z_inconsistency,
)

SHAPE = (10, 14, 12)


def smooth_volume(shape=SHAPE, seed=0) -> np.ndarray:
    """A blob with structure in every direction, values in [0.1, 0.9] plus exact 0 and 1 voxels."""
    n, h, w = shape
    z, y, x = np.meshgrid(np.linspace(-1, 1, n), np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    volume = 0.5 + 0.3 * np.sin(2.5 * z + 1.0) * np.cos(2.0 * y) + 0.1 * x
    volume = np.clip(volume, 0.1, 0.9)
    volume[0, 0, 0], volume[-1, -1, -1] = 0.0, 1.0
    return volume


def test_identical_volumes_are_perfect():
    target = smooth_volume()
    result = evaluate_volumes(target.copy(), target)
    assert list(result) == list(METRICS)
    assert result["mae"] == 0.0
    assert result["psnr"] == math.inf
    assert result["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert result["z_inconsistency"] == 0.0


def test_scaling_maps_target_to_full_range_and_clips_prediction():
    target = smooth_volume() * 40.0 + 300.0  # range [300, 340]
    pred = target.copy()
    pred[1, 1, 1], pred[2, 2, 2] = 1000.0, -5.0
    pred_scaled, target_scaled = scale_to_target_range(pred, target)
    assert target_scaled.min() == 0.0 and target_scaled.max() == pytest.approx(DATA_RANGE)
    assert pred_scaled[1, 1, 1] == DATA_RANGE and pred_scaled[2, 2, 2] == 0.0


def test_known_offset_gives_hand_computed_mae_and_psnr():
    target = smooth_volume()  # min 0 and max 1 exactly, so the scale factor is 255
    pred = target + 0.1  # 25.5 on the [0, 255] scale; stays inside [0, 1] except where noted
    extremes = (target == 0.0) | (target == 1.0)
    pred[extremes] = target[extremes]  # max(target) = 1 would clip; keep the hand computation exact
    assert pred.max() <= 1.0
    n_off = target.size - 2
    expected_mae = 25.5 * n_off / target.size
    expected_psnr = 10 * math.log10(255.0**2 / (25.5**2 * n_off / target.size))
    result = evaluate_volumes(pred, target)
    assert result["mae"] == pytest.approx(expected_mae, rel=1e-12)
    assert result["psnr"] == pytest.approx(expected_psnr, rel=1e-12)


def test_prediction_is_clipped_before_the_error():
    target = smooth_volume()
    result = evaluate_volumes(target + 10.0, target)  # every voxel clips to 255
    assert result["mae"] == pytest.approx(np.mean(255.0 - 255.0 * target), rel=1e-12)


def test_metrics_ignore_a_shared_positive_affine_intensity_change():
    rng = np.random.default_rng(1)
    target = smooth_volume()
    pred = target + rng.normal(0, 0.05, SHAPE)
    mask = target > 0.4
    plain = evaluate_volumes(pred, target, mask)
    changed = evaluate_volumes(3.0 * pred + 100.0, 3.0 * target + 100.0, mask)
    for name in METRICS:
        assert changed[name] == pytest.approx(plain[name], rel=1e-9)


def test_ssim_matches_skimage_on_the_same_scaled_volumes():
    rng = np.random.default_rng(2)
    target = smooth_volume()
    pred = target + rng.normal(0, 0.08, SHAPE)
    pred_scaled, target_scaled = scale_to_target_range(pred, target)
    expected = structural_similarity(pred_scaled, target_scaled, data_range=255.0)
    assert evaluate_volumes(pred, target)["ssim"] == pytest.approx(expected, rel=1e-12)
    assert 0.0 < expected < 0.99


def test_all_true_mask_equals_no_mask():
    rng = np.random.default_rng(3)
    target = smooth_volume()
    pred = target + rng.normal(0, 0.05, SHAPE)
    everything = np.ones(SHAPE, dtype=bool)
    assert evaluate_volumes(pred, target, everything) == pytest.approx(evaluate_volumes(pred, target))


def test_mask_restricts_every_metric_to_its_voxels():
    rng = np.random.default_rng(4)
    target = smooth_volume()
    pred = target.copy()
    mask = np.zeros(SHAPE, dtype=bool)
    mask[:, :, :8] = True
    pred[~mask] += rng.normal(0, 0.3, int((~mask).sum()))  # errors only outside the mask
    inside = evaluate_volumes(pred, target, mask)
    everywhere = evaluate_volumes(pred, target)
    assert everywhere["mae"] > 1.0 and everywhere["psnr"] < 40
    assert inside["mae"] == 0.0 and inside["psnr"] == math.inf and inside["z_inconsistency"] == 0.0
    # SSIM windows near the mask edge see the outside noise; deep inside, the map is exactly 1.
    deep = np.zeros(SHAPE, dtype=bool)
    deep[:, :, 3:5] = True  # the 7-wide windows around these columns stay inside the mask
    assert structural_similarity_3d(*scale_to_target_range(pred, target), deep) == pytest.approx(1.0)
    assert inside["ssim"] > everywhere["ssim"]


def test_masked_ssim_is_the_mean_of_skimage_map_inside_mask_and_interior():
    rng = np.random.default_rng(5)
    target = smooth_volume()
    pred = target + rng.normal(0, 0.05, SHAPE)
    mask = target > 0.5
    pred_scaled, target_scaled = scale_to_target_range(pred, target)
    _, ssim_map = structural_similarity(pred_scaled, target_scaled, data_range=255.0, full=True)
    interior = np.zeros(SHAPE, dtype=bool)
    interior[3:-3, 3:-3, 3:-3] = True
    assert evaluate_volumes(pred, target, mask)["ssim"] == pytest.approx(ssim_map[mask & interior].mean())


def test_z_inconsistency_flags_slice_striping_more_than_a_smooth_change():
    rng = np.random.default_rng(6)
    target = smooth_volume(shape=(24, 16, 16))
    n = target.shape[0]
    striped = target + rng.normal(0, 0.05, (n, 1, 1))  # independent per-slice offsets
    noisy_slices = target + rng.normal(0, 0.05, target.shape) * rng.uniform(0.5, 1.5, (n, 1, 1))
    ramp = np.linspace(-1, 1, n)[:, None, None]
    smooth_change = target + 0.05 * ramp * np.ones_like(target)  # same size of error, smooth along z
    base = z_inconsistency(target, target)
    z_striped = z_inconsistency(striped, target)
    z_noisy = z_inconsistency(noisy_slices, target)
    z_smooth = z_inconsistency(smooth_change, target)
    assert base == 0.0
    assert mean_absolute_error(smooth_change, target) >= 0.5 * mean_absolute_error(striped, target)
    assert z_striped > 3 * z_smooth > 0
    assert z_noisy > 3 * z_smooth


def test_z_inconsistency_with_mask_uses_pairs_inside_in_both_slices():
    target = smooth_volume()
    pred = target.copy()
    pred[5] += 0.2  # breaks the pairs (4, 5) and (5, 6)
    mask = np.ones(SHAPE, dtype=bool)
    mask[5] = False
    assert z_inconsistency(pred, target, mask) == 0.0
    assert z_inconsistency(pred, target) > 0.0


def test_psnr_and_mae_on_hand_values():
    target = np.zeros((2, 2, 2))
    pred = np.full((2, 2, 2), 5.0)
    assert mean_absolute_error(pred, target) == 5.0
    assert peak_signal_to_noise_ratio(pred, target) == pytest.approx(10 * math.log10(255.0**2 / 25.0))


@pytest.mark.parametrize(
    ("pred", "target", "mask", "error", "message"),
    [
        (np.zeros((4, 4)), np.zeros((4, 4)), None, ValueError, r"3D volume.*\(4, 4\)"),
        (np.zeros((8, 8, 8)), np.zeros((8, 8, 9)), None, ValueError, r"\(8, 8, 8\).*\(8, 8, 9\)"),
        (np.zeros((8, 8, 8)), np.arange(512.0).reshape(8, 8, 8), np.ones((8, 8, 8)), TypeError, "boolean.*float64"),
        (np.zeros((8, 8, 8)), np.arange(512.0).reshape(8, 8, 8), np.zeros((8, 8, 8), bool), ValueError, "empty"),
        (np.zeros((8, 8, 8)), np.ones((8, 8, 8)), None, ValueError, "constant.*1.0"),
        (np.full((8, 8, 8), np.nan), np.arange(512.0).reshape(8, 8, 8), None, ValueError, "NaN"),
        (np.zeros((5, 8, 8)), np.arange(320.0).reshape(5, 8, 8), None, ValueError, r"win_size=7.*\(5, 8, 8\)"),
    ],
)
def test_bad_inputs_name_the_problem(pred, target, mask, error, message):
    with pytest.raises(error, match=message):
        evaluate_volumes(pred, target, mask)


def test_summarize_gives_mean_and_population_std():
    rows = [{"subject": "a", "mae": 1.0, "ssim": 0.5}, {"subject": "b", "mae": 3.0, "ssim": 0.7}]
    summary = summarize(rows)
    assert summary["mae"] == {"mean": 2.0, "std": 1.0, "n": 2}
    assert summary["ssim"]["mean"] == pytest.approx(0.6)
    assert "subject" not in summary


def test_summarize_with_a_perfect_psnr_reports_inf_mean_and_nan_std():
    summary = summarize([{"psnr": math.inf}, {"psnr": 30.0}])
    assert summary["psnr"]["mean"] == math.inf and math.isnan(summary["psnr"]["std"])


def test_summarize_rejects_empty_and_inconsistent_rows():
    with pytest.raises(ValueError, match="at least one row"):
        summarize([])
    with pytest.raises(ValueError, match="row 1 has no 'ssim'"):
        summarize([{"mae": 1.0, "ssim": 0.5}, {"mae": 2.0}])


def test_paired_differences_pair_by_subject_with_a_t_interval():
    from scipy.stats import t

    from lift3d.evaluation.metrics import paired_differences

    a = [{"subject": s, "psnr": p, "mae": m} for s, p, m in (("s1", 20.0, 10.0), ("s2", 21.0, 9.0), ("s3", 22.0, 8.0))]
    b = [{"subject": s, "psnr": p, "mae": m} for s, p, m in (("s3", 23.0, 9.0), ("s1", 20.5, 9.0), ("s2", 22.0, 8.5))]
    diff = paired_differences(a, b)
    assert set(diff) == {"psnr", "mae"}  # only the metrics the rows hold
    psnr = diff["psnr"]
    assert psnr["per_subject"] == {"s1": 0.5, "s2": 1.0, "s3": 1.0} and psnr["mean"] == pytest.approx(2.5 / 3)
    d = np.array([0.5, 1.0, 1.0])
    half = t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    assert psnr["ci"] == pytest.approx([d.mean() - half, d.mean() + half])
    assert psnr["b_better"] == 3 and diff["mae"]["b_better"] == 2  # lower MAE is better; s3 got worse
    with pytest.raises(ValueError, match="same subjects"):
        paired_differences(a, b[:2])


def test_uncertainty_scores_rank_the_errors_on_the_0_255_scale():
    from lift3d.evaluation.metrics import uncertainty_scores

    rng = np.random.default_rng(0)
    target = rng.uniform(2, 8, (4, 6, 6))
    target[0, 0, :2] = 0, 10  # the target's range is [0, 10]; no prediction is clipped
    error = rng.uniform(0, 1, target.shape)
    error[0, 0, 1] = 0
    scores = uncertainty_scores(error, target + error, target)
    assert scores["std_error_spearman"] == pytest.approx(1.0)
    assert scores["std_mean"] == pytest.approx(error.mean() * 255 / np.ptp(target))
    assert uncertainty_scores(error[::-1].copy(), target + error, target)["std_error_spearman"] < 0.2
    mask = np.zeros(target.shape, dtype=bool)
    mask[1:3] = True
    assert uncertainty_scores(error, target + error, target, mask)["std_mean"] == pytest.approx(
        error[mask].mean() * 255 / np.ptp(target))
    with pytest.raises(ValueError, match=r"std has shape \(4, 6, 5\) but target has \(4, 6, 6\)"):
        uncertainty_scores(error[..., :5], target, target)


def test_score_pair_scores_inside_the_pairs_mask_against_the_chosen_reference():
    from types import SimpleNamespace

    import torch

    from lift3d.evaluation.metrics import evaluate_volumes, score_pair

    rng = np.random.default_rng(0)
    target, clean, pred = (rng.uniform(-1, 1, (1, 8, 10, 10)).astype(np.float32) for _ in range(3))
    mask = np.zeros((1, 8, 10, 10), dtype=bool)
    mask[:, 1:7, 2:8, 2:8] = True
    pair = SimpleNamespace(subject="s-00", target=torch.from_numpy(target),
                           extra={"mask": torch.from_numpy(mask), "clean_target": torch.from_numpy(clean)})
    assert score_pair(pred[0], pair) == {"subject": "s-00", **evaluate_volumes(pred[0], target[0], mask[0])}
    assert score_pair(pred[0], pair, "clean_target") == {"subject": "s-00", **evaluate_volumes(pred[0], clean[0], mask[0])}
    unmasked = SimpleNamespace(subject="s-01", target=torch.from_numpy(target), extra={})
    assert score_pair(pred[0], unmasked) == {"subject": "s-01", **evaluate_volumes(pred[0], target[0])}
