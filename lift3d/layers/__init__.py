"""Volumetric layers, one kind per module. Importing the package imports each of its modules, so every
built-in kind registers itself (``lift3d.layers.registry.LAYER_KINDS``) and a new one is one new file,
as timm's ``models/__init__.py`` imports its model files."""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
