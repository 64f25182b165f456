"""lift3d: lift a pretrained 2D diffusion U-Net into a volume-aware 3D model.

Implements Make-A-Volume (Zhu et al., MICCAI 2023): identity-initialised 1D convolutions along
the slice axis, inserted into any 2D network by ``inflate``; ``fuse`` folds them into their
host convs for inference.
"""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("lift3d")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

from lift3d.layers.low_rank import LowRankVolumetricConv
from lift3d.layers.volumetric import VolumetricConv
from lift3d.lifting.fuse import fuse, fused_layers
from lift3d.lifting.inflate import (
    PRESETS,
    InflationReport,
    inflate,
    is_lifted,
    is_volumetric_parameter,
    lift_settings,
    report,
    set_recompute,
    set_trainable,
    volume_batch,
    volumetric_disabled,
    volumetric_layers,
    volumetric_state_dict,
)
from lift3d.plugins import hookimpl

# The checkpoint functions need lift3d.io (schemas, pydantic, the safe writer): imported on first use, so that
# ``import lift3d; lift3d.inflate(model)`` loads no I/O module.
_CHECKPOINT_NAMES = ("load_lifted", "load_volumetric", "save_lifted", "save_volumetric")


def __getattr__(name: str):
    if name == "checkpoint" or name in _CHECKPOINT_NAMES:
        from lift3d.lifting import checkpoint

        return checkpoint if name == "checkpoint" else getattr(checkpoint, name)
    raise AttributeError(f"module 'lift3d' has no attribute {name!r}")


__all__ = [
    "PRESETS", "InflationReport", "LowRankVolumetricConv", "VolumetricConv", "__version__", "checkpoint", "fuse",
    "fused_layers", "hookimpl", "inflate", "is_lifted", "is_volumetric_parameter", "lift_settings", "load_lifted",
    "load_volumetric", "report", "save_lifted", "save_volumetric", "set_recompute", "set_trainable", "volume_batch",
    "volumetric_disabled", "volumetric_layers", "volumetric_state_dict",
]
