"""The autoencoder stage: train the KL autoencoder that Make-A-Volume's latent diffusion runs in.

Make-A-Volume (Zhu et al., MICCAI 2023, sec. 2.2 and 3) diffuses in the latents of a KL autoencoder
with downsampling f = 4. The recipe is latent diffusion's (Rombach et al., CVPR 2022, app. G):
an L1 reconstruction loss, a small KL term towards N(0, I), here a structural (1 - SSIM) term
(torchmetrics), and optionally a patch discriminator whose hinge loss switches on after a warm-up,
its generator term weighted by the ratio of the two losses' gradient norms at the decoder's last
layer. Nothing needs weights from a hub (no perceptual network).

One autoencoder serves source and target: each batch is the source slices and the target slices.
The export is a diffusers ``AutoencoderKL`` folder whose ``scaling_factor`` (and ``shift_factor``)
are measured on the training latents, so that stage 1 sees unit-variance latents.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from lift3d.data.dataset import stack_items
from lift3d.diffusion.autoencoding import tiny_kl_config
from lift3d.diffusion.export import TRAINING_SETTINGS
from lift3d.plugins import create
from lift3d.training.checkpoints import write_folder
from lift3d.training.config import TrainConfig
from lift3d.training.data_order import IndexedView
from lift3d.training.task import Task, check_grid

if TYPE_CHECKING:
    from diffusers import AutoencoderKL


class PatchDiscriminator(nn.Module):
    """A PatchGAN (Isola et al., 2017): one real/fake logit per overlapping patch of a slice."""

    def __init__(self, in_channels: int = 1, width: int = 32, layers: int = 3) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(in_channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]
        channels = width
        for i in range(1, layers):
            out = width * min(2 ** i, 8)
            stride = 2 if i < layers - 1 else 1
            blocks += [nn.Conv2d(channels, out, 4, stride, 1), nn.GroupNorm(min(8, out), out), nn.LeakyReLU(0.2)]
            channels = out
        blocks.append(nn.Conv2d(channels, 1, 4, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _ssim(reconstruction: Tensor, target: Tensor) -> Tensor:
    from torchmetrics.functional.image import structural_similarity_index_measure

    # Slices in [-1, 1]; a window of 7 fits the 16-pixel slices of the tests as well as 256.
    return structural_similarity_index_measure(reconstruction.float(), target.float(), data_range=2.0,
                                               kernel_size=7)


class AutoencoderObjective(nn.Module):
    """The autoencoder (and its discriminator) with the whole loss in ``forward``.

    The loss is one scalar, minimised by one optimizer over both networks: the discriminator's
    hinge loss sees the reconstruction detached, and the generator's adversarial term sees the
    discriminator's weights detached, so each term only moves its own network. Keeping it all in
    ``forward`` lets Accelerate's DDP wrapper all-reduce every gradient.
    """

    def __init__(self, vae: "AutoencoderKL", cfg: Any) -> None:
        super().__init__()
        self.vae, self.cfg = vae, cfg
        adversarial = cfg.adversarial_weight > 0
        self.discriminator = PatchDiscriminator(vae.config.in_channels, cfg.discriminator_width) if adversarial else None

    def _adaptive_weight(self, reconstruction_loss: Tensor, generator_loss: Tensor) -> Tensor:
        last = self.vae.decoder.conv_out.weight
        g_rec = torch.autograd.grad(reconstruction_loss, last, retain_graph=True)[0]
        g_adv = torch.autograd.grad(generator_loss, last, retain_graph=True)[0]
        return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach()

    def forward(self, x: Tensor, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        posterior = self.vae.encode(x).latent_dist
        reconstruction = self.vae.decode(posterior.sample()).sample
        l1 = F.l1_loss(reconstruction.float(), x.float())
        ssim = _ssim(reconstruction, x)
        kl = posterior.kl().mean() / x[0].numel()  # per pixel, as l1 is
        loss = l1 + self.cfg.ssim_weight * (1 - ssim) + self.cfg.kl_weight * kl
        logs = {"l1": l1.detach(), "ssim": ssim.detach(), "kl": kl.detach()}
        if self.discriminator is None:
            return loss, logs
        if step < self.cfg.adversarial_start:
            # Unused parameters would stall DDP's gradient all-reduce; a zero term keeps them in the graph.
            return loss + 0.0 * sum(p.sum() for p in self.discriminator.parameters()), logs
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        generator_loss = -functional_call(self.discriminator, frozen, (reconstruction,)).mean()
        weight = self._adaptive_weight(l1 + self.cfg.ssim_weight * (1 - ssim), generator_loss) if torch.is_grad_enabled() \
            else torch.ones((), device=x.device)
        real, fake = self.discriminator(x), self.discriminator(reconstruction.detach())
        discriminator_loss = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
        loss = loss + self.cfg.adversarial_weight * weight * generator_loss + discriminator_loss
        logs.update(generator=generator_loss.detach(), discriminator=discriminator_loss.detach(), adaptive_weight=weight)
        return loss, logs


def new_vae(cfg: Any, image_channels: int) -> "AutoencoderKL":
    """A fresh ``AutoencoderKL``: f = 2 ** (len(block_out_channels) - 1), f = 4 by default."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(tiny_kl_config(
        image_channels=image_channels, latent_channels=cfg.latent_channels, block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block, norm_num_groups=cfg.norm_num_groups))


@torch.no_grad()
def measure_latent_scale(vae: "AutoencoderKL", batches: Iterable[Tensor]) -> tuple[float, float]:
    """``(shift_factor, scaling_factor)``: the mean and 1 / std of the posterior means over ``batches``,
    so that ``(z - shift) * scale`` has zero mean and unit variance on the training slices."""
    total, total_sq, count = 0.0, 0.0, 0
    for x in batches:
        z = vae.encode(x.to(vae.dtype)).latent_dist.mode().double()
        total, total_sq, count = total + z.sum().item(), total_sq + (z ** 2).sum().item(), count + z.numel()
    if count == 0:
        raise ValueError("no training slices to measure the latent scale on")
    mean = total / count
    std = max(total_sq / count - mean ** 2, 1e-12) ** 0.5
    return float(mean), float(1.0 / std)


# --------------------------------------------------------------------------------------------
# The stage


def autoencoder_task(cfg: TrainConfig, dataset, objective, output_dir: Path, device) -> Task:
    """The autoencoder stage: reconstruct source and target slices with one KL autoencoder."""
    view = IndexedView(dataset.slices())

    def slices(batch: dict) -> Tensor:
        parts = [batch["source"]] + ([batch["target"]] if "target" in batch else [])
        return torch.cat(parts).to(device)

    def loss(model, batch: dict, micro: int):
        return model(slices(batch), micro // cfg.optim.gradient_accumulation_steps)

    val_items = stack_items([view[i] for i in range(0, len(view), max(1, len(view) // 16))][:16])

    @torch.no_grad()
    def validate(model) -> dict[str, float]:
        x = slices(val_items)
        vae = model.vae
        reconstruction = vae.decode(vae.encode(x.to(vae.dtype)).latent_dist.mode()).sample.float().clamp(-1, 1)
        mse = float(F.mse_loss(reconstruction, x.float()))
        return {"val_l1": float(F.l1_loss(reconstruction, x.float())),
                "val_psnr": 10 * math.log10(4.0 / max(mse, 1e-12))}  # slices in [-1, 1]: peak-to-peak 2

    def export(model) -> Path:
        loader = torch.utils.data.DataLoader(view, batch_size=cfg.data.batch_size, collate_fn=stack_items)
        batches = (slices(b) for _, b in zip(range(cfg.vae.scale_batches), loader))
        shift, scale = measure_latent_scale(model.vae, batches)
        model.vae.register_to_config(scaling_factor=scale, shift_factor=shift)

        def write(tmp: Path) -> None:
            model.vae.save_pretrained(tmp, safe_serialization=True)
            (tmp / TRAINING_SETTINGS).write_text(json.dumps(
                {"stage": "autoencoder", "scaling_factor": scale, "shift_factor": shift,
                 "downsampling_factor": 2 ** (len(model.vae.config.block_out_channels) - 1),
                 "data": {"dataset": cfg.data.dataset, "options": dict(cfg.data.options)}, "config": cfg.to_dict()},
                indent=2))

        return write_folder(output_dir / "model", write)

    return Task(objective, [p for p in objective.parameters() if p.requires_grad], view, loss, validate, export)


def build_autoencoder_objective(cfg: TrainConfig, dataset):
    """A new KL autoencoder from [vae], or the ``kl`` autoencoder of [autoencoder] to fine-tune."""
    if cfg.autoencoder.options:
        base = create("autoencoders", cfg.autoencoder.name, **cfg.autoencoder.options)
        if not hasattr(base, "vae"):
            raise ValueError(f"run.stage = 'autoencoder' trains a KL autoencoder; autoencoder.name = "
                             f"{cfg.autoencoder.name!r} has none (use 'kl', or no autoencoder.options for a new one)")
        vae = base.vae
    else:
        vae = new_vae(cfg.vae, dataset[0].source.shape[0])
    check_grid(dataset, 2 ** (len(vae.config.block_out_channels) - 1), "the autoencoder's f")
    return AutoencoderObjective(vae.train().requires_grad_(True), cfg.vae)


def prepare(cfg: TrainConfig, dataset, output_dir: Path) -> Callable[[Any], Task]:
    """Build and check the autoencoder stage before the run folder is touched."""
    objective = build_autoencoder_objective(cfg, dataset)
    return lambda accelerator: autoencoder_task(cfg, dataset, objective, output_dir, accelerator.device)
