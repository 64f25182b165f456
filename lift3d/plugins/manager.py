"""The plugin manager and the typed registries that plugins fill.

Set-up order, as pytest and tox do it: ``PluginManager("lift3d")`` -> hookspecs -> installed
entry points (group ``lift3d``) -> built-ins not already loaded -> ``check_pending()``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import inspect
import os
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

import pluggy

from lift3d.plugins import spec

AUTOLOAD_ENV = "LIFT3D_DISABLE_PLUGIN_AUTOLOAD"
"""Set to 1/true/yes to skip installed third-party plugins (the built-ins still load)."""

BUILTIN_PLUGINS = (
    "lift3d_plugins.autoencoders",
    "lift3d_plugins.timestep_samplers",
    "lift3d_plugins.datasets",
    "lift3d_plugins.layer_kinds",
    "lift3d_plugins.objectives",
    "lift3d_plugins.segmenters",
)

KINDS = ("datasets", "autoencoders", "timestep_samplers", "objectives", "segmenters")

T = TypeVar("T")


class PluginError(ValueError):
    """A plugin name is unknown or registered twice, or a plugin is given an option it does not take."""


@dataclass(frozen=True)
class Entry:
    """One registered name: what it builds and who provided it."""

    name: str
    factory: Callable[..., Any]
    plugin: str
    package: str


@functools.cache
def _module_distributions() -> dict[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _provider(factory: Callable[..., Any]) -> tuple[str, str]:
    module = getattr(factory, "__module__", None) or "<unknown>"
    top = module.split(".")[0]
    dists = _module_distributions().get(top)
    return module, (dists[0] if dists else top)


class Registry(Generic[T]):
    """Names -> factories for one kind of plugin. Duplicates raise; unknown names list the valid ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._noun = kind[:-1].replace("_", " ")  # "timestep_samplers" -> "timestep sampler"
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, factory: Callable[..., T]) -> None:
        if not isinstance(name, str) or not name:
            raise PluginError(f"{self.kind} plugin names must be non-empty strings, got {name!r}")
        plugin, package = _provider(factory)
        if name in self._entries:
            old = self._entries[name]
            raise PluginError(
                f"{self._noun} {name!r} is registered twice: by {old.plugin} ({old.package}) "
                f"and by {plugin} ({package})"
            )
        self._entries[name] = Entry(name, factory, plugin, package)

    def entry(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            available = ", ".join(sorted(self._entries)) or "none"
            raise PluginError(f"Unknown {self._noun} {name!r}; available: {available}") from None

    def get(self, name: str) -> Callable[..., T]:
        return self.entry(name).factory

    def create(self, name: str, /, **options: Any) -> T:
        factory = self.get(name)
        check_factory_options(f"{self._noun} {name!r}", factory, options)
        return factory(**options)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> Iterator[Entry]:
        return (self._entries[n] for n in self.names())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {self.names()})"


def check_factory_options(what: str, factory: Callable[..., Any], options: dict[str, Any]) -> None:
    """A misspelt option names itself and the valid ones (instead of Python's bare TypeError)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # no signature to read (some builtins): let the call decide
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    valid = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise PluginError(f"{what} has no option {', '.join(map(repr, unknown))}; valid: {', '.join(valid) or 'none'}")


def _load_entrypoint_plugins(pm: pluggy.PluginManager) -> None:
    """pluggy's ``load_setuptools_entrypoints``, keyed by distribution *and* entry-point name.

    pluggy keys plugins by the bare entry-point name and silently skips a name it already has, so
    a third party's entry point called ``datasets`` (as lift3d's own is) would never load.
    """
    for dist in list(importlib.metadata.distributions()):
        for ep in dist.entry_points:
            if ep.group != spec.NAME:
                continue
            key = f"{dist.metadata['Name']}:{ep.name}"
            if pm.has_plugin(key) or pm.is_blocked(key):
                continue  # the same distribution twice on sys.path: first one wins, as in pluggy
            try:
                plugin = ep.load()
            except Exception as exc:
                raise PluginError(f"lift3d plugin {key} ({ep.value}) failed to import: {exc!r}") from exc
            if not pm.is_registered(plugin):
                pm.register(plugin, name=key)


def _autoload_disabled() -> bool:
    return os.environ.get(AUTOLOAD_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


class PluginManager:
    """lift3d's pluggy manager plus one registry per plugin kind."""

    def __init__(self, *, autoload: bool | None = None, extra_plugins: tuple[object, ...] = ()) -> None:
        self.pm = pluggy.PluginManager(spec.NAME)
        self.pm.add_hookspecs(spec)
        if autoload if autoload is not None else not _autoload_disabled():
            _load_entrypoint_plugins(self.pm)
        for module_name in BUILTIN_PLUGINS:
            module = importlib.import_module(module_name)
            if not self.pm.is_registered(module):
                self.pm.register(module, name=module_name)
        for plugin in extra_plugins:
            self.pm.register(plugin)
        self.pm.check_pending()
        self.datasets: Registry[Any] = Registry("datasets")
        self.autoencoders: Registry[Any] = Registry("autoencoders")
        self.timestep_samplers: Registry[Any] = Registry("timestep_samplers")
        self.pm.hook.lift3d_register_datasets(registry=self.datasets)
        self.pm.hook.lift3d_register_autoencoders(registry=self.autoencoders)
        self.pm.hook.lift3d_register_timestep_samplers(registry=self.timestep_samplers)
        self.objectives: Registry[Any] = Registry("objectives")
        self.pm.hook.lift3d_register_objectives(registry=self.objectives)
        self.segmenters: Registry[Any] = Registry("segmenters")
        self.pm.hook.lift3d_register_segmenters(registry=self.segmenters)

    def registry(self, kind: str) -> Registry[Any]:
        if kind not in KINDS:
            raise PluginError(f"Unknown plugin kind {kind!r}; available: {', '.join(KINDS)}")
        return getattr(self, kind)


@functools.cache
def get_plugin_manager() -> PluginManager:
    """The process-wide manager (built once). Tests build their own ``PluginManager``."""
    return PluginManager()


def create(kind: str, name: str, /, **options: Any) -> Any:
    """Build the plugin ``name`` of ``kind`` (one of :data:`KINDS`)."""
    return get_plugin_manager().registry(kind).create(name, **options)
