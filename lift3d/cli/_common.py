"""Shared CLI plumbing: user errors become one clear line and a non-zero exit, not a traceback."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable

EXIT_USER_ERROR = 2


class UserError(ValueError):
    """An error the user can fix (bad path, bad value, bad file). Its message is the whole story."""


USER_ERRORS: tuple[type[BaseException], ...] = (UserError, ValueError, TypeError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, KeyError)


def run_cli(main: Callable[[list[str] | None], int | None]) -> Callable[[list[str] | None], int]:
    """Wrap a ``main(argv)`` so user errors print ``<prog>: error: <message>`` and exit 2.

    Set ``LIFT3D_DEBUG=1`` to get the full traceback instead.
    """

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "lift3d"
        try:
            return int(main(argv) or 0)
        except USER_ERRORS as exc:
            if os.environ.get("LIFT3D_DEBUG"):
                raise
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
            print(f"{prog}: error: {message}", file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130

    return wrapper
