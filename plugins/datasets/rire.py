"""``rire``: the RIRE T1 -> T2 brain MRI pairs (https://rire.insight-journal.org), as distributed.

Make-A-Volume uses 17 volumes, 14 for training and 3 for testing, resized to 256 x 256 x 35.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lift3d.data.errors import VolumeError
from lift3d.data.metaimage import METAIMAGE_SUFFIXES, require_simpleitk
from lift3d_plugins.datasets._files import PairedFilesDataset, SubjectFiles, check_root, find_first, missing_error


# Float32 volumes of the training grid while one subject is served (source, target, mask and the
# resampling's output), and those a cached subject keeps (source, target, mask).


def rire_candidates(patient: Path, modality: str) -> list[Path]:
    """Where a modality may be, in order of preference: NIfTI conversions first, then MetaImage."""
    name = f"{patient.name}_{modality}"
    return [
        patient / f"{modality}.nii.gz",
        patient / f"{modality}.nii",
        patient / modality / f"{name}.nii.gz",
        patient / modality / f"{name}.nii",
        patient / modality / f"{name}.mhd",
    ]


class RireDataset(PairedFilesDataset):
    """RIRE patients in the layout the RIRE site distributes, or NIfTI conversions of it:

        <root>/patient_001/mr_T1/patient_001_mr_T1.mhd  (+ .raw)   read with SimpleITK
        <root>/patient_001/mr_T2/patient_001_mr_T2.mhd  (+ .raw)
        <root>/patient_001/mr_T1.nii.gz                            or NIfTI conversions,
        <root>/patient_001/mr_T1/patient_001_mr_T1.nii.gz          preferred when present

    Every ``patient_*`` folder is a subject. MetaImage files need SimpleITK
    (``pip install lift3d[rire]``); NIfTI files do not. ``source``/``target`` pick the
    modality folders (``mr_T1``, ``mr_T2``, ``mr_PD``, ``mr_T1_rectified``...). Defaults follow the
    paper: 256 x 256 x 35 and 3 test patients drawn with ``seed``. With
    ``skip_incomplete=True`` patients lacking a modality are left out instead of being an error.
    """

    plugin_name = "rire"

    def __init__(
        self,
        root: Path | str | None = None,
        *,
        source: str = "mr_T1",
        target: str = "mr_T2",
        skip_incomplete: bool = False,
        size: int | tuple[int, int] = 256,
        num_slices: int = 35,
        test_size: int | float = 3,
        **options: Any,
    ) -> None:
        root = check_root(root, "rire")
        patients = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("patient_"))
        if not patients:
            raise VolumeError(f"{root}: no patient_* folders; expected {root}/patient_001/{source}/patient_001_{source}.mhd")
        files, missing = [], []
        for patient in patients:
            found = {m: find_first(rire_candidates(patient, m)) for m in (source, target)}
            lacking = [m for m, p in found.items() if p is None]
            if lacking:
                missing.append(f"{patient.name} lacks {' and '.join(lacking)}")
            else:
                files.append(SubjectFiles(patient.name, found[source], found[target]))
        if missing and not skip_incomplete:
            raise missing_error(root, missing, f"looked for e.g. {', '.join(p.name for p in rire_candidates(Path('patient_001'), source))}")
        if not files:
            raise VolumeError(f"{root}: no patient has both {source} and {target}")
        metaimages = [p for f in files for p in (f.source, f.target) if p.suffix in METAIMAGE_SUFFIXES]
        if metaimages:
            require_simpleitk(metaimages[0])
        super().__init__(files, where=root, size=size, num_slices=num_slices, test_size=test_size, **options)
