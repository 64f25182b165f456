"""``paired-nifti``: any folder (or CSV) of paired 3D images, one subject per pair."""

from __future__ import annotations

import csv as csv_module
from pathlib import Path
from typing import Any

from lift3d.data.errors import VolumeError
from lift3d.data.splits import SPLITS
from lift3d_plugins.datasets._files import (
    PairedFilesDataset,
    SubjectFiles,
    check_root,
    find_first,
    missing_error,
    modality_candidates,
    subject_folders,
    visible_entries,
)

CSV_COLUMNS = ("subject", "source", "target")


class PairedNiftiDataset(PairedFilesDataset):
    """Paired source/target volumes from a folder of subjects, or from a CSV of pairs.

    Folder layout (``source``/``target``/``mask`` are file names, with or without ``.nii.gz``):

        <root>/<subject>/<source>.nii.gz     e.g. root/sub-01/T1.nii.gz
        <root>/<subject>/<target>.nii.gz          root/sub-01/T2.nii.gz
        <root>/<subject>/<mask>.nii.gz            (optional: mask="brainmask")

    Every non-hidden sub-folder of ``root`` is a subject and must hold both files (and the mask,
    if named). ``.nii`` works too. ``target=None`` reads sources only (for inference); each
    pair's ``target`` is then None.

    CSV (``csv=pairs.csv``): columns ``subject,source,target``, optional ``mask`` and ``split``
    (train/val/test, used when no explicit lists are given). Relative paths are resolved against
    ``root`` if given, else the CSV's folder.

    Targets on a different grid are resampled onto the source grid through the affines. Splits:
    explicit ``train``/``val``/``test`` lists, or seeded ``test_size``/``val_size``. All other
    options are those of ``PairedFilesDataset`` (``size``, ``num_slices``, ``slice_axis``...).
    """

    def __init__(
        self,
        root: Path | str | None = None,
        *,
        source: str = "source",
        target: str | None = "target",
        mask: str | None = None,
        csv: Path | str | None = None,
        **options: Any,
    ) -> None:
        if csv is not None:
            files, split_column = _from_csv(Path(csv).expanduser(), root)
            where: object = csv
            if split_column and not any(options.get(k) is not None for k in ("train", "val", "test")):
                for name in ("train", "val", "test"):
                    options[name] = [s for s, sp in split_column.items() if sp == name]
        else:
            root = check_root(root, "paired-nifti")
            files, where = _from_folder(root, source, target, mask), root
        super().__init__(files, where=where, **options)


def _from_folder(root: Path, source: str, target: str | None, mask: str | None) -> list[SubjectFiles]:
    folders = subject_folders(root)
    if not folders:
        raise VolumeError(
            f"{root}: no subjects found; expected one folder per subject: "
            f"{root}/<subject>/" + " and ".join(str(modality_candidates(Path(), n)[0]) for n in (source, target) if n)
        )
    roles = {"source": source} | ({"target": target} if target else {}) | ({"mask": mask} if mask else {})
    files, missing = [], []
    for folder in folders:
        found = {role: find_first(modality_candidates(folder, name)) for role, name in roles.items()}
        lacking = [f"{role} {modality_candidates(Path(), roles[role])[0]}" for role, path in found.items() if path is None]
        if lacking:
            present = ", ".join(p.name for p in visible_entries(folder)) or "nothing"
            missing.append(f"{folder.name} lacks {' and '.join(lacking)} (has: {present})")
        else:
            files.append(SubjectFiles(folder.name, found["source"], found.get("target"), found.get("mask")))
    if missing:
        raise missing_error(root, missing, f"expected {' and '.join(roles.values())} in every subject folder")
    return files


def _from_csv(path: Path, root: Path | str | None) -> tuple[list[SubjectFiles], dict[str, str]]:
    if not path.exists():
        raise VolumeError(f"{path}: CSV of pairs not found")
    if not path.is_file():
        raise VolumeError(f"{path}: is not a regular file; give the CSV of pairs as a file")
    base = Path(root).expanduser() if root is not None else path.parent
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv_module.DictReader(handle)
            columns = [c.strip() for c in reader.fieldnames or []]
            lacking = [c for c in CSV_COLUMNS if c not in columns]
            if lacking:
                raise VolumeError(f"{path}: missing column(s) {', '.join(lacking)}; needs {', '.join(CSV_COLUMNS)} (optional: mask, split); has: {', '.join(columns) or 'none'}")
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if isinstance(k, str) and k}
                    for row in reader]
    except (UnicodeDecodeError, csv_module.Error) as exc:
        raise VolumeError(f"{path}: not a readable CSV of pairs ({exc})") from None
    if not rows:
        raise VolumeError(f"{path}: no rows; needs one row per subject ({', '.join(CSV_COLUMNS)})")
    files, missing, splits = [], [], {}
    for line, row in enumerate(rows, start=2):
        paths = {k: base / row[k] for k in ("source", "target") if row[k]}
        if row.get("mask"):
            paths["mask"] = base / row["mask"]
        lacking = [f"{k} {p}" for k, p in paths.items() if not p.is_file()]
        lacking += [k for k in ("source", "target") if k not in paths]
        if not row["subject"]:
            lacking.append("subject name")
        if lacking:
            missing.append(f"line {line} ({row['subject'] or '?'}): no {', '.join(lacking)}")
            continue
        split = row.get("split", "")
        if split:
            if split not in SPLITS[:3]:
                raise VolumeError(f"{path}: line {line}: unknown split {split!r}; valid: {', '.join(SPLITS[:3])}")
            splits[row["subject"]] = split
        files.append(SubjectFiles(row["subject"], paths["source"], paths["target"], paths.get("mask")))
    if missing:
        raise missing_error(path, missing, "every row needs existing source and target files")
    return files, splits
