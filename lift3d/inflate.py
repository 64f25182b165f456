"""Lift a 2D network into a volume-aware one: :func:`inflate` (Make-A-Volume, sec. 2.3).

``inflate`` walks the module graph, attaches a :class:`~lift3d.volumetric.VolumetricConv` to each
chosen host module as a child named ``volumetric`` (so ``conv1.weight`` keeps its name and the new
weights read ``conv1.volumetric.weight``), and runs it from a forward hook on the host. Two hooks
on the root model let it take a volume batch ``(b, c, n, h, w)``: the slices are flattened to
``(b n) c h w`` for the 2D network, per-volume conditioning is repeated for each slice, and the
output is folded back to ``(b, c', n, h, w)``. A plain 4D batch runs exactly as before.
"""

from __future__ import annotations

import contextlib
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence, Union

import torch
from einops import rearrange
from torch import Tensor, nn

from lift3d.volumetric import PADDING_MODES, VolumetricConv

logger = logging.getLogger("lift3d")

LAYER_NAME = "volumetric"
"""Child-module name of every volumetric layer: parameters read ``<host>.volumetric.weight``."""

RESIDUAL_BLOCK = re.compile(r"res(net)?[_]?(block|unit)|resnet|residual|bottleneck|basicblock|convnext", re.I)
"""Class names taken for residual blocks: diffusers ``ResnetBlock2D``, timm ``BasicBlock``,
``Bottleneck``, ``ConvNeXtBlock``, and user classes such as ``ResBlock``."""

Where = Union[str, Sequence[str], Callable[[str, nn.Module], bool]]


def _is_spatial_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and max(module.kernel_size) > 1


def _residual_ancestor(name: str, blocks: dict[str, nn.Module]) -> str | None:
    """The nearest enclosing residual block of module ``name`` (the root never counts)."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:depth])
        if prefix in blocks:
            return prefix
    return None


def _select_resnet(model: nn.Module) -> list[str]:
    blocks = {n: m for n, m in model.named_modules() if n and RESIDUAL_BLOCK.search(type(m).__name__)}
    return [n for n, m in model.named_modules() if _is_spatial_conv(m) and _residual_ancestor(n, blocks)]


def _select_spatial(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if _is_spatial_conv(m)]


def _select_block_output(model: nn.Module) -> list[str]:
    blocks = [n for n, m in model.named_modules() if n and RESIDUAL_BLOCK.search(type(m).__name__)]
    # Only outermost blocks: a block nested in another block would double up.
    return [n for n in blocks if not any(n.startswith(o + ".") for o in blocks)]


PRESETS: dict[str, Callable[[nn.Module], list[str]]] = {
    "resnet": _select_resnet,
    "spatial": _select_spatial,
    "block-output": _select_block_output,
}
"""``resnet`` (default, the paper's lineage): after each spatial (kernel > 1) Conv2d inside a
residual block, making it a pseudo-3D conv. ``spatial``: after every spatial Conv2d.
``block-output``: one layer on the output of each residual block."""


def _out_channels(name: str, module: nn.Module) -> int:
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    channels = getattr(module, "out_channels", None)
    if isinstance(channels, int):
        return channels
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError(f"cannot tell the output channels of host {name!r} ({type(module).__name__}): "
                         "it has no Conv2d and no integer `out_channels`")
    return convs[-1].out_channels


def _select_hosts(model: nn.Module, where: Where) -> list[str]:
    if isinstance(where, str):
        if where not in PRESETS:
            raise ValueError(f"Unknown placement where={where!r}; available: {', '.join(PRESETS)}, "
                             "a list of module names, or a callable (name, module) -> bool")
        return PRESETS[where](model)
    if callable(where):
        return [n for n, m in model.named_modules() if n and where(n, m)]
    names = list(where)
    modules = dict(model.named_modules())
    unknown = [n for n in names if n not in modules]
    if unknown:
        raise ValueError(f"where= names modules the model does not have: {unknown}")
    return names


@dataclass
class LiftState:
    """Shared by the root hooks and every volumetric layer of one lifted model.

    ``num_slices`` is set by each root forward and deliberately left in place afterwards, so the
    recomputation of gradient checkpointing, which runs during backward, sees the same n.
    """

    kernel_size: int
    where: list[str]
    padding_mode: str
    groups: int
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


@dataclass(frozen=True)
class InflationReport:
    """What :func:`inflate` inserted: layer count, where, and the parameter overhead."""

    hosts: tuple[tuple[str, int], ...]  # (host module name, channels)
    base_parameters: int
    volumetric_parameters: int

    @property
    def num_layers(self) -> int:
        return len(self.hosts)

    @property
    def overhead(self) -> float:
        return self.volumetric_parameters / max(self.base_parameters, 1)

    def __str__(self) -> str:
        lines = [f"lift3d: inserted {self.num_layers} volumetric layers, "
                 f"{self.volumetric_parameters:,} parameters (+{100 * self.overhead:.2f}% over "
                 f"{self.base_parameters:,})"]
        lines += [f"  {name}.{LAYER_NAME} ({channels} ch)" for name, channels in self.hosts]
        return "\n".join(lines)


def _state(model: nn.Module) -> LiftState:
    state = getattr(model, "_lift3d_state", None)
    if state is None:
        raise ValueError(f"{type(model).__name__} is not lifted; call lift3d.inflate(model) first")
    return state


def is_lifted(model: nn.Module) -> bool:
    return getattr(model, "_lift3d_state", None) is not None


def volumetric_layers(model: nn.Module) -> Iterator[tuple[str, VolumetricConv]]:
    """``(host name, layer)`` for every volumetric layer, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, VolumetricConv):
            yield name.rsplit(".", 1)[0] if "." in name else "", module


def is_volumetric_parameter(name: str) -> bool:
    return f".{LAYER_NAME}." in f".{name}"


def report(model: nn.Module) -> InflationReport:
    state = _state(model)
    volumetric = sum(p.numel() for n, p in model.named_parameters() if is_volumetric_parameter(n))
    total = sum(p.numel() for p in model.parameters())
    return InflationReport(tuple(state.channels.items()), total - volumetric, volumetric)


def inflate(
    model: nn.Module,
    *,
    kernel_size: int = 3,
    where: Where = "resnet",
    padding_mode: str = "zeros",
    groups: int = 1,
    verbose: bool = False,
) -> nn.Module:
    """Insert identity-initialised volumetric 1D convs into a 2D network, in place; returns it.

    :param kernel_size: odd kernel size of the 1D conv along the slice axis.
    :param where: a preset (``"resnet"``, ``"spatial"``, ``"block-output"``; see :data:`PRESETS`),
        a list of module names, or a callable ``(name, module) -> bool`` choosing host modules.
    :param padding_mode: border handling along n, ``"zeros"`` or ``"replicate"``.
    :param groups: groups of the 1D conv (1 = full channel mixing as in the paper; ``channels``
        for a cheaper depthwise variant).
    :param verbose: print the :class:`InflationReport` (it is always logged at INFO).

    Afterwards ``model(x)`` with ``x`` of shape ``(b, c, n, h, w)`` returns ``(b, c', n, h, w)``,
    exactly equal to the 2D model's per-slice output until the volumetric weights are trained.
    """
    if is_lifted(model):
        raise ValueError(f"{type(model).__name__} is already lifted ({len(_state(model).where)} volumetric "
                         "layers); inflate it only once")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"Unknown padding_mode {padding_mode!r}; available: {', '.join(PADDING_MODES)}")
    hosts = _select_hosts(model, where)
    if not hosts:
        raise ValueError(f"where={where!r} matched no module of {type(model).__name__}; for a network "
                         "without residual blocks try where='spatial' or a callable (name, module) -> bool")
    modules = dict(model.named_modules())
    channels = {name: _out_channels(name, modules[name]) for name in hosts}
    state = LiftState(kernel_size, list(hosts), padding_mode, groups, channels)
    for name in hosts:
        host = modules[name]
        reference = next(host.parameters(), None)
        layer = VolumetricConv(channels[name], kernel_size, groups=groups, padding_mode=padding_mode,
                               device=reference.device if reference is not None else None,
                               dtype=reference.dtype if reference is not None else None)
        host.add_module(LAYER_NAME, layer)
        state.handles.append(host.register_forward_hook(_make_host_hook(state)))
    state.handles.append(model.register_forward_pre_hook(_make_flatten_hook(state), with_kwargs=True))
    state.handles.append(model.register_forward_hook(_make_unflatten_hook(state), with_kwargs=True))
    state.handles.append(model.register_load_state_dict_post_hook(_accept_2d_state_dict))
    model._lift3d_state = state
    summary = report(model)
    logger.info("%s", summary)
    if verbose:
        print(summary)
    return model


def _make_host_hook(state: LiftState):
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


def _make_flatten_hook(state: LiftState):
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


def _make_unflatten_hook(state: LiftState):
    def hook(model: nn.Module, args: tuple, kwargs: dict, output: Any):
        shape = state.volume_shape
        if shape is None:
            return None
        state.volume_shape = None
        return _to_volumes(output, *shape)

    return hook


def _accept_2d_state_dict(model: nn.Module, incompatible) -> None:
    """Let a plain 2D state dict load strictly: if *every* volumetric key is missing, they keep
    their current (identity) values. A partial set of volumetric keys still fails."""
    missing = incompatible.missing_keys
    volumetric = [k for k in missing if is_volumetric_parameter(k)]
    expected = sum(1 for n, _ in model.state_dict().items() if is_volumetric_parameter(n))
    if volumetric and len(volumetric) == expected:
        for key in volumetric:
            missing.remove(key)


@contextlib.contextmanager
def volume_batch(model: nn.Module, num_slices: int):
    """Run a ``(b n) c h w`` batch that is already flattened, with known ``num_slices``::

        with lift3d.volume_batch(model, n):
            eps = model(x_flat, t_flat).sample
    """
    state = _state(model)
    if num_slices < 1:
        raise ValueError(f"num_slices must be >= 1, got {num_slices}")
    previous, state.forced_num_slices = state.forced_num_slices, int(num_slices)
    try:
        yield model
    finally:
        state.forced_num_slices = previous


@contextlib.contextmanager
def volumetric_disabled(model: nn.Module):
    """Switch the volumetric layers off: the lifted model computes the plain 2D model slice by slice."""
    state = _state(model)
    previous, state.enabled = state.enabled, False
    try:
        yield model
    finally:
        state.enabled = previous


TRAINABLE = ("volumetric", "all")


def set_trainable(model: nn.Module, which: str = "volumetric") -> list[str]:
    """``"volumetric"``: freeze the base, train the volumetric layers only; ``"all"``: train everything.

    Returns the names of the trainable parameters.
    """
    if which not in TRAINABLE:
        raise ValueError(f"Unknown trainable={which!r}; available: {', '.join(TRAINABLE)}")
    _state(model)
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(which == "all" or is_volumetric_parameter(name))
        if param.requires_grad:
            names.append(name)
    return names


def volumetric_state_dict(model: nn.Module) -> dict[str, Tensor]:
    _state(model)
    return {k: v for k, v in model.state_dict().items() if is_volumetric_parameter(k)}
