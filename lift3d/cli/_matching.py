"""How ``lift3d-evaluate`` pairs each prediction with its target, mask, source, std map and labels.

A prediction's *subject name* is its file name without ``.nii.gz``/``.nii`` (``sub-01_synth``); its
*base name* drops lift3d-synthesize's ``_synth`` too (``sub-01``). Each of ``--target``, ``--mask``,
``--source``, ``--std`` and ``--labels`` may be:

- one file per prediction, in ``--pred`` order (predictions given as files);
- one file for every prediction (``--mask``), or for the one prediction of a ``--pred`` folder;
- files matched by name (``--pred`` a folder, e.g. ``--target data/*/T2.nii.gz``): a file belongs to the
  prediction whose subject or base name is its own name (``sub-01.nii.gz``, ``sub-01_std.nii.gz``) or
  its folder's (``sub-01/T2.nii.gz``, a ``paired-nifti`` layout);
- a folder holding, per prediction, a file of the same name or of its base name (``synth/a_synth.nii.gz``
  -> ``targets/a.nii.gz``);
- a pattern with ``{name}``, replaced by each prediction's base name (``data/{name}/T2.nii.gz``).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from lift3d.cli._common import OUTPUT_SUFFIX, STD_SUFFIX, UserError
from lift3d.data.nifti import NIFTI_SUFFIXES, list_image_files

NAME_FIELD = "{name}"
SYNTH = OUTPUT_SUFFIX[: -len(".nii.gz")]  # "_synth"
STD = STD_SUFFIX[: -len(".nii.gz")]  # "_std"
_SHOWN = 3  # names listed in an error line before "and N more"


@dataclass(frozen=True)
class Subject:
    name: str
    prediction: Path
    target: Path
    mask: Path | None = None
    source: Path | None = None
    std: Path | None = None
    labels: Path | None = None


def subject_name(path: Path) -> str:
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


def base_name(path: Path) -> str:
    """The subject name without lift3d-synthesize's ``_synth`` (``a_synth.nii.gz`` -> ``a``)."""
    name = subject_name(path)
    return name[: -len(SYNTH)] if name.endswith(SYNTH) and len(name) > len(SYNTH) else name


def std_candidates(prediction: Path) -> list[str]:
    """File names a std map of ``prediction`` may have, in order: the same name;
    lift3d-synthesize's (``<name>_synth.nii.gz`` -> ``<name>_std.nii.gz``); ``<stem>_std.nii.gz``."""
    name, stem = prediction.name, subject_name(prediction)
    synth = [name[: -len(OUTPUT_SUFFIX)] + STD_SUFFIX] if name.endswith(OUTPUT_SUFFIX) else []
    return [name, *synth, stem + STD_SUFFIX]


def _listed(names: Sequence[str], separator: str = ", ") -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return separator.join(names[:_SHOWN]) + more


def predictions_in(folder: Path) -> tuple[list[Path], list[Path]]:
    """The predictions in ``folder``, and the std maps beside them (``a_synth_std.nii.gz`` beside
    ``a_synth.nii.gz``, as the fit recipe writes them), which are not predictions."""
    files = list_image_files(folder, NIFTI_SUFFIXES)
    stds = {name for path in files for name in std_candidates(path)[1:]}
    return [p for p in files if p.name not in stds], [p for p in files if p.name in stds]


def _check_exists(path: Path, role: str) -> Path:
    if not path.exists():
        raise UserError(f"{role} file not found: {path}")
    if path.is_dir():
        raise UserError(f"{role} {path} is a directory; give a directory only as the single --{role} path")
    return path


def _candidates(prediction: Path, role: str) -> list[str]:
    base = base_name(prediction)
    names = std_candidates(prediction) if role == "std" else [prediction.name]
    return list(dict.fromkeys([*names, *(base + suffix for suffix in NIFTI_SUFFIXES)]))


def _from_folder(directory: Path, predictions: list[Path], role: str) -> list[Path]:
    matched, missing = [], []
    for prediction in predictions:
        names = _candidates(prediction, role)
        found = next((directory / n for n in names if (directory / n).is_file()), None)
        subject_folder = directory / base_name(prediction)
        if found is None and subject_folder.is_dir() and not subject_folder.is_symlink():
            inside = [p.name for p in list_image_files(subject_folder, NIFTI_SUFFIXES)]
            example = inside[0] if inside else f"<{role}>.nii.gz"
            raise UserError(f"{role} directory {directory} holds a folder {base_name(prediction)}/ for prediction "
                            f"{prediction.name} (files: {_listed(inside) or 'none'}); say which file is the {role}: "
                            f"--{role} '{directory}/{NAME_FIELD}/{example}' or --{role} {directory}/*/{example}")
        if found is None:
            missing.append(f"{prediction.name} (looked for {', '.join(names)})")
        matched.append(found)
    if missing:
        raise UserError(f"{role} directory {directory} has no file for prediction {_listed(missing, '; ')}")
    return matched  # type: ignore[return-value]


def _keys(path: Path) -> set[str]:
    """The names a file given among several answers to: its own, without ``_std``/``_synth``, its folder's."""
    stem = subject_name(path)
    stripped = {stem[: -len(end)] for end in (SYNTH + STD, STD, SYNTH) if stem.endswith(end) and len(stem) > len(end)}
    return {stem, *stripped, path.parent.name}


def _by_name(files: list[Path], predictions: list[Path], role: str) -> list[Path]:
    keys = {path: _keys(path) for path in files}
    matched, missing = [], []
    for prediction in predictions:
        names = {subject_name(prediction), base_name(prediction)}
        found = [path for path in files if names & keys[path]]
        if len(found) > 1:
            raise UserError(f"{len(found)} --{role} files match prediction {prediction.name}: "
                            f"{_listed([str(p) for p in found])}; give one per prediction")
        if not found:
            missing.append(prediction.name)
        matched.append(found[0] if found else None)
    if missing:
        raise UserError(f"no --{role} file is named for {len(missing)} prediction(s): {_listed(missing)} (a file "
                        f"matches by its name, <name>.nii.gz, or its folder's, <name>/...; <name> = "
                        f"{base_name(Path(missing[0]))})")
    return matched  # type: ignore[return-value]


def per_subject(paths: Sequence[str] | None, predictions: list[Path], role: str, *, allow_one: bool,
                by_name: bool) -> list[Path | None]:
    """Resolve one of --target/--mask/--source/--std/--labels to one path (or None) per prediction.

    ``by_name``: the predictions come from a folder (sorted by name), so several files are matched by
    name, never by their order on the command line."""
    if not paths:
        return [None] * len(predictions)
    if len(paths) == 1 and NAME_FIELD in paths[0]:
        return [_check_exists(Path(paths[0].replace(NAME_FIELD, base_name(p))), role) for p in predictions]
    if len(paths) == 1 and Path(paths[0]).is_dir():
        return _from_folder(Path(paths[0]), predictions, role)  # type: ignore[return-value]
    resolved = [_check_exists(Path(p), role) for p in paths]
    if len(resolved) == 1 and (allow_one or len(predictions) == 1):
        return resolved * len(predictions)  # type: ignore[return-value]
    if by_name:
        return _by_name(resolved, predictions, role)  # type: ignore[return-value]
    if len(resolved) == len(predictions):
        return resolved  # type: ignore[return-value]
    valid = f"1 or {len(predictions)}" if allow_one and len(predictions) > 1 else f"{len(predictions)}"
    if role == "target":
        raise UserError(f"got {len(predictions)} --pred files but {len(resolved)} --target files; give one target "
                        "per prediction")
    raise UserError(f"got {len(resolved)} --{role} paths for {len(predictions)} predictions; give {valid}, "
                    "or a directory")


def collect_subjects(args: argparse.Namespace) -> tuple[list[Subject], list[Path]]:
    """Pair predictions with targets (and masks, sources, std maps, labels), checking every path exists;
    also return the std maps skipped in a --pred folder."""
    skipped: list[Path] = []
    by_name = len(args.pred) == 1 and Path(args.pred[0]).is_dir()
    if by_name:
        pred_dir = Path(args.pred[0])
        predictions, skipped = predictions_in(pred_dir)
        if not predictions:
            raise UserError(f"prediction directory {pred_dir} holds no {' or '.join(NIFTI_SUFFIXES)} file")
    else:
        predictions = [_check_exists(Path(p), "prediction") for p in args.pred]
    roles = {"target": False, "mask": True, "source": False, "std": False}
    found = {role: per_subject(getattr(args, role), predictions, role, allow_one=one, by_name=by_name)
             for role, one in roles.items()}
    subjects = [Subject(subject_name(p), p, *(found[role][i] for role in roles))  # type: ignore[misc]
                for i, p in enumerate(predictions)]
    if getattr(args, "labels", None):
        if not getattr(args, "segmenter", None):
            raise UserError("--labels are scored against a segmentation: give --segmenter DIR too")
        labels = per_subject(args.labels, predictions, "labels", allow_one=False, by_name=by_name)
        subjects = [replace(subject, labels=path) for subject, path in zip(subjects, labels)]
    names = [s.name for s in subjects]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"several predictions share the subject name {', '.join(duplicates)}; file names must differ")
    return subjects, skipped
