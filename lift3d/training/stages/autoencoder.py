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
from dataclasses import dataclass
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
from lift3d.training.data_order import IndexedView
from lift3d.training.options import MAX_LAYERS_PER_BLOCK, at_least, check_groups, from_to, opt, show_value, widths
from lift3d.training.sections import AutoencoderConfig
from lift3d.training.sizing import check_training_bytes, on_meta, parameter_bytes, resnet_lower_bound
from lift3d.training.stages.registry import STAGES, Stage
from lift3d.training.task import Task, check_grid

if TYPE_CHECKING:
    from diffusers import AutoencoderKL


@dataclass
class VaeConfig:
    """``[vae]``: the options of the autoencoder stage."""

    block_out_channels: list[int] = opt([64, 128, 128], "autoencoder stage: AutoencoderKL widths of a new autoencoder; "
                                        "f = 2 ** (levels - 1), so three levels give the paper's f = 4", rule=widths())
    latent_channels: int = opt(4, "autoencoder stage: latent channels", rule=at_least(1))
    layers_per_block: int = opt(1, "autoencoder stage: resnets per level", rule=from_to(1, MAX_LAYERS_PER_BLOCK))
    norm_num_groups: int = opt(32, "autoencoder stage: GroupNorm groups (must divide every width)", rule=at_least(1))
    kl_weight: float = opt(1e-6, "autoencoder stage: weight of the KL term (per pixel)", rule=at_least(0))
    ssim_weight: float = opt(0.2, "autoencoder stage: weight of the structural term 1 - SSIM", rule=at_least(0))
    adversarial_weight: float = opt(0.0, "autoencoder stage: weight of the patch-discriminator term, scaled by the "
                                    "adaptive gradient-norm ratio (0 = no discriminator)", rule=at_least(0))
    adversarial_start: int = opt(0, "autoencoder stage: step at which the discriminator switches on",
                                 rule=at_least(0))
    discriminator_width: int = opt(32, "autoencoder stage: channels of the discriminator's first layer",
                                   rule=at_least(8))
    scale_batches: int = opt(32, "autoencoder stage: training batches whose latents set scaling_factor and "
                             "shift_factor at export", rule=at_least(1))


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

    def __init__(self, vae: "AutoencoderKL", options: VaeConfig) -> None:
        super().__init__()
        self.vae, self.options = vae, options
        self.discriminator = None
        if options.adversarial_weight > 0:
            self.discriminator = PatchDiscriminator(vae.config.in_channels, options.discriminator_width)

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
        loss = l1 + self.options.ssim_weight * (1 - ssim) + self.options.kl_weight * kl
        logs = {"l1": l1.detach(), "ssim": ssim.detach(), "kl": kl.detach()}
        if self.discriminator is None:
            return loss, logs
        if step < self.options.adversarial_start:
            # Unused parameters would stall DDP's gradient all-reduce; a zero term keeps them in the graph.
            return loss + 0.0 * sum(p.sum() for p in self.discriminator.parameters()), logs
        frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
        generator_loss = -functional_call(self.discriminator, frozen, (reconstruction,)).mean()
        reconstruction_loss = l1 + self.options.ssim_weight * (1 - ssim)
        weight = self._adaptive_weight(reconstruction_loss, generator_loss) if torch.is_grad_enabled() \
            else torch.ones((), device=x.device)
        real, fake = self.discriminator(x), self.discriminator(reconstruction.detach())
        discriminator_loss = 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())
        loss = loss + self.options.adversarial_weight * weight * generator_loss + discriminator_loss
        logs.update(generator=generator_loss.detach(), discriminator=discriminator_loss.detach(), adaptive_weight=weight)
        return loss, logs


def new_vae(options: VaeConfig, image_channels: int) -> "AutoencoderKL":
    """A fresh ``AutoencoderKL`` of ``[vae]``: f = 2 ** (len(block_out_channels) - 1), f = 4 by default."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_config(tiny_kl_config(
        image_channels=image_channels, latent_channels=options.latent_channels,
        block_out_channels=options.block_out_channels, layers_per_block=options.layers_per_block,
        norm_num_groups=options.norm_num_groups))


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


def autoencoder_task(objective: AutoencoderObjective, view: IndexedView, batch_size: int, accumulation: int,
                     settings: dict[str, Any], output_dir: Path, device) -> Task:
    """Reconstruct source and target slices with one KL autoencoder; the export writes ``settings`` (what the
    run was) beside the measured latent scale."""

    def slices(batch: dict) -> Tensor:
        parts = [batch["source"]] + ([batch["target"]] if "target" in batch else [])
        return torch.cat(parts).to(device)

    def loss(model, batch: dict, micro: int):
        return model(slices(batch), micro // accumulation)

    val_items = stack_items([view[i] for i in range(0, len(view), max(1, len(view) // 16))][:16])

    @torch.no_grad()
    def score(model) -> dict[str, float]:
        x = slices(val_items)
        vae = model.vae
        reconstruction = vae.decode(vae.encode(x.to(vae.dtype)).latent_dist.mode()).sample.float().clamp(-1, 1)
        mse = float(F.mse_loss(reconstruction, x.float()))
        return {"val_l1": float(F.l1_loss(reconstruction, x.float())),
                "val_psnr": 10 * math.log10(4.0 / max(mse, 1e-12))}  # slices in [-1, 1]: peak-to-peak 2

    def export(model) -> Path:
        loader = torch.utils.data.DataLoader(view, batch_size=batch_size, collate_fn=stack_items)
        batches = (slices(b) for _, b in zip(range(model.options.scale_batches), loader))
        shift, scale = measure_latent_scale(model.vae, batches)
        model.vae.register_to_config(scaling_factor=scale, shift_factor=shift)

        def write(tmp: Path) -> None:
            model.vae.save_pretrained(tmp, safe_serialization=True)
            (tmp / TRAINING_SETTINGS).write_text(json.dumps(
                {**settings, "scaling_factor": scale, "shift_factor": shift,
                 "downsampling_factor": 2 ** (len(model.vae.config.block_out_channels) - 1)}, indent=2))

        return write_folder(output_dir / "model", write)

    return Task(objective, [p for p in objective.parameters() if p.requires_grad], view, loss, score, export)


def autoencoder_objective(autoencoder: AutoencoderConfig, options: VaeConfig, dataset) -> AutoencoderObjective:
    """A new KL autoencoder from ``[vae]``, or the ``kl`` autoencoder of ``[autoencoder]`` to fine-tune."""
    if autoencoder.options:
        base = create("autoencoders", autoencoder.name, **autoencoder.options)
        if not hasattr(base, "vae"):
            raise ValueError(f"the autoencoder stage trains a KL autoencoder; autoencoder.name = "
                             f"{autoencoder.name!r} has none (use 'kl', or no autoencoder.options for a new one)")
        vae = base.vae
    else:
        vae = new_vae(options, dataset[0].source.shape[0])
    check_grid(dataset, 2 ** (len(vae.config.block_out_channels) - 1), "the autoencoder's f")
    return AutoencoderObjective(vae.train().requires_grad_(True), options)


@STAGES.register("autoencoder")
class Autoencoder(Stage):
    """Train the KL autoencoder the latent stages run in (a new one from ``[vae]``, or the ``kl`` autoencoder
    of ``[autoencoder]`` fine-tuned), on source and target slices alike."""

    summary = "train the KL autoencoder the latent stages run in ([vae])"
    section, options = "vae", VaeConfig
    export_label = "autoencoder"
    reads = ("run", "data", "autoencoder", "optim")
    # Validation reconstructs training slices: no sampled validation, no validation split, no windows.
    ignores = ("run.validate_every", "run.validate_steps", "data.window", "data.val_volumes",
               "autoencoder.cache_latents")

    def check(self, cfg: Any) -> None:
        check_groups("vae", cfg.vae.block_out_channels, cfg.vae.norm_num_groups)

    def view(self, cfg: Any, dataset) -> IndexedView:
        return IndexedView(dataset.slices())

    def memory(self, cfg: Any) -> tuple[int, int, str]:
        vae: VaeConfig = cfg.vae
        what = (f"the autoencoder of vae.block_out_channels = {show_value(vae.block_out_channels)}, layers_per_block = "
                f"{vae.layers_per_block}, latent_channels = {vae.latent_channels}")
        first, last, latent = vae.block_out_channels[0], vae.block_out_channels[-1], vae.latent_channels
        # and the four convs in and out: image -> first, last -> mean and log-variance, latent -> last, first -> image
        bound = resnet_lower_bound(vae.block_out_channels, vae.layers_per_block) + 9 * (2 * first + 3 * latent * last)
        if vae.adversarial_weight > 0:
            bound += 16 * 2 * vae.discriminator_width ** 2
            what += f", discriminator_width = {vae.discriminator_width}"
        check_training_bytes(4 * bound, 4 * bound, what + " (at least)", False)
        nbytes = parameter_bytes(on_meta(lambda: new_vae(vae, 1), what))
        if vae.adversarial_weight > 0:
            nbytes += parameter_bytes(on_meta(lambda: PatchDiscriminator(1, vae.discriminator_width), what))
        return nbytes, nbytes, what

    def prepare(self, cfg: Any, dataset, output_dir: Path) -> Callable[[Any], Task]:
        objective = autoencoder_objective(cfg.autoencoder, cfg.vae, dataset)
        view = self.view(cfg, dataset)
        settings = {"stage": self.export_label, "data": {"dataset": cfg.data.dataset, "options": dict(cfg.data.options)},
                    "config": cfg.to_dict()}
        return lambda accelerator: autoencoder_task(objective, view, cfg.data.batch_size,
                                                    cfg.optim.gradient_accumulation_steps, settings, output_dir,
                                                    accelerator.device)
