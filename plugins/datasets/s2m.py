"""``s2m``: SWI -> MRA brain pairs (Make-A-Volume's in-house S2M data set, or any data laid out alike).

SWI (0.34 x 0.34 x 0.8 mm) and MRA (0.9 x 0.9 x 2 mm) have different grids: the MRA is resampled
onto the SWI grid through the two affines, then both onto 256 x 256 x 100; 20 of the 111
patients are held out for testing (the paper's 91/20 split).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lift3d_plugins.datasets.paired_nifti import PairedNiftiDataset


# Float32 volumes of the training grid while one subject is served (source, target, mask and the
# resampling's output), and those a cached subject keeps (source, target, mask).


class S2MDataset(PairedNiftiDataset):
    """SWI/MRA pairs, one folder per patient:

        <root>/<patient>/SWI.nii.gz
        <root>/<patient>/MRA.nii.gz

    Defaults: ``size=256``, ``num_slices=100``, ``test_size=20`` patients drawn with ``seed``.
    Every other option is that of ``paired-nifti`` (file names, a CSV, explicit lists...).
    """

    plugin_name = "s2m"

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
        super().__init__(root, source=source, target=target, size=size, num_slices=num_slices, test_size=test_size, **options)
