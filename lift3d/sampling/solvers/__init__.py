"""Solvers, a registered kind: one solver per module of this package, each registering itself with
``@SOLVERS.register(name)``. The modules are found here (as pytest lists its ``default_plugins`` once), so a new
built-in solver is one new file; a third party's comes through the hook ``lift3d_register_solvers``."""

from __future__ import annotations

import importlib
import pkgutil

from lift3d.sampling.solvers.registry import SOLVERS, Solver, build_solver, solver_class, solvers_for

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["SOLVERS", "Solver", "build_solver", "solver_class", "solvers_for"]
