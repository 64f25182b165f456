"""Lift a 2D network into a volume-aware one: ``inflate`` (Make-A-Volume, sec. 2.3).

``inflate`` walks the module graph, attaches a volumetric layer of the chosen kind
(``lift3d.layers.registry``) to each chosen host module (``lift3d.lifting.placement``) as a child named
``volumetric`` (so ``conv1.weight`` keeps its name and the new weights read
``conv1.volumetric.weight``), and runs it from a forward hook on the host. Two hooks on the root model (``lift3d.lifting.hooks``) let it take a volume batch
``(b, c, n, h, w)``: the slices are flattened to ``(b n) c h w`` for the 2D network, per-volume
conditioning is repeated for each slice, and the output is folded back to ``(b, c', n, h, w)``.
A plain 4D batch runs exactly as before.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator

from torch import Tensor, nn

from lift3d.layers import registry as layer_kinds
from lift3d.lifting.hooks import (LAYER_NAME, lift_state, LiftState, accept_2d_state_dict, is_volumetric_parameter, make_flatten_hook,
                           make_host_hook, make_unflatten_hook)
from lift3d.lifting.placement import PRESETS, Where, choose_hosts, out_channels
from lift3d.layers.functional import PADDING_MODES
from lift3d.layers.low_rank import RANK_MIN as LOW_RANK_MIN

__all__ = ["LAYER_NAME", "PRESETS", "InflationReport", "inflate", "is_lifted", "is_volumetric_parameter", "lift_settings", "report",
           "set_recompute", "set_trainable", "volume_batch", "volumetric_disabled", "volumetric_layers",
           "volumetric_state_dict"]

logger = logging.getLogger("lift3d")

@dataclass(frozen=True)
class InflationReport:
    """What ``inflate`` inserted: layer count, where, and the parameter overhead."""

    hosts: tuple[tuple[str, int], ...]  # (host module name, channels)
    base_parameters: int
    volumetric_parameters: int  # stored weights: parameters and fixed buffers (low-rank ``train_down=False``)
    kind: str = ""
    placement: str = ""

    @property
    def num_layers(self) -> int:
        return len(self.hosts)

    @property
    def overhead(self) -> float:
        return self.volumetric_parameters / max(self.base_parameters, 1)

    def headline(self) -> str:
        return str(self).split("\n", 1)[0]

    def __str__(self) -> str:
        lines = [f"lift3d: inserted {self.num_layers} volumetric layers of kind {self.kind!r} at {self.placement}, "
                 f"{self.volumetric_parameters:,} parameters (+{100 * self.overhead:.2f}% over "
                 f"{self.base_parameters:,})"]
        lines += [f"  {name}.{LAYER_NAME} ({channels} ch)" for name, channels in self.hosts]
        return "\n".join(lines)


def _unfused_state(model: nn.Module, doing: str) -> LiftState:
    state = lift_state(model)
    if state.fused:
        raise ValueError(f"{type(model).__name__} is fused for inference (lift3d.lifting.fuse), so it cannot {doing}; "
                         "do that before fusing, or load the model again")
    return state


def lift_settings(model: nn.Module) -> dict:
    """The settings that re-lift a fresh 2D model identically (kind and its options, kernel size,
    hosts, padding)."""
    return _unfused_state(model, "be saved").settings()


def is_lifted(model: nn.Module) -> bool:
    return getattr(model, "_lift3d_state", None) is not None


def volumetric_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(host name, layer)`` for every volumetric layer, in the order of the hosts (none if not lifted)."""
    if not is_lifted(model):
        return
    modules = dict(model.named_modules())
    for name in lift_state(model).where:
        yield name, getattr(modules[name], LAYER_NAME)


def report(model: nn.Module) -> InflationReport:
    state = lift_state(model)
    volumetric = sum(v.numel() for k, v in model.state_dict().items() if is_volumetric_parameter(k))
    base = sum(p.numel() for n, p in model.named_parameters() if not is_volumetric_parameter(n))
    return InflationReport(tuple(state.channels.items()), base, volumetric, state.kind, state.placement)


_ALWAYS_AFFORDABLE = 2**20
"""Layers smaller than this (1 MiB) skip the memory budget: no budget is that small, and skipping it keeps
``inflate`` of a small model from loading ``lift3d.io``."""


def check_layer_memory(kind: str, channels: dict[str, int], kernel_size: int, padding_mode: str,
                       options: dict) -> None:
    """Build the layers on the meta device first: a ``kernel_size`` of 2000001 is refused with its size
    and the memory limit, not by the allocator."""
    widths = collections.Counter(channels.values())
    per_width = {c: sum(p.numel() * p.element_size() for p in layer_kinds.create(
        kind, c, kernel_size=kernel_size, padding_mode=padding_mode, device="meta", **options).parameters())
        for c in widths}
    nbytes = sum(per_width[c] * count for c, count in widths.items())
    if nbytes > _ALWAYS_AFFORDABLE:
        from lift3d.io.budget import check_bytes

        check_bytes(nbytes, f"the {len(channels)} volumetric layers of kind {kind!r} with kernel_size {kernel_size}")


def inflate(
    model: nn.Module,
    kind: str | None = None,
    *,
    kernel_size: int = 3,
    where: Where = "auto",
    padding_mode: str = "zeros",
    recompute: bool = False,
    verbose: bool = False,
    **options,
) -> nn.Module:
    """Insert identity-initialised volumetric layers into a 2D network, in place; returns it.

    Afterwards ``model(x)`` with ``x`` of shape ``(b, c, n, h, w)`` returns ``(b, c', n, h, w)``,
    exactly equal to the 2D model's per-slice output until the volumetric weights are trained.

    :param kind: the kind of layer (``lift3d.layers.registry.names()``): ``"full"`` (the default, the
        paper's full-channel 1D conv), ``"low-rank"`` (1x1 C -> r, 1D conv along n in r channels,
        1x1 r -> C from zero: 1.02x the 2D FLOPs instead of 1.19x), ``"depthwise"``,
        ``"slice-attention"``, or one a plugin registered. The README gives the trade.
    :param kernel_size: odd kernel size along the slice axis.
    :param where: ``"auto"`` (residual blocks where the model has them, else every spatial conv;
        the choice is logged), a preset of ``PRESETS``, a list of module names, or a callable
        ``(name, module) -> bool`` choosing host modules.
    :param padding_mode: border handling along n, ``"zeros"`` or ``"replicate"``.
    :param recompute: in training, do not keep each layer's input (its host conv's output) for
        backward but recompute it from the host's input (plain ``nn.Conv2d`` hosts); see
        ``set_recompute``.
    :param verbose: print the ``InflationReport`` (it is always logged at INFO).
    :param options: options of the kind, e.g. ``rank=``/``rank_ratio=``/``train_down=`` (low-rank),
        ``groups=`` (full: an int dividing every host's channels, or ``"depthwise"``), ``heads=``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"inflate needs a torch.nn.Module (a 2D U-Net), got {type(model).__name__}")
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int):
        raise TypeError(f"kernel_size must be an odd int, got {kernel_size!r} ({type(kernel_size).__name__})")
    if is_lifted(model):
        raise ValueError(f"{type(model).__name__} is already lifted ({len(lift_state(model).where)} volumetric "
                         "layers); inflate it only once")
    if padding_mode not in PADDING_MODES:
        raise ValueError(f"Unknown padding_mode {padding_mode!r}; available: {', '.join(PADDING_MODES)}")
    if kind is None:
        kind = "full" if "groups" in options else layer_kinds.DEFAULT_KIND
    layer_kinds.check_options(kind, options)
    hosts, placement = choose_hosts(model, where)
    if not hosts:
        raise ValueError(f"where={where!r} matched no module of {type(model).__name__}; for a network "
                         "without residual blocks try where='spatial' or a callable (name, module) -> bool")
    modules = dict(model.named_modules())
    channels = {name: out_channels(name, modules[name]) for name in hosts}
    check_layer_memory(kind, channels, kernel_size, padding_mode, options)
    layers = {}
    for name in hosts:
        reference = next(modules[name].parameters(), None)
        layers[name] = layer_kinds.create(kind, channels[name], kernel_size=kernel_size, padding_mode=padding_mode,
                                          device=reference.device if reference is not None else None,
                                          dtype=reference.dtype if reference is not None else None, **options)
    recorded = dict(options)
    if kind == "low-rank" and not {"rank", "rank_min"} & set(options):
        recorded["rank_min"] = LOW_RANK_MIN  # saved, so a later change of the default floor cannot change the shapes
    state = LiftState(kernel_size, list(hosts), padding_mode, kind, recorded, channels, placement,
                      recompute=bool(recompute))
    for name in hosts:  # nothing is touched before every layer could be built
        modules[name].add_module(LAYER_NAME, layers[name])
        state.handles.append(modules[name].register_forward_hook(make_host_hook(state)))
    state.handles.append(model.register_forward_pre_hook(make_flatten_hook(state), with_kwargs=True))
    state.handles.append(model.register_forward_hook(make_unflatten_hook(state), with_kwargs=True))
    state.handles.append(model.register_load_state_dict_post_hook(accept_2d_state_dict))
    model._lift3d_state = state
    summary = report(model)
    if placement.startswith("spatial (auto"):  # not the paper's placement: say so where users see it
        logger.warning("%s", summary.headline())
    logger.info("%s", summary)
    if verbose:
        print(summary)
    return model


def set_recompute(model: nn.Module, on: bool = True) -> None:
    """Recompute each volumetric layer's input (its host conv's output) in backward instead of
    keeping it: the train step's activation memory goes back to about the 2D model's, for one more
    host conv forward per layer in backward. Gradients are unchanged (``tests/test_inflate.py``)."""
    lift_state(model).recompute = bool(on)


@contextlib.contextmanager
def volume_batch(model: nn.Module, num_slices: int):
    """Run a ``(b n) c h w`` batch that is already flattened, with known ``num_slices``:

        with lift3d.volume_batch(model, n):
            eps = model(x_flat, t_flat).sample
    """
    state = lift_state(model)
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
    state = lift_state(model)
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
    _unfused_state(model, "be trained")
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(which == "all" or is_volumetric_parameter(name))
        if param.requires_grad:
            names.append(name)
    return names


def volumetric_state_dict(model: nn.Module) -> dict[str, Tensor]:
    lift_state(model)
    return {k: v for k, v in model.state_dict().items() if is_volumetric_parameter(k)}
