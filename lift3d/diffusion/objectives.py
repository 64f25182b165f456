"""Training objectives: how a clean latent is noised, what the U-Net is trained to predict, and which solver
turns its predictions back into volumes by default and in few steps.

``ddpm`` is the objective of Make-A-Volume (Zhu et al., MICCAI 2023, eq. 4) and of LDM: the DDPM forward
process ``x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps``, with the U-Net predicting ``eps`` or ``v``.
``flow`` is flow matching / rectified flow (Lipman et al., ICLR 2023; Liu et al., ICLR 2023), as MAISI-v2
and WFM use it: ``x_s = (1 - s) x_0 + s eps`` on a straight path, ``s = t / T``, the U-Net predicting the
velocity ``eps - x_0``; its solvers (Euler on the straight path, DPM-Solver++ on flow sigmas) stay accurate
in a few steps.

Both take integer training timesteps ``t`` in ``[0, T)`` from a timestep sampler plugin (stage 1 one per
slice, stage 2 one per volume with weight ``2T - t``), so the stage-2 weighting means the same thing
under either objective: small ``t`` is little noise. ``train_steps = N`` (Fast-DDPM, Jiang et al.,
2024) snaps every training ``t`` to the grid an N-step solver visits, so training and sampling
match.

An objective is a registered kind (``OBJECTIVES``): the built-ins register here, by decorator; a third
party's come through the hook ``lift3d_register_objectives``. Which solvers sample an objective is said once,
by each solver (its ``inverts``, ``lift3d.sampling.solvers``); an objective names only its
``default_solver`` and its few-step preset ``fast``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lift3d.io.errors import Lift3dError
from lift3d.io.schemas import MIN_SHIFT
from lift3d.plugins.registry import PluginError, Registry

OBJECTIVES: Registry[Any] = Registry(
    "objectives", noun="objective",
    doc="Training objectives: how latents are noised, what the U-Net predicts, the loss target; an export "
        "without one (written before objectives existed) is ``ddpm``.")


def _check_train_steps(train_steps: int | None, num_train_timesteps: int) -> int | None:
    if train_steps is None:
        return None
    if isinstance(train_steps, bool) or not isinstance(train_steps, int) or not 1 <= train_steps <= num_train_timesteps:
        raise Lift3dError(f"objective option train_steps must be an integer from 1 to the {num_train_timesteps} "
                          f"training timesteps (or unset: every timestep), got {train_steps!r}")
    return train_steps


def _snap(t: Tensor, grid: Tensor) -> Tensor:
    """Each of ``t`` moved to the nearest value of ``grid`` (sorted or not)."""
    grid = grid.to(t.device, torch.float64)
    nearest = (t.double()[..., None] - grid).abs().argmin(dim=-1)
    return grid[nearest].round().to(t.dtype)


class StepMatched:
    """What both built-ins share: ``train_steps = N`` (Fast-DDPM) snaps every training timestep to the grid an
    N-step solver visits (``step_grid``), and is what an export records of the objective's options."""

    train_steps: int | None = None

    def step_grid(self, steps: int) -> Tensor:
        raise NotImplementedError

    @property
    def options(self) -> dict[str, Any]:
        return {} if self.train_steps is None else {"train_steps": self.train_steps}

    def training_timesteps(self, t: Tensor) -> Tensor:
        return t if self.train_steps is None else _snap(t, self.step_grid(self.train_steps))


@OBJECTIVES.register("ddpm")
class DDPMObjective(StepMatched):
    """``ddpm``: the DDPM forward process, the U-Net predicting ``epsilon`` or ``v_prediction``.

    The noise schedule takes diffusers' names and defaults, so a scheduler config file missing a key reads
    as diffusers reads it; training passes all four.

    :param num_train_timesteps: the number of training timesteps.
    :param beta_schedule: the noise schedule's name (diffusers' ``beta_schedule``).
    :param beta_start: the first beta of the schedule.
    :param beta_end: the last beta of the schedule.
    :param prediction_type: ``epsilon`` (the paper's eq. 4) or ``v_prediction``.
    :param train_steps: Fast-DDPM: train only on the timesteps a DDIM solver of this many steps visits.
    """

    name = "ddpm"
    default_solver = "ddim"  # the paper's DDIM-200
    # The few-step preset (lift3d-synthesize --fast): the best within 8 U-Net evaluations on the ICBM protocol's
    # validation subjects (benchmarks/results/few-steps.md): the mean of 4 DPM-Solver++ 2 samples.
    fast = {"solver": "dpm", "steps": 2, "samples": 4}

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "linear",
                 beta_start: float = 0.0001, beta_end: float = 0.02, prediction_type: str = "epsilon",
                 train_steps: int | None = None, **_diffusers_keys: Any) -> None:
        from diffusers import DDPMScheduler

        if prediction_type not in ("epsilon", "v_prediction"):
            raise Lift3dError(f"the ddpm objective predicts epsilon or v_prediction, got {prediction_type!r}")
        self.prediction_type = prediction_type
        self.train_steps = _check_train_steps(train_steps, num_train_timesteps)
        self.scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                                       beta_start=beta_start, beta_end=beta_end, prediction_type=prediction_type,
                                       clip_sample=False)
        self.num_train_timesteps = num_train_timesteps

    def step_grid(self, steps: int) -> Tensor:
        """The training timesteps a DDIM solver of ``steps`` steps visits."""
        from diffusers import DDIMScheduler

        grid = DDIMScheduler.from_config(self.scheduler.config)
        grid.set_timesteps(steps)
        return grid.timesteps

    def noisy(self, x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(x_t, the timesteps the U-Net sees)`` for integer ``t`` (one per row of ``x0``)."""
        return self.scheduler.add_noise(x0, noise, t), t

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(x0, noise, t)

    def clean_estimate(self, prediction: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """x_0 from the U-Net's ``prediction`` at ``x_t`` and model timestep ``t`` (one value)."""
        a = self.scheduler.alphas_cumprod.to(x_t.device)[int(t)].to(x_t.dtype)
        if self.prediction_type == "epsilon":
            return (x_t - (1 - a).sqrt() * prediction) / a.sqrt()
        return a.sqrt() * x_t - (1 - a).sqrt() * prediction


def euler_sigmas(steps: int) -> list[float]:
    """The ``s`` an Euler solver of ``steps`` steps visits on the straight path, before diffusers' shift: the
    uniform grid ``1, (N - 1) / N, ..., 1 / N``. (diffusers' own grid ends at ``s = 1 / T``, which spends the
    last of N steps on nothing.)"""
    return [1 - i / steps for i in range(steps)]


@OBJECTIVES.register("flow")
class FlowMatchingObjective(StepMatched):
    """``flow``: rectified flow, ``x_s = (1 - s) x_0 + s eps`` with ``s = (t + 1) / T``; the U-Net sees
    ``s T`` and predicts the velocity ``eps - x_0``.

    :param num_train_timesteps: T, the resolution of ``s``.
    :param shift: diffusers' timestep shift of the sampling schedule (1 = uniform in ``s``; > 1 spends
        more steps at high noise, as SD3 does).
    :param train_steps: train only on the ``s`` an Euler solver of this many steps visits (step-count
        matched training, as Fast-DDPM does for DDPM).
    """

    name = "flow"
    prediction_type = "flow_prediction"
    default_solver = "flow"
    # The few-step preset (lift3d-synthesize --fast): the best within 8 U-Net evaluations on the ICBM protocol's
    # validation subjects (benchmarks/results/few-steps.md): the mean of 2 Euler 4-step samples.
    fast = {"solver": "flow", "steps": 4, "samples": 2}

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, train_steps: int | None = None,
                 **_diffusers_keys: Any) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) \
                or not MIN_SHIFT <= shift <= 100:
            raise Lift3dError(f"objective option shift must be a number from {MIN_SHIFT} to 100, got {shift!r}")
        self.train_steps = _check_train_steps(train_steps, num_train_timesteps)
        self.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=num_train_timesteps, shift=float(shift))
        self.num_train_timesteps = num_train_timesteps
        self.shift = float(shift)

    def step_grid(self, steps: int) -> Tensor:
        """The training timesteps an Euler solver of ``steps`` steps visits (its model timestep ``s T`` is ``t + 1``)."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        grid = FlowMatchEulerDiscreteScheduler.from_config(self.scheduler.config)
        grid.set_timesteps(sigmas=euler_sigmas(steps))
        return grid.timesteps - 1

    def _sigma(self, t: Tensor, like: Tensor) -> Tensor:
        s = (t.to(torch.float64) + 1) / self.num_train_timesteps
        return s.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))

    def noisy(self, x0: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        s = self._sigma(t, x0)
        return (1 - s) * x0 + s * noise, (t + 1).to(torch.float32)

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        return noise - x0

    def clean_estimate(self, prediction: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        s = float(t) / self.num_train_timesteps
        return x_t - s * prediction


def objective_name(settings_objective: str | None) -> str:
    """The objective an export names; exports written before objectives existed are ``ddpm``."""
    return settings_objective or "ddpm"


def create_objective(name: str, scheduler_config: dict[str, Any], options: dict[str, Any] | None = None):
    """The objective ``name`` (registered in ``OBJECTIVES``) on the noise schedule ``scheduler_config`` (a
    diffusers config dict, as training's ``[diffusion]`` section or an export's
    ``scheduler/scheduler_config.json`` gives it), with its own ``options``."""
    config = {k: v for k, v in scheduler_config.items() if not k.startswith("_")}
    try:
        return OBJECTIVES.create(name, **config, **(options or {}))
    except PluginError as exc:
        raise Lift3dError(str(exc)) from None
