"""Downstream segmentation (lift3d/evaluation/segmentation.py, tissue_unet.py): Dice, the segmenter folder, the
segmenter stage, a third-party segmenter plugin and ``lift3d-evaluate --segmenter``."""

from __future__ import annotations

import csv
import json
import math
import types

import nibabel as nib
import numpy as np
import pytest
import torch

from lift3d.cli import evaluate as evaluate_cli
from lift3d.cli import main as cli_main
from lift3d.data.tissue import TISSUES, tissue_labels
from lift3d.evaluation.segmentation import as_labels, dice_names, dice_scores, load_segmenter, tissue_dice
from lift3d.evaluation.tissue_unet import SETTINGS_NAME, WEIGHTS_NAME, TissueSegmenter, load_tissue_segmenter
from lift3d.io.errors import Lift3dError
from lift3d.plugins import PluginManager, hookimpl
from lift3d.plugins.protocols import Segmenter

CLASSES = ("csf", "gm", "wm")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Tiny convolutions: one thread (see conftest)."""


# --------------------------------------------------------------------------------------------
# Dice


def test_dice_of_a_hand_computed_case():
    a = torch.tensor([[[0, 1, 1, 2, 2, 2, 0, 0]]])  # (1, 1, 8): csf at 1-2, gm at 3-5
    b = torch.tensor([[[0, 1, 0, 2, 2, 0, 0, 3]]])  # csf at 1, gm at 3-4, wm at 7
    scores = dice_scores(a, b, CLASSES)
    # csf: 2 * 1 / (2 + 1); gm: 2 * 2 / (3 + 2); wm: absent from a, present in b: 0.
    assert scores["dice_csf"] == pytest.approx(2 / 3)
    assert scores["dice_gm"] == pytest.approx(4 / 5)
    assert scores["dice_wm"] == 0.0
    assert scores["dice_mean"] == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)
    # Inside a mask that leaves out voxels 2 and 7: csf 2 * 1 / (1 + 1), wm absent from both: NaN, not in the mean.
    mask = torch.tensor([[[1, 1, 0, 1, 1, 1, 1, 0]]], dtype=torch.bool)
    masked = dice_scores(a, b, CLASSES, mask, prefix="m_")
    assert masked["m_csf"] == 1.0 and masked["m_gm"] == pytest.approx(4 / 5) and math.isnan(masked["m_wm"])
    assert masked["m_mean"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match=r"labels must lie in 0..3"):
        dice_scores(a + 3, b, CLASSES)


def test_probabilities_become_labels_with_background():
    p = torch.zeros(3, 1, 1, 4)
    p[0, 0, 0, 1] = 0.6  # csf
    p[1, 0, 0, 2], p[2, 0, 0, 2] = 0.3, 0.45  # wm the most probable of 0.25 / 0.3 / 0.45
    p[1, 0, 0, 3] = 0.4  # background 0.6 wins
    assert tissue_labels(p).flatten().tolist() == [0, 1, 3, 0]
    assert torch.equal(as_labels(p, CLASSES), tissue_labels(p))
    assert dice_names(CLASSES) == ["dice_csf", "dice_gm", "dice_wm", "dice_mean"]


# --------------------------------------------------------------------------------------------
# The built-in segmenter's folder


def tiny_segmenter(seed: int = 0, **grid) -> TissueSegmenter:
    torch.manual_seed(seed)
    return TissueSegmenter.new(TISSUES, context=1, block_out_channels=(8, 16), input_grid=grid or None)


def test_a_segmenter_folder_round_trips_and_is_safetensors_and_json_only(tmp_path):
    segmenter = tiny_segmenter()
    segmenter.save(tmp_path / "seg")
    assert sorted(p.name for p in (tmp_path / "seg").iterdir()) == [WEIGHTS_NAME, SETTINGS_NAME]
    loaded = load_segmenter(tmp_path / "seg", manager=PluginManager(autoload=False))
    assert isinstance(loaded, Segmenter) and loaded.classes == TISSUES
    volume = torch.rand(1, 5, 16, 24) * 2 - 1
    assert torch.equal(loaded.probabilities(volume), segmenter.probabilities(volume))
    assert loaded.segment(volume).shape == (5, 16, 24) and loaded.segment(volume).dtype == torch.int64


@pytest.mark.parametrize("damage, message", [
    (lambda f: (f / SETTINGS_NAME).unlink(), "has no segmenter.json"),
    (lambda f: (f / SETTINGS_NAME).write_text("{"), "segmenter config is not valid JSON"),
    (lambda f: (f / SETTINGS_NAME).write_text(json.dumps({**json.loads((f / SETTINGS_NAME).read_text()), "code": "x"})),
     "code is not a key lift3d reads; valid keys: classes, format"),
    (lambda f: (f / SETTINGS_NAME).write_text((f / SETTINGS_NAME).read_text().replace('"tissue-unet"', '"nnunet"')),
     "Unknown segmenter 'nnunet'; available: tissue-unet"),
    (lambda f: (f / WEIGHTS_NAME).rename(f / "model.pt"), "has no model.safetensors; it holds model.pt, but lift3d never"),
    (lambda f: (f / WEIGHTS_NAME).write_bytes(b"not safetensors"), "is not a readable safetensors file"),
    (lambda f: (f / SETTINGS_NAME).write_text((f / SETTINGS_NAME).read_text().replace("16", "32")),
     "does not fit the network of segmenter.json"),
])
def test_a_bad_segmenter_folder_is_refused_in_one_line(tmp_path, damage, message):
    folder = tiny_segmenter().save(tmp_path / "seg")
    damage(folder)
    with pytest.raises(Lift3dError) as info:
        load_segmenter(folder, manager=PluginManager(autoload=False))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_missing_segmenter_folder_from_the_cli_is_one_line(tmp_path, capsys):
    volume = nib.Nifti1Image(np.random.default_rng(0).random((8, 8, 4), dtype=np.float32), np.eye(4))
    nib.save(volume, tmp_path / "a.nii.gz")
    code = evaluate_cli.main(["--pred", str(tmp_path / "a.nii.gz"), "--target", str(tmp_path / "a.nii.gz"),
                              "--segmenter", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "segmenter folder" in err and "not found" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_segmenters_are_listed_by_lift3d_plugins(capsys):
    assert cli_main.main(["plugins", "--kind", "segmenters"]) == 0
    assert "tissue-unet" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# A third-party segmenter, registered through a plugin manager as an installed plugin would be


class ThresholdSegmenter:
    """Labels by intensity bands read from its folder's segmenter.json ``options``: a segmenter with no network."""

    def __init__(self, *, path):
        settings = json.loads((path / "segmenter.json").read_text())
        self.classes = tuple(settings["classes"])
        self.bands = settings["options"]["bands"]  # upper bounds of classes 1..K in [-1, 1]
        self.input_grid = None

    def segment(self, volume):
        v = volume.reshape(volume.shape[-3:])
        return torch.bucketize(v, torch.tensor(self.bands), right=False).clamp(max=len(self.classes)).long()


@hookimpl
def lift3d_register_segmenters(registry):
    registry.add("threshold", ThresholdSegmenter)


def test_a_third_party_segmenter_plugin(tmp_path):
    folder = tmp_path / "threshold"
    folder.mkdir()
    (folder / "segmenter.json").write_text(json.dumps({
        "format": "lift3d-segmenter", "version": 1, "plugin": "threshold", "classes": ["dark", "bright"],
        "options": {"bands": [-0.5, 0.5]}}))
    manager = PluginManager(autoload=False, extra_plugins=(types.SimpleNamespace(
        lift3d_register_segmenters=lift3d_register_segmenters),))
    assert "threshold" in manager.segmenters.names()
    segmenter = load_segmenter(folder, manager=manager)
    target = torch.tensor([-1.0, -0.2, 0.0, 0.9, 0.9, -0.9]).reshape(1, 1, 1, 6)  # labels 0 1 1 2 2 0
    prediction = torch.tensor([-1.0, -0.2, 0.9, 0.9, 0.0, -0.2]).reshape(1, 1, 1, 6)  # labels 0 1 2 2 1 1
    labels = torch.tensor([0, 1, 1, 2, 2, 2]).reshape(1, 1, 6)
    scores = tissue_dice(segmenter, prediction, target, labels=labels)
    # dark: prediction {1, 4, 5}, target {1, 2}: 2 * 1 / 5; bright: {2, 3}, {3, 4}: 2 * 1 / 4.
    assert scores["dice_dark"] == pytest.approx(2 * 1 / 5) and scores["dice_bright"] == pytest.approx(2 * 1 / 4)
    # against the labels (dark {1, 2}, bright {3, 4, 5}): prediction 2 * 1 / 5 and 2 * 1 / 5; target 1 and 2 * 2 / 5.
    assert scores["dice_label_dark"] == pytest.approx(0.4) and scores["dice_label_bright"] == pytest.approx(0.4)
    assert scores["dice_target_label_dark"] == 1.0 and scores["dice_target_label_bright"] == pytest.approx(0.8)
    assert list(scores) == dice_names(("dark", "bright"), labels=True)


# --------------------------------------------------------------------------------------------
# The segmenter stage


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A few steps of the segmenter stage on tiny phantom subjects."""
    from lift3d.recipes.segmenter import train_tissue_segmenter

    out = tmp_path_factory.mktemp("segmenter") / "run"
    options = {"size": 16, "num_slices": 8, "num_subjects": 3, "val_size": 1, "test_size": 0}
    folder = train_tissue_segmenter("phantom", options, out, steps=100, batch_size=8, learning_rate=1e-2,
                                    block_out_channels=(8, 16), threads=1)
    return folder, options


def test_the_segmenter_stage_learns_tissue_and_exports_a_folder(trained):
    folder, options = trained
    settings = json.loads((folder / SETTINGS_NAME).read_text())
    assert settings["plugin"] == "tissue-unet" and settings["classes"] == list(TISSUES)
    assert settings["input_grid"]["size"] == [16, 16] and settings["input_grid"]["num_slices"] == 8
    rows = list(csv.DictReader(open(folder.parent / "logs" / "metrics.csv")))
    first = float(next(r for r in rows if r["step"] == "0")["val_dice_mean"])
    assert settings["training"]["validation"]["val_dice_mean"] > first + 0.3
    segmenter = load_tissue_segmenter(folder)
    from lift3d.plugins import create

    pair = create("datasets", "phantom", split="val", **options)[0]
    scores = tissue_dice(segmenter, pair.target, pair.target, labels=pair.extra["tissue"])
    assert all(scores[f"dice_{t}"] == 1.0 for t in TISSUES)  # the same volume, segmented twice
    assert scores["dice_target_label_mean"] == pytest.approx(settings["training"]["validation"]["val_dice_mean"])


def test_a_dataset_without_tissue_maps_is_refused_before_the_run_folder(tmp_path):
    from lift3d.recipes.segmenter import segmenter_config
    from lift3d.training.loop import train

    cfg = segmenter_config("icbm152", {"tissue": False, "size": 16, "num_slices": 8, "voxel_mm": 8, "num_train": 1},
                           tmp_path / "run", steps=2)
    with pytest.raises(ValueError, match=r"subject 'train-00' of dataset 'icbm152' has no tissue maps"):
        train(cfg)
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------------------------
# lift3d-evaluate --segmenter


def test_lift3d_evaluate_scores_tissue_dice_end_to_end(trained, tmp_path, capsys):
    from lift3d.data.nifti import save_volume
    from lift3d.data.orientation import from_slices
    from lift3d.plugins import create

    folder, options = trained
    dataset = create("datasets", "phantom", split="all", **options)
    for i in range(2):
        pair = dataset[i]
        for kind, volume in (("target", pair.target), ("same", pair.target), ("other", dataset[2].target)):
            save_volume(tmp_path / kind / f"s{i}.nii.gz", volume, pair.meta)
        labels = from_slices(tissue_labels(pair.extra["tissue"]).numpy().astype(np.float32), pair.meta.orientation,
                             pair.meta.slice_axis)
        (tmp_path / "labels").mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(labels.astype(np.int16), pair.meta.affine), tmp_path / "labels" / f"s{i}.nii.gz")
    rows = {}
    for kind in ("same", "other"):
        code = evaluate_cli.main(["--pred", str(tmp_path / kind), "--target", str(tmp_path / "target"),
                                  "--labels", str(tmp_path / "labels"), "--segmenter", str(folder),
                                  "--out", str(tmp_path / f"out-{kind}")])
        assert code == 0, capsys.readouterr().err
        rows[kind] = list(csv.DictReader(open(tmp_path / f"out-{kind}" / "metrics.csv")))
        summary = json.loads((tmp_path / f"out-{kind}" / "summary.json").read_text())
        assert set(dice_names(TISSUES, labels=True)) <= set(summary["metrics"]) and summary["higher_is_better"]["dice_gm"]
    same, other = rows["same"][0], rows["other"][0]
    assert float(same["dice_gm"]) == 1.0 and float(same["dice_label_gm"]) == float(same["dice_target_label_gm"])
    assert float(other["dice_mean"]) < 0.95  # another subject's anatomy: the segmentations disagree
    assert float(other["dice_target_label_mean"]) == float(same["dice_target_label_mean"]) > 0.3
    # the CLI's scores are the API's, on the file brought onto the segmenter's grid
    from lift3d.evaluation.segmentation import file_tissue_dice

    api = file_tissue_dice(load_segmenter(folder), tmp_path / "other" / "s0.nii.gz", tmp_path / "target" / "s0.nii.gz",
                           tmp_path / "labels" / "s0.nii.gz")
    assert float(other["dice_label_wm"]) == pytest.approx(api["dice_label_wm"])
    code = evaluate_cli.main(["--pred", str(tmp_path / "same"), "--target", str(tmp_path / "target"),
                              "--labels", str(tmp_path / "labels"), "--out", str(tmp_path / "out-x")])
    assert code == 2 and "give --segmenter DIR too" in capsys.readouterr().err
