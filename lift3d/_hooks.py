"""The hooks that make a lifted model volume-aware (private to :mod:`lift3d.inflate`).

The root model's pre-hook flattens a volume batch ``(b, c, n, h, w)`` to slices ``(b n) c h w``
and repeats per-volume conditioning for each slice; its post-hook folds the output back. Each host
module's hook runs its volumetric layer with the slice count the root hook recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from einops import rearrange
from torch import Tensor, nn

LAYER_NAME = "volumetric"
"""Child-module name of every volumetric layer: parameters read ``<host>.volumetric.weight``."""


def is_volumetric_parameter(name: str) -> bool:
    return f".{LAYER_NAME}." in f".{name}"


@dataclass
class LiftState:
    """Shared by the root hooks and every volumetric layer of one lifted model.

    ``num_slices`` is set by each root forward and deliberately left in place afterwards, so the
    recomputation of gradient checkpointing, which runs during backward, sees the same n.
    """

    kernel_size: int
    where: list[str]
    padding_mode: str
    groups: int | str
    channels: dict[str, int]
    num_slices: int | None = None
    forced_num_slices: int | None = None
    enabled: bool = True
    volume_shape: tuple[int, int] | None = None
    handles: list[Any] = field(default_factory=list, repr=False)

    def settings(self) -> dict[str, Any]:
        """What a loader needs to re-lift a fresh 2D model identically (JSON-serialisable)."""
        return {"kernel_size": self.kernel_size, "where": list(self.where), "padding_mode": self.padding_mode,
                "groups": self.groups, "num_layers": len(self.where)}


def make_host_hook(state: LiftState):
    def hook(host: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if state.num_slices is None or not state.enabled:
            return None
        return getattr(host, LAYER_NAME)(output, state.num_slices)

    return hook


SAMPLE_KWARGS = ("sample", "x", "input", "inputs")


def _find_sample(args: tuple, kwargs: dict) -> int | str | None:
    """Where the image batch is: positional index 0, or the first known keyword."""
    if args and isinstance(args[0], Tensor):
        return 0
    return next((k for k in SAMPLE_KWARGS if isinstance(kwargs.get(k), Tensor)), None)


def _to_slices(value: Any, b: int, n: int) -> Any:
    """Per-volume conditioning -> per-slice: ``(b, n)`` values flatten, ``(b, ...)`` values repeat."""
    if not isinstance(value, Tensor) or value.dim() == 0:
        return value
    if value.dim() == 2 and tuple(value.shape) == (b, n):
        return rearrange(value, "b n -> (b n)")
    if value.shape[0] == b:
        return value.repeat_interleave(n, dim=0)
    return value


def make_flatten_hook(state: LiftState):
    def hook(model: nn.Module, args: tuple, kwargs: dict):
        where = _find_sample(args, kwargs)
        sample = None if where is None else (args[where] if isinstance(where, int) else kwargs[where])
        state.volume_shape = None
        if sample is None or sample.dim() != 5:
            state.num_slices = state.forced_num_slices
            return None
        b, _, n = sample.shape[:3]
        state.num_slices, state.volume_shape = n, (b, n)
        flat = rearrange(sample, "b c n h w -> (b n) c h w")
        args = tuple(flat if i == where else _to_slices(a, b, n) for i, a in enumerate(args))
        kwargs = {k: flat if k == where else _to_slices(v, b, n) for k, v in kwargs.items()}
        return args, kwargs

    return hook


def _to_volumes(value: Any, b: int, n: int) -> Any:
    if isinstance(value, Tensor):
        if value.dim() >= 1 and value.shape[0] == b * n:
            if value.dim() == 4:
                return rearrange(value, "(b n) c h w -> b c n h w", b=b)
            return rearrange(value, "(b n) ... -> b n ...", b=b)
        return value
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_to_volumes(v, b, n) for v in value)
    if isinstance(value, list):
        return [_to_volumes(v, b, n) for v in value]
    if isinstance(value, dict):  # diffusers BaseOutput is an OrderedDict dataclass
        for key in list(value.keys()):
            value[key] = _to_volumes(value[key], b, n)
        return value
    return value


def make_unflatten_hook(state: LiftState):
    def hook(model: nn.Module, args: tuple, kwargs: dict, output: Any):
        shape = state.volume_shape
        if shape is None:
            return None
        state.volume_shape = None
        return _to_volumes(output, *shape)

    return hook


def accept_2d_state_dict(model: nn.Module, incompatible) -> None:
    """Let a plain 2D state dict load strictly: if *every* volumetric key is missing, they keep
    their current (identity) values. A partial set of volumetric keys still fails."""
    missing = incompatible.missing_keys
    volumetric = [k for k in missing if is_volumetric_parameter(k)]
    expected = sum(1 for n, _ in model.state_dict().items() if is_volumetric_parameter(n))
    if volumetric and len(volumetric) == expected:
        for key in volumetric:
            missing.remove(key)


