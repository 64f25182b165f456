"""lift3d's plugin system (pluggy): datasets, autoencoders, timestep samplers, objectives and segmenters.

``hookimpl`` is the one symbol a plugin needs; see the README, "Writing a dataset plugin".
"""

import pluggy

from lift3d.plugins.spec import NAME

hookimpl = pluggy.HookimplMarker(NAME)

from lift3d.plugins.manager import (  # noqa: E402
    AUTOLOAD_ENV,
    KINDS,
    PluginError,
    PluginManager,
    Registry,
    create,
    get_plugin_manager,
)

__all__ = [
    "AUTOLOAD_ENV", "KINDS", "NAME", "PluginError", "PluginManager", "Registry", "create",
    "get_plugin_manager", "hookimpl",
]
