"""The diffusion loss of Make-A-Volume (eq. 4), and the validation loss on fixed volumes (the same noise
for every model, so stages compare exactly)."""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from lift3d.data.dataset import stack_items
from lift3d.diffusion.conditioning import predict
from lift3d.training.data_order import LatentEncoder


logger = logging.getLogger("lift3d.training.losses")


def diffusion_loss(unet, objective, latents: Tensor, source_latents: Tensor | None, noise: Tensor,
                   timesteps: Tensor) -> Tensor:
    """Eq. 4 under any objective: ``|| target - f_theta(x_t, t, z_c) ||^2`` over all slices; for ``ddpm`` with
    epsilon, ``|| eps - eps_theta(sqrt(a_t) z + sqrt(1 - a_t) eps, t, z_c) ||^2``."""
    n = latents.shape[2]
    flat = lambda x: rearrange(x, "b c n h w -> (b n) c h w")  # noqa: E731
    z, eps, t = flat(latents), flat(noise), timesteps.reshape(-1)
    noisy, model_t = objective.noisy(z, eps, t)
    noisy = rearrange(noisy, "(b n) c h w -> b c n h w", n=n)
    target = objective.target(z, eps, t)
    return F.mse_loss(flat(predict(unet, noisy, source_latents, model_t)).float(), target.float())


VAL_VOLUMES = 2
VAL_SEED = 1234
VAL_TIMESTEP_FRACTIONS = (0.05, 0.25, 0.5, 0.75, 0.95)


@torch.no_grad()
def fixed_volume_loss(unet, objective, encoder: LatentEncoder, view, num_train_timesteps: int, conditioned: bool,
                      device) -> float:
    """Mean loss on the first volumes of ``view`` (the dataset's volumes), with fixed noise, at a fixed grid of t.

    Every slice of a volume shares t, as in stage 2. The 2D model (stage 1) and the lifted model at
    initialisation give exactly the same value, so the two stages can be compared.
    """
    items = [view[i] for i in range(min(VAL_VOLUMES, len(view)))]
    batch = stack_items(items)
    batch["index"] = list(range(len(items)))
    latents, source = encoder(batch, device)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(VAL_SEED)).to(device)
    was_training = unet.training
    unet.eval()
    losses = []
    for fraction in VAL_TIMESTEP_FRACTIONS:
        t = int(fraction * num_train_timesteps)
        timesteps = torch.full(latents.shape[:1] + latents.shape[2:3], t, device=device)
        losses.append(float(diffusion_loss(unet, objective, latents,
                                           source if conditioned else None, noise,
                                           timesteps)))
    unet.train(was_training)
    return sum(losses) / len(losses)
