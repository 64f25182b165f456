"""The one exception for bad volume data: a missing, corrupt or unusable image, folder or pair."""

from __future__ import annotations

from lift3d.io.errors import Lift3dError


class VolumeError(Lift3dError):
    """An image, folder or pair that cannot be used. The message names the file and the problem."""
