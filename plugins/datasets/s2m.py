"""``s2m``: SWI -> MRA brain pairs (Make-A-Volume's in-house S2M data set, or any data laid out alike).

SWI (0.34 x 0.34 x 0.8 mm) and MRA (0.9 x 0.9 x 2 mm) have different grids: the MRA is resampled
onto the SWI grid through the two affines, then both onto 256 x 256 x 100; 20 of the 111
patients are held out for testing (the paper's 91/20 split).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from lift3d.io.budget import check_bytes
from lift3d.io.errors import BudgetError
from lift3d_plugins.datasets.paired_nifti import PairedNiftiDataset


# Float32 volumes of the training grid while one subject is served (source, target, mask and the
# resampling's output), and those a cached subject keeps (source, target, mask).
GRID_WORKING_VOLUMES = 6
CACHED_VOLUMES = 3


class S2MDataset(PairedNiftiDataset):
    """SWI/MRA pairs, one folder per patient::

        <root>/<patient>/SWI.nii.gz
        <root>/<patient>/MRA.nii.gz

    Defaults: ``size=256``, ``num_slices=100``, ``test_size=20`` patients drawn with ``seed``.
    Every other option is that of ``paired-nifti`` (file names, a CSV, explicit lists...).
    """

    def __init__(
        self,
        root: Path | str | None = None,
        *,
        source: str = "SWI",
        target: str = "MRA",
        size: int | tuple[int, int] = 256,
        num_slices: int = 100,
        test_size: int | float = 20,
        **options: Any,
    ) -> None:
        sizes = f"num_slices = {num_slices!r} and size = {size!r}"
        try:
            super().__init__(root, source=source, target=target, size=size, num_slices=num_slices, test_size=test_size, **options)
        except BudgetError as exc:
            raise BudgetError(f"s2m: {sizes}: {exc}") from None
        subjects, cache_size = len(self.subjects()), options.get("cache_size")
        cached = min(subjects, cache_size if isinstance(cache_size, int) else subjects) if options.get("cache") else 0
        held = GRID_WORKING_VOLUMES + CACHED_VOLUMES * cached
        check_bytes(4 * math.prod(self.grid.shape), f"s2m: {sizes} give {' x '.join(map(str, self.grid.shape))} "
                    f"float32 voxels; {held} such volumes (serving one subject"
                    + (f", and {cached} cached" if cached else "") + ")", copies=held)
