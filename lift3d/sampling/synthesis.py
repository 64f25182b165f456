"""Sampling a trained model: source volume -> synthesised target volume (Make-A-Volume, sec. 2.2-2.3).

:func:`load_synthesis_model` reads a folder written by :func:`lift3d.training.loop.export_model`;
:func:`synthesize` encodes the source, starts from seeded Gaussian noise, denoises **all slices
jointly at the same timestep** with the source latent concatenated on channels (the paper's
``p_theta(z_{t-1} | z_t, z_c)``), and decodes. The samplers are diffusers' own classes built from
the training scheduler config (the paper reports DDIM with 200 steps).

Volumes longer than the model was fine-tuned on are denoised in overlapping windows: at every step
the U-Net runs on each window and the noise predictions are blended with weights that ramp down
towards inner window edges, then one scheduler step updates the whole volume. (Overwriting the
overlap instead, as the authors' code does, leaves seams where a window's border slices meet.)

:func:`synthesize_posterior` draws several samples per source and returns their mean and per-voxel
standard deviation (an uncertainty map); samples are batched through the U-Net together, each
with its own seed (:func:`sample_seed`). ``noise_correlation`` gives every slice's noise a shared
component, so the slices of a volume start (and, with DDPM, are perturbed) alike.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from lift3d.data.context import with_source_context
from lift3d.data.intensity import IntensityScaling
from lift3d.data.nifti import save_volume
from lift3d.data.resample import check_in_plane_size
from lift3d.data.volume import VolumeMeta
from lift3d.diffusion.autoencoding import decode_volume, encode_volume
from lift3d.diffusion.schedules import SCHEDULERS, make_scheduler
from lift3d.sampling.model import (DTYPES, SynthesisModel, check_channels, load_synthesis_model, resolve_device,
                                   resolve_dtype)
from lift3d.sampling.windows import predict_noise, predict_noise_windowed, resolve_window, window_weights

logger = logging.getLogger("lift3d.sampling.synthesis")

# The sampling API in one place: what a user imports from here lives in these modules.
__all__ = ["DTYPES", "SCHEDULERS", "PosteriorEstimate", "SynthesisModel", "check_channels", "check_clip_x0",
           "load_synthesis_model", "make_scheduler", "predict_noise", "predict_noise_windowed", "resolve_device",
           "resolve_dtype", "resolve_window", "sample_seed", "save_std_volume", "synthesize", "synthesize_posterior",
           "unet_evaluations", "window_weights", "STARTS"]


# --------------------------------------------------------------------------------------------
# Sampling


SOURCE_RANGE_SLACK = 1e-3  # float rounding of a source scaled to [-1, 1]


def _check_source(model: SynthesisModel, source: Tensor) -> None:
    if not isinstance(source, Tensor) or source.ndim != 5 or source.shape[1] != model.image_channels:
        shape = tuple(source.shape) if isinstance(source, Tensor) else type(source).__name__
        raise ValueError(f"source must be a volume batch (b, {model.image_channels}, n, h, w) in [-1, 1], got {shape}")
    h, w = source.shape[-2:]
    try:
        check_in_plane_size((int(h), int(w)), model.size_multiple)
    except ValueError as exc:
        raise ValueError(f"source in-plane size {h} x {w} does not fit the model: {exc}; resample the source") from None
    if source.shape[0] == 0 or source.shape[2] == 0:
        raise ValueError(f"source must hold at least one volume of at least one slice, got shape {tuple(source.shape)}")
    if not torch.isfinite(source).all():
        raise ValueError("source has NaN or inf values")
    low, high = float(source.min()), float(source.max())
    if low < -1 - SOURCE_RANGE_SLACK or high > 1 + SOURCE_RANGE_SLACK:
        raise ValueError(f"source values span [{low:.4g}, {high:.4g}], but the model takes sources scaled to [-1, 1] "
                         "as in training; prepare them with lift3d.data.prepare_volume")


@torch.no_grad()
def check_clip_x0(model: SynthesisModel) -> None:
    """x0 clipping assumes pixel space, where the data lie in [-1, 1]; latents are not bounded."""
    factor = model.autoencoder.downsampling_factor
    if factor != 1:
        raise ValueError(f"clip_x0 (--clip-x0) is for pixel-space models, but this one samples in the latent space "
                         f"of the {model.settings.autoencoder.name!r} autoencoder (downsampling factor "
                         f"{factor}), whose values are not bounded by [-1, 1]")


# --------------------------------------------------------------------------------------------
# Several samples, correlated noise


@dataclass
class PosteriorEstimate:
    """What :func:`synthesize_posterior` returns, on the same ``[-1, 1]`` scale as the source.

    :param mean: the mean of the samples ``(b, c, n, h, w)``; with one sample, that sample.
    :param std: the per-voxel sample standard deviation (Bessel-corrected, ``K - 1`` in the
        denominator) of the samples, same shape; None for a single sample.
    :param samples: how many samples were drawn per source volume.
    :param unet_evaluations: U-Net passes per source volume, all samples together (:func:`unet_evaluations`).
    """

    mean: Tensor
    std: Tensor | None
    samples: int
    unet_evaluations: int = 0


def sample_seed(seed: int, k: int) -> int:
    """The seed of sample ``k`` of a run seeded with ``seed``.

    Sample 0 uses ``seed`` itself, so one sample is exactly what a single-sample run gives.
    Sample ``k >= 1`` uses ``numpy.random.SeedSequence([seed mod 2**64, k]).generate_state(1,
    uint64)[0]``: a hash of the pair, so runs with seeds 0 and 1 share no sample (``seed + k``
    would make sample 1 of seed 0 equal sample 0 of seed 1).
    """
    if k == 0:
        return int(seed)
    return int(np.random.SeedSequence([int(seed) % 2**64, int(k)]).generate_state(1, np.uint64)[0])


def correlate_slices(noise: Tensor, rho: float) -> Tensor:
    """Independent N(0, 1) ``noise`` ``(b, c, n, h, w)`` -> noise whose slices correlate by ``rho``.

    Every voxel stays N(0, 1); two slices of a volume correlate by ``rho`` at the same (c, h, w),
    the covariance ``x_k = sqrt(rho) * shared + sqrt(1 - rho) * own_k`` gives. It is made from the
    draw itself by that covariance's symmetric square root, ``x = sqrt(1 - rho) z +
    (sqrt(1 - rho + rho n) - sqrt(1 - rho)) mean_k z``, so it needs no extra random numbers and is
    linear in ``z`` (which lets it act on DDPM's step noise, see :func:`_ddpm_step`). ``rho = 1``
    gives every slice the same noise; ``rho = 0`` returns ``noise`` unchanged.
    """
    if rho == 0:
        return noise
    n = noise.shape[2]
    own = math.sqrt(1.0 - rho)
    shared = math.sqrt(1.0 - rho + rho * n) - own
    return own * noise + shared * noise.mean(dim=2, keepdim=True)


def check_sampling_options(samples: int = 1, sample_batch: int | None = None, noise_correlation: float = 0.0) -> None:
    """The ranges :func:`synthesize_posterior` accepts, as one clear :class:`ValueError`."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer (1 = a single sample), got {samples!r}")
    if sample_batch is not None and (isinstance(sample_batch, bool) or not isinstance(sample_batch, int)
                                     or sample_batch < 1):
        raise ValueError(f"sample_batch must be a positive integer or None (the device's default), got {sample_batch!r}")
    if (isinstance(noise_correlation, bool) or not isinstance(noise_correlation, (int, float))
            or not 0.0 <= noise_correlation <= 1.0):
        raise ValueError(f"noise_correlation must be a number from 0 (independent noise per slice) to 1 (the same "
                         f"noise in every slice), got {noise_correlation!r}")


def resolve_sample_batch(sample_batch: int | None, samples: int, device: torch.device) -> int:
    """How many samples :func:`synthesize_posterior` denoises together: ``sample_batch`` (at most
    ``samples``), or by default all of them on an accelerator and one at a time on the CPU, where a
    batch of samples measured slower per sample than one at a time (``benchmarks/samples.py``)."""
    if sample_batch is None:
        return samples if device.type != "cpu" else 1
    return min(sample_batch, samples)


def _ddpm_step(sampler, eps: Tensor, t: Tensor, latents: Tensor, generators: Sequence[torch.Generator],
               rho: float) -> Tensor:
    """One DDPM step with sample ``k``'s added noise drawn from ``generators[k]`` (rows
    ``k*b:(k+1)*b`` of the batch), correlated across slices by ``rho``.

    diffusers' ``DDPMScheduler.step`` (0.42) draws its noise inside, from ``generator``, and takes
    no ``variance_noise``. The step is ``mean(x_t, eps) + sigma_t z``, linear in ``z``, and a zero
    input has a zero mean (x0 clipping leaves 0 alone), so the same step on zeros with a copy of
    the generator returns exactly the noise it added, ``sigma_t z``, which is then swapped for
    ``sigma_t correlate_slices(z)``. The step keeps no state, so it may run per sample.
    """
    b = latents.shape[0] // len(generators)
    out = []
    for k, generator in enumerate(generators):
        rows = slice(k * b, (k + 1) * b)
        probe = torch.Generator().set_state(generator.get_state()) if rho else None
        prev = sampler.step(eps[rows], t, latents[rows], generator=generator).prev_sample
        if probe is not None:
            added = sampler.step(torch.zeros_like(eps[rows]), t, torch.zeros_like(latents[rows]),
                                 generator=probe).prev_sample
            prev = prev - added + correlate_slices(added, rho)
        out.append(prev)
    return out[0] if len(out) == 1 else torch.cat(out)


STARTS = ("noise", "estimate", "source")
"""Where sampling starts: pure noise (the whole schedule), or an informed start (SDEdit, Meng et al., ICLR
2022): the model's own one-pass estimate of the target, or the source itself, noised to an intermediate step."""


def first_step(num_steps: int, start: str, strength: float | None) -> int:
    """The index of the first of ``num_steps`` sampler steps that runs: 0 from noise; with an informed
    start the last ``ceil(strength * num_steps)`` steps run (at least one)."""
    if start == "noise":
        return 0
    return num_steps - max(1, math.ceil(float(strength) * num_steps - 1e-9))


def check_start(start: str, strength: float | None, conditioning: str = "concat") -> None:
    """The informed-start options :func:`synthesize_posterior` accepts, as one clear :class:`ValueError`."""
    if start not in STARTS:
        raise ValueError(f"start must be one of {', '.join(STARTS)}, got {start!r}")
    if start == "noise":
        if strength is not None:
            raise ValueError(f"strength {strength!r} is for an informed start (start = 'estimate' or 'source'); "
                             "from noise the whole schedule runs")
        return
    if (isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength)
            or not 0.0 < strength < 1.0):
        raise ValueError(f"start = {start!r} needs strength in (0, 1): the fraction of the schedule that runs from "
                         f"the noised start; got {strength!r}")
    if start == "source" and conditioning != "concat":
        raise ValueError("start = 'source' needs a model conditioned on a source (conditioning 'concat')")


def _informed_start(model: SynthesisModel, sampler, net, noise: Tensor, source: Tensor | None, generators, rho: float,
                    begin: int, start: str, latent_shape: torch.Size) -> Tensor:
    """SDEdit: the clean estimate (one U-Net pass at the first step, or the source) noised with fresh noise
    to the sampler's step ``begin``."""
    t0, t_begin = sampler.timesteps[0], sampler.timesteps[begin]
    clean = model.objective.clean_estimate(net(noise, t0), noise, t0) if start == "estimate" else source
    fresh = torch.cat([correlate_slices(torch.randn(latent_shape, generator=g), rho) for g in generators])
    fresh = fresh.to(noise.device, noise.dtype)
    if hasattr(sampler, "set_begin_index"):
        sampler.set_begin_index(begin)
    t = t_begin.reshape(1).expand(noise.shape[0])
    if hasattr(sampler, "scale_noise"):  # flow matching: (1 - s) x0 + s eps
        return sampler.scale_noise(clean, t, fresh)
    return sampler.add_noise(clean, fresh, t)


def _denoise_samples(model: SynthesisModel, condition: Tensor | None, latent_shape: torch.Size, seeds: Sequence[int],
                     *, scheduler: str, steps: int | None, clip_x0: bool, windows: list[tuple[int, Tensor]] | None,
                     slice_wise: bool, rho: float, bar: tqdm, start: str = "noise", strength: float | None = None,
                     source_latent: Tensor | None = None) -> list[Tensor]:
    """Denoise one batch of samples (one seed each) of the ``b`` sources together; returns each
    sample's decoded ``(b, c, n, h, w)`` volume in [-1, 1]."""
    from diffusers import DDPMScheduler

    device = model.device
    sampler = make_scheduler(scheduler, model.scheduler_config, steps, device=device, clip_x0=clip_x0,
                             objective=model.objective)
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    # Drawn on the CPU, so the same seed gives the same noise on every device.
    noise = [correlate_slices(torch.randn(latent_shape, generator=g), rho) for g in generators]
    latents = (noise[0] if len(noise) == 1 else torch.cat(noise)).to(device) * getattr(sampler, "init_noise_sigma", 1.0)
    if condition is not None and len(seeds) > 1:
        condition = condition.repeat(len(seeds), *([1] * (condition.ndim - 1)))  # sample-major, like latents

    def net(x: Tensor, t: Tensor) -> Tensor:  # one U-Net evaluation of the whole batch
        model_in = sampler.scale_model_input(x, t) if hasattr(sampler, "scale_model_input") else x
        if windows is None:
            out = predict_noise(model, model_in, condition, t, slice_wise)
        else:
            out = predict_noise_windowed(model, model_in, condition, t, windows, slice_wise)
        bar.update(1)
        return out

    begin = first_step(len(sampler.timesteps), start, strength)
    if start != "noise":
        source = None
        if source_latent is not None:
            source = source_latent.repeat(len(seeds), *([1] * (source_latent.ndim - 1))).to(latents)
        latents = _informed_start(model, sampler, net, latents, source, generators, rho, begin, start, latent_shape)
    # DDIM (eta = 0, as called here), DPM-Solver++ and flow Euler add no noise after the start; DDPM adds
    # some at every step, from each sample's own generator.
    stochastic = isinstance(sampler, DDPMScheduler)
    for t in sampler.timesteps[begin:]:
        eps = net(latents, t)
        if stochastic:
            latents = _ddpm_step(sampler, eps, t, latents, generators, rho)
        else:
            latents = sampler.step(eps, t, latents).prev_sample
    ae_dtype = getattr(model.autoencoder, "dtype", None) or model.dtype
    b = latent_shape[0]
    return [decode_volume(model.autoencoder, part.to(ae_dtype)).float().clamp_(-1.0, 1.0)
            for part in latents.split(b)]


def unet_evaluations(model: SynthesisModel, scheduler: str, steps: int | None = None, *, samples: int = 1,
                     start: str = "noise", strength: float | None = None) -> int:
    """U-Net passes per volume of a :func:`synthesize_posterior` call (each pass covers all slices; with
    windows, every window of one step counts as one pass): the steps that run, plus one for an
    ``estimate`` start, times ``samples``."""
    sampler = make_scheduler(scheduler, model.scheduler_config, steps, objective=model.objective)
    return evaluations_of(len(sampler.timesteps), samples, start, strength)


def evaluations_of(num_steps: int, samples: int = 1, start: str = "noise", strength: float | None = None) -> int:
    """:func:`unet_evaluations` for a sampler of ``num_steps`` steps."""
    return samples * (num_steps - first_step(num_steps, start, strength) + (start == "estimate"))


@torch.no_grad()
def synthesize_posterior(
    model: SynthesisModel,
    source: Tensor,
    *,
    samples: int = 8,
    sample_batch: int | None = None,
    scheduler: str | None = None,
    steps: int | None = None,
    seed: int = 0,
    window: int | None = None,
    overlap: int | None = None,
    slice_wise: bool = False,
    clip_x0: bool = False,
    noise_correlation: float = 0.0,
    start: str = "noise",
    strength: float | None = None,
    progress: bool | None = True,
) -> PosteriorEstimate:
    """Draw ``samples`` syntheses of ``source`` ``(b, c, n, h, w)`` in [-1, 1]; their mean and std.

    The mean of K samples scores better on PSNR and SSIM than one sample (the target's own noise
    cannot be predicted, and the mean does not invent any); the std shows where the model is
    unsure. :func:`synthesize` is this function's mean, with one sample by default.

    :param samples: K, the number of samples per source volume.
    :param sample_batch: how many samples go through the U-Net together. None: all K on a GPU
        (or other accelerator), one at a time on the CPU, where batching measured slower
        (:func:`resolve_sample_batch`). A smaller batch needs less memory; a batch that runs out of
        memory is halved and retried (down to 1), with a warning.
    :param scheduler: for a ``ddpm`` model ``ddpm`` (1000 steps by default), ``ddim`` (200, the paper's)
        or ``dpm`` (DPM-Solver++, 25); for a ``flow`` model ``flow`` (Euler, 4) or ``dpm`` (8). None:
        the objective's default sampler (``ddim``, ``flow``).
    :param steps: inference steps; None = the scheduler's default.
    :param seed: seeds the initial noise (drawn on the CPU, so it is the same on every device) and
        any noise the sampler adds; the same seed gives the same volume. Sample ``k`` is seeded
        with :func:`sample_seed` ``(seed, k)``, sample 0 with ``seed`` itself, so the result does
        not depend on ``sample_batch`` beyond float rounding.
    :param window: denoise in windows of this many slices. None: whole volumes, unless a lifted
        model gets more slices than ``model.max_slices`` (then windows of that size); 0: never.
    :param overlap: slices shared by neighbouring windows (default ``window // 4``, at least 1).
    :param slice_wise: the paper's "w/o volumetric layers" ablation: the volumetric layers are
        switched off, so every slice is denoised by the 2D model on its own; all else is equal.
    :param clip_x0: clamp the predicted clean sample to [-1, 1] at every step. Only for pixel-space
        models (an autoencoder with downsampling factor 1), whose data lie in [-1, 1]. An epsilon
        model in pixel space with little training can diverge without it (whole slices end at
        -1 or +1); a v-prediction model rarely needs it.
    :param noise_correlation: rho in [0, 1]: the noise of any two slices of a volume correlates by
        rho, each voxel's noise staying N(0, 1) (:func:`correlate_slices`). It applies to the
        initial noise, and with ``ddpm`` to the noise added at every step; DDIM and DPM-Solver++
        add none after the start. 0 (the default): independent noise per slice, as in training.
    :param start: ``noise`` (default): the whole schedule from Gaussian noise. ``estimate``: an informed
        start (SDEdit): one U-Net pass on the noise gives the model's own estimate of the target, which is
        noised afresh to the step where the last ``strength`` of the schedule begins. ``source``: the
        same from the source itself (a bridge from the input contrast; concat-conditioned models).
    :param strength: with an informed start, the fraction of the ``steps`` that run, in (0, 1).
    :param progress: show a tqdm bar over the denoising steps (None: only on a terminal).

    With ``conditioning = "none"`` (plain volume generation) the source only sets the shape.
    """
    check_sampling_options(samples, sample_batch, noise_correlation)
    check_start(start, strength, model.conditioning)
    scheduler = scheduler or model.objective.default_sampler
    _check_source(model, source)
    b, _, n, h, w = source.shape
    windowing = resolve_window(model, n, window, overlap, slice_wise)
    if clip_x0:
        check_clip_x0(model)
    # checks the name against the model's objective, and the steps
    sampler = make_scheduler(scheduler, model.scheduler_config, steps, clip_x0=clip_x0, objective=model.objective)
    device = model.device
    ae_dtype = getattr(model.autoencoder, "dtype", None) or model.dtype
    condition = source_latent = None
    if model.conditioning == "concat":
        condition = source_latent = encode_volume(model.autoencoder, source.to(device=device, dtype=ae_dtype)).float()
        latent_shape = condition.shape
        condition = with_source_context(condition, model.source_context)
    else:
        f = model.autoencoder.downsampling_factor
        latent_shape = torch.Size((b, model.latent_channels, n, h // f, w // f))
    windows = None if windowing is None else window_weights(n, *windowing)
    seeds = [sample_seed(seed, k) for k in range(samples)]
    batch = resolve_sample_batch(sample_batch, samples, device)
    evaluations = evaluations_of(len(sampler.timesteps), samples, start, strength)
    desc = f"{scheduler} sampling" + (f", {samples} samples" if samples > 1 else "")
    drawn: list[Tensor] = []
    with tqdm(total=evaluations, desc=desc, disable=None if progress is None else not progress,
              dynamic_ncols=True) as bar:
        while len(drawn) < samples:
            chunk = seeds[len(drawn):len(drawn) + batch]
            done = bar.n
            try:
                drawn += _denoise_samples(model, condition, latent_shape, chunk, scheduler=scheduler, steps=steps,
                                          clip_x0=clip_x0, windows=windows, slice_wise=slice_wise,
                                          rho=float(noise_correlation), bar=bar, start=start, strength=strength,
                                          source_latent=source_latent)
            except torch.OutOfMemoryError:
                if len(chunk) == 1:
                    raise
                batch = len(chunk) // 2
                logger.warning("out of memory denoising %d samples together; retrying %d at a time (set "
                               "sample_batch / --sample-batch to start there)", len(chunk), batch)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                bar.update(done - bar.n)
    if samples == 1:
        return PosteriorEstimate(drawn[0], None, 1, evaluations)
    std, mean = torch.std_mean(torch.stack(drawn), dim=0, correction=1)
    return PosteriorEstimate(mean, std, samples, evaluations)


def synthesize(model: SynthesisModel, source: Tensor, *, samples: int = 1, **options: Any) -> Tensor:
    """Synthesise the target modality for ``source`` ``(b, c, n, h, w)`` in [-1, 1]; same shape out.

    One sample by default; with ``samples = K`` the mean of K. ``options`` are those of
    :func:`synthesize_posterior` (``scheduler``, ``steps``, ``seed``, ``window``, ``overlap``,
    ``slice_wise``, ``clip_x0``, ``sample_batch``, ``noise_correlation``, ``progress``), which also
    returns the samples' per-voxel std.
    """
    return synthesize_posterior(model, source, samples=samples, **options).mean


# --------------------------------------------------------------------------------------------
# Writing the uncertainty map


def save_std_volume(path: str | os.PathLike, std: Any, meta: VolumeMeta) -> Path:
    """Write a std map ``(n, h, w)`` (on the [-1, 1] scale of the synthesis) as NIfTI on the source's grid.

    Like :func:`lift3d.data.save_volume` for the mean, with one difference: a standard deviation
    is a scale, not an intensity, so it is multiplied by the slope of the source's intensity map,
    ``(high - low) / 2``, and the offset ``low`` is not added. It is resampled back linearly, as
    the mean is, which keeps it non-negative.
    """
    half_range = (meta.intensity.high - meta.intensity.low) / 2.0
    # save_volume maps v -> (v + 1) * (high' - low') / 2 + low'; with low' = -2 half_range and
    # high' = 2 half_range that is v * 2 half_range, so std / 2 comes out as std * half_range.
    # Halving keeps a Bessel-corrected std (up to sqrt(2) for values in [-1, 1]) clear of the
    # [-1, 1] clip save_volume applies.
    scale_only = IntensityScaling(-2.0 * half_range, 2.0 * half_range, meta.intensity.percentiles)
    array = std.detach().cpu().float() / 2.0 if isinstance(std, Tensor) else np.asarray(std, dtype=np.float32) / 2.0
    return save_volume(path, array, dataclasses.replace(meta, intensity=scale_only))
