"""The plan of a fit: the training grid, the networks, the steps and the choices to make on validation,
derived from the dataset's fingerprint, the device and the memory budget, and written to ``plan.json``.

As nnU-Net's plan, it is automatic and editable: change ``plan.json`` in the run folder and run the same
``lift3d fit`` command again; the phases whose inputs changed run anew, the others are kept.

The rule (each line a choice a user may override in the file):

- **slice axis**: the voxel axis with the coarsest spacing when the voxels are anisotropic (the
  acquisition's slices, at least 1.5x coarser), else axial;
- **in-plane size**: the native in-plane voxel count, rounded up to what the U-Net divides by, capped by
  the device profile (48 on a CPU, 256 on a GPU);
- **slices**: the through-plane field of view at the in-plane grid's voxel size, capped (32 / 64);
- **networks, steps, batch**: the device profile's; the stage-1 batch halves until the memory check passes;
- **distillation**: the ``direct`` family (``reflow`` may be added), a student trained to sample in 1 Euler
  step (a 2-step one may be added), tried at 1 and 2 network passes on validation, published when within
  ``distill_tolerance_db`` of the chosen few-step sampler.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lift3d.data.fingerprint import Fingerprint
from lift3d.io.schemas import read_json
from lift3d.io.writing import make_folder, write_text_atomic

PLAN_FILE = "plan.json"
PLAN_VERSION = 1
AXIS_NAMES = {"R": "sagittal", "L": "sagittal", "A": "coronal", "P": "coronal", "S": "axial", "I": "axial"}
ANISOTROPY = 1.5
"""Voxels this much coarser along one axis make that axis the slice axis."""


class StageTwoVariant(BaseModel):
    """One stage-2 run to choose among on validation: overrides of the lifted layers and the optimiser."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    kind: str | None = None
    kernel_size: int | None = Field(default=None, ge=1, le=15)
    trainable: Literal["volumetric", "all"] | None = None
    learning_rate: float | None = Field(default=None, gt=0, le=1)
    lr_scheduler: Literal["constant", "cosine", "linear"] | None = None

    def overrides(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)

    def name(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.overrides().items()) or "default"


class Plan(BaseModel):
    """Everything a fit is made of. Written to ``plan.json``; unknown keys are refused (a typo never passes)."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)
    version: Literal[1] = PLAN_VERSION
    device: Literal["cpu", "cuda"] = "cpu"
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    slice_axis: Literal["axial", "coronal", "sagittal"] = "axial"
    size: int = Field(default=48, ge=8, le=1024)
    num_slices: int = Field(default=24, ge=2, le=512)
    widths: list[int] = Field(default_factory=lambda: [16, 32, 64], min_length=1, max_length=6)
    layers_per_block: int = Field(default=1, ge=1, le=4)
    objective: Literal["flow", "ddpm"] = "flow"
    source_context: int = Field(default=0, ge=0, le=8)  # 2.5D: source slices on each side of a target slice
    stage1_steps: int = Field(default=2000, ge=1, le=10**7)
    stage1_batch: int = Field(default=16, ge=1, le=4096)
    stage1_lr: float = Field(default=1e-3, gt=0, le=1)
    stage2_steps: int = Field(default=1200, ge=1, le=10**7)
    stage2_val_every: int = Field(default=150, ge=1, le=10**7)
    stage2_lr: float = Field(default=2e-3, gt=0, le=1)
    stage2_variants: list[StageTwoVariant] = Field(
        default_factory=lambda: [StageTwoVariant(), StageTwoVariant(lr_scheduler="cosine", learning_rate=4e-3)],
        min_length=1, max_length=16)
    evaluation_budget: int = Field(default=8, ge=1, le=1000)
    solver_steps: list[int] = Field(default_factory=lambda: [1, 2, 4, 8], min_length=1, max_length=16)
    solver_samples: list[int] = Field(default_factory=lambda: [1, 2, 4], min_length=1, max_length=16)
    # K >= 2 also tried in antithetic pairs (z, -z) with a deterministic solver, and so is a student's K = 2
    solver_antithetic: bool = True
    # direct won on the ICBM benchmark's validation subjects in both directions (benchmarks/results/icbm-recipe.md)
    distill: list[Literal["direct", "reflow"]] = Field(default_factory=lambda: ["direct"], max_length=2)
    distill_steps: int = Field(default=400, ge=1, le=10**7)
    distill_lr: float = Field(default=5e-4, gt=0, le=1)  # 2e-4 left the ICBM 1-step student 0.3 dB lower
    distill_val_every: int = Field(default=100, ge=1, le=10**7)
    distill_teacher_samples: int = Field(default=1, ge=1, le=16)  # K: the teacher's target, a K-sample mean
    # the Euler steps each student is trained to sample in (one run each): 1, and 2 sequential passes if listed
    distill_student_steps: list[Literal[1, 2]] = Field(default_factory=lambda: [1], min_length=1, max_length=2)
    distill_tolerance_db: float = Field(default=0.1, ge=0, le=100)
    val_size: int = Field(default=3, ge=1, le=10**5)
    test_size: int = Field(default=6, ge=1, le=10**5)
    baseline: bool = False
    baseline_features: list[int] = Field(default_factory=lambda: [16, 16, 32, 64, 128, 16], min_length=6,
                                         max_length=6)
    baseline_steps: int = Field(default=1000, ge=1, le=10**7)
    baseline_batch: int = Field(default=2, ge=1, le=256)
    baseline_lr: float = Field(default=1e-3, gt=0, le=1)
    baseline_val_every: int = Field(default=50, ge=1, le=10**7)
    why: dict[str, str] = Field(default_factory=dict)

    @property
    def multiple(self) -> int:
        """What the in-plane size must divide by: the U-Net's downsampling."""
        return 2 ** (len(self.widths) - 1)

    def data_options(self) -> dict[str, Any]:
        """The dataset options that put every subject on the plan's training grid."""
        return {"size": self.size, "num_slices": self.num_slices, "slice_axis": self.slice_axis,
                "multiple": self.multiple}


PROFILES: dict[str, dict[str, Any]] = {
    # 2 CPU cores: the ICBM protocol's scale (a volume in about a second; a fit well inside 90 minutes).
    "cpu": {"max_size": 48, "max_slices": 32, "widths": [16, 32, 64], "layers_per_block": 1,
            "stage1_steps": 2000, "stage1_batch": 16, "stage2_steps": 1200, "stage2_val_every": 150},
    # One GPU: the paper's grid.
    "cuda": {"max_size": 256, "max_slices": 64, "widths": [64, 128, 256, 256], "layers_per_block": 2,
             "stage1_steps": 30000, "stage1_batch": 32, "stage2_steps": 4000, "stage2_val_every": 500,
             "stage1_lr": 1e-4, "stage2_lr": 1e-4, "baseline_steps": 10000, "baseline_batch": 1,
             "baseline_features": [32, 32, 64, 128, 256, 32], "baseline_val_every": 500,
             "distill_steps": 2000, "distill_val_every": 250},
}


def _slice_axis(fp: Fingerprint) -> tuple[str, int, str]:
    """The slice axis, its voxel axis in the most common orientation, and why."""
    orientation = max(fp.orientations, key=fp.orientations.get)
    coarsest = max(range(3), key=lambda i: fp.median_spacing[i])
    if fp.anisotropy >= ANISOTROPY:
        axis = AXIS_NAMES[orientation[coarsest]]
        return axis, coarsest, (f"voxels {fp.anisotropy:.2g}x coarser along voxel axis {coarsest} "
                                f"({orientation[coarsest]}): {axis} slices, as acquired")
    axis_index = next(i for i, code in enumerate(orientation) if AXIS_NAMES[code] == "axial")
    return "axial", axis_index, f"near-isotropic voxels (anisotropy {fp.anisotropy:.2g}): axial slices"


def _round_up(value: float, multiple: int) -> int:
    return max(multiple, int(math.ceil(value / multiple)) * multiple)


def make_plan(fp: Fingerprint, *, device: str = "cpu", subjects: int | None = None, seed: int = 0,
              baseline: bool = False) -> Plan:
    """The automatic plan for the dataset of fingerprint ``fp`` on ``device`` (``"cpu"`` or ``"cuda"``)."""
    profile = dict(PROFILES["cuda" if device.startswith("cuda") else "cpu"])
    axis, through, why_axis = _slice_axis(fp)
    in_plane = [i for i in range(3) if i != through]
    multiple = 2 ** (len(profile["widths"]) - 1)
    native = max(fp.median_shape[i] for i in in_plane)
    size = min(profile.pop("max_size"), _round_up(native, multiple))
    fov = max(fp.median_shape[i] * fp.median_spacing[i] for i in in_plane)
    voxel = fov / size
    depth = fp.median_shape[through] * fp.median_spacing[through]
    num_slices = max(8, min(profile.pop("max_slices"), int(round(depth / voxel))))
    count = fp.count if subjects is None else subjects
    val_size, test_size = _held_out(count)
    why = {"slice_axis": why_axis,
           "size": f"{native} native in-plane voxels, rounded to a multiple of {multiple}, capped for {device}",
           "num_slices": f"{depth:.0f} mm through-plane at {voxel:.2g} mm in-plane voxels, capped for {device}",
           "split": f"{count} subjects: {val_size} validation, {test_size} test, the rest training",
           "profile": f"the {device} profile's networks and steps"}
    return Plan(device="cuda" if device.startswith("cuda") else "cpu", seed=seed, slice_axis=axis, size=size,
                num_slices=num_slices, val_size=val_size, test_size=test_size, baseline=baseline, why=why,
                **profile)


def _held_out(count: int) -> tuple[int, int]:
    """Validation and test subjects: about 15 % and 25 %, at least 1 and 2, leaving at least 2 to train."""
    val = max(1, round(0.15 * count))
    test = max(2, round(0.25 * count))
    while count - val - test < 2 and test > 1:
        test -= 1
    return val, test


def save_plan(plan: Plan, folder: Path) -> Path:
    path = make_folder(folder) / PLAN_FILE
    write_text_atomic(path, json.dumps(plan.model_dump(mode="json", exclude_none=True), indent=1) + "\n")
    return path


def load_plan(path: Path) -> Plan:
    """The plan in ``path``, checked: an unknown key, a wrong type or a value out of range is one line naming
    the file and the key."""
    return read_json(path, Plan, folder=Path(path).parent, what="plan")
