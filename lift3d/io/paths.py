"""Paths named inside a file stay inside the file's folder: no absolute path, no ``..``, no symlink out."""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from lift3d.io.errors import UnsafePathError


def inside(folder: str | os.PathLike, name: object, what: str) -> Path:
    """``folder / name``, refused unless ``name`` is a relative path that stays inside ``folder``
    once every symlink is resolved. ``what`` names where the path came from (``"lift3d.json's weights"``)."""
    folder = Path(folder)
    if not isinstance(name, str) or not name:
        raise UnsafePathError(f"{what} must be a non-empty file name inside {folder}, got {name!r}")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise UnsafePathError(f"{what} is {name!r}, which holds a control character; give a plain file name inside "
                              f"{folder}")
    pure = PurePosixPath(name)
    if pure.is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive or "\\" in name:
        raise UnsafePathError(f"{what} is {name!r}, an absolute path; lift3d reads only files inside {folder}")
    if ".." in pure.parts:
        raise UnsafePathError(f"{what} is {name!r}, which leaves {folder} through '..'")
    path = folder / pure
    check_contained(folder, path, what)
    return path


def check_contained(folder: str | os.PathLike, path: str | os.PathLike, what: str) -> Path:
    """Refuse ``path`` if, symlinks resolved, it lies outside ``folder`` (or its links cannot be resolved)."""
    try:
        root, real = Path(folder).resolve(), Path(path).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # a link loop, or a NUL byte
        raise UnsafePathError(f"{what} ({Path(path)}) cannot be resolved ({exc}); lift3d reads only files inside "
                              f"{Path(folder)}") from None
    if real != root and root not in real.parents:
        raise UnsafePathError(f"{what} ({Path(path)}) resolves to {real}, outside {Path(folder)}; "
                              "lift3d does not follow a link out of the folder of the file that names it")
    return Path(path)
