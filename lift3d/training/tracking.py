"""A CSV tracker for Accelerate, so logs need no extra dependency (TensorBoard stays optional)."""

from __future__ import annotations

import csv
import json
import numbers
from pathlib import Path

from accelerate.tracking import GeneralTracker

from lift3d.io.errors import Lift3dError
from lift3d.io.tables import spreadsheet_safe, write_rows
from lift3d.io.writing import (atomic_path, make_folder, open_append, open_new, own_file, refuse_link,
                               write_text_atomic)

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
    """Appends ``step`` plus every logged value to ``<logging_dir>/<run_name>/metrics.csv``.

    Text cells that a spreadsheet would run as a formula are neutralised (``lift3d.io.tables``);
    numbers stay numbers. No write follows a link: the log folder and the file must not be links, the
    file is appended to with ``O_NOFOLLOW`` and rewritten atomically. A row that a resumed run logs again
    (the same step and the same columns as a row an earlier run left, e.g. the final validation of a run
    resumed after its export) replaces that row instead of repeating it.
    """

    name = "csv"
    requires_logging_directory = True

    def __init__(self, run_name: str, logging_dir: str | Path) -> None:
        super().__init__()
        self.path = own_file(make_folder(logging_dir, run_name) / "metrics.csv")
        self._columns: list[str] | None = None
        self._earlier: dict[tuple[str, frozenset[str]], int] = {}  # an earlier run's rows: (step, columns) -> index
        self._started = False

    @property
    def tracker(self):
        return self.path

    def store_init_configuration(self, values: dict) -> None:
        write_text_atomic(self.path.parent / "config.json", json.dumps(values, indent=2, default=str))

    def _start(self) -> None:
        """Read the log an earlier run left (after the loop has trimmed a resumed one): its header and rows."""
        self._started = True
        if not own_file(self.path).is_file():
            return
        columns, rows = read_rows(self.path)
        self._columns = columns or None
        self._earlier = {_row_key(row): index for index, row in enumerate(rows)}

    def log(self, values: dict, step: int | None = None, **kwargs) -> None:
        row = {"step": step, **values}
        if not self._started:
            self._start()
        if self._columns is None:
            self._columns = list(row)
            _rewrite(self.path, self._columns, [])
        new = [key for key in row if key not in self._columns]
        again = self._earlier.pop(_row_key(row), None)
        if new or again is not None:  # a wider header, or an earlier run's row replaced: rewrite the file
            _, rows = read_rows(self.path)
            self._columns += new
            if again is not None:
                rows[again] = _as_cells(row)
            _rewrite(self.path, self._columns, rows)
            if again is not None:
                return
        with open_append(self.path) as handle:
            write_rows(handle, self._columns, [_as_cells(row)], header=False, neutralise=False)


def _as_cells(row: dict) -> dict[str, object]:
    """A logged row as CSV cells: numbers as Python writes them, text neutralised for spreadsheets."""
    return {key: value if isinstance(value, numbers.Number) or value is None else spreadsheet_safe(str(value))
            for key, value in row.items()}


def _row_key(row: dict) -> tuple[str, frozenset[str]]:
    """What makes a row the same row again: its step and the columns it fills."""
    step = row.get("step")
    filled = frozenset(k for k, v in row.items() if k != "step" and v is not None and v != "")
    return ("" if step is None else str(step), filled)


def read_rows(path: Path) -> tuple[list[str], list[dict[str, object]]]:
    """The header and rows of a CSV log (cells as written), read without following a link."""
    with own_file(path).open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        return list(reader.fieldnames or []), rows  # type: ignore[arg-type]


def _rewrite(path: Path, columns: list[str], rows: list[dict[str, object]]) -> None:
    """Write the whole log atomically; ``rows`` hold cells already made safe."""
    with atomic_path(path) as tmp, open_new(tmp, newline="") as handle:
        write_rows(handle, columns, rows, neutralise=False)


def drop_rows_after(path: Path, step: int) -> None:
    """Keep only the rows of ``path`` logged at or before ``step`` (all of them go for ``step < 0``).

    A run resumed from the checkpoint at ``step`` logs the later steps again; without this they
    would appear twice. Neither the file nor its folder may be a link.
    """
    refuse_link(path.parent, "the log folder")
    own_file(path)
    if step < 0:
        path.unlink()
        return
    columns, rows = read_rows(path)
    kept = [r for r in rows if str(r.get("step") or "").isdigit() and int(str(r["step"])) <= step]
    _rewrite(path, columns, kept)


def validation_curve(folder: Path) -> list[dict[str, float]]:
    """The sampled-validation rows of a lift3d run's CSV log: step, val_psnr, val_ssim, val_mae, ..."""
    with (folder / "logs" / "metrics.csv").open(newline="") as f:
        rows = [row for row in csv.DictReader(f) if row.get("val_psnr")]
    return [{k: (int(v) if k == "step" else float(v)) for k, v in row.items()
             if v and (k == "step" or k.startswith("val_"))} for row in rows]
