"""One safe writer: run-folder locks, atomic files, and temporary names no reader ever picks up.

Every temporary file or folder lift3d writes is hidden and carries the writer's PID,
``.<final name>.lift3d-tmp-<pid>-<random>``, beside its final path, and is renamed into place only
once complete. The final name is shortened in the temporary's so that any name the file system
allows still has room for the mark. A writer that dies (kill -9, a full disk) leaves one; the next
writer into that folder removes those whose PID is gone (``clean_stale_temporaries``), and
readers of folders skip hidden names.

No write follows a link: a file lift3d creates is opened with ``O_NOFOLLOW`` (and ``O_EXCL`` for a
temporary), a file it replaces or a sub-folder it writes into is checked with ``lstat`` first, and
a link at any of those paths is refused in one line naming it (``UnsafePathError``). A link
could point outside the folder, and writing through it would replace a file the run does not own.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import stat
import uuid
from pathlib import Path
from typing import IO, Iterator, Sequence

from lift3d.io.errors import Lift3dError, RunFolderError, UnsafePathError

TMP_MARK = ".lift3d-tmp-"
LOCK_FILE = ".lift3d.lock"
_TMP = re.compile(r"\A\..*" + re.escape(TMP_MARK) + r"([0-9]+)-[0-9a-f]+(\.[A-Za-z.]+)?\Z", re.DOTALL)
# pid_t is a C int; a PID field past it (or 0) was never a writer's: its temporary is stale.
_PID_MAX = 2**31 - 1
_NAME_MAX = 255  # bytes, where the file system does not say (ext4, XFS, APFS, NTFS all allow 255)
_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def _name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError):  # a folder not created yet, or a platform without the query
        return _NAME_MAX


def _shortened(name: str, room: int) -> str:
    """``name`` cut to at most ``room`` bytes as the file system stores it (whole characters only)."""
    encoded = os.fsencode(name)
    return name if len(encoded) <= room else encoded[:max(room, 0)].decode("utf-8", errors="ignore")


def temporary_path(path: str | os.PathLike, suffix: str = "") -> Path:
    """A hidden, unique sibling of ``path`` (same folder, so ``os.replace`` is atomic).

    ``suffix`` is appended (``.nii.gz``) for writers that pick the format from the name. The final
    name is shortened inside the temporary's so the whole stays within the file system's name limit."""
    path = Path(path)
    tail = f"{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:12]}{suffix}"
    room = _name_max(path.parent) - len(os.fsencode(tail)) - 1
    return path.parent / f".{_shortened(path.name, room)}{tail}"


def is_temporary(name: str) -> bool:
    return _TMP.match(name) is not None


def _writer_pid(name: str) -> int | None:
    """The PID a temporary's name carries; 0 where the field cannot be a PID (so the writer is gone);
    None for a name that is not a temporary's."""
    match = _TMP.match(name)
    if match is None:
        return None
    digits = match.group(1)
    if len(digits) > len(str(_PID_MAX)):
        return 0
    pid = int(digits)
    return pid if 1 <= pid <= _PID_MAX else 0


def _pid_alive(pid: int) -> bool:
    if not 1 <= pid <= _PID_MAX:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):  # someone else's process, or a doubt: keep the file
        return True
    return True


def _remove(path: Path) -> None:
    """Remove a file, a link (never its target) or a folder (``rmtree`` follows no link inside it)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def link_message(path: Path | str, what: str = "") -> str:
    """One line refusing a link at ``path``, where lift3d would write."""
    named = f"{what} {path}" if what else f"{path}"
    return (f"{named} is a symbolic link; lift3d does not write through a link (it may point outside the folder): "
            "remove the link, or choose another output folder")


def refuse_link(path: str | os.PathLike, what: str = "") -> Path:
    """``path``, unless it is a symbolic link (dangling or not): then ``UnsafePathError``."""
    path = Path(path)
    if path.is_symlink():
        raise UnsafePathError(link_message(path, what))
    return path


def own_file(path: str | os.PathLike) -> Path:
    """``path``, unless it is a link, or a file that has other names (hard links) that a rewrite in
    place would change too: a file lift3d reads back and appends to (a log). A missing path passes."""
    path = refuse_link(path)
    with contextlib.suppress(FileNotFoundError):
        info = path.lstat()
        if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
            raise UnsafePathError(f"{path} is {_shared(info.st_nlink)}; lift3d writes only a regular file of its own "
                                  "there: remove it")
    return path


def _shared(links: int) -> str:
    return f"a file with {links} hard links (writing it would change the other names' content too)"


def refuse_links(root: str | os.PathLike, *names: str) -> None:
    """Refuse a link at any of ``root / name``: the files and sub-folders lift3d writes in ``root``.
    ``root`` itself is the folder the user chose, and may be a link."""
    for name in names:
        refuse_link(Path(root) / name)


def make_folder(root: str | os.PathLike, *parts: str) -> Path:
    """``root / parts...``, each part created if missing and refused if it is a link or not a folder.
    ``root`` (the folder the user chose) is created with its parents if missing."""
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    for part in parts:
        path = path / part
        with contextlib.suppress(FileExistsError):
            path.mkdir()
        refuse_link(path)
        if not path.is_dir():
            raise Lift3dError(f"{path} exists and is not a folder; lift3d writes a folder there: move it away")
    return path


def clean_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders in ``folder`` whose writer is no longer running.
    A temporary whose PID field cannot be a PID is stale too. A link named as a temporary is removed
    itself, never what it points to."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        pid = _writer_pid(entry.name)
        if pid is not None and not _pid_alive(pid):
            _remove(entry)
            removed.append(entry)
    return removed


def open_new(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8",
             newline: str | None = None) -> IO:
    """Open a file that must not exist yet (a temporary) for writing: ``O_EXCL | O_NOFOLLOW``, so
    nothing planted at its name, a link least of all, is written to."""
    try:
        fd = os.open(path, _NEW_FILE, 0o666)
    except FileExistsError:
        raise UnsafePathError(f"{path} appeared before lift3d created it; refusing to write there") from None
    binary = "b" in mode
    return os.fdopen(fd, mode, encoding=None if binary else encoding, newline=None if binary else newline)


def _checked_fd(path: Path, flags: int) -> int:
    """``os.open(path, flags | O_NOFOLLOW)``; refused if ``path`` is a link, or not a regular file with one name."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafePathError(link_message(path)) from None
        if exc.errno == errno.ENXIO:  # a FIFO with no reader
            raise UnsafePathError(f"{path} is not a regular file; lift3d writes only regular files there") from None
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        why = "not a regular file" if not stat.S_ISREG(info.st_mode) else _shared(info.st_nlink)
        raise UnsafePathError(f"{path} is {why}; lift3d writes only a regular file of its own there: remove it")
    return fd


def open_append(path: str | os.PathLike, *, encoding: str = "utf-8", newline: str | None = "") -> IO:
    """Open ``path`` for appending text, creating it if missing, without following a link (a log)."""
    fd = _checked_fd(Path(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    return os.fdopen(fd, "a", encoding=encoding, newline=newline)


def _check_temporary(tmp: Path, final: Path) -> None:
    if tmp.is_symlink():
        raise UnsafePathError(f"the temporary written for {final} was replaced by a link; nothing was published")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to; it is renamed onto ``path`` when the
    block ends, and removed if the block raises (a full disk, say): nothing half-written is left.
    A link at ``path`` is refused before anything is written."""
    path = refuse_link(path)
    tmp = temporary_path(path, suffix)
    try:
        yield tmp
        _check_temporary(tmp, path)
        refuse_link(path)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def commit_together(pairs: list[tuple[Path, Path]], remove: Sequence[Path] = ()) -> None:
    """Rename each complete temporary onto its final path, the companions first and the main file
    last (pass it last), so a reader that sees the main file sees its companions too; the files in
    ``remove`` (an earlier run's outputs that no longer describe the new ones) go with them.

    All or nothing: every final path is checked first (no link), an existing one is moved aside,
    and if a rename fails the ones done are undone and the old files put back. A temporary may be a
    folder: the folder at its final path is replaced whole."""
    for tmp, final in pairs:
        _check_temporary(Path(tmp), Path(final))
        refuse_link(final)
    for path in remove:
        refuse_link(path)
    done: list[tuple[Path, Path | None]] = []  # (final, the old one moved aside)
    try:
        for path in remove:
            old = temporary_path(path)
            os.replace(path, old)
            done.append((Path(path), old))
        for tmp, final in pairs:
            old = None
            if os.path.lexists(final):
                old = temporary_path(final)
                os.replace(final, old)
            done.append((Path(final), old))
            os.replace(tmp, final)
    except BaseException:
        for final, old in reversed(done):
            with contextlib.suppress(OSError):
                _remove(final)  # the new one (a folder must go before the old one can take its name)
                if old is not None:
                    os.replace(old, final)
        raise
    for _, old in done:
        if old is not None:
            _remove(old)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp, open_new(tmp) as handle:
        handle.write(text)
    return Path(path)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp, open_new(tmp, "wb") as handle:
        handle.write(data)
    return Path(path)


def disk_full_message(exc: OSError, path: str | os.PathLike) -> str:
    """One line for a failed write: the path, and what the file system said."""
    reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
    return f"cannot write {path}: {reason}; nothing partial was left behind"


class RunLock:
    """An exclusive lock on a run folder, held while a run writes into it.

    ``flock`` on ``<folder>/.lift3d.lock``: the kernel drops it when the process dies, so a killed
    run never leaves a stale lock. A second run into the folder is refused, naming the holder's PID.
    The lock file is opened without following a link, and must be a regular file with one name:
    its content (the PID) is replaced, and must not replace anything else's.
    """

    def __init__(self, folder: str | os.PathLike, purpose: str = "run") -> None:
        self.folder, self.purpose = Path(folder), purpose
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = _checked_fd(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = " ".join(os.read(fd, 64).decode(errors="replace").split())[:20] or "unknown"
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
