"""Built-in timestep samplers: which diffusion step each training slice is noised to.

Stage 1 of Make-A-Volume (Zhu et al., MICCAI 2023, sec. 2.3) draws t independently per slice;
stage 2 fixes one t per volume, favouring small t with multinomial weights ``2T - t``.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from lift3d.io.budget import check_count
from lift3d.io.errors import Lift3dError
from lift3d.plugins import hookimpl


def _check_sizes(num_volumes: int, num_slices: int, num_train_timesteps: int) -> tuple[int, int, int]:
    """Positive ints (not bools, not floats) whose timesteps, and weights over the T steps, fit the memory budget."""
    sizes = []
    for name, value in (
        ("num_volumes", num_volumes),
        ("num_slices", num_slices),
        ("num_train_timesteps", num_train_timesteps),
    ):
        try:
            size = operator.index(value)  # ints, numpy ints and 0-d int tensors; not floats
        except TypeError:
            size = None
        if size is None or isinstance(value, bool) or size < 1:
            raise Lift3dError(f"{name} must be a positive integer, got {value!r}")
        sizes.append(size)
    num_volumes, num_slices, num_train_timesteps = sizes
    check_count(num_volumes * num_slices, 8, f"timesteps for num_volumes = {num_volumes} x num_slices = {num_slices}")
    # The float64 weights over the T steps and torch.multinomial's working copy of them.
    check_count(num_train_timesteps, 8, f"timestep weights over num_train_timesteps = {num_train_timesteps}", copies=2)
    return num_volumes, num_slices, num_train_timesteps


def _draw_device(generator: torch.Generator | None) -> torch.device:
    # Draw where the generator lives (torch requires it), then move: a seeded CPU generator gives
    # the same timesteps whatever device the batch is on.
    return generator.device if generator is not None else torch.device("cpu")


class PerSliceTimestepSampler:
    """``uniform-slice``: an independent, uniform t for every slice (stage 1, the 2D model)."""

    per_volume = False

    def __call__(
        self,
        num_volumes: int,
        num_slices: int,
        num_train_timesteps: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        num_volumes, num_slices, num_train_timesteps = _check_sizes(num_volumes, num_slices, num_train_timesteps)
        t = torch.randint(
            0, num_train_timesteps, (num_volumes, num_slices),
            generator=generator, device=_draw_device(generator), dtype=torch.int64,
        )
        return t.to(device) if device is not None else t

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class PerVolumeTimestepSampler:
    """``uniform-volume``: one t per volume, shared by all its slices, drawn from ``weights``.

    Subclasses change the distribution by overriding ``weights``; ``None`` means uniform.
    """

    per_volume = True

    def weights(self, num_train_timesteps: int) -> Tensor | None:
        """Unnormalised weight of each 0-based diffusers timestep ``0..T-1``, or None for uniform."""
        return None

    def __call__(
        self,
        num_volumes: int,
        num_slices: int,
        num_train_timesteps: int,
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        num_volumes, num_slices, num_train_timesteps = _check_sizes(num_volumes, num_slices, num_train_timesteps)
        draw_device = _draw_device(generator)
        weights = self.weights(num_train_timesteps)
        if weights is None:
            t = torch.randint(
                0, num_train_timesteps, (num_volumes,),
                generator=generator, device=draw_device, dtype=torch.int64,
            )
        else:
            if weights.shape != (num_train_timesteps,):
                raise ValueError(
                    f"{type(self).__name__}.weights({num_train_timesteps}) must have shape "
                    f"({num_train_timesteps},), got {tuple(weights.shape)}"
                )
            t = torch.multinomial(
                weights.to(draw_device, torch.float64), num_volumes, replacement=True, generator=generator
            )
        # repeat, not expand: callers may write into the result, and slices must not alias.
        t = t[:, None].repeat(1, num_slices)
        return t.to(device) if device is not None else t

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class MakeAVolumeTimestepSampler(PerVolumeTimestepSampler):
    """``make-a-volume``: one t per volume, small (low-noise) t favoured (paper sec. 2.3, stage 2).

    The paper samples t in ``1..T`` with replacement from a multinomial whose unnormalised weight
    is ``2T - t``: t = 1 (least noise) weighs ``2T - 1``, t = T (pure noise) weighs ``T``, so
    the cleanest step is drawn about twice as often as the noisiest.

    diffusers counts the same steps from 0: index ``i`` in ``0..T-1`` is the paper's step
    ``t = i + 1`` (``scheduler.alphas_cumprod[i]`` is the paper's alpha-bar at t = i + 1). So
    index ``i`` gets weight ``2T - (i + 1) = 2T - 1 - i``: index 0 weighs ``2T - 1``, index
    ``T - 1`` weighs ``T``. This keeps the paper's distribution over noise levels exactly, rather
    than shifting it by one step as plugging the 0-based index into ``2T - t`` would.
    """

    def weights(self, num_train_timesteps: int) -> Tensor:
        T = num_train_timesteps
        return 2 * T - 1 - torch.arange(T, dtype=torch.float64)


@hookimpl
def lift3d_register_timestep_samplers(registry):
    registry.add("uniform-slice", PerSliceTimestepSampler)
    registry.add("uniform-volume", PerVolumeTimestepSampler)
    registry.add("make-a-volume", MakeAVolumeTimestepSampler)
