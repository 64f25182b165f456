"""``icbm152``: paired T1w / T2w subjects made from the ICBM 152 2009c template, real anatomy built in.

The template (Fonov et al., NeuroImage 2011; McGill University) is one population-average brain. A
2 mm derivative of it ships with the package (``data/icbm152/``, see its README for provenance and
licence). Each subject is that brain under a random smooth deformation and a small rotation,
applied identically to T1, T2, the brain mask and the template's tissue probability maps (CSF, grey
and white matter), plus a bias field and Gaussian noise drawn independently per modality; a subject
depends only on its seed. Any folder holding a T1/T2/mask triple on one grid (the 1 mm template, your
own pair) can stand in for the packaged files; the tissue maps are then the folder's own (``files``
keys ``csf``, ``gm``, ``wm``) or the packaged 2 mm ones, resampled onto its grid by the affines.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch

from lift3d.data.dataset import VolumeDataset
from lift3d.data.errors import VolumeError
from lift3d.data.nifti import load_image
from lift3d.data.orientation import to_slices
from lift3d.data.resample import resize_volume
from lift3d.data.splits import SPLITS, check_split
from lift3d.data.tissue import TISSUES
from lift3d.data.volume import TrainingGrid, prepare_volume
from lift3d.io.budget import check_bytes
from lift3d.io.errors import BudgetError
from lift3d.plugins.protocols import VolumePair

PACKAGED = Path(__file__).resolve().parent / "data" / "icbm152"
FILES = {"T1": "T1w.nii.gz", "T2": "T2w.nii.gz", "mask": "brainmask.nii.gz"}
TISSUE_FILES = {name: f"tpm_{name}.nii.gz" for name in TISSUES}  # csf, gm, wm
MODALITIES = ("T1", "T2")
# Tissue maps lie on the template's brain when (CSF + GM + WM > 0.5) overlaps its brain mask with at least this
# Dice (the packaged maps: 0.99); the packaged maps are not used for a folder in another space.
TISSUE_MIN_DICE = 0.8

# Subject i of a split is drawn from np.random.default_rng(FIRST_SEED[split] + SEED_STRIDE * seed + i):
# seed 0 gives train 1000.., val 1500.., test 2000.. (the ICBM benchmark's protocol), seed 1 gives
# 2500.., 3000.., 3500.., and so on; at most MAX_PER_SPLIT subjects per split keeps every seed distinct.
FIRST_SEED = {"train": 1000, "val": 1500, "test": 2000}
SEED_STRIDE = 1500
MAX_PER_SPLIT = 500

# Memory of one subject, in float32 volumes: about 33 of the template's grid while it is deformed (float64
# coordinates and displacements, measured), and 6 more with tissue maps (the template's and the warped), and 11
# of the training grid (source, target, clean target, mask, 3 tissue maps and the resampling's output), 7 of
# which stay per cached subject.
TEMPLATE_WORKING_VOLUMES = 36
TISSUE_WORKING_VOLUMES = 6
GRID_WORKING_VOLUMES = 11
CACHED_VOLUMES = 7


@dataclass(frozen=True)
class Corruption:
    """How a subject differs from the template; every draw comes from the subject's seed."""

    displacement_mm: float = 3.0  # std of each displacement component at the control points
    displacement_control_points: int = 5  # per axis, cubic-upsampled to the grid
    max_rotation_deg: float = 4.0  # uniform in [-max, max] about each axis, around the brain centre
    bias_log_std: float = 0.1  # the bias field is exp(smooth field with this std): about +-20 %
    bias_control_points: int = 4
    noise_fraction: float = 0.02  # noise std as a fraction of the modality's 99th percentile in the brain

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"icbm152: {f.name} must be a number >= 0, got {value!r}")
        for name in ("displacement_control_points", "bias_control_points"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 2:
                raise ValueError(f"icbm152: {name} must be an integer >= 2, got {value!r}")


@dataclass(frozen=True)
class Template:
    """T1, T2 and mask on the generation grid (RAS), that grid's affine, and the tissue probabilities
    ``(3, ...)`` of ``TISSUES`` on it (None without tissue maps)."""

    t1: np.ndarray
    t2: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    tissue: np.ndarray | None = None

    @property
    def voxel_mm(self) -> float:
        return float(np.linalg.norm(self.affine[:3, 0]))


def template_files(root: Path | str | None = None, files: dict[str, str] | None = None) -> dict[str, Path]:
    """The T1, T2 and mask paths: packaged unless ``root`` is given; ``files`` renames any of them (its
    tissue keys are ``tissue_files``')."""
    names = dict(FILES)
    for key, name in (files or {}).items():
        if key not in FILES and key not in TISSUE_FILES:
            raise ValueError(f"icbm152: unknown key {key!r} in files; valid: {', '.join([*FILES, *TISSUE_FILES])}")
        if key in FILES:
            names[key] = str(name)
    folder = PACKAGED if root is None else Path(root).expanduser()
    if root is not None and not folder.is_dir():
        problem = "template folder not found" if not folder.exists() else "is a file"
        raise VolumeError(f"{folder}: {problem}; icbm152 needs a folder holding {', '.join(names.values())}")
    missing = [name for name in names.values() if not (folder / name).is_file()]
    if missing:
        if root is None:
            raise VolumeError(f"{folder}: packaged ICBM 152 file(s) missing: {', '.join(missing)}; "
                              "reinstall lift3d (pip install --force-reinstall lift3d)")
        present = ", ".join(sorted(p.name for p in folder.iterdir())[:10]) or "nothing"
        raise VolumeError(f"{folder}: template folder lacks {', '.join(missing)} (has: {present}); it needs "
                          f"{', '.join(names.values())} (rename with files={{T1 = ..., T2 = ..., mask = ...}})")
    return {key: folder / name for key, name in names.items()}


def tissue_files(root: Path | str | None = None, files: dict[str, str] | None = None) -> tuple[tuple[Path, ...], bool]:
    """The CSF, GM and WM probability maps, and whether they are the template folder's own: those ``files``
    names (``csf``, ``gm``, ``wm``, all three, in the template folder), else the packaged 2 mm maps."""
    given = [key for key in TISSUE_FILES if key in (files or {})]
    if given and len(given) < len(TISSUE_FILES):
        raise ValueError(f"icbm152: files names the tissue map(s) {', '.join(given)} but not "
                         f"{', '.join(k for k in TISSUE_FILES if k not in given)}; give all of csf, gm, wm or none")
    folder = (PACKAGED if root is None else Path(root).expanduser()) if given else PACKAGED
    paths = tuple(folder / str((files or {}).get(key, name) if given else name) for key, name in TISSUE_FILES.items())
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        hint = "reinstall lift3d (pip install --force-reinstall lift3d)" if not given else \
            "or leave csf, gm and wm out of files (the packaged 2 mm maps are then used), or set tissue = false"
        raise VolumeError(f"{folder}: tissue map(s) missing: {', '.join(missing)}; {hint}")
    return paths, bool(given)


def _on_grid(image: nib.Nifti1Image, shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """``image``'s voxels on the grid ``(shape, affine)``: as they are where the two grids agree, else
    interpolated linearly through the affines (smoothed first where the image's voxels are finer), 0 outside it."""
    from scipy.ndimage import affine_transform, gaussian_filter

    data = np.asarray(image.dataobj, dtype=np.float32)
    if data.shape == tuple(shape) and np.allclose(image.affine, affine, atol=1e-4):
        return data
    finer = np.linalg.norm(affine[:3, :3], axis=0) / np.linalg.norm(image.affine[:3, :3], axis=0)
    sigma = np.maximum(0.0, (finer - 1.0) / 2.0)
    if sigma.any():
        data = gaussian_filter(data, sigma, mode="constant")
    to_image = np.linalg.inv(image.affine) @ affine  # grid voxel -> image voxel
    return affine_transform(data, to_image[:3, :3], to_image[:3, 3], output_shape=tuple(shape), order=1,
                            mode="constant", cval=0.0)


def tissue_overlap(template: Template) -> float:
    """Dice of the template's brain mask and where its tissue maps sum past 0.5 (1 = they lie on its brain)."""
    if template.tissue is None:
        raise ValueError("icbm152: this template has no tissue maps")
    tissue = template.tissue.sum(0) > 0.5
    return float(2 * (tissue & template.mask).sum() / max(1, tissue.sum() + template.mask.sum()))


@functools.lru_cache(maxsize=4)
def _load_template(paths: tuple[Path, Path, Path], stamps: tuple, voxel_mm: float | None, skull_strip: bool,
                   margin_mm: float, tissue_paths: tuple[Path, ...] | None = None) -> Template:
    try:
        images = {key: nib.as_closest_canonical(load_image(p)) for key, p in zip(("T1", "T2", "mask"), paths)}
    except VolumeError as exc:
        packaged = paths[0].parent == PACKAGED
        raise VolumeError(f"{exc}" + ("; the packaged ICBM 152 data is damaged: reinstall lift3d" if packaged else "")) from None
    affine = images["T1"].affine
    for key, image in images.items():
        if image.shape != images["T1"].shape or not np.allclose(image.affine, affine, atol=1e-4):
            raise VolumeError(f"{paths[('T1', 'T2', 'mask').index(key)]}: its grid (shape {image.shape}) differs "
                              f"from {paths[0].name}'s {images['T1'].shape}; the three files must share one grid")
    tissue = None
    if tissue_paths is not None:
        try:
            tissue = [_on_grid(nib.as_closest_canonical(load_image(p)), images["T1"].shape, affine) for p in tissue_paths]
        except VolumeError as exc:
            packaged = tissue_paths[0].parent == PACKAGED
            raise VolumeError(f"{exc}" + ("; the packaged ICBM 152 data is damaged: reinstall lift3d" if packaged else "")) from None
    mask = np.asarray(images["mask"].dataobj) > 0.5
    if not mask.any():
        raise VolumeError(f"{paths[2]}: the brain mask is empty")
    t1, t2 = (np.asarray(images[k].dataobj, dtype=np.float32) for k in MODALITIES)
    if skull_strip:
        t1, t2 = t1 * mask, t2 * mask
    voxel = float(np.linalg.norm(affine[:3, 0]))
    f = 1 if voxel_mm is None else int(round(voxel_mm / voxel))
    if voxel_mm is not None and (f < 1 or abs(f * voxel - voxel_mm) > 1e-3):
        raise ValueError(f"icbm152: voxel_mm={voxel_mm} is not a whole multiple of the template's {voxel:g} mm voxel; "
                         f"valid: {', '.join(f'{voxel * k:g}' for k in (1, 2, 3, 4))}, ...")
    margin = int(round(margin_mm / voxel))

    # The brain's bounding box plus a margin; R widened to A's extent (canonical RAS axes) so axial slices are square.
    lo, hi = np.argwhere(mask).min(0), np.argwhere(mask).max(0) + 1
    lo, hi = np.maximum(lo - margin, 0), np.minimum(hi + margin, mask.shape)
    side = int(hi[1] - lo[1])
    centre = (lo[0] + hi[0]) // 2
    lo[0], hi[0] = centre - side // 2, centre - side // 2 + side
    pad = [(max(0, -int(lo[0])), max(0, int(hi[0]) - mask.shape[0])), (0, 0), (0, 0)]
    extent = [(hi - lo)[a] // f * f for a in range(3)]  # whole blocks only
    box = tuple(slice(int(lo[a]) + pad[a][0], int(lo[a]) + pad[a][0] + extent[a]) for a in range(3))

    def crop(volume: np.ndarray) -> np.ndarray:
        volume = np.pad(volume, pad)[box]
        shape = [s // f for s in volume.shape]
        return volume.reshape(shape[0], f, shape[1], f, shape[2], f).mean(axis=(1, 3, 5), dtype=np.float64)

    scale = np.diag([f, f, f, 1.0])
    scale[:3, 3] = lo + (f - 1) / 2.0  # block centres, in the template's voxel coordinates
    maps = None if tissue is None else np.clip(np.stack([crop(t) for t in tissue]), 0.0, 1.0).astype(np.float32)
    return Template(crop(t1).astype(np.float32), crop(t2).astype(np.float32),
                    crop(mask.astype(np.float32)) > 0.5, affine @ scale, maps)


def load_template(root: Path | str | None = None, *, files: dict[str, str] | None = None,
                  voxel_mm: float | None = None, skull_strip: bool = True, margin_mm: float = 4.0,
                  tissue: bool | None = None) -> Template:
    """The template, cropped to a square in-plane field of view around the brain, block-averaged.

    :param root: a folder with the three files; None = the packaged 2 mm derivative.
    :param voxel_mm: the generation voxel, a whole multiple of the template's (None = the template's).
    :param skull_strip: multiply T1 and T2 by the brain mask (the T2 of the 1 mm template is brain only).
    :param margin_mm: added around the brain's bounding box.
    :param tissue: the tissue maps of ``tissue_files``, brought onto the template's grid by the affines
        (exactly, where they share it). None: where they lie on the template's brain (``TISSUE_MIN_DICE``),
        so the packaged maps are left out for a folder in another space; True: required; False: none.
    """
    if tissue not in (None, True, False):
        raise ValueError(f"icbm152: tissue must be true, false or None (where the maps fit), got {tissue!r}")
    paths = template_files(root, files)
    ordered = tuple(paths[k] for k in ("T1", "T2", "mask"))
    maps, own = tissue_files(root, files) if tissue is not False else (None, False)
    stamps = tuple((p.resolve(), p.stat().st_mtime_ns, p.stat().st_size) for p in ordered + (maps or ()))
    template = _load_template(ordered, stamps, voxel_mm, bool(skull_strip), float(margin_mm), maps)
    if template.tissue is not None and (overlap := tissue_overlap(template)) < TISSUE_MIN_DICE:
        if tissue or own:
            raise VolumeError(f"icbm152: the tissue maps {', '.join(p.name for p in maps)} cover the brain mask "
                              f"{paths['mask'].name} with Dice {overlap:.2f} (< {TISSUE_MIN_DICE}): they do not lie "
                              "on the template's brain; give maps in its space, or set tissue = false")
        template = replace(template, tissue=None)
    return template


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], control_points: int, std: float) -> np.ndarray:
    """Gaussian values on a coarse grid of control points, cubic-upsampled to ``shape``."""
    from scipy.ndimage import zoom

    coarse = rng.normal(0.0, std, size=(control_points,) * len(shape))
    field_ = zoom(coarse, [s / control_points for s in shape], order=3, mode="nearest")
    if field_.shape != tuple(shape):  # float rounding in zoom's output size
        field_ = np.pad(field_, [(0, max(0, s - g)) for s, g in zip(shape, field_.shape)], mode="edge")
        field_ = field_[tuple(slice(0, s) for s in shape)]
    return field_


def rotation_matrix(angles_deg: np.ndarray) -> np.ndarray:
    ax, ay, az = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_subject(template: Template, seed: int, corruption: Corruption = Corruption(),
                 skull_strip: bool = True) -> dict[str, np.ndarray]:
    """One subject on the template's grid: ``T1``, ``T2``, ``mask`` and the clean ``T1_clean``, ``T2_clean``
    (and ``tissue``, ``(3, ...)``, where the template has tissue maps).

    The deformation and rotation are drawn first and shared by T1, T2, mask and tissue maps; then each
    modality draws its own bias field and noise. ``*_clean`` is the deformed image before its bias and noise.
    """
    from scipy.ndimage import map_coordinates

    rng = np.random.default_rng(seed)
    shape = template.t1.shape
    grid = np.stack(np.meshgrid(*[np.arange(s, dtype=np.float64) for s in shape], indexing="ij"))
    centre = np.argwhere(template.mask).mean(0)[:, None, None, None]
    displacement = np.stack([smooth_field(rng, shape, corruption.displacement_control_points,
                                          corruption.displacement_mm / template.voxel_mm) for _ in range(3)])
    rotation = rotation_matrix(rng.uniform(-corruption.max_rotation_deg, corruption.max_rotation_deg, 3))
    # Output voxel p reads the template at R (p - c) + c + d(p).
    coords = np.einsum("ij,j...->i...", rotation, grid - centre) + centre + displacement
    warp = lambda v: map_coordinates(v.astype(np.float32), coords, order=1, mode="constant", cval=0.0)  # noqa: E731
    mask = warp(template.mask.astype(np.float32)) > 0.5
    keep = mask if skull_strip else np.ones_like(mask)
    out = {"mask": mask}
    if template.tissue is not None:  # no random draw: every other volume is the same with or without tissue
        out["tissue"] = np.stack([warp(t) * keep for t in template.tissue]).astype(np.float32)
    for name, volume in (("T1", template.t1), ("T2", template.t2)):
        warped = warp(volume)
        bias = np.exp(smooth_field(rng, shape, corruption.bias_control_points, corruption.bias_log_std))
        reference = float(np.percentile(volume[template.mask], 99))
        noise = rng.normal(0.0, corruption.noise_fraction * reference, size=shape)
        out[name] = (np.clip(warped * bias + noise, 0.0, None) * keep).astype(np.float32)
        out[f"{name}_clean"] = (warped * keep).astype(np.float32)
    return out


def subject_seed(split: str, index: int, seed: int = 0) -> int:
    """The numpy seed of subject ``index`` of ``split`` (see ``FIRST_SEED``)."""
    if split not in FIRST_SEED:
        raise ValueError(f"icbm152: unknown split {split!r}; valid: {', '.join(FIRST_SEED)}")
    if not 0 <= index < MAX_PER_SPLIT:
        raise ValueError(f"icbm152: subject index {index} out of range; at most {MAX_PER_SPLIT} subjects per split")
    return FIRST_SEED[split] + SEED_STRIDE * int(seed) + int(index)


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= MAX_PER_SPLIT:
        raise ValueError(f"icbm152: {name} must be an integer from 0 to {MAX_PER_SPLIT}, got {value!r}")
    return int(value)


class ICBM152Dataset(VolumeDataset):
    """T1 -> T2 subjects (``source``/``target`` may be swapped) made from the ICBM 152 2009c template.

    Splits and seeds: ``num_train``, ``num_val`` and ``num_test`` subjects named ``train-00``,
    ``val-00``, ``test-00``...; subject ``i`` of a split is drawn from numpy's
    ``default_rng(FIRST_SEED[split] + 1500 * seed + i)`` with ``FIRST_SEED`` = train 1000, val 1500,
    test 2000, so the three splits never share a seed, for any ``seed`` and up to 500 subjects per
    split. ``split="all"`` is train, then val, then test.

    Template: the packaged 2 mm derivative, or ``root`` = a folder with ``T1w.nii.gz``,
    ``T2w.nii.gz`` and ``brainmask.nii.gz`` on one grid (other names through ``files``, e.g.
    ``{"T1": "1mm_T1.nii.gz", "T2": "1mm_T2_brain.nii.gz", "mask": "1mm_brainmask.nii.gz"}``).
    It is cropped to the brain plus ``margin_mm``, with square axial slices, and block-averaged to
    ``voxel_mm`` (a whole multiple of its voxel; None keeps it); ``skull_strip`` zeroes everything
    outside the mask. Corruption: see ``Corruption`` (``displacement_mm`` ... ``noise_fraction``).

    Each pair is then served like a ``paired-nifti`` one: reoriented, sliced along ``slice_axis``,
    scaled to [-1, 1] by ``percentiles`` and resampled to ``size`` x ``num_slices``. ``extra`` holds
    ``mask`` ``(1, n, h, w)`` bool, ``clean_target`` (the deformed target before its own bias field
    and noise, mapped to [-1, 1] by the *target's* intensity scaling, so it is comparable with
    predictions of the target), ``target_meta``, ``seed`` and, with tissue maps, ``tissue``: ``(3, n, h, w)``
    float32 probabilities of CSF, grey and white matter (``TISSUES``), deformed
    with the subject and zero outside its brain mask where ``skull_strip``. ``tissue`` (None: where the
    maps lie on the template's brain; True: required; False: none) and ``files`` keys ``csf``, ``gm``,
    ``wm`` choose them, see ``load_template``. ``meta`` writes a volume back on the generation grid,
    with its affine. Nothing is generated until a subject is indexed.
    """

    def __init__(
        self,
        root: Path | str | None = None,
        *,
        split: str = "train",
        files: dict[str, str] | None = None,
        num_train: int = 13,
        num_val: int = 3,
        num_test: int = 6,
        seed: int = 0,
        source: str = "T1",
        target: str = "T2",
        size: int | tuple[int, int] = 48,
        num_slices: int = 24,
        slice_axis: str = "axial",
        multiple: int = 8,
        percentiles: tuple[float, float] = (0.5, 99.5),
        voxel_mm: float | None = None,
        skull_strip: bool = True,
        margin_mm: float = 4.0,
        displacement_mm: float = 3.0,
        displacement_control_points: int = 5,
        max_rotation_deg: float = 4.0,
        bias_log_std: float = 0.1,
        bias_control_points: int = 4,
        noise_fraction: float = 0.02,
        tissue: bool | None = None,
        cache: bool = False,
        cache_size: int | None = None,
    ) -> None:
        check_split(split)
        for role, modality in (("source", source), ("target", target)):
            if modality not in MODALITIES:
                raise ValueError(f"Unknown icbm152 {role} modality {modality!r}; valid: {', '.join(MODALITIES)}")
        if source == target:
            raise ValueError(f"icbm152: source and target are both {source!r}; valid pairs: T1 -> T2, T2 -> T1")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"icbm152: seed must be an integer >= 0, got {seed!r}")
        counts = {"train": _count("num_train", num_train), "val": _count("num_val", num_val),
                  "test": _count("num_test", num_test)}
        options = f"num_slices = {num_slices!r} and size = {size!r}"
        try:
            grid = TrainingGrid(size, num_slices, slice_axis, multiple, percentiles)
        except BudgetError as exc:
            raise BudgetError(f"icbm152: {options}: {exc}") from None
        if cache_size is not None and (isinstance(cache_size, bool) or not isinstance(cache_size, int) or cache_size < 0):
            raise ValueError(f"icbm152: cache_size must be an integer >= 0 or None, got {cache_size!r}")
        subjects = sum(counts[s] for s in SPLITS[:3] if split in (s, "all"))
        cached = min(subjects, subjects if cache_size is None else cache_size) if cache else 0
        held = GRID_WORKING_VOLUMES + CACHED_VOLUMES * cached
        check_bytes(4 * math.prod(grid.shape), f"icbm152: {options} give {' x '.join(map(str, grid.shape))} float32 "
                    f"voxels; {held} such volumes (serving one subject" + (f", and {cached} cached" if cached else "")
                    + ")", copies=held)
        super().__init__(cache=cache, cache_size=cache_size)
        self.grid = grid
        self.num_slices = self.grid.num_slices
        self.split, self.seed, self.source, self.target = split, int(seed), source, target
        self.skull_strip = bool(skull_strip)
        self.corruption = Corruption(float(displacement_mm), displacement_control_points, float(max_rotation_deg),
                                     float(bias_log_std), bias_control_points, float(noise_fraction))
        wanted = [s for s in SPLITS[:3] if split in (s, "all")]
        self._plan = [(f"{s}-{i:02d}", subject_seed(s, i, self.seed)) for s in wanted for i in range(counts[s])]
        if not self._plan:
            raise ValueError(f"icbm152: the {split!r} split is empty (num_train={num_train}, num_val={num_val}, "
                             f"num_test={num_test})")
        self.template = load_template(root, files=files, voxel_mm=voxel_mm, skull_strip=self.skull_strip,
                                      margin_mm=margin_mm, tissue=tissue)
        shape = self.template.t1.shape
        held = TEMPLATE_WORKING_VOLUMES + (TISSUE_WORKING_VOLUMES if self.template.tissue is not None else 0)
        check_bytes(4 * math.prod(shape), f"icbm152: the template grid of {' x '.join(map(str, shape))} voxels "
                    f"(voxel_mm = {voxel_mm!r}); {held} float32 volumes on it while a subject is deformed", copies=held)

    def subjects(self) -> list[str]:
        return [name for name, _ in self._plan]

    def seeds(self) -> dict[str, int]:
        """Subject -> its numpy seed."""
        return dict(self._plan)

    def load(self, index: int) -> VolumePair:
        subject, seed = self._plan[index]
        volumes = make_subject(self.template, seed, self.corruption, self.skull_strip)
        affine = self.template.affine

        def image(array: np.ndarray) -> nib.Nifti1Image:
            return nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine)

        source, meta = prepare_volume(image(volumes[self.source]), self.grid, path=None)
        target, target_meta = prepare_volume(image(volumes[self.target]), self.grid, path=None)
        clean = target_meta.intensity.normalise(to_slices(image(volumes[f"{self.target}_clean"]), self.grid.slice_axis))
        clean = np.clip(resize_volume(clean, self.grid.shape), -1.0, 1.0)
        mask, _ = prepare_volume(image(volumes["mask"]), self.grid, order=0, normalise=False)
        extra = {"mask": torch.from_numpy(mask[None] > 0.5), "clean_target": torch.from_numpy(clean[None]),
                 "target_meta": target_meta, "seed": seed}
        if "tissue" in volumes:
            maps = [prepare_volume(image(t), self.grid, normalise=False)[0] for t in volumes["tissue"]]
            extra["tissue"] = torch.from_numpy(np.clip(np.stack(maps), 0.0, 1.0))
        return VolumePair(subject, torch.from_numpy(source[None]), torch.from_numpy(target[None]), meta=meta, extra=extra)

