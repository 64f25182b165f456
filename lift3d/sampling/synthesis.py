"""Sampling a trained model: source volume -> synthesised target volume (Make-A-Volume, sec. 2.2-2.3).

``load_synthesis_model`` reads a folder written by ``lift3d.training.loop.export_model``;
``synthesize`` encodes the source, starts from seeded Gaussian noise, denoises **all slices
jointly at the same timestep** with the source latent concatenated on channels (the paper's
``p_theta(z_{t-1} | z_t, z_c)``), and decodes. A registered solver (``lift3d.sampling.solvers``:
DDIM, DDPM, DPM-Solver++, Euler, or a plugin's) steps it, built from the training noise schedule (the
paper reports DDIM with 200 steps); the loop asks the solver what it is instead of probing it.

Volumes longer than the model was fine-tuned on are denoised in overlapping windows: at every step
the U-Net runs on each window and the noise predictions are blended with weights that ramp down
towards inner window edges, then one solver step updates the whole volume. (Overwriting the
overlap instead, as the authors' code does, leaves seams where a window's border slices meet.)

``synthesize_posterior`` draws several samples per source and returns their mean and per-voxel
standard deviation (an uncertainty map); samples are batched through the U-Net together, each
with its own seed (``sample_seed``). ``noise_correlation`` gives every slice's noise
a shared component, so the slices of a volume start (and, with a stochastic solver, are perturbed) alike.
``antithetic`` draws the samples in pairs ``z``, ``-z`` (``sample_noise``): a variance reduction for their mean.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from lift3d.io.errors import Lift3dError
from lift3d.data.context import with_source_context
from lift3d.data.nifti import save_volume
from lift3d.data.resample import check_in_plane_size
from lift3d.data.volume import VolumeMeta, std_scale
from lift3d.diffusion.autoencoding import decode_volume, encode_volume
from lift3d.sampling.model import DTYPES, SynthesisModel, load_synthesis_model, resolve_device, resolve_dtype
from lift3d.sampling.noise import StepNoise, correlate_slices, sample_noise, sample_seed
from lift3d.sampling.solvers import SOLVERS, Solver, build_solver
from lift3d.sampling.windows import predict_noise, predict_noise_windowed, resolve_window, window_weights

logger = logging.getLogger("lift3d.sampling.synthesis")

# The sampling API in one place: what a user imports from here lives in these modules.
__all__ = ["DTYPES", "SOLVERS", "PosteriorEstimate", "SynthesisModel", "build_solver", "check_clip_x0",
           "correlate_slices", "load_synthesis_model", "predict_noise", "predict_noise_windowed", "resolve_device",
           "resolve_dtype", "resolve_window", "sample_seed", "save_std_volume", "synthesize", "synthesize_posterior",
           "unet_evaluations", "window_weights", "STARTS"]


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


# Several samples, correlated noise


@dataclass
class PosteriorEstimate:
    """What ``synthesize_posterior`` returns, on the same ``[-1, 1]`` scale as the source.

    :param mean: the mean of the samples ``(b, c, n, h, w)``; with one sample, that sample.
    :param std: the per-voxel sample standard deviation (Bessel-corrected, ``K - 1`` in the
        denominator) of the samples, same shape; None for a single sample.
    :param samples: how many samples were drawn per source volume.
    :param unet_evaluations: U-Net passes per source volume, all samples together (``unet_evaluations``).
    """

    mean: Tensor
    std: Tensor | None
    samples: int
    unet_evaluations: int = 0


def check_sampling_options(samples: int = 1, sample_batch: int | None = None, noise_correlation: float = 0.0,
                           first_sample: int = 0) -> None:
    """The ranges ``synthesize_posterior`` accepts, as one clear ``ValueError``."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer (1 = a single sample), got {samples!r}")
    if isinstance(first_sample, bool) or not isinstance(first_sample, int) or first_sample < 0:
        raise ValueError(f"first_sample must be an integer >= 0 (the index of the first sample drawn), "
                         f"got {first_sample!r}")
    if sample_batch is not None and (isinstance(sample_batch, bool) or not isinstance(sample_batch, int)
                                     or sample_batch < 1):
        raise ValueError(f"sample_batch must be a positive integer or None (the device's default), got {sample_batch!r}")
    if (isinstance(noise_correlation, bool) or not isinstance(noise_correlation, (int, float))
            or not 0.0 <= noise_correlation <= 1.0):
        raise ValueError(f"noise_correlation must be a number from 0 (independent noise per slice) to 1 (the same "
                         f"noise in every slice), got {noise_correlation!r}")


def resolve_sample_batch(sample_batch: int | None, samples: int, device: torch.device) -> int:
    """How many samples ``synthesize_posterior`` denoises together: ``sample_batch`` (at most
    ``samples``), or by default all of them on an accelerator and one at a time on the CPU, where a
    batch of samples measured slower per sample than one at a time (``benchmarks/samples.py``)."""
    if sample_batch is None:
        return samples if device.type != "cpu" else 1
    return min(sample_batch, samples)


STARTS = ("noise", "estimate", "source")
"""Where sampling starts: pure noise (the whole schedule), or an informed start (SDEdit, Meng et al., ICLR
2022): the model's own one-pass estimate of the target, or the source itself, noised to an intermediate step."""


def check_antithetic(antithetic: bool, solver: str) -> None:
    """Antithetic pairs negate a sample's noise; a stochastic solver adds fresh noise at every step, so the pair
    would share only its start: refused, naming the solvers that can."""
    if not isinstance(antithetic, bool):
        raise ValueError(f"antithetic must be True or False, got {antithetic!r}")
    if antithetic and SOLVERS.get(solver).stochastic:
        deterministic = [name for name in SOLVERS.names() if not SOLVERS.get(name).stochastic]
        raise ValueError(f"antithetic pairs need a deterministic solver; {solver!r} adds noise at every step "
                         f"(deterministic: {', '.join(deterministic)})")


def first_step(num_steps: int, start: str, strength: float | None) -> int:
    """The index of the first of ``num_steps`` solver steps that runs: 0 from noise; with an informed
    start the last ``ceil(strength * num_steps)`` steps run (at least one)."""
    if start == "noise":
        return 0
    return num_steps - max(1, math.ceil(float(strength) * num_steps - 1e-9))


def check_start(start: str, strength: float | None, conditioning: str = "concat", solver: str | None = None) -> None:
    """The informed-start options ``synthesize_posterior`` accepts, with the registered ``solver`` if given,
    as one clear ``ValueError``."""
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
    if solver is not None and not SOLVERS.get(solver).informed_start:
        starting = [name for name in SOLVERS.names() if SOLVERS.get(name).informed_start]
        raise ValueError(f"start = {start!r} needs a solver that declares an informed start; solver {solver!r} "
                         f"does not (those that do: {', '.join(starting)})")


@dataclass
class SamplingRun:
    """What every batch of samples of one ``synthesize_posterior`` call shares: the model, the solver
    asked for, the source's latent (and the condition made of it), the windows and the noise options."""

    model: SynthesisModel
    solver: str
    steps: int | None
    num_steps: int  # the solver's length, ``steps`` or its default
    clip_x0: bool
    latent_shape: torch.Size
    condition: Tensor | None
    source_latent: Tensor | None
    windows: list[tuple[int, Tensor]] | None
    slice_wise: bool
    rho: float
    start: str = "noise"
    strength: float | None = None


def _informed_start(run: SamplingRun, solver: Solver, net: Callable[[Tensor, Tensor], Tensor], noise: Tensor,
                    fresh_noise: StepNoise, begin: int) -> Tensor:
    """SDEdit: the clean estimate (one U-Net pass at the first step, or the source) noised with fresh noise
    to the solver's step ``begin``."""
    if run.start == "estimate":
        t0 = solver.timesteps[0]
        clean = run.model.objective.clean_estimate(net(noise, t0), noise, t0)
    else:
        source = run.source_latent
        clean = source.repeat(len(fresh_noise.generators), *([1] * (source.ndim - 1))).to(noise)
    fresh = fresh_noise.draw(noise)
    return solver.noised(clean, fresh, begin)


def run_steps(solver: Solver, net: Callable[[Tensor, Tensor], Tensor], latents: Tensor, begin: int,
               noise: StepNoise) -> Tensor:
    """The solver's steps from ``begin`` to the end; each step gets what the solver declares it needs."""
    declared: dict[str, Any] = {"noise": noise} if solver.stochastic else {}
    timesteps = solver.timesteps
    for i in range(begin, len(timesteps)):
        t = timesteps[i]
        if solver.needs_next_t:
            declared["t_next"] = timesteps[i + 1] if i + 1 < len(timesteps) else None
        latents = solver.step(net(latents, t), t, latents, **declared)
    return latents


def _denoise_samples(run: SamplingRun, draws: Sequence[tuple[int, float]], bar: tqdm) -> list[Tensor]:
    """Denoise one batch of samples (each a seed and the sign of its noise, ``sample_noise``) of the ``b``
    sources together; returns each sample's decoded ``(b, c, n, h, w)`` volume in [-1, 1]."""
    model, device = run.model, run.model.device
    solver = build_solver(run.solver, model.objective, model.scheduler_config, run.steps, device=device,
                          clip_x0=run.clip_x0)
    generators = [torch.Generator().manual_seed(int(seed)) for seed, _ in draws]
    # Every sample's noise (the start, an informed start's, a stochastic solver's steps) comes from its own
    # generator, with its sign, drawn on the CPU: the same seed gives the same noise on every device.
    step_noise = StepNoise(generators, run.rho, [sign for _, sign in draws])
    latents = step_noise.draw(torch.empty(len(draws) * run.latent_shape[0], *run.latent_shape[1:], device=device))
    latents = latents * solver.init_noise_sigma
    condition = run.condition
    if condition is not None and len(draws) > 1:
        condition = condition.repeat(len(draws), *([1] * (condition.ndim - 1)))  # sample-major, like latents

    def net(x: Tensor, t: Tensor) -> Tensor:  # one U-Net evaluation of the whole batch
        model_in = solver.scale_model_input(x, t)
        if run.windows is None:
            out = predict_noise(model, model_in, condition, t, run.slice_wise)
        else:
            out = predict_noise_windowed(model, model_in, condition, t, run.windows, run.slice_wise)
        bar.update(1)
        return out

    begin = first_step(len(solver.timesteps), run.start, run.strength)
    if run.start != "noise":
        latents = _informed_start(run, solver, net, latents, step_noise, begin)
    # A stochastic solver (ddpm) draws the noise of every step from each sample's own generator.
    latents = run_steps(solver, net, latents, begin, step_noise)
    b = run.latent_shape[0]
    return [decode_volume(model.autoencoder, part.to(model.autoencoder_dtype)).float().clamp_(-1.0, 1.0)
            for part in latents.split(b)]


def unet_evaluations(model: SynthesisModel, solver: str, steps: int | None = None, *, samples: int = 1,
                     start: str = "noise", strength: float | None = None) -> int:
    """U-Net passes per volume of a ``synthesize_posterior`` call (each pass covers all slices; with
    windows, every window of one step counts as one pass): the steps that run, plus one for an
    ``estimate`` start, times ``samples``."""
    built = build_solver(solver, model.objective, model.scheduler_config, steps)
    return evaluations_of(len(built.timesteps), samples, start, strength)


def evaluations_of(num_steps: int, samples: int = 1, start: str = "noise", strength: float | None = None) -> int:
    """``unet_evaluations`` for a solver of ``num_steps`` steps."""
    return samples * (num_steps - first_step(num_steps, start, strength) + (start == "estimate"))


def _solver_name(model: SynthesisModel, solver: str | None, scheduler: str | None) -> str:
    """The solver asked for (``scheduler`` is its name before solvers were registered), or the objective's default."""
    if scheduler is not None:
        if solver is not None and solver != scheduler:
            raise ValueError(f"solver {solver!r} and scheduler {scheduler!r} both given; scheduler is the old name "
                             "of solver: give solver only")
        warnings.warn("synthesize(scheduler=...) is now synthesize(solver=...)", DeprecationWarning, stacklevel=4)
        solver = scheduler
    return solver or model.objective.default_solver


def _prepare(model: SynthesisModel, source: Tensor, solver: str, steps: int | None, *, window: int | None,
             overlap: int | None, slice_wise: bool, clip_x0: bool, noise_correlation: float, start: str,
             strength: float | None) -> SamplingRun:
    """Every check of a ``synthesize_posterior`` call, then the source encoded once for all samples."""
    _check_source(model, source)
    b, _, n, h, w = source.shape
    windowing = resolve_window(model, n, window, overlap, slice_wise)
    if clip_x0:
        check_clip_x0(model)
    # checks the name against the model's objective, the steps, x0 clipping and the start
    num_steps = len(build_solver(solver, model.objective, model.scheduler_config, steps, clip_x0=clip_x0).timesteps)
    check_start(start, strength, model.conditioning, solver)
    condition = source_latent = None
    if model.conditioning == "concat":
        condition = source_latent = encode_volume(
            model.autoencoder, source.to(device=model.device, dtype=model.autoencoder_dtype)).float()
        latent_shape = condition.shape
        condition = with_source_context(condition, model.source_context)
    else:
        f = model.autoencoder.downsampling_factor
        latent_shape = torch.Size((b, model.latent_channels, n, h // f, w // f))
    windows = None if windowing is None else window_weights(n, *windowing)
    return SamplingRun(model, solver, steps, num_steps, clip_x0, latent_shape, condition, source_latent, windows,
                       slice_wise, float(noise_correlation), start, strength)


def _draw_samples(run: SamplingRun, draws: list[tuple[int, float]], batch: int, bar: tqdm) -> list[Tensor]:
    """All samples, ``batch`` at a time; a batch that runs out of memory is halved and retried (down to 1)."""
    drawn: list[Tensor] = []
    while len(drawn) < len(draws):
        chunk = draws[len(drawn):len(drawn) + batch]
        done = bar.n
        try:
            drawn += _denoise_samples(run, chunk, bar)
        except torch.OutOfMemoryError:
            if len(chunk) == 1:
                raise
            batch = len(chunk) // 2
            logger.warning("out of memory denoising %d samples together; retrying %d at a time (set "
                           "sample_batch / --sample-batch to start there)", len(chunk), batch)
            if run.model.device.type == "cuda":
                torch.cuda.empty_cache()
            bar.update(done - bar.n)
    return drawn


@torch.no_grad()
def synthesize_posterior(model: SynthesisModel, source: Tensor, *, samples: int = 8, sample_batch: int | None = None,
                         solver: str | None = None, steps: int | None = None, seed: int = 0,
                         window: int | None = None, overlap: int | None = None, slice_wise: bool = False,
                         clip_x0: bool = False, noise_correlation: float = 0.0, start: str = "noise",
                         strength: float | None = None, antithetic: bool = False, first_sample: int = 0,
                         progress: bool | None = True, scheduler: str | None = None) -> PosteriorEstimate:
    """Draw ``samples`` syntheses of ``source`` ``(b, c, n, h, w)`` in [-1, 1]; their mean and std.

    The mean of K samples scores better on PSNR and SSIM than one sample (the target's own noise
    cannot be predicted, and the mean does not invent any); the std shows where the model is
    unsure. ``synthesize`` is this function's mean, with one sample by default.

    With ``conditioning = "none"`` (plain volume generation) the source only sets the shape.

    :param samples: K, the number of samples per source volume.
    :param sample_batch: how many samples go through the U-Net together. None: all K on a GPU
        (or other accelerator), one at a time on the CPU, where batching measured slower
        (``resolve_sample_batch``). A smaller batch needs less memory; a batch that runs out of
        memory is halved and retried (down to 1), with a warning.
    :param solver: a registered solver that inverts the model's objective (``lift3d.sampling.solvers``):
        for a ``ddpm`` model ``ddim`` (200 steps by default, the paper's), ``ddpm`` (1000) or ``dpm``
        (DPM-Solver++, 25); for a ``flow`` model ``flow`` (Euler, 4) or ``dpm`` (8). None: the objective's
        ``default_solver`` (``ddim``, ``flow``).
    :param steps: solver steps; None = the solver's default for the model's objective.
    :param seed: seeds the initial noise (drawn on the CPU, so it is the same on every device) and
        any noise the solver adds; the same seed gives the same volume. Sample ``k`` is seeded
        with ``sample_seed`` ``(seed, k)``, sample 0 with ``seed`` itself, so the
        result does not depend on ``sample_batch`` beyond float rounding.
    :param window: denoise in windows of this many slices. None: whole volumes, unless a lifted
        model gets more slices than ``model.max_slices`` (then windows of that size); 0: never.
    :param overlap: slices shared by neighbouring windows (default ``window // 4``, at least 1).
    :param slice_wise: the paper's "w/o volumetric layers" ablation: the volumetric layers are
        switched off, so every slice is denoised by the 2D model on its own; all else is equal.
    :param clip_x0: clamp the predicted clean sample to [-1, 1] at every step. Only for pixel-space
        models (an autoencoder with downsampling factor 1), whose data lie in [-1, 1], and solvers that
        declare ``clips_x0``. An epsilon model in pixel space with little training can diverge without it
        (whole slices end at -1 or +1); a v-prediction model rarely needs it.
    :param noise_correlation: rho in [0, 1]: the noise of any two slices of a volume correlates by
        rho, each voxel's noise staying N(0, 1) (``correlate_slices``). It applies
        to the initial noise, and with a stochastic solver (``ddpm``) to the noise added at every step; the
        deterministic ones add none after the start. 0 (the default): independent noise per slice, as in
        training.
    :param start: ``noise`` (default): the whole schedule from Gaussian noise. ``estimate``: an informed
        start (SDEdit): one U-Net pass on the noise gives the model's own estimate of the target, which is
        noised afresh to the step where the last ``strength`` of the schedule begins. ``source``: the
        same from the source itself (a bridge from the input contrast; concat-conditioned models).
    :param strength: with an informed start, the fraction of the ``steps`` that run, in (0, 1).
    :param antithetic: draw the samples in antithetic pairs: sample ``2j + 1`` starts from sample ``2j``'s noise
        negated (``sample_noise``). The part of a deterministic sampler's output that is odd in the noise
        cancels in the pair's mean, so the mean of K samples is closer to the posterior mean than K
        independent samples give; the std map is then the spread of each pair. Needs a deterministic solver;
        with one sample it changes nothing.
    :param first_sample: the index of the first sample drawn: ``samples`` samples ``first_sample, ...`` of the
        run seeded with ``seed`` (to draw one run's samples in parts; 0 by default).
    :param progress: show a tqdm bar over the denoising steps (None: only on a terminal).
    :param scheduler: the old name of ``solver`` (deprecated).
    """
    check_sampling_options(samples, sample_batch, noise_correlation, first_sample)
    solver = _solver_name(model, solver, scheduler)
    check_antithetic(antithetic, solver)
    run = _prepare(model, source, solver, steps, window=window, overlap=overlap, slice_wise=slice_wise,
                   clip_x0=clip_x0, noise_correlation=noise_correlation, start=start, strength=strength)
    evaluations = evaluations_of(run.num_steps, samples, start, strength)
    draws = [sample_noise(seed, k, antithetic) for k in range(first_sample, first_sample + samples)]
    batch = resolve_sample_batch(sample_batch, samples, model.device)
    desc = f"{solver} sampling" + (f", {samples} {'antithetic ' * antithetic}samples" if samples > 1 else "")
    with tqdm(total=evaluations, desc=desc, disable=None if progress is None else not progress,
              dynamic_ncols=True) as bar:
        drawn = _draw_samples(run, draws, batch, bar)
    bad = [k for k, sample in enumerate(drawn) if not torch.isfinite(sample).all()]
    if bad:  # the model's fault, not the source's (which was checked finite above)
        where = f"the model in {model.folder}" if model.folder is not None else "the model"
        raise Lift3dError(f"{where} produced NaN or inf values in sample(s) {bad[:5]} with solver {solver!r}; the "
                          "source was finite: the weights or the solver settings are at fault (try another solver "
                          "or fewer steps, or retrain)")
    if samples == 1:
        return PosteriorEstimate(drawn[0], None, 1, evaluations)
    std, mean = torch.std_mean(torch.stack(drawn), dim=0, correction=1)
    return PosteriorEstimate(mean, std, samples, evaluations)


def synthesize(model: SynthesisModel, source: Tensor, *, samples: int = 1, **options: Any) -> Tensor:
    """Synthesise the target modality for ``source`` ``(b, c, n, h, w)`` in [-1, 1]; same shape out.

    One sample by default; with ``samples = K`` the mean of K. ``options`` are those of
    ``synthesize_posterior`` (``solver``, ``steps``, ``seed``, ``window``, ``overlap``,
    ``slice_wise``, ``clip_x0``, ``sample_batch``, ``noise_correlation``, ``start``, ``strength``,
    ``antithetic``, ``first_sample``, ``progress``), which also
    returns the samples' per-voxel std.
    """
    return synthesize_posterior(model, source, samples=samples, **options).mean


# Writing the uncertainty map


def save_std_volume(path: str | os.PathLike, std: Any, meta: VolumeMeta) -> Path:
    """Write a std map ``(n, h, w)`` (on the [-1, 1] scale of the synthesis) as NIfTI on the source's grid.

    Like ``lift3d.data.save_volume`` for the mean, but as a scale (``lift3d.data.volume.std_scale``).
    """
    return save_volume(path, *std_scale(std, meta))
