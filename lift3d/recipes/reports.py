"""What every benchmark records next to its figures: the machine, the code, and the JSON report (with
paths relative to the repository, so a report never records where the machine kept things)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

import lift3d

REPO = Path(lift3d.__file__).resolve().parents[1]
"""The checkout lift3d runs from (benchmarks and their reports live there)."""


def cpu_model() -> str:
    """lscpu's "Model name" (what RESULTS.md quotes), else /proc/cpuinfo's, else platform's guess."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine_info(**extra: Any) -> dict[str, Any]:
    """The machine, the library versions, and the commit (plus any uncommitted change to ``lift3d/``
    or ``plugins/``) the figures belong to. Call it before the measurements start."""
    import diffusers

    info: dict[str, Any] = {
        "cpu": cpu_model(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
        "diffusers": diffusers.__version__, "lift3d": lift3d.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    try:
        git = ["git", "-C", str(REPO)]
        info["commit"] = subprocess.run(git + ["rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        check=True).stdout.strip()
        info["uncommitted"] = subprocess.run(git + ["status", "--porcelain", "--", "lift3d", "plugins"],
                                             capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        pass
    return info | extra


def portable(value: Any) -> Any:
    """``value`` with every absolute path made relative to the repository (temp folders as ``<tmp>/...``),
    so that a report does not record where the machine that ran it kept things."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable(v) for v in value]
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str) and value.startswith("/") and " " not in value:
        tmp = tempfile.gettempdir()
        if value == tmp or value.startswith(tmp + "/"):
            return "<tmp>" + value[len(tmp):]
        return os.path.relpath(value, REPO)
    return value


def write_json(path: str | os.PathLike, report: dict[str, Any]) -> None:
    """Write ``report`` to ``path``, creating its folder; paths in it are made relative (``portable``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(portable(json.loads(json.dumps(report, default=str))), indent=1))
