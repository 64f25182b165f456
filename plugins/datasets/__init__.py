"""Built-in dataset plugins: ``paired-nifti``, ``rire``, ``s2m``, ``phantom`` and ``icbm152``."""

from lift3d.plugins import hookimpl
from lift3d_plugins.datasets.icbm152 import ICBM152Dataset
from lift3d_plugins.datasets.paired_nifti import PairedNiftiDataset
from lift3d_plugins.datasets.phantom import PhantomDataset
from lift3d_plugins.datasets.rire import RireDataset
from lift3d_plugins.datasets.s2m import S2MDataset

__all__ = ["ICBM152Dataset", "PairedNiftiDataset", "PhantomDataset", "RireDataset", "S2MDataset"]


@hookimpl
def lift3d_register_datasets(registry):
    registry.add("icbm152", ICBM152Dataset)
    registry.add("paired-nifti", PairedNiftiDataset)
    registry.add("phantom", PhantomDataset)
    registry.add("rire", RireDataset)
    registry.add("s2m", S2MDataset)
