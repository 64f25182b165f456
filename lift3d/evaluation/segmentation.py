"""Downstream segmentation: a synthesised volume is as good as what a tissue segmenter finds in it.

``tissue_dice`` segments the synthesised and the real target volume with the same segmenter and scores,
per tissue, the Dice of the two segmentations (``dice_csf``...) and, where labels are given, of each against
them (``dice_label_*`` for the synthesis, ``dice_target_label_*`` for the real target: the segmenter's own
ceiling). Dice is torchmetrics' (``dice_score``); a tissue absent from both segmentations scores NaN.
A segmenter is any ``lift3d.plugins.protocols.Segmenter``; ``load_segmenter`` loads a folder through
the entry of ``SEGMENTERS`` its ``segmenter.json`` names (the built-in is ``tissue-unet``,
``lift3d.evaluation.tissue_unet``; plugins add theirs through ``lift3d_register_segmenters``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lift3d.data.intensity import IntensityScaling
from lift3d.data.nifti import load_image
from lift3d.data.orientation import to_slices
from lift3d.data.tissue import tissue_labels
from lift3d.data.volume import TrainingGrid, prepare_volume
from lift3d.evaluation.tissue_unet import SegmenterError, load_tissue_segmenter, read_settings
from lift3d.plugins.protocols import Segmenter
from lift3d.plugins.registry import Registry

SEGMENTERS: Registry[Any] = Registry(
    "segmenters", doc="labels tissue in a volume, to score synthesis downstream (lift3d.plugins.protocols.Segmenter)")
# Registered here rather than by a decorator in tissue_unet.py: this module imports tissue_unet (the folder's
# settings reader), so the built-in is registered whenever the registry is imported, without an import cycle.
SEGMENTERS.add("tissue-unet", load_tissue_segmenter)

PREFIXES = {"segmentation": "dice_", "labels": "dice_label_", "target_labels": "dice_target_label_"}


def load_segmenter(path: str | Path, *, manager: Any = None) -> Segmenter:
    """The segmenter saved in the folder ``path``, built by the plugin its ``segmenter.json`` names.

    ``manager`` is a ``lift3d.plugins.PluginManager`` whose segmenters to use (default: ``SEGMENTERS``).
    Every way the folder can be bad is one ``Lift3dError`` line naming it.
    """
    settings = read_settings(path)
    registry = manager.registry("segmenters") if manager is not None else SEGMENTERS
    if settings.plugin not in registry:
        raise SegmenterError(f"{Path(path) / 'segmenter.json'} names the plugin {settings.plugin!r}: Unknown segmenter "
                             f"{settings.plugin!r}; available: {', '.join(registry.names()) or 'none'} (install the "
                             "package that provides it; `lift3d plugins --kind segmenters` lists them)")
    segmenter = registry.create(settings.plugin, path=Path(path))
    classes = getattr(segmenter, "classes", None)
    if not callable(getattr(segmenter, "segment", None)) or not isinstance(classes, (tuple, list)) or not classes:
        raise SegmenterError(f"segmenter plugin {settings.plugin!r} built a {type(segmenter).__name__} from {path}, "
                             "which has no segment(volume) method or no classes; see lift3d.plugins.protocols.Segmenter")
    return segmenter


def _volume(x: Any, name: str) -> Tensor:
    x = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    if x.dim() == 4 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 3:
        raise ValueError(f"{name} must be a volume (n, h, w) or (1, n, h, w); got shape {tuple(x.shape)}")
    return x


def as_labels(labels: Any, classes: tuple[str, ...]) -> Tensor:
    """``(n, h, w)`` int64 labels from integer labels ``(n, h, w)``/``(1, n, h, w)``, or from probabilities
    ``(K, n, h, w)`` of the ``K`` classes (a dataset's ``extra["tissue"]``: the most probable, background included)."""
    x = labels if isinstance(labels, Tensor) else torch.as_tensor(np.asarray(labels))
    if x.is_floating_point() and x.dim() == 4 and x.shape[0] == len(classes):
        return tissue_labels(x)
    x = _volume(x, "labels")
    if x.is_floating_point():
        if not torch.equal(x, x.round()):
            raise ValueError(f"labels must be whole numbers 0..{len(classes)} (0 = background), or "
                             f"({len(classes)}, n, h, w) probabilities; got fractional values")
    x = x.long()
    if x.numel() and (x.min() < 0 or x.max() > len(classes)):
        raise ValueError(f"labels must lie in 0..{len(classes)} (0 = background, then {', '.join(classes)}); "
                         f"got {int(x.min())}..{int(x.max())}")
    return x


def dice_scores(segmentation: Tensor, reference: Tensor, classes: tuple[str, ...], mask: Any = None,
                prefix: str = "dice_") -> dict[str, float]:
    """Per class, the Dice of two label maps ``(n, h, w)`` (inside ``mask`` where given), as ``{prefix}{class}``,
    and their mean over the classes present, ``{prefix}mean``. A class absent from both is NaN."""
    from torchmetrics.functional.segmentation import dice_score

    a, b = as_labels(segmentation, classes), as_labels(reference, classes)
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if mask is not None:
        inside = _volume(mask, "mask").bool()
        if inside.shape != a.shape:
            raise ValueError(f"mask has shape {tuple(inside.shape)}, the label maps {tuple(a.shape)}")
        a, b = a * inside, b * inside  # outside the mask both are background, which is not scored
    scores = dice_score(a[None], b[None], num_classes=len(classes) + 1, include_background=False, average="none",
                        input_format="index")[0]
    out = {f"{prefix}{name}": float(value) for name, value in zip(classes, scores)}
    present = [v for v in out.values() if not math.isnan(v)]
    out[f"{prefix}mean"] = sum(present) / len(present) if present else math.nan
    return out


def tissue_dice(segmenter: Segmenter, prediction: Any, target: Any, labels: Any = None,
                mask: Any = None) -> dict[str, float]:
    """Dice per tissue between the segmentations of ``prediction`` and ``target`` (``dice_<class>``, ``dice_mean``),
    and with ``labels``, of each against them (``dice_label_*``, ``dice_target_label_*``).

    ``prediction`` and ``target`` are volumes ``(1, n, h, w)`` or ``(n, h, w)`` scaled as the segmenter was
    trained (a dataset's [-1, 1]); ``labels`` are integer labels or ``(K, n, h, w)`` probabilities (a dataset's
    ``extra["tissue"]``); ``mask`` restricts every score to its voxels.
    """
    classes = tuple(segmenter.classes)
    ours, theirs = segmenter.segment(_volume(prediction, "prediction")), segmenter.segment(_volume(target, "target"))
    scores = dice_scores(ours, theirs, classes, mask, PREFIXES["segmentation"])
    if labels is not None:
        reference = as_labels(labels, classes)
        scores |= dice_scores(ours, reference, classes, mask, PREFIXES["labels"])
        scores |= dice_scores(theirs, reference, classes, mask, PREFIXES["target_labels"])
    return scores


def dice_names(classes: tuple[str, ...], labels: bool = False) -> list[str]:
    """The keys ``tissue_dice`` returns for ``classes`` (with ``labels`` given or not), in order."""
    kinds = ["segmentation", "labels", "target_labels"] if labels else ["segmentation"]
    return [f"{PREFIXES[kind]}{name}" for kind in kinds for name in (*classes, "mean")]


# Image files (lift3d-evaluate --segmenter)


def _grid(segmenter: Segmenter) -> TrainingGrid | None:
    grid = getattr(segmenter, "input_grid", None)
    if not grid:
        return None
    return TrainingGrid(tuple(grid["size"]), grid["num_slices"], grid.get("slice_axis", "axial"), 1,
                        tuple(grid.get("percentiles", (0.5, 99.5))))


def image_volume(segmenter: Segmenter, path: str | Path, slice_axis: str = "axial", *,
                 labels: bool = False) -> Tensor:
    """An image file as the segmenter takes it: on its ``input_grid`` where it has one (else the file's own
    voxels, sliced along ``slice_axis``), scaled to [-1, 1] by its percentiles; or with ``labels``, a label map
    or mask on the same grid (nearest neighbour, values kept)."""
    image = load_image(path)
    grid = _grid(segmenter)
    if grid is not None:
        volume, _ = prepare_volume(image, grid, order=0 if labels else 1, normalise=not labels)
    else:
        volume = to_slices(image, slice_axis)
        if not labels:
            volume = np.clip(IntensityScaling.fit(volume, (0.5, 99.5), source=path).normalise(volume), -1.0, 1.0)
    return torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))


def file_tissue_dice(segmenter: Segmenter, prediction: str | Path, target: str | Path, labels: str | Path | None = None,
                     mask: str | Path | None = None, slice_axis: str = "axial") -> dict[str, float]:
    """``tissue_dice`` of image files (a label file holds 0 = background, then 1..K in the segmenter's order)."""
    volumes = [image_volume(segmenter, p, slice_axis) for p in (prediction, target)]
    reference = None if labels is None else image_volume(segmenter, labels, slice_axis, labels=True).round().long()
    inside = None if mask is None else image_volume(segmenter, mask, slice_axis, labels=True) > 0
    try:
        return tissue_dice(segmenter, *volumes, labels=reference, mask=inside)
    except ValueError as exc:
        raise SegmenterError(f"{prediction}: {exc}") from None
