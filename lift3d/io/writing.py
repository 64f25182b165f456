"""One safe writer: run-folder locks, atomic files, and temporary names no reader ever picks up.

Every temporary file or folder lift3d writes is hidden and carries the writer's PID,
``.<final name>.lift3d-tmp-<pid>-<random>``, beside its final path, and is renamed into place only
once complete. A writer that dies (kill -9, a full disk) leaves one; the next writer into that
folder removes those whose PID is gone (:func:`clean_stale_temporaries`), and readers of folders
skip hidden names.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator

from lift3d.io.errors import RunFolderError

TMP_MARK = ".lift3d-tmp-"
LOCK_FILE = ".lift3d.lock"
_TMP = re.compile(r"^\..*" + re.escape(TMP_MARK) + r"(\d+)-[0-9a-f]+(\.[A-Za-z.]+)?$")


def temporary_path(path: str | os.PathLike, suffix: str = "") -> Path:
    """A hidden, unique sibling of ``path`` (same folder, so ``os.replace`` is atomic).

    ``suffix`` is appended (``.nii.gz``) for writers that pick the format from the name."""
    path = Path(path)
    return path.parent / f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:12]}{suffix}"


def is_temporary(name: str) -> bool:
    return _TMP.match(name) is not None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def clean_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders in ``folder`` whose writer is no longer running."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TMP.match(entry.name)
        if match and not _pid_alive(int(match.group(1))):
            _remove(entry)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; it is renamed onto ``path`` when the
    block ends, and removed if the block raises (a full disk, say): nothing half-written is left."""
    path = Path(path)
    tmp = temporary_path(path, suffix)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def commit_together(pairs: list[tuple[Path, Path]]) -> None:
    """Rename each complete temporary onto its final path, the companions first and the main file
    last (pass it last), so a reader that sees the main file sees its companions too."""
    for tmp, final in pairs:
        os.replace(tmp, final)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def disk_full_message(exc: OSError, path: str | os.PathLike) -> str:
    """One line for a failed write: the path, and what the file system said."""
    reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return f"cannot write {path}: {reason}; nothing partial was left behind"


class RunLock:
    """An exclusive lock on a run folder, held while a run writes into it.

    ``flock`` on ``<folder>/.lift3d.lock``: the kernel drops it when the process dies, so a killed
    run never leaves a stale lock. A second run into the folder is refused, naming the holder's PID.
    """

    def __init__(self, folder: str | os.PathLike, purpose: str = "run") -> None:
        self.folder, self.purpose = Path(folder), purpose
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunFolderError(f"{self.folder} is in use by another lift3d {self.purpose} (PID {holder}); wait "
                                 "for it to finish, or choose another output folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
