"""Kinds of volumetric layer: the registry behind ``lift3d.inflate(model, kind=...)``.

A kind is a name and a factory, registered by a plugin through the ``lift3d_register_layer_kinds``
hook exactly as datasets are (the built-ins in ``lift3d_plugins.layer_kinds`` do it the same way)::

    @lift3d.hookimpl
    def lift3d_register_layer_kinds(registry):
        registry.add("my-kind", MyVolumetricLayer)

``factory(channels, *, kernel_size, padding_mode, device, dtype, **options)`` returns an
``nn.Module`` that every kind must make a :class:`VolumetricLayer`:

- ``forward(x, num_slices)``: ``(b n) c h w -> (b n) c h w``, never mixing two volumes;
- ``reset_parameters()``: the one place of the identity initialisation; right after it the layer
  returns its input bit for bit (``torch.equal``) for any n and any batch;
- ``init_random_(std=None, generator=None)``: random weights, so tests can see the layer work.

Optional: ``fuse_into(host)`` folds the residual and the centre tap into a host ``nn.Conv2d`` for
inference and returns the layer that computes what is left (:mod:`lift3d.lifting.fuse`); its ``unfuse(y)``
turns the fused host's output back into the 2D host's. A kind without it is left unfused.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from lift3d.plugins.manager import PluginError, Registry, check_factory_options

BUILTIN = "lift3d_plugins.layer_kinds"
DEFAULT_KIND = "low-rank"
"""What :func:`lift3d.lifting.inflate` inserts by default: the low-rank layer with its rank floor (r = max(16, C/8)).
From the same stage-1 weights of the ICBM protocol, each kind at its best learning rate, it matched the paper's
``full`` layer on the validation subjects (``benchmarks/results/layer-kinds.md``) at +2 % parameters instead of
+21 %; ``kind="full"`` is the paper's layer."""


@runtime_checkable
class VolumetricLayer(Protocol):
    """What :func:`lift3d.lifting.inflate` needs from a layer of any kind."""

    def forward(self, x: Tensor, num_slices: int) -> Tensor: ...

    def reset_parameters(self) -> None: ...

    def init_random_(self, std: float | None = None, generator=None) -> None: ...


def build_registry(pm) -> Registry:
    """A layer-kind registry filled by every plugin of the pluggy manager ``pm``.

    The built-in kinds are registered on ``pm`` first when the manager has not loaded them (through
    the ``lift3d`` entry point group), as the manager does for its other built-ins.
    """
    module = importlib.import_module(BUILTIN)
    if not pm.is_registered(module):
        pm.register(module, name=BUILTIN)
    registry: Registry = Registry("layer_kinds")
    pm.hook.lift3d_register_layer_kinds(registry=registry)
    return registry


@functools.cache
def registry() -> Registry:
    """The process-wide registry of layer kinds (built once, from the process-wide plugin manager)."""
    from lift3d.plugins.manager import get_plugin_manager

    return build_registry(get_plugin_manager().pm)


def names() -> list[str]:
    return registry().names()


def create(kind: str, channels: int, *, kernel_size: int, padding_mode: str, device=None, dtype=None,
           **options: Any) -> nn.Module:
    """Build one layer of ``kind``; an unknown kind or option names itself and the valid ones."""
    factory = registry().get(kind)
    check_factory_options(f"layer kind {kind!r}", factory, {**options, "kernel_size": kernel_size,
                                                     "padding_mode": padding_mode, "device": device, "dtype": dtype})
    layer = factory(channels, kernel_size=kernel_size, padding_mode=padding_mode, device=device, dtype=dtype, **options)
    missing = [m for m in ("forward", "reset_parameters", "init_random_") if not callable(getattr(layer, m, None))]
    if not isinstance(layer, nn.Module) or missing:
        raise PluginError(f"layer kind {kind!r} built a {type(layer).__name__}, not an nn.Module with "
                          f"forward(x, num_slices), reset_parameters() and init_random_() (missing: {missing})")
    return layer


def check_options(kind: str, options: dict[str, Any]) -> None:
    """Fail before anything is inserted when ``kind`` is unknown or does not take ``options``."""
    check_factory_options(f"layer kind {kind!r}", registry().get(kind), options)


def parse_kind(spec: str) -> dict[str, Any]:
    """A layer kind and its settings as written on a benchmark's command line, as ``lift3d.lifting.inflate``
    keywords: ``"low-rank:train_down=false,rank=4"`` -> ``{"kind": "low-rank", "train_down": False,
    "rank": 4}`` (``true``/``false``, ints and floats are converted, anything else stays a string)."""
    kind, _, rest = spec.partition(":")
    settings: dict[str, Any] = {"kind": kind}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r} in {spec!r} is not key=value")
        lowered = value.lower()
        if lowered in ("true", "false"):
            settings[key] = lowered == "true"
            continue
        for convert in (int, float, str):
            try:
                settings[key] = convert(value)
                break
            except ValueError:
                continue
    return settings
