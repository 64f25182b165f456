"""lift3d's registries and its plugin system (pluggy).

Every kind of extension is a ``Registry`` (``lift3d.plugins.registry``); installed plugins fill
them through ``lift3d.plugins.manager``. ``hookimpl`` is the one symbol a plugin needs; see
``docs/pages/plugins.md``.
"""

import pluggy

from lift3d.plugins.spec import NAME

hookimpl = pluggy.HookimplMarker(NAME)

from lift3d.plugins.registry import Entry, PluginError, Registry, all_registries  # noqa: E402
from lift3d.plugins.manager import (  # noqa: E402 (it installs the registries' plugin loader)
    AUTOLOAD_ENV,
    KINDS,
    PluginManager,
    create,
    get_plugin_manager,
    using_plugins,
)

__all__ = [
    "AUTOLOAD_ENV", "KINDS", "NAME", "Entry", "PluginError", "PluginManager", "Registry", "all_registries", "create",
    "get_plugin_manager", "hookimpl", "using_plugins",
]
