"""Tests for lift3d/evaluation/figures.py: panel count and layout, mid-planes and their orientation, grey
levels shared by prediction and target, error rows, std (uncertainty) rows, atomic PNG writing."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest

from lift3d.evaluation.figures import save_orthogonal_views
from lift3d.evaluation.metrics import scale_to_target_range

SHAPE = (9, 12, 10)


def volumes(seed=0):
    rng = np.random.default_rng(seed)
    target = rng.uniform(0, 100, SHAPE)
    return {
        "source": 500 - 2 * target,
        "prediction": target + rng.normal(0, 5, (SHAPE[0], 1, 1)),
        "target": target,
    }


def draw(tmp_path, vol, **kwargs):
    return save_orthogonal_views(tmp_path / "f.png", vol, dpi=30, **kwargs)


def images_by_row(fig):
    """The 3 image axes of each row, top to bottom (colourbar axes hold no AxesImage)."""
    image_axes = [ax for ax in fig.axes if ax.images]
    return [image_axes[i : i + 3] for i in range(0, len(image_axes), 3)]


def test_png_has_one_row_per_volume_plus_error_row(tmp_path):
    path = tmp_path / "views.png"
    fig = save_orthogonal_views(path, volumes(), title="subject 1", dpi=50)
    rows = images_by_row(fig)
    assert len(rows) == 4 and all(len(row) == 3 for row in rows)
    assert len(fig.axes) == 4 * 3 + 1  # one colourbar, for the error row
    assert [row[0].get_ylabel() for row in rows] == ["source", "prediction", "target", "|prediction - target|"]
    assert [ax.get_title() for ax in rows[0]] == ["axial", "coronal", "sagittal"]
    png = matplotlib.image.imread(path)
    width, height = fig.get_size_inches() * 50
    assert png.shape[:2] == (round(height), round(width))
    assert png[..., :3].std() > 0.05  # not a blank canvas
    assert [p.name for p in tmp_path.iterdir()] == ["views.png"]  # no temporary file left


def test_panels_are_mid_planes_with_slice_axis_vertical(tmp_path):
    vol = volumes()
    fig = draw(tmp_path, vol)
    axial, coronal, sagittal = images_by_row(fig)[2]  # the target row
    n, h, w = SHAPE
    target = vol["target"]
    np.testing.assert_array_equal(axial.images[0].get_array(), target[n // 2])
    np.testing.assert_array_equal(coronal.images[0].get_array(), target[:, h // 2, :])
    np.testing.assert_array_equal(sagittal.images[0].get_array(), target[:, :, w // 2])
    # Index 0 at the bottom: the slice axis runs upwards, like lift3d.data.orientation's (n, h, w).
    assert all(ax.images[0].origin == "lower" for ax in (axial, coronal, sagittal))


def test_spacing_sets_panel_aspect(tmp_path):
    fig = draw(tmp_path, volumes(), spacing=(4.0, 1.0, 0.5))
    axial, coronal, sagittal = images_by_row(fig)[0]
    assert axial.get_aspect() == pytest.approx(1.0 / 0.5)
    assert coronal.get_aspect() == pytest.approx(4.0 / 0.5)
    assert sagittal.get_aspect() == pytest.approx(4.0 / 1.0)


def test_prediction_shares_target_grey_levels_and_source_has_its_own(tmp_path):
    fig = draw(tmp_path, volumes())
    source, prediction, target, error = images_by_row(fig)
    assert prediction[0].images[0].get_clim() == target[1].images[0].get_clim()
    assert source[0].images[0].get_clim() != target[0].images[0].get_clim()
    assert error[0].images[0].get_cmap().name == "hot"
    assert error[0].images[0].get_clim()[0] == 0.0


def test_error_row_is_absolute_error_on_metric_scale(tmp_path):
    vol = volumes()
    fig = draw(tmp_path, vol)
    error_axial = images_by_row(fig)[3][0].images[0].get_array()
    pred_scaled, target_scaled = scale_to_target_range(vol["prediction"], vol["target"])
    np.testing.assert_allclose(error_axial, np.abs(pred_scaled - target_scaled)[SHAPE[0] // 2])


def test_several_predictions_get_one_error_row_each_on_a_shared_scale(tmp_path):
    vol = volumes()
    vol = {"source": vol["source"], "slice-wise": vol["prediction"], "lifted": vol["target"] + 1.0,
           "target": vol["target"]}
    fig = draw(tmp_path, vol, error_of=[("slice-wise", "target"), ("lifted", "target")])
    rows = images_by_row(fig)
    assert len(rows) == 6
    assert [row[0].get_ylabel() for row in rows[4:]] == ["|slice-wise - target|", "|lifted - target|"]
    assert rows[4][0].images[0].get_clim() == rows[5][0].images[0].get_clim()
    assert rows[1][0].images[0].get_clim() == rows[2][0].images[0].get_clim() == rows[3][0].images[0].get_clim()


def test_no_error_rows_when_error_of_is_none(tmp_path):
    fig = draw(tmp_path, {"a": volumes()["target"]}, error_of=None)
    assert len(fig.axes) == 3


def test_uncertainty_rows_follow_the_error_rows_on_the_metric_scale(tmp_path):
    vol = volumes()
    vol = {"source": vol["source"], "slice-wise": vol["prediction"], "lifted": vol["target"] + 1.0,
           "target": vol["target"]}
    rng = np.random.default_rng(1)
    stds = {"slice-wise": rng.uniform(0, 4, SHAPE), "lifted": rng.uniform(0, 2, SHAPE)}
    fig = draw(tmp_path, vol, error_of=[("slice-wise", "target"), ("lifted", "target")], uncertainty=stds)
    rows = images_by_row(fig)
    assert len(rows) == 8
    assert [row[0].get_ylabel() for row in rows[6:]] == ["std(slice-wise)", "std(lifted)"]
    assert len(fig.axes) == 8 * 3 + 4  # a colourbar for each error and std row
    assert {ax.get_ylabel() for ax in fig.axes if not ax.images} == {"0-255 scale", "std, 0-255 scale"}
    scale = 255 / (vol["target"].max() - vol["target"].min())
    n, h, w = SHAPE
    sagittal = rows[6][2].images[0]
    np.testing.assert_allclose(sagittal.get_array(), stds["slice-wise"][:, :, w // 2] * scale)
    assert sagittal.get_cmap().name == "viridis"
    assert rows[6][0].images[0].get_clim() == rows[7][0].images[0].get_clim()
    assert rows[6][0].images[0].get_clim()[0] == 0.0
    assert rows[6][0].images[0].get_clim()[1] < rows[4][0].images[0].get_clim()[1]  # not the error rows' scale


def test_uncertainty_without_a_target_stays_in_its_own_units(tmp_path):
    std = np.full(SHAPE, 3.0)
    fig = draw(tmp_path, {"mean": volumes()["target"]}, error_of=None, uncertainty={"mean": std})
    rows = images_by_row(fig)
    assert [row[0].get_ylabel() for row in rows] == ["mean", "std(mean)"]
    np.testing.assert_array_equal(rows[1][0].images[0].get_array(), std[SHAPE[0] // 2])
    assert [ax.get_ylabel() for ax in fig.axes if not ax.images] == ["std"]


@pytest.mark.parametrize(
    ("vol", "kwargs", "error", "message"),
    [
        ({"prediction": np.zeros(SHAPE)}, {}, ValueError, "'target'.*available: prediction"),
        ({}, {}, ValueError, "volumes is empty"),
        ({"a": np.zeros((3, 3))}, {"error_of": None}, ValueError, r"'a' must be 3D.*\(3, 3\)"),
        ({"a": np.zeros(SHAPE), "b": np.zeros((2, 2, 2))}, {"error_of": None}, ValueError, "'b' has shape"),
        ({"a": np.zeros(SHAPE)}, {"error_of": None, "spacing": (1, 0, 1)}, ValueError, "spacing"),
        ({"a": np.zeros(SHAPE)}, {"error_of": None, "uncertainty": {"b": np.zeros(SHAPE)}}, ValueError,
         "uncertainty names 'b'.*available: a"),
        ({"a": np.zeros(SHAPE)}, {"error_of": None, "uncertainty": {"a": np.zeros((2, 2, 2))}}, ValueError,
         r"std map of 'a' has shape \(2, 2, 2\) but 'a' has \(9, 12, 10\)"),
    ],
)
def test_bad_arguments_name_the_problem(tmp_path, vol, kwargs, error, message):
    with pytest.raises(error, match=message):
        save_orthogonal_views(tmp_path / "f.png", vol, **kwargs)
    assert list(tmp_path.iterdir()) == []
