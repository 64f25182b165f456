"""Kinds of volumetric layer: the registry behind ``lift3d.inflate(model, kind=...)``.

Each built-in kind registers from its own module (``full`` and ``depthwise`` in ``lift3d.layers.volumetric``,
``low-rank`` in ``lift3d.layers.low_rank``, ``slice-attention`` in ``lift3d.layers.slice_attention``),
which ``lift3d.layers`` imports; a new built-in is one new file there:

    @LAYER_KINDS.register("my-kind")
    class MyVolumetricLayer(nn.Module): ...

A plugin adds its own through the ``lift3d_register_layer_kinds`` hook (``registry.add("my-kind", factory)``),
loaded only when a kind is not found among the built-ins, so inflating with a built-in kind imports no plugin.

``factory(channels, *, kernel_size, padding_mode, device, dtype, **options)`` returns an
``nn.Module`` that every kind must make a ``VolumetricLayer``:

- ``forward(x, num_slices)``: ``(b n) c h w -> (b n) c h w``, never mixing two volumes;
- ``reset_parameters()``: the one place of the identity initialisation; right after it the layer
  returns its input bit for bit (``torch.equal``) for any n and any batch;
- ``init_random_(std=None, generator=None)``: random weights, so tests can see the layer work.

Optional: ``fuse_into(host)`` folds the residual and the centre tap into a host ``nn.Conv2d`` for
inference and returns the layer that computes what is left (``lift3d.lifting.fuse``); its ``unfuse(y)``
turns the fused host's output back into the 2D host's. A kind without it is left unfused.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

from lift3d.plugins.registry import PluginError, Registry, check_factory_options

LAYER_KINDS: Registry[Any] = Registry(
    "layer_kinds", doc="a volumetric layer inflate inserts (lift3d.layers.registry.VolumetricLayer)")

DEFAULT_KIND = "low-rank"
"""What ``lift3d.lifting.inflate`` inserts by default: the low-rank layer with its rank floor (r = max(16, C/8)).
From the same stage-1 weights of the ICBM protocol, each kind at its best learning rate, it matched the paper's
``full`` layer on the validation subjects (``benchmarks/results/layer-kinds.md``) at +2 % parameters instead of
+21 %; ``kind="full"`` is the paper's layer."""


@runtime_checkable
class VolumetricLayer(Protocol):
    """What ``lift3d.lifting.inflate`` needs from a layer of any kind."""

    def forward(self, x: Tensor, num_slices: int) -> Tensor: ...

    def reset_parameters(self) -> None: ...

    def init_random_(self, std: float | None = None, generator=None) -> None: ...


def names() -> list[str]:
    """Every layer kind, built-in and from plugins."""
    return LAYER_KINDS.names()


def create(kind: str, channels: int, *, kernel_size: int, padding_mode: str, device=None, dtype=None,
           **options: Any) -> nn.Module:
    """Build one layer of ``kind``; an unknown kind or option names itself and the valid ones."""
    factory = LAYER_KINDS.get(kind)
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
    check_factory_options(f"layer kind {kind!r}", LAYER_KINDS.get(kind), options)


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
