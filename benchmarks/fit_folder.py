"""Bring-your-own-data benchmark: ``lift3d fit`` on a paired-nifti folder lift3d has never seen, with no option
beyond the folder and the contrasts, on 2 CPU cores.

The folder: 24 subjects made from the real 1 mm ICBM 152 2009c T1w/T2w template (each a random smooth
deformation and rotation, shared by both contrasts, with its own bias field and noise per contrast; the
``icbm152`` plugin's subject maker), then stored as a scanner might: 1 x 1 x 3 mm anisotropic voxels (every 3
axial slices averaged), LPS orientation (x and y flipped, the affine says so), contrasts named ``T1w`` and
``T2w`` by their file names, and a ``brainmask`` per subject. Nothing of it is lift3d's training grid.

    python benchmarks/fit_folder.py --publish          # about 70 minutes on 2 idle CPU cores

It writes the folder (once) and the run under ``runs/fit-folder/``, and with ``--publish``
``benchmarks/results/fit_folder_cpu.json``: the command, the machine, the fingerprint, the plan, the wall
time of every phase and the test scores with paired intervals.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from lift3d.recipes.reports import REPO, machine_info, write_json

DEFAULT_DATA = REPO.parent / "shared" / "data" / "icbm152-2009c"
FILES = {"T1": "1mm_T1.nii.gz", "T2": "1mm_T2_brain.nii.gz", "mask": "1mm_brainmask.nii.gz"}
SUBJECTS = 24
THICKNESS = 3  # 1 mm axial slices averaged 3 at a time: 3 mm slices


def stored_as_scanned(volume: np.ndarray, affine: np.ndarray, mask: bool = False) -> nib.Nifti1Image:
    """``volume`` (RAS, 1 mm) with every 3 axial slices averaged, in LPS order with the affine to match."""
    z = volume.shape[2] // THICKNESS * THICKNESS
    thick = volume[:, :, :z].reshape(*volume.shape[:2], z // THICKNESS, THICKNESS).mean(axis=3)
    if mask:
        thick = (thick > 0.5).astype(np.float32)
    flipped = thick[::-1, ::-1, :]
    # thick slice k averages slices 3k..3k+2: its centre is slice 3k + 1
    scaled = affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, THICKNESS, 1], [0, 0, 0, 1.0]])
    to_lps = np.array([[-1, 0, 0, volume.shape[0] - 1], [0, -1, 0, volume.shape[1] - 1], [0, 0, 1, 0], [0, 0, 0, 1.0]])
    return nib.Nifti1Image(np.ascontiguousarray(flipped, dtype=np.float32), scaled @ to_lps)


def make_folder(folder: Path, data: Path, subjects: int = SUBJECTS) -> None:
    """Write the benchmark's subjects (skipping those already written)."""
    from lift3d_plugins.datasets.icbm152 import load_template, make_subject

    template = load_template(data, files=FILES, voxel_mm=1, tissue=False)
    for i in range(subjects):
        out = folder / f"sub-{i + 1:02d}"
        if (out / "brainmask.nii.gz").is_file():
            continue
        volumes = make_subject(template, seed=7000 + i)
        out.mkdir(parents=True, exist_ok=True)
        for name, key in (("T1w", "T1"), ("T2w", "T2")):
            nib.save(stored_as_scanned(volumes[key], template.affine), str(out / f"{name}.nii.gz"))
        nib.save(stored_as_scanned(volumes["mask"].astype(np.float32), template.affine, mask=True),
                 str(out / "brainmask.nii.gz"))
        print(f"[folder] {out}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the ICBM 152 2009c folder")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "fit-folder", help="folder and run go here")
    parser.add_argument("--publish", action="store_true", help="write benchmarks/results/fit_folder_cpu.json")
    args = parser.parse_args(argv)
    folder, run = args.out / "data", args.out / "run"
    make_folder(folder, args.data)
    from lift3d.cli.main import main as lift3d

    machine = machine_info()
    command = ["fit", "--data", str(folder), "--source", "T1w", "--target", "T2w", "--out", str(run)]
    tic = time.perf_counter()
    code = lift3d(command)
    wall = time.perf_counter() - tic
    if code != 0:
        return code
    phases = {p.parent.name: json.loads(p.read_text())["wall_s"] for p in sorted(run.glob("*/phase.json"))}
    results = json.loads((run / "results.json").read_text())
    report = {"benchmark": "fit_folder", "command": "python benchmarks/fit_folder.py " + shlex.join(argv or sys.argv[1:]),
              "lift3d_command": "lift3d " + " ".join(command), "machine": machine, "wall_s": wall,
              "phase_wall_s": phases, "fingerprint": json.loads((run / "fingerprint" / "phase.json").read_text())[
                  "fingerprint"], **results}
    write_json(run / "benchmark.json", report)
    if args.publish:
        write_json(REPO / "benchmarks" / "results" / "fit_folder_cpu.json", report)
    print(f"fit of {SUBJECTS} subjects: {wall / 60:.1f} min; {run / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
