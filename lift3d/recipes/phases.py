"""Keyed, resumable phases of a recipe: each phase records what it was run with, and a re-run skips it
when that key has not changed.

A phase's folder holds ``phase.json``: its key (everything its result depends on), its wall time and
whatever it chose. A re-run with the same key takes the record instead of running again; a changed key
(an edited ``plan.json``, another seed, other data) runs the phase anew, and every phase keyed on it after.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable

from lift3d.io.writing import make_folder, refuse_link, write_text_atomic

PHASE_FILE = "phase.json"


def plain(value: Any) -> Any:
    """``value`` as JSON reads it back (tuples as lists, paths as strings), so keys compare equal."""
    return json.loads(json.dumps(value, default=str))


class Phases:
    """The phases of one run folder. ``run(name, key, work)`` runs ``work(folder)`` unless done with ``key``.

    ``work`` gets the phase's (empty) folder and returns a JSON-ready dict of what it chose; the record
    returned is that dict plus ``key``, ``wall_s``, ``run_id`` and ``reused``.
    """

    def __init__(self, root: Path, *, log: Callable[[str], None] = print) -> None:
        self.root = Path(root)
        self.log = log

    def folder(self, name: str) -> Path:
        return self.root / name

    def record(self, name: str) -> dict[str, Any] | None:
        """The finished record of phase ``name``, whatever its key; None when it never finished."""
        path = self.folder(name) / PHASE_FILE
        if not path.is_file() or path.is_symlink() or self.folder(name).is_symlink():
            return None  # not finished, or not this run's own record: the phase runs again
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None  # unreadable: the phase runs again
        return record if isinstance(record, dict) and "key" in record else None

    def run(self, name: str, key: dict[str, Any], work: Callable[[Path], dict[str, Any] | None]) -> dict[str, Any]:
        record = self.record(name)
        if record is not None and record["key"] == plain(key):
            self.log(f"[{name}] done earlier ({record.get('wall_s', 0) / 60:.1f} min): kept")
            return {**record, "reused": True}
        folder = refuse_link(self.folder(name), "a phase folder")  # never clear another folder through a link
        if folder.exists():
            shutil.rmtree(folder)
        make_folder(self.root, name)
        tic = time.perf_counter()
        try:
            result = work(folder) or {}
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)  # a phase that failed leaves nothing half-done
            raise
        record = {"key": plain(key), "wall_s": time.perf_counter() - tic, "run_id": str(time.time_ns()),
                  **plain(result)}
        write_text_atomic(folder / PHASE_FILE, json.dumps(record, indent=1))
        return {**record, "reused": False}
