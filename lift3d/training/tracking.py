"""A CSV tracker for Accelerate, so logs need no extra dependency (TensorBoard stays optional)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from accelerate.tracking import GeneralTracker

from lift3d.io.errors import Lift3dError
from lift3d.io.writing import atomic_path, write_text_atomic

TRACKERS = ("csv", "tensorboard", "none")


def available_trackers() -> tuple[str, ...]:
    """The ``run.tracker`` values that log on this machine: Accelerate drops a tracker whose package
    is missing with a mere warning, and the run then writes no logs at all."""
    from accelerate.utils import is_tensorboard_available

    return tuple(t for t in TRACKERS if t != "tensorboard" or bool(is_tensorboard_available()))


def check_tracker(name: str) -> str:
    """``name`` if it will log here; else one line saying why, and which trackers would."""
    available = available_trackers()
    if name not in available:
        why = ("the tensorboard package is not installed (pip install tensorboard)" if name == "tensorboard"
               else "it is not a tracker lift3d knows")
        raise Lift3dError(f"run.tracker = {name!r} cannot log: {why}; trackers available here: {', '.join(available)}")
    return name


class CSVTracker(GeneralTracker):
    """Appends ``step`` plus every logged value to ``<logging_dir>/metrics.csv``."""

    name = "csv"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str | Path) -> None:
        super().__init__()
        self.path = Path(logging_dir) / run_name / "metrics.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._columns: list[str] | None = None
        self._started = False

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        write_text_atomic(self.path.parent / "config.json", json.dumps(values, indent=2, default=str))

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        row = {"step": step, **values}
        if not self._started:  # read at the first row, after the loop has trimmed a resumed log
            self._started = True
            if self.path.is_file():  # resumed run: keep the header already written
                with self.path.open() as f:
                    self._columns = next(csv.reader(f), None)
        if self._columns is None:
            self._columns = list(row)
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(self._columns)
        new = [key for key in row if key not in self._columns]
        if new:  # a new metric: rewrite with the wider header so the file stays rectangular
            with self.path.open(newline="") as f:
                rows = list(csv.DictReader(f))
            self._columns += new
            with self.path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self._columns)
                writer.writeheader()
                writer.writerows(rows)
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self._columns, extrasaction="ignore").writerow(row)


def drop_rows_after(path: Path, step: int) -> None:
    """Keep only the rows of ``path`` logged at or before ``step`` (all of them go for ``step < 0``).

    A run resumed from the checkpoint at ``step`` logs the later steps again; without this they
    would appear twice.
    """
    if step < 0:
        path.unlink()
        return
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        rows = [r for r in reader if (r.get("step") or "").isdigit() and int(r["step"]) <= step]
    with atomic_path(path) as tmp, tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def validation_curve(folder: Path) -> list[dict[str, float]]:
    """The sampled-validation rows of a lift3d run's CSV log: step, val_psnr, val_ssim, val_mae, ..."""
    with (folder / "logs" / "metrics.csv").open(newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("val_psnr")]
    return [{k: (int(v) if k == "step" else float(v)) for k, v in row.items()
             if v and (k == "step" or k.startswith("val_"))} for row in rows]
