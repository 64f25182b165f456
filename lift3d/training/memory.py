"""Memory the configured models need, measured on torch's meta device and checked against the budget
(:mod:`lift3d.io.budget`) before training allocates anything: the noise schedule, and the model's
weights, gradients and AdamW moments (and EMA)."""

from __future__ import annotations

from typing import Any, Callable

from lift3d.io.budget import check_bytes
from lift3d.io.errors import Lift3dError
from lift3d.lifting.inflate import inflate
from lift3d.training.config import ConfigError, TrainConfig, show_value, unet2d_arguments

# Per diffusion step: betas, alphas, alphas_cumprod and timesteps (DDPM), the stage-2 sampler's float64 weights,
# and DPM-Solver++'s alpha_t, sigma_t and lambda_t: eight arrays of at most 8 bytes.
TIMESTEP_BYTES = 64
# Trained weights also hold a gradient and AdamW's two moments.
TRAINED_COPIES = 4


def _resnet_lower_bound(widths_: list[int], layers: int) -> int:
    """Parameters a 2D U-Net or autoencoder of these widths has at least: each resnet's second 3x3 conv,
    ``layers`` per level down and ``layers + 1`` up. Exact integers: a width of 10**30 gives a huge number,
    not an overflow, and is refused before torch is asked to build anything."""
    return 9 * sum((2 * layers + 1) * w * w for w in widths_)


def _meta_parameters(build: Callable[[], Any], what: str) -> Any:
    import torch

    try:
        with torch.device("meta"):
            return build()
    except Lift3dError:
        raise
    except Exception as exc:  # diffusers' own checks of its arguments; the config layer tells which options
        raise ConfigError(f"{what} cannot be built: {type(exc).__name__}: {exc}".replace("\n", " ")) from None


def _parameter_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _check_total(weights: int, trained: int, what: str, ema: bool) -> None:
    copies = TRAINED_COPIES + (1 if ema else 0)
    check_bytes(min(weights + (copies - 1) * trained, 2**100), what)


def model_memory(cfg: TrainConfig) -> tuple[int, int, str] | None:
    """``(weight bytes, trained weight bytes, description)`` of the model this stage builds from the config,
    measured on torch's meta device (nothing is allocated); None when it comes from ``model.pretrained``.

    In the diffusion stages the U-Net's input channels are counted for a 1-channel latent (the autoencoder
    plugin, which knows its latent channels, is not built here): the estimate is a lower bound.
    """
    if cfg.run.stage == "segmenter":  # widths and levels are capped by their rule: building it on meta is cheap
        from lift3d.data.tissue import TISSUES
        from lift3d.evaluation.tissue_unet import TissueUNet

        seg = cfg.segmenter
        what = f"the tissue U-Net of segmenter.block_out_channels = {show_value(seg.block_out_channels)}"
        nbytes = _parameter_bytes(_meta_parameters(
            lambda: TissueUNet(2 * seg.context + 1, len(TISSUES) + 1, seg.block_out_channels), what))
        return nbytes, nbytes, what
    if cfg.run.stage == "autoencoder":
        vae = cfg.vae
        what = (f"the autoencoder of vae.block_out_channels = {show_value(vae.block_out_channels)}, layers_per_block = "
                f"{vae.layers_per_block}, latent_channels = {vae.latent_channels}")
        first, last, latent = vae.block_out_channels[0], vae.block_out_channels[-1], vae.latent_channels
        # and the four convs in and out: image -> first, last -> mean and log-variance, latent -> last, first -> image
        bound = _resnet_lower_bound(vae.block_out_channels, vae.layers_per_block) + 9 * (2 * first + 3 * latent * last)
        if vae.adversarial_weight > 0:
            bound += 16 * 2 * vae.discriminator_width ** 2
            what += f", discriminator_width = {vae.discriminator_width}"
        _check_total(4 * bound, 4 * bound, what + " (at least)", False)
        from lift3d.training.stages.autoencoder import PatchDiscriminator, new_vae

        nbytes = _parameter_bytes(_meta_parameters(lambda: new_vae(vae, 1), what))
        if vae.adversarial_weight > 0:
            nbytes += _parameter_bytes(_meta_parameters(lambda: PatchDiscriminator(1, vae.discriminator_width), what))
        return nbytes, nbytes, what
    if cfg.model.pretrained:
        return None
    model = cfg.model
    sources = 2 * model.source_context + 1 if model.conditioning == "concat" else 0
    in_channels = 1 + sources
    what = (f"the U-Net of model.block_out_channels = {show_value(model.block_out_channels)}, layers_per_block = "
            f"{model.layers_per_block}" + (f", source_context = {model.source_context}" if model.source_context else ""))
    bound = 4 * (_resnet_lower_bound(model.block_out_channels, model.layers_per_block)
                 + 9 * (in_channels + 1) * model.block_out_channels[0])  # and conv_in, conv_out
    _check_total(bound, bound if cfg.run.stage == "slices" or cfg.lift.trainable == "all" else 0,
                 what + " (at least)", cfg.optim.ema)

    from diffusers import UNet2DModel

    unet = _meta_parameters(lambda: UNet2DModel(**unet2d_arguments(model, in_channels, 1)), what)
    weights = _parameter_bytes(unet)
    if cfg.run.stage == "slices":
        return weights, weights, what
    lift = cfg.lift
    what += (f", lifted with lift.kind = {lift.kind or 'default'!r}, lift.kernel_size = {lift.kernel_size}"
             + (f", lift.options = {show_value(lift.options)}" if lift.options else ""))
    _meta_parameters(lambda: inflate(unet, lift.kind or None, kernel_size=lift.kernel_size, where=lift.where,
                                            padding_mode=lift.padding_mode, **lift.options), what)
    lifted = _parameter_bytes(unet) - weights
    return weights + lifted, lifted if lift.trainable == "volumetric" else weights + lifted, what


def check_memory(cfg: TrainConfig) -> None:
    """Refuse a config whose noise schedule or model (weights, gradients and AdamW moments) would not fit in
    the memory budget (:mod:`lift3d.io.budget`), with one line giving the size and the limit."""
    steps = cfg.diffusion.num_train_timesteps
    check_bytes(TIMESTEP_BYTES * steps, f"diffusion.num_train_timesteps = {steps}: the noise schedule's arrays")
    measured = model_memory(cfg)
    if measured is not None:
        weights, trained, what = measured
        ema = cfg.optim.ema and cfg.run.stage != "autoencoder"
        _check_total(weights, trained, f"{what}: its weights, gradients and AdamW moments"
                     + (" and EMA" if ema else ""), ema)
