"""One registry per kind of extension (timm's ``register_model``): names -> objects, filled where the code lives.

A built-in registers from its own module with the decorator (``@SOLVERS.register("ddim")``); a third-party
plugin adds names through its hook, which ``lift3d.plugins.manager`` calls the first time a registry is
asked for a name it does not have, or for its list. So looking up a built-in imports no plugin at all.
This module is plain Python (no pluggy, no torch), so the lowest layers can hold a registry.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")
F = TypeVar("F")

_CATALOGUE: dict[str, "Registry[Any]"] = {}
_plugin_loader: Callable[["Registry[Any]"], None] | None = None


class PluginError(ValueError):
    """A plugin name is unknown or registered twice, or a plugin is given an option it does not take."""


@functools.cache
def _module_distributions() -> dict[str, list[str]]:
    import importlib.metadata  # only when a provider is asked for: registering stays free of it

    return importlib.metadata.packages_distributions()


@dataclass(frozen=True)
class Entry:
    """One registered name: the object registered under it and the module that defines that object."""

    name: str
    factory: Any
    plugin: str

    @property
    def package(self) -> str:
        """The installed distribution that provides ``plugin`` (its top-level name if none is known)."""
        top = self.plugin.split(".")[0]
        dists = _module_distributions().get(top)
        return dists[0] if dists else top


def _defining_module(obj: Any) -> str:
    return getattr(obj, "__module__", None) or type(obj).__module__ or "<unknown>"


class Registry(Generic[T]):
    """The names of one kind (``"solvers"``, ``"layer_kinds"``...) and what each builds.

    :param kind: the plural snake-case name of the kind; the hook that fills it is ``lift3d_register_<kind>``.
    :param noun: how errors name one item (default: ``kind`` singular, ``"layer_kinds"`` -> ``"layer kind"``).
    :param doc: one line saying what an item is, for help texts and the docs.
    :param catalogue: record the registry in ``all_registries`` (one registry per kind); False for a
        private registry, such as a test's.
    """

    def __init__(self, kind: str, *, noun: str | None = None, doc: str = "", catalogue: bool = True) -> None:
        if not isinstance(kind, str) or not kind.isidentifier():
            raise PluginError(f"a registry kind must be a snake_case name, got {kind!r}")
        self.kind = kind
        self.noun = noun or kind.removesuffix("s").replace("_", " ")
        self.doc = doc
        # The module that made the registry, so `lift3d plugins` and the docs can say where a kind lives.
        caller = inspect.currentframe().f_back  # type: ignore[union-attr]
        self.module = caller.f_globals.get("__name__", "<unknown>") if caller else "<unknown>"
        self._entries: dict[str, Entry] = {}
        self._own: set[str] = set()  # names registered by code, not by plugins: what detached() copies
        self._loaded = not catalogue  # a private registry has no plugins to load
        self._loading = False
        if catalogue:
            if kind in _CATALOGUE:
                raise PluginError(f"a registry of {kind} already exists, in {_CATALOGUE[kind].module}; "
                                  f"import it from there instead of making a second one in {self.module}")
            _CATALOGUE[kind] = self

    def register(self, name: str, /) -> Callable[[F], F]:
        """Decorator registering a class, function or object under ``name``; it returns its argument unchanged."""

        def decorator(obj: F) -> F:
            self.add(name, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        """Register ``obj`` under ``name`` (what plugin hooks call); a name registered twice raises."""
        if not isinstance(name, str) or not name:
            raise PluginError(f"{self.kind} plugin names must be non-empty strings, got {name!r}")
        entry = Entry(name, obj, _defining_module(obj))
        if name in self._entries:
            old = self._entries[name]
            raise PluginError(f"{self.noun} {name!r} is registered twice: by {old.plugin} ({old.package}) "
                              f"and by {entry.plugin} ({entry.package})")
        self._entries[name] = entry
        if not self._loading:
            self._own.add(name)

    def entry(self, name: str) -> Entry:
        """The entry of ``name``; an unknown name loads this kind's plugins once, then lists the valid names."""
        if name in self:
            return self._entries[name]
        available = ", ".join(sorted(self._entries)) or "none"
        raise PluginError(f"Unknown {self.noun} {name!r}; available: {available}")

    def get(self, name: str) -> T:
        """The object registered under ``name`` (a factory, a class or an instance)."""
        return self.entry(name).factory

    def create(self, name: str, /, **options: Any) -> Any:
        """``get(name)(**options)``; an option the factory does not take names itself and the valid ones."""
        factory = self.get(name)
        check_factory_options(f"{self.noun} {name!r}", factory, options)
        return factory(**options)

    def names(self) -> list[str]:
        """Every registered name, sorted (plugins included)."""
        self._load_plugins()
        return sorted(self._entries)

    def entries(self) -> Iterator[Entry]:
        return (self._entries[n] for n in self.names())

    def detached(self) -> "Registry[T]":
        """A private copy holding the names registered by code (not by plugins), outside the catalogue."""
        copy: Registry[T] = Registry(self.kind, noun=self.noun, doc=self.doc, catalogue=False)
        copy.module = self.module
        copy._entries = {name: self._entries[name] for name in sorted(self._own)}
        copy._own = set(self._own)
        return copy

    def _load_plugins(self) -> None:
        if self._loaded or _plugin_loader is None:
            return
        self._loaded = True  # first, so a plugin that looks something up while registering does not recurse
        before = dict(self._entries)
        self._loading = True
        try:
            _plugin_loader(self)
        except BaseException:
            # Leave nothing half-registered, so the next lookup raises the same error again.
            self._entries, self._loaded = before, False
            raise
        finally:
            self._loading = False

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        if name not in self._entries:
            self._load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._entries)})"


def all_registries() -> dict[str, Registry[Any]]:
    """The catalogue, kind -> registry, of every registry whose module has been imported."""
    return dict(_CATALOGUE)


def set_plugin_loader(loader: Callable[[Registry[Any]], None]) -> None:
    """Install what fills a registry with its kind's plugins on first need (``lift3d.plugins.manager`` does)."""
    global _plugin_loader
    _plugin_loader = loader


@contextlib.contextmanager
def filled_for_now(fill: Callable[[Registry[Any]], None]) -> Iterator[None]:
    """Call ``fill(registry)`` on every catalogued registry; remove what it added when the block ends."""
    added: dict[str, set[str]] = {}
    try:
        for kind, registry in all_registries().items():
            before = set(registry._entries)
            try:
                fill(registry)
            finally:
                added[kind] = set(registry._entries) - before
        yield
    finally:
        for kind, names in added.items():
            registry = _CATALOGUE[kind]
            for name in names:
                registry._entries.pop(name, None)
                registry._own.discard(name)


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
