"""The one process-wide pluggy manager, through which installed plugins fill the registries kind by kind.

Set-up order, as pytest and tox do it: ``PluginManager("lift3d")`` -> hookspecs -> entry points (group
``lift3d``) -> ``check_pending()``. Nothing loads until a registry asks (``lift3d.plugins.registry``):
the first lookup of a name it lacks, or its first listing, loads the entry points named after its kind
(``datasets``) and those named after no kind (a generic plugin, such as the example's ``example``), then
calls ``lift3d_register_<kind>(registry=...)`` of those plugins only. lift3d's own entry points (the
built-in datasets, autoencoders and timestep samplers) load even when ``LIFT3D_DISABLE_PLUGIN_AUTOLOAD``
hides the installed third-party plugins.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import os
import re
from typing import Any, Iterable, Iterator

import pluggy

from lift3d.plugins import spec
from lift3d.plugins.registries import AUTOENCODERS, DATASETS, TIMESTEP_SAMPLERS  # noqa: F401 (always catalogued)
from lift3d.plugins.registry import (  # noqa: F401 (re-exported: the names plugins and callers used to import here)
    Entry,
    PluginError,
    Registry,
    all_registries,
    check_factory_options,
    filled_for_now,
    set_plugin_loader,
)

AUTOLOAD_ENV = "LIFT3D_DISABLE_PLUGIN_AUTOLOAD"
"""Set to 1/true/yes to skip installed third-party plugins (lift3d's own entry points still load)."""

HOOK_PREFIX = "lift3d_register_"
KINDS = tuple(name.removeprefix(HOOK_PREFIX) for name in vars(spec) if name.startswith(HOOK_PREFIX))
"""Every kind a plugin may fill: one hook ``lift3d_register_<kind>`` each, in ``lift3d.plugins.spec``."""

BUILTIN_DISTRIBUTION = "lift3d"


def _autoload_disabled() -> bool:
    return os.environ.get(AUTOLOAD_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _entry_points(autoload: bool) -> list[tuple[str, importlib.metadata.EntryPoint]]:
    """``(distribution:name, entry point)`` of group ``lift3d``; without ``autoload``, lift3d's own only.

    Keyed by distribution *and* entry-point name: pluggy's ``load_setuptools_entrypoints`` keys by the bare
    name, so a third party's entry point called ``datasets`` (as lift3d's own is) would never load.
    """
    found: dict[str, importlib.metadata.EntryPoint] = {}
    for dist in list(importlib.metadata.distributions()):
        dist_name = dist.metadata["Name"]
        if not autoload and _canonical(dist_name or "") != BUILTIN_DISTRIBUTION:
            continue
        for ep in dist.entry_points:
            # The same distribution twice on sys.path: the first one wins, as in pluggy.
            if ep.group == spec.NAME:
                found.setdefault(f"{dist_name}:{ep.name}", ep)
    return list(found.items())


def _for_kind(entry_point_name: str, kind: str) -> bool:
    """An entry point named after a kind fills only that kind; one named otherwise may fill any."""
    return entry_point_name == kind or entry_point_name not in KINDS


def _load(pm: pluggy.PluginManager, key: str, ep: importlib.metadata.EntryPoint) -> Any:
    plugin = pm.get_plugin(key)
    if plugin is not None or pm.is_blocked(key):
        return plugin
    try:
        plugin = ep.load()
    except Exception as exc:
        raise PluginError(f"lift3d plugin {key} ({ep.value}) failed to import: {exc!r}") from exc
    if not pm.is_registered(plugin):
        pm.register(plugin, name=key)
    return plugin


def _new_pluggy() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(spec.NAME)
    pm.add_hookspecs(spec)
    return pm


def _call_hook(pm: pluggy.PluginManager, registry: Registry[Any], plugins: Iterable[Any]) -> None:
    """``lift3d_register_<kind>(registry=registry)`` of ``plugins`` only (a kind without a hook has no plugins)."""
    name = HOOK_PREFIX + registry.kind
    if not hasattr(pm.hook, name):
        return
    keep = {id(p) for p in plugins if p is not None}
    others = [p for _, p in pm.list_name_plugin() if p is not None and id(p) not in keep]
    caller = pm.subset_hook_caller(name, remove_plugins=others) if others else getattr(pm.hook, name)
    caller(registry=registry)


class _HookHolder:
    """The hooks of a plugin object pluggy cannot hold as it is: pluggy keeps plugins in sets, and a
    ``types.SimpleNamespace`` of hook functions (handy in tests and docs) is unhashable."""

    def __init__(self, plugin: object) -> None:
        self.__dict__.update({name: getattr(plugin, name) for name in dir(plugin) if name.startswith(HOOK_PREFIX)})


def _holdable(plugin: object) -> object:
    try:
        hash(plugin)
    except TypeError:
        return _HookHolder(plugin)
    return plugin


def _unknown_kind(kind: str) -> PluginError:
    return PluginError(f"Unknown plugin kind {kind!r}; available: {', '.join(sorted(all_registries()))}")


class _Manager:
    """What both managers offer: ``registry(kind)``, ``kinds()`` and each registry as an attribute."""

    pm: pluggy.PluginManager

    def registry(self, kind: str) -> Registry[Any]:
        raise NotImplementedError

    def kinds(self) -> list[str]:
        """The kinds whose registry has been imported, sorted."""
        return sorted(all_registries())

    def __getattr__(self, name: str) -> Registry[Any]:
        if name.startswith("_") or name not in all_registries():
            raise AttributeError(name)
        return self.registry(name)


class ProcessPluginManager(_Manager):
    """The process-wide manager: the registries are the catalogue's own, filled on first need."""

    def __init__(self) -> None:
        self.pm = _new_pluggy()
        self._entry_points: list[tuple[str, importlib.metadata.EntryPoint]] | None = None

    def registry(self, kind: str) -> Registry[Any]:
        try:
            return all_registries()[kind]
        except KeyError:
            raise _unknown_kind(kind) from None

    def load(self, registry: Registry[Any]) -> None:
        """Fill ``registry`` with its kind's installed plugins (called once per kind by the registry)."""
        if self._entry_points is None:
            self._entry_points = _entry_points(not _autoload_disabled())
        plugins = [_load(self.pm, key, ep) for key, ep in self._entry_points if _for_kind(ep.name, registry.kind)]
        self.pm.check_pending()
        _call_hook(self.pm, registry, plugins)


class PluginManager(_Manager):
    """A manager of its own, holding private copies of the registries: for tests and tools that must not
    change the process-wide ones. Each copy holds the names registered by code, then what the plugins add.

    :param autoload: load installed third-party plugins (default: unless ``LIFT3D_DISABLE_PLUGIN_AUTOLOAD``
        is set); lift3d's own entry points load either way.
    :param extra_plugins: plugin objects or modules registered on top, as if installed.
    """

    def __init__(self, *, autoload: bool | None = None, extra_plugins: tuple[object, ...] = ()) -> None:
        self.pm = _new_pluggy()
        autoload = not _autoload_disabled() if autoload is None else autoload
        self._plugins = [(ep.name, _load(self.pm, key, ep)) for key, ep in _entry_points(autoload)]
        for plugin in map(_holdable, extra_plugins):
            self.pm.register(plugin)
            self._plugins.append(("", plugin))
        self.pm.check_pending()
        self._registries: dict[str, Registry[Any]] = {}
        for kind in all_registries():  # now, so a name registered twice raises here
            self.registry(kind)

    def registry(self, kind: str) -> Registry[Any]:
        if kind not in self._registries:
            if kind not in all_registries():
                raise _unknown_kind(kind)
            copy = all_registries()[kind].detached()
            _call_hook(self.pm, copy, [p for name, p in self._plugins if _for_kind(name, kind)])
            self._registries[kind] = copy
        return self._registries[kind]


@functools.cache
def get_plugin_manager() -> ProcessPluginManager:
    """The process-wide manager (built once); ``registry(kind)`` gives the catalogue's registry."""
    return ProcessPluginManager()


set_plugin_loader(lambda registry: get_plugin_manager().load(registry))


def create(kind: str, name: str, /, **options: Any) -> Any:
    """Build ``name`` of ``kind`` (``"datasets"``, ``"autoencoders"``...) with ``options``."""
    return get_plugin_manager().registry(kind).create(name, **options)


@contextlib.contextmanager
def using_plugins(*plugins: object) -> Iterator[None]:
    """Register plugin objects on the process-wide manager for a ``with`` block, as if installed, and call
    their hooks on every registry imported so far; what they added is removed when the block ends."""
    pm = get_plugin_manager().pm
    plugins = tuple(map(_holdable, plugins))
    for plugin in plugins:
        pm.register(plugin)
    try:
        pm.check_pending()
        with filled_for_now(lambda registry: _call_hook(pm, registry, plugins)):
            yield
    finally:
        for plugin in plugins:
            pm.unregister(plugin)
