"""Shared CLI plumbing: user errors become one clear line and a non-zero exit, not a traceback."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable

from lift3d.io.errors import Lift3dError
from lift3d.io.offline import go_offline

EXIT_USER_ERROR = 2

# lift3d-synthesize's file names, which lift3d-evaluate reads back. Std maps live in a subfolder, so a
# folder of predictions (lift3d-evaluate --pred DIR) holds predictions only.
OUTPUT_SUFFIX = "_synth.nii.gz"
STD_DIR = "std"
STD_SUFFIX = "_std.nii.gz"


class UserError(Lift3dError):
    """An error the user can fix (bad path, bad value, bad file). Its message is the whole story."""


# OSError covers what the file system refuses: a missing path, no permission, a read-only or full disk.
# OverflowError is a number the user gave past what a C type holds; it must not end in a traceback.
# KeyError is not here: a missing key is an internal bug, and must not print as a bare key.
USER_ERRORS: tuple[type[BaseException], ...] = (UserError, Lift3dError, ValueError, TypeError, OSError,
                                                OverflowError)


def _message(exc: BaseException) -> object:
    if isinstance(exc, OSError) and exc.strerror:
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f)
        return f"cannot write or read {where}: {exc.strerror}" if where else exc.strerror
    return exc


def run_cli(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Wrap a ``main(argv)`` so user errors print ``<prog>: error: <message>`` and exit 2.

    Set ``LIFT3D_DEBUG=1`` to get the full traceback instead.
    """

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "lift3d"
        go_offline()  # a lift3d process never reaches a model hub
        try:
            return int(main(argv) or 0)
        except BrokenPipeError:  # the reader went away (`lift3d plugins | head`): stop quietly, as cat does
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        except USER_ERRORS as exc:
            if os.environ.get("LIFT3D_DEBUG"):
                raise
            print(f"{prog}: error: {_message(exc)}", file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130

    return wrapper
