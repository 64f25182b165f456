"""Setting up a fit (``lift3d.recipes.fit.fit``): the request, the fingerprint, the plan and the split,
each checked and written before any training."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from lift3d.data.errors import VolumeError
from lift3d.data.fingerprint import check_subject_count, fingerprint, fingerprint_pairs
from lift3d.data.splits import split_subjects
from lift3d.io.errors import Lift3dError
from lift3d.io.schemas import read_json
from lift3d.io.writing import make_folder, write_text_atomic
from lift3d.plugins import create
from lift3d.recipes.make_a_volume import Recipe
from lift3d.recipes.phases import Phases
from lift3d.recipes.plan import PLAN_FILE, Plan, load_plan, make_plan, save_plan

MASK_NAMES = ("brainmask", "mask", "brain_mask")
"""File names (without suffix) taken as the brain mask when every subject folder holds one."""


@dataclass
class FitRequest:
    """What the user asked for: the data, the contrasts and the run folder; everything else is planned.

    :param options: dataset options beyond the grid, e.g. ``{"root": FOLDER, "mask": "brainmask"}``.
    :param plan: an explicit plan (a benchmark's); None: ``RUN/plan.json`` if it exists, else planned.
    :param split: a JSON file ``{"train": [...], "val": [...], "test": [...]}``; None: a seeded split.
    """

    out: Path
    source: str
    target: str
    dataset: str = "paired-nifti"
    options: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    seed: int = 0
    baseline: bool = False
    plan: Plan | None = None
    split: Path | None = None
    log: Callable[[str], None] = print


@dataclass
class FitContext:
    """What the phases share once the data, the plan and the split are fixed."""

    request: FitRequest
    phases: Phases
    plan: Plan
    data: dict[str, Any]  # the dataset options every stage trains and scores with
    splits: dict[str, list[str]]
    device: torch.device

    def pairs(self, split: str) -> list[Any]:
        dataset = create("datasets", self.request.dataset, split=split, **self.data)
        return [dataset[i] for i in range(len(dataset))]

    def recipe(self, variant: dict[str, Any] | None = None) -> Recipe:
        plan, variant = self.plan, dict(variant or {})
        optim = {k: variant.pop(k) for k in ("learning_rate", "lr_scheduler") if k in variant}
        return Recipe(dataset=self.request.dataset, data_options=self.data, widths=tuple(plan.widths),
                      stage1_steps=plan.stage1_steps, stage2_steps=plan.stage2_steps,
                      layers_per_block=plan.layers_per_block, objective=plan.objective,
                      source_context=plan.source_context,
                      stage1_batch=plan.stage1_batch, stage1_lr=plan.stage1_lr, stage2_lr=plan.stage2_lr,
                      stage2_lift=variant, stage2_optim=optim, validate_every=plan.stage2_val_every,
                      val_volumes=len(self.splits["val"]), name=f"{self.request.out / PLAN_FILE}")


def detect_mask(root: Path) -> str | None:
    """The mask name every subject folder of ``root`` holds (``brainmask``, ``mask``...), else None."""
    if not root.is_dir():
        return None  # the dataset says what is wrong with the folder
    folders = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    for name in MASK_NAMES:
        if folders and all(any((f / f"{name}{s}").is_file() for s in (".nii.gz", ".nii")) for f in folders):
            return name
    return None


def _dataset_options(request: FitRequest) -> dict[str, Any]:
    options = {"source": request.source, "target": request.target, **request.options}
    if request.dataset == "paired-nifti" and "mask" not in options and options.get("root"):
        options["mask"] = detect_mask(Path(options["root"]))
    return options


def _fingerprint_phase(request: FitRequest, phases: Phases, options: dict[str, Any]) -> dict[str, Any]:
    """The dataset's fingerprint, keyed on its files (their names and times), or, for a dataset without files
    (a generated one, which also keeps its own splits), on its options."""
    files = getattr(create("datasets", request.dataset, split="all", **options), "files", None)
    if files is None:
        def from_pairs(folder: Path) -> dict[str, Any]:
            pairs = [p for split in ("train", "val", "test")
                     for ds in [create("datasets", request.dataset, split=split, **options)]
                     for p in (ds[i] for i in range(len(ds)))]
            request.log(f"[fingerprint] {len(pairs)} subjects of {request.dataset!r} (its own splits)")
            print_ = fingerprint_pairs(pairs, source=request.source, target=request.target)
            return {"fingerprint": print_.to_json(), "own_splits": True}

        return phases.run("fingerprint", {"dataset": request.dataset, "options": options}, from_pairs)
    stamp = [[f.subject, *(str(p) for p in (f.source, f.target, f.mask) if p)] for f in files]
    stamp = [row + [os.stat(p).st_mtime_ns for p in row[1:]] for row in stamp]

    def work(folder: Path) -> dict[str, Any]:
        request.log(f"[fingerprint] {len(files)} subjects")
        return {"fingerprint": fingerprint(files, source=request.source, target=request.target).to_json()}

    return phases.run("fingerprint", {"files": stamp}, work)


def _plan(request: FitRequest, fp: dict[str, Any] | None) -> Plan:
    path = request.out / PLAN_FILE
    if request.plan is not None:
        save_plan(request.plan, request.out)
        return request.plan
    if path.is_file():
        request.log(f"[plan] {path} (as written there; edit it and re-run to change the fit)")
        return load_plan(path)
    from lift3d.data.fingerprint import Fingerprint, SubjectFingerprint

    subjects = tuple(SubjectFingerprint(**{k: tuple(v) if isinstance(v, list) else v for k, v in s.items()})
                     for s in fp["subjects"])
    plan = make_plan(Fingerprint(fp["source"], fp["target"], subjects),
                     device="cuda" if request.device.startswith("cuda") else "cpu", seed=request.seed,
                     baseline=request.baseline)
    save_plan(plan, request.out)
    request.log(f"[plan] {path}: {plan.num_slices} {plan.slice_axis} slices of {plan.size} x {plan.size}, "
                f"U-Net {plan.widths}, {plan.objective}; " + "; ".join(plan.why.values()))
    return plan


def _split(request: FitRequest, plan: Plan, subjects: list[str] | None) -> dict[str, list[str]]:
    """The user's split file, or a seeded split of ``subjects``; None subjects: the dataset's own splits."""
    if subjects is None:
        return {s: create("datasets", request.dataset, split=s, **_dataset_options(request)).subjects()
                for s in ("train", "val", "test")}
    if request.split is not None:
        given = read_json(request.split, what="split file")
        lists = {k: given.get(k) for k in ("train", "val", "test")}
        if any(v is not None and not (isinstance(v, list) and all(isinstance(s, str) for s in v))
               for v in lists.values()):
            raise Lift3dError(f"{request.split}: train, val and test must be lists of subject names")
        try:
            split = split_subjects(subjects, **lists, where=request.split)
        except ValueError as exc:
            raise Lift3dError(str(exc)) from None
    else:
        check_subject_count(len(subjects), plan.val_size + plan.test_size + 2,
                            f"of {plan.val_size} validation, {plan.test_size} test and 2 training subjects")
        split = split_subjects(subjects, val_size=plan.val_size, test_size=plan.test_size, seed=plan.seed)
    for name in ("train", "val", "test"):
        if not split[name]:
            raise VolumeError(f"the {name} split is empty ({len(subjects)} subjects); give it subjects")
    return {k: split[k] for k in ("train", "val", "test")}


def prepare(request: FitRequest) -> FitContext:
    """Fingerprint, plan and split: everything checked and written before any training. A run folder this
    call created is removed again when the data are refused before anything was written into it."""
    options = _dataset_options(request)
    create("datasets", request.dataset, split="all", **options)  # a missing folder or bad option fails here
    created = not request.out.exists()
    make_folder(request.out)
    try:
        return _prepare(request, options)
    except BaseException:
        if created and request.out.is_dir() and not any(request.out.iterdir()):
            request.out.rmdir()
        raise


def _prepare(request: FitRequest, options: dict[str, Any]) -> FitContext:
    phases = Phases(request.out, log=request.log)
    record = _fingerprint_phase(request, phases, options)
    fp = record["fingerprint"]
    plan = _plan(request, fp)
    subjects = None if record.get("own_splits") else [s["subject"] for s in fp["subjects"]]
    splits = _split(request, plan, subjects)
    write_text_atomic(request.out / "split.json", json.dumps(splits, indent=1) + "\n")
    data = {**options, **plan.data_options(), "cache": True}
    if subjects is not None:
        data |= {k: splits[k] for k in ("train", "val", "test")}
    device = torch.device(request.device)
    return FitContext(request, phases, plan, data, splits, device)
