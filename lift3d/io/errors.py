"""The one base of lift3d's user errors: a bad file, path, value or option, told in one line.

Every error a user can fix derives from ``Lift3dError`` (itself a ``ValueError``), so a
command-line tool prints it as one line and exits 2, and the fuzz tests can tell it from a bug.
"""

from __future__ import annotations


class Lift3dError(ValueError):
    """An error the user can fix. Its message is one line naming the file or option and the bad value."""


class BudgetError(Lift3dError):
    """A header or a config implies an allocation larger than the memory lift3d may use."""


class UnsafePathError(Lift3dError):
    """A path named inside a file leaves its folder (absolute, ``..``, or a symlink pointing out)."""


class RunFolderError(Lift3dError):
    """A run folder is held by another run, or holds another run's work that this run would destroy."""
