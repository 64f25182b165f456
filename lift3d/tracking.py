"""A CSV tracker for Accelerate, so logs need no extra dependency (TensorBoard stays optional)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from accelerate.tracking import GeneralTracker


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
        (self.path.parent / "config.json").write_text(json.dumps(values, indent=2, default=str))

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
        columns, rows = reader.fieldnames or [], [r for r in reader if r["step"] and int(r["step"]) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
