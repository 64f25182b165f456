"""The solver registry (``SOLVERS``) and the contract every solver keeps.

A *solver* turns a trained network's predictions back into a volume, step by step (DDIM, DPM-Solver++,
Euler...). Each registers its class by name from its own module, ``@SOLVERS.register("ddim")``, and declares
what it is, as diffusers schedulers declare ``_compatibles``, so the sampling loop asks instead of probing.
A diffusers scheduler is one way to implement a solver (``lift3d.sampling.solvers.diffusers_scheduler``);
a solver written by hand keeps the same contract. Third-party solvers come through the hook
``lift3d_register_solvers``, loaded the first time a name is not found.
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping

import torch
from torch import Tensor

from lift3d.io.errors import Lift3dError
from lift3d.plugins.registry import Registry


class Solver:
    """The contract of a solver: declared properties, ``build``, and one ``step``.

    Declared on the class (read before anything is built, by the CLI's help and the docs):

    - ``inverts``: the objectives it samples (their ``name``) -> its default number of steps for each.
    - ``stochastic``: it adds noise at every step; ``step`` then gets ``noise``, a
      ``lift3d.sampling.noise.StepNoise`` drawing from each sample's own generator.
    - ``needs_next_t``: ``step`` gets ``t_next``, the timestep it steps to (None on the last step: to the
      clean sample), for a solver that does not keep its own place in the schedule.
    - ``informed_start``: it can start from a clean estimate noised to an intermediate step (SDEdit):
      ``noised`` works.
    - ``clips_x0``: it can clamp its estimate of the clean sample to [-1, 1] at every step (``clip_x0``).
    - ``summary``: one line saying what it is, for ``lift3d-synthesize --help`` and the docs.
    - ``revision``: raised whenever the same name, steps and seed would now give another volume, so that
      what was cached or trained with the earlier one is not reused.

    An instance is one sampling run's schedule: ``timesteps`` are the model timesteps the network is called
    at, in order, in the objective's convention (what ``Objective.noisy`` gives the U-Net), and
    ``init_noise_sigma`` scales the initial N(0, 1) noise.
    """

    inverts: ClassVar[Mapping[str, int]] = {}
    stochastic: ClassVar[bool] = False
    needs_next_t: ClassVar[bool] = False
    informed_start: ClassVar[bool] = False
    clips_x0: ClassVar[bool] = False
    summary: ClassVar[str] = ""
    revision: ClassVar[int] = 0

    timesteps: Tensor
    init_noise_sigma: float = 1.0

    @classmethod
    def build(cls, objective: Any, scheduler_config: dict[str, Any], steps: int, *,
              device: torch.device | str | None = None, clip_x0: bool = False) -> "Solver":
        """This solver for a model trained with ``objective`` on the noise schedule ``scheduler_config`` (a
        diffusers config dict, as an export's ``scheduler/scheduler_config.json`` gives it), with ``steps``
        steps (already checked: from 1 to the training timesteps), its timesteps on ``device``."""
        raise NotImplementedError

    def scale_model_input(self, sample: Tensor, t: Tensor) -> Tensor:
        """What the network sees of ``sample`` at timestep ``t`` (most solvers: ``sample`` itself)."""
        return sample

    def step(self, output: Tensor, t: Tensor, sample: Tensor, **declared: Any) -> Tensor:
        """``sample`` at timestep ``t`` -> the sample at the next timestep, given the network's ``output``.
        ``declared`` holds ``t_next`` (``needs_next_t``) and ``noise`` (``stochastic``), and nothing else."""
        raise NotImplementedError

    def noised(self, clean: Tensor, noise: Tensor, begin: int) -> Tensor:
        """``clean`` noised with N(0, 1) ``noise`` to ``timesteps[begin]``, where sampling then continues
        (``informed_start`` solvers only)."""
        raise NotImplementedError(f"{type(self).__name__} declares no informed start")


SOLVERS: Registry[type[Solver]] = Registry(
    "solvers", noun="solver",
    doc="Solvers: step a trained network's predictions back to a volume (DDIM, DPM-Solver++, Euler...); "
        "a :class:`lift3d.sampling.solvers.registry.Solver` each.")


def solvers_for(objective_name: str) -> list[str]:
    """The registered solvers that sample a model trained with the objective ``objective_name``."""
    return [name for name in SOLVERS.names() if objective_name in SOLVERS.get(name).inverts]


def solver_class(name: str, objective: Any) -> type[Solver]:
    """The solver ``name``, checked to invert ``objective`` (an objective object; its ``name`` is matched)."""
    if name not in SOLVERS or objective.name not in SOLVERS.get(name).inverts:
        raise Lift3dError(f"solver {name!r} does not sample a model trained with the {objective.name!r} objective; "
                          f"valid: {', '.join(solvers_for(objective.name)) or 'none registered'}")
    return SOLVERS.get(name)


def build_solver(name: str, objective: Any, scheduler_config: dict[str, Any], steps: int | None = None, *,
                 device: torch.device | str | None = None, clip_x0: bool = False) -> Solver:
    """The solver ``name`` for a model trained with ``objective`` on ``scheduler_config``, with ``steps`` steps
    (None: the solver's default for that objective). ``clip_x0`` clamps its x0 estimate to [-1, 1] at every
    step (solvers that declare ``clips_x0``). Every misuse is one ``Lift3dError`` line."""
    cls = solver_class(name, objective)
    steps = cls.inverts[objective.name] if steps is None else steps
    train_steps = int(scheduler_config.get("num_train_timesteps", 1000))
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= train_steps:
        raise Lift3dError(f"steps must be an integer from 1 to the {train_steps} training timesteps, got {steps!r}")
    if clip_x0 and not cls.clips_x0:
        clipping = [n for n in solvers_for(objective.name) if SOLVERS.get(n).clips_x0]
        raise Lift3dError(f"clip_x0 (--clip-x0) is for solvers that clamp their x0 estimate ({', '.join(clipping)} "
                          f"on a {objective.name!r} model); solver {name!r} has no x0 clipping")
    return cls.build(objective, scheduler_config, steps, device=device, clip_x0=clip_x0)
