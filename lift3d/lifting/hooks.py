"""The hooks that make a lifted model volume-aware (private to ``lift3d.lifting.inflate``).

The root model's pre-hook flattens a volume batch ``(b, c, n, h, w)`` to slices ``(b n) c h w``
and repeats per-volume conditioning for each slice; its post-hook folds the output back. Each host
module's hook runs its volumetric layer with the slice count the root hook recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
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
    kind: str
    options: dict[str, Any]
    channels: dict[str, int]
    placement: str = ""  # how the hosts were chosen, for the report
    recompute: bool = False
    fused: bool = False
    num_slices: int | None = None
    forced_num_slices: int | None = None
    enabled: bool = True
    volume_shape: tuple[int, int] | None = None
    handles: list[Any] = field(default_factory=list, repr=False)

    def settings(self) -> dict[str, Any]:
        """What a loader needs to re-lift a fresh 2D model identically (JSON-serialisable)."""
        return {"kind": self.kind, "kernel_size": self.kernel_size, "where": list(self.where),
                "padding_mode": self.padding_mode, "options": dict(self.options), "num_layers": len(self.where)}


def same_layout(out: Tensor, like: Tensor) -> Tensor:
    """``out`` with the strides of ``like``, the host output it replaces.

    Kernels downstream (GroupNorm, attention) choose their path, and so their summation order, by
    the input's strides, even those of size-1 dims: a one-slice batch whose layer output came back
    with other strides than the host's differed from the 2D model by ~1e-6. Where only the strides
    of size-1 dims differ this is a free restride; otherwise a copy.
    """
    if out.stride() == like.stride():
        return out
    if all(s == t for n, s, t in zip(out.shape, out.stride(), like.stride()) if n > 1):
        return out.as_strided(like.shape, like.stride(), out.storage_offset())
    return torch.empty_like(like).copy_(out)


class _Recomputed:
    """A saved tensor dropped in forward and recomputed from the host's input in backward."""

    __slots__ = ("size", "stride", "offset")

    def __init__(self, t: Tensor) -> None:
        self.size, self.stride, self.offset = t.size(), t.stride(), t.storage_offset()


def _run_recomputing_host(layer: nn.Module, host: nn.Conv2d, x: Tensor, output: Tensor, n: int) -> Tensor:
    """Run ``layer(output)`` without keeping ``output`` (the host conv's result) for backward.

    The layer needs its input for its weight gradient; the 2D model never kept that tensor (the
    next op keeps only its own input). Every tensor the layer saves that lives in ``output``'s storage
    is packed as "recompute": in backward the host conv runs again on ``x``, which the host conv
    has kept for its own gradient anyway.
    """
    # The hooks outlive this call (autograd keeps them with every tensor they packed), so they
    # must not hold ``output`` itself: only its device and address.
    storage, device = output.untyped_storage().data_ptr(), output.device

    def pack(t: Tensor):
        if t.device == device and t.untyped_storage().data_ptr() == storage:
            return _Recomputed(t)
        return t

    def unpack(saved):
        if not isinstance(saved, _Recomputed):
            return saved
        with torch.no_grad():
            y = host._conv_forward(x, host.weight, host.bias)
        return y.as_strided(saved.size, saved.stride, saved.offset)

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        return layer(output, n)


class _Hook:
    """A hook that holds the lift state as an attribute, not in a closure: ``copy.deepcopy`` of a
    lifted model then gives hooks that share the *copy's* state (a closure would keep the original's)."""

    def __init__(self, state: LiftState) -> None:
        self.state = state


class HostHook(_Hook):
    def __call__(self, host: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        state, layer = self.state, getattr(host, LAYER_NAME)
        if state.num_slices is None or not state.enabled:
            # A fused host computes A conv(x) + c: the layer gives back the 2D host's output.
            return same_layout(layer.unfuse(output), output) if getattr(layer, "fused", False) else None
        if (state.recompute and torch.is_grad_enabled() and output.requires_grad and type(host) is nn.Conv2d
                and args and isinstance(args[0], Tensor)):
            out = _run_recomputing_host(layer, host, args[0], output, state.num_slices)
        else:
            out = layer(output, state.num_slices)
        return same_layout(out, output)


def make_host_hook(state: LiftState) -> HostHook:
    return HostHook(state)


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


class FlattenHook(_Hook):
    def __call__(self, model: nn.Module, args: tuple, kwargs: dict):
        state = self.state
        where = _find_sample(args, kwargs)
        sample = None if where is None else (args[where] if isinstance(where, int) else kwargs[where])
        state.volume_shape = None
        if sample is None or sample.dim() != 5:
            state.num_slices = state.forced_num_slices
            return None
        b, _, n = sample.shape[:3]
        if b == 0 or n == 0:
            raise ValueError(f"a lifted model needs at least one volume of at least one slice; got a batch of "
                             f"shape {tuple(sample.shape)} (b, c, n, h, w)")
        state.num_slices, state.volume_shape = n, (b, n)
        flat = rearrange(sample, "b c n h w -> (b n) c h w")
        args = tuple(flat if i == where else _to_slices(a, b, n) for i, a in enumerate(args))
        kwargs = {k: flat if k == where else _to_slices(v, b, n) for k, v in kwargs.items()}
        return args, kwargs


def make_flatten_hook(state: LiftState) -> FlattenHook:
    return FlattenHook(state)


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


class UnflattenHook(_Hook):
    def __call__(self, model: nn.Module, args: tuple, kwargs: dict, output: Any):
        shape = self.state.volume_shape
        if shape is None:
            return None
        self.state.volume_shape = None
        return _to_volumes(output, *shape)


def make_unflatten_hook(state: LiftState) -> UnflattenHook:
    return UnflattenHook(state)


def accept_2d_state_dict(model: nn.Module, incompatible) -> None:
    """Let a plain 2D state dict load strictly: if *every* volumetric key is missing, they keep
    their current (identity) values. A partial set of volumetric keys still fails."""
    missing = incompatible.missing_keys
    volumetric = [k for k in missing if is_volumetric_parameter(k)]
    expected = sum(1 for n, _ in model.state_dict().items() if is_volumetric_parameter(n))
    if volumetric and len(volumetric) == expected:
        for key in volumetric:
            missing.remove(key)


def lift_state(model: nn.Module) -> LiftState:
    """The lift state ``lift3d.inflate`` attached to ``model``; a clear error if it is not lifted."""
    state = getattr(model, "_lift3d_state", None)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not lifted; call lift3d.inflate(model) first")
    return state
