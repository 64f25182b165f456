"""Tests for lift3d/sampling/synthesis.py on tiny exported models (identity autoencoder, 16 x 16 x 8, 2-4 steps)."""

from __future__ import annotations

import json
import re

import pytest
import torch

import lift3d
from lift3d.sampling import synthesis
from lift3d.lifting.checkpoint import CheckpointError
from lift3d.io.errors import Lift3dError
from lift3d.training.config import TrainConfig
from lift3d.sampling.synthesis import (
    SOLVERS,
    build_solver,
    correlate_slices,
    load_synthesis_model,
    predict_noise,
    resolve_sample_batch,
    sample_seed,
    save_std_volume,
    synthesize,
    synthesize_posterior,
    window_weights,
)
from lift3d.training.export import export_model
from lift3d.training.unets import build_autoencoder, build_objective, new_unet2d

SIZE, SLICES = 16, 8
# The diffusers scheduler behind each built-in solver: the references below are built from it directly.
DIFFUSERS_CLASSES = {"ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "dpm": "DPMSolverMultistepScheduler"}


pytestmark = pytest.mark.usefixtures("one_thread")


class _Dataset:
    num_slices = SLICES


def export_tiny(folder, unet, stage: str):
    """Export ``unet`` as lift3d-finetune would, with the identity autoencoder; returns the model folder."""
    cfg = TrainConfig()
    cfg.run.stage = stage
    cfg.data.options = {"size": SIZE, "num_slices": SLICES}
    cfg.model.block_out_channels = [16, 32]
    autoencoder = build_autoencoder(cfg)
    return export_model(cfg, unet, autoencoder, build_objective(cfg), _Dataset(), folder)


def tiny_unet():
    cfg = TrainConfig()
    cfg.model.block_out_channels = [16, 32]
    torch.manual_seed(0)
    return new_unet2d(cfg, 2, 1, SIZE)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A stage-1 (2D) model, the same lifted at identity, and lifted with random volumetric weights."""
    root = tmp_path_factory.mktemp("models")
    unet = tiny_unet()
    out = {"2d": export_tiny(root / "2d", unet, "slices")}
    lift3d.inflate(unet, "full")  # the paper's layer: random weights in it mix the slices strongly
    out["identity"] = export_tiny(root / "identity", unet, "volumes")
    g = torch.Generator().manual_seed(1)
    for _, layer in lift3d.volumetric_layers(unet):
        layer.init_random_(std=0.05, generator=g)
    out["random"] = export_tiny(root / "random", unet, "volumes")
    return out


@pytest.fixture(scope="module")
def source():
    g = torch.Generator().manual_seed(3)
    z = torch.linspace(-1, 1, SLICES)[:, None, None]
    y = torch.linspace(-1, 1, SIZE)[None, :, None]
    x = torch.linspace(-1, 1, SIZE)[None, None, :]
    head = (x**2 + y**2 + z**2 < 0.8).float() * 1.6 - 0.8
    return (head + 0.05 * torch.randn(SLICES, SIZE, SIZE, generator=g)).clamp(-1, 1)[None, None]


def count_calls(model):
    calls = []
    model.unet.register_forward_hook(lambda *_: calls.append(1))
    return calls


def test_load_builds_lifted_and_2d_models(folders):
    lifted = load_synthesis_model(folders["random"], device="cpu")
    plain = load_synthesis_model(folders["2d"], device="cpu")
    assert lifted.lifted and not plain.lifted
    assert lifted.max_slices == SLICES and plain.max_slices is None
    assert lifted.size_multiple == 2 and lifted.latent_channels == 1
    assert lifted.scheduler_config["_class_name"] == "DDPMScheduler"


def test_output_shape_and_seed_reproducibility(folders, source):
    model = load_synthesis_model(folders["random"], device="cpu")
    a = synthesize(model, source, steps=2, seed=0, progress=False)
    b = synthesize(model, source, steps=2, seed=0, progress=False)
    c = synthesize(model, source, steps=2, seed=1, progress=False)
    assert a.shape == source.shape
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2


@pytest.mark.parametrize("name, steps", [("ddim", 3), ("dpm", 4), ("ddpm", 2)])
def test_step_counts_are_honoured(folders, source, name, steps):
    model = load_synthesis_model(folders["identity"], device="cpu")
    calls = count_calls(model)
    synthesize(model, source, solver=name, steps=steps, progress=False)
    assert len(calls) == steps
    assert len(build_solver(name, model.objective, model.scheduler_config, steps).timesteps) == steps


def test_default_step_counts_and_classes(folders):
    model = load_synthesis_model(folders["2d"], device="cpu")
    config = model.scheduler_config
    expected = {"ddpm": 1000, "ddim": 200, "dpm": 25}
    assert {name: SOLVERS.get(name).inverts for name in ("ddpm", "ddim", "dpm", "flow")} == {
        "ddpm": {"ddpm": 1000}, "ddim": {"ddpm": 200}, "dpm": {"ddpm": 25, "flow": 8}, "flow": {"flow": 4}}
    for name, steps in expected.items():
        scheduler = build_solver(name, model.objective, config).scheduler
        assert type(scheduler).__name__ == DIFFUSERS_CLASSES[name] and len(scheduler.timesteps) == steps
        assert scheduler.config.beta_schedule == config["beta_schedule"] and scheduler.config.beta_end == config["beta_end"]


def test_unknown_solver_and_bad_steps(folders, source):
    model = load_synthesis_model(folders["2d"], device="cpu")
    with pytest.raises(ValueError, match="solver 'euler' does not sample a model trained with the 'ddpm' objective; "
                                         "valid: ddim, ddpm, dpm"):
        synthesize(model, source, solver="euler", progress=False)
    with pytest.raises(ValueError, match="solver 'flow' does not sample .* 'ddpm' objective"):
        synthesize(model, source, solver="flow", progress=False)
    with pytest.raises(ValueError, match="steps must be an integer from 1 to the 1000 training timesteps, got 0"):
        synthesize(model, source, steps=0, progress=False)


@pytest.mark.parametrize("name", ["ddim", "dpm", "ddpm"])
def test_clip_x0_bounds_every_x0_estimate(folders, source, monkeypatch, name):
    """An untrained epsilon model's x0 estimates leave [-1, 1]; clip_x0 holds them there at every step."""
    x0_seen = []

    def recording(*args, **kwargs):
        solver = build_solver(*args, **kwargs)
        scheduler = solver.scheduler
        step = scheduler.step

        def step_and_record(*a, **k):
            out = step(*a, **k)
            x0 = getattr(out, "pred_original_sample", None)
            if x0 is None:  # DPM-Solver++ keeps its x0 estimates in model_outputs
                x0 = scheduler.model_outputs[-1]
            x0_seen.append(x0.abs().max().item())
            return out

        scheduler.step = step_and_record
        return solver

    monkeypatch.setattr(synthesis, "build_solver", recording)
    model = load_synthesis_model(folders["random"], device="cpu")
    synthesize(model, source, solver=name, steps=3, progress=False)
    assert max(x0_seen) > 1.5
    x0_seen.clear()
    synthesize(model, source, solver=name, steps=3, clip_x0=True, progress=False)
    assert len(x0_seen) == 3 and max(x0_seen) <= 1.0 + 1e-6


def test_window_weights_blend_to_one_and_keep_volume_ends():
    for n, window, overlap in [(8, 4, 2), (20, 16, 4), (10, 4, 1), (9, 4, 0), (12, 5, 3)]:
        windows = window_weights(n, window, overlap)
        total = torch.zeros(n)
        for start, weights in windows:
            assert len(weights) == window and (weights > 0).all() and weights.max() <= 1
            total[start:start + window] += weights
        assert windows[0][0] == 0 and windows[-1][0] == n - window
        assert windows[0][1][0] == 1 and windows[-1][1][-1] == 1  # volume ends at full weight
        if 2 * overlap <= window and (n - window) % (window - overlap) == 0:
            assert torch.allclose(total, torch.ones(n))  # ramps of neighbours sum to exactly 1


def test_windowed_equals_whole_with_identity_volumetric_layers(folders, source):
    model = load_synthesis_model(folders["identity"], device="cpu")
    whole = synthesize(model, source, steps=3, progress=False)
    calls = count_calls(model)
    windowed = synthesize(model, source, steps=3, window=4, overlap=2, progress=False)
    assert len(calls) == 3 * 3  # windows start at 0, 2, 4
    # Slices do not interact, so only float rounding of the weighted average differs.
    assert (windowed - whole).abs().max() < 1e-5


def long_source(n=2 * SLICES):
    z = torch.linspace(-1, 1, n)[:, None, None]
    y = torch.linspace(-1, 1, SIZE)[None, :, None]
    x = torch.linspace(-1, 1, SIZE)[None, None, :]
    return ((x**2 + y**2 + z**2 < 0.8).float() * 1.6 - 0.8)[None, None]


def test_long_volume_is_windowed_automatically(folders):
    model = load_synthesis_model(folders["random"], device="cpu")
    source = long_source()  # 16 slices; the model was fine-tuned on 8
    calls = count_calls(model)
    auto = synthesize(model, source, steps=2, progress=False)
    assert len(calls) == 2 * 3  # windows of 8 slices overlapping by 8 // 4 = 2 start at 0, 6, 8
    assert torch.equal(auto, synthesize(model, source, steps=2, window=8, overlap=2, progress=False))
    assert not torch.equal(auto, synthesize(model, source, steps=2, window=0, progress=False))


def test_windowed_stays_close_to_whole_with_random_volumetric_layers(folders, source):
    model = load_synthesis_model(folders["random"], device="cpu")
    whole = synthesize(model, source, steps=3, progress=False)
    windowed = synthesize(model, source, steps=3, window=6, overlap=4, progress=False)
    sliced = synthesize(model, source, steps=3, slice_wise=True, progress=False)
    error = (windowed - whole).abs().mean()
    # Mean |difference| on the [-1, 1] scale. Windows miss slices the volumetric layers (std 0.05,
    # a receptive field along n wider than the window) would see, so this is not exact.
    assert error < 0.02
    assert error < 0.2 * (sliced - whole).abs().mean()  # much closer than dropping the volumetric layers


def _overwrite_weights(num_slices, window, overlap):
    """The authors' scheme: each later window overwrites the overlap (weight ~0 where overwritten)."""
    starts = [start for start, _ in window_weights(num_slices, window, overlap)]
    out = []
    for i, start in enumerate(starts):
        w = torch.ones(window)
        if i + 1 < len(starts):
            w[starts[i + 1] - start:] = 1e-12
        out.append((start, w))
    return out


def test_blended_windows_leave_no_seam(folders, monkeypatch):
    """The windowing error (windowed - whole) must not peak at window borders, as overwriting does.

    The synthesised slices of an untrained model differ from each other by far more than any seam,
    so the seam is measured on the difference from the whole-volume result.
    """
    model = load_synthesis_model(folders["random"], device="cpu")
    source = long_source()
    whole = synthesize(model, source, steps=3, window=0, progress=False)
    blended = synthesize(model, source, steps=3, window=8, overlap=4, progress=False)
    monkeypatch.setattr(synthesis, "window_weights", _overwrite_weights)
    overwritten = synthesize(model, source, steps=3, window=8, overlap=4, progress=False)

    borders = [4, 8]  # windows start at 0, 4, 8: the first slice of each later window
    others = [k for k in range(source.shape[2]) if k not in borders]

    def error(result):
        return (result - whole)[0, 0].abs().mean(dim=(1, 2))  # per slice

    def largest_jump(result):
        e = (result - whole)[0, 0]
        return (e[1:] - e[:-1]).abs().mean(dim=(1, 2)).max()

    assert error(overwritten)[borders].max() > 2 * error(overwritten)[others].max()  # a seam, to be sure it shows
    assert error(blended)[borders].max() <= error(blended)[others].max()  # no larger at the borders than elsewhere
    assert largest_jump(blended) < 0.5 * largest_jump(overwritten)
    assert error(blended).mean() < 0.02


def test_slice_wise_equals_2d_model_slice_by_slice(folders, source):
    lifted = load_synthesis_model(folders["random"], device="cpu")
    plain = load_synthesis_model(folders["2d"], device="cpu")
    slice_wise = synthesize(lifted, source, steps=3, seed=5, slice_wise=True, progress=False)
    # Reference: the 2D U-Net on one slice at a time, with that slice of the same seeded noise.
    noise = torch.randn(source.shape, generator=torch.Generator().manual_seed(5))
    reference = torch.empty_like(source)
    with torch.no_grad():
        for k in range(SLICES):
            scheduler = diffusers_scheduler("ddim", plain.scheduler_config, 3)
            z, cond = noise[:, :, k], source[:, :, k]
            for t in scheduler.timesteps:
                eps = plain.unet(torch.cat([z, cond], dim=1), t.reshape(1)).sample
                z = scheduler.step(eps, t, z).prev_sample
            reference[:, :, k] = z.clamp(-1, 1)
    assert (slice_wise - reference).abs().max() < 1e-4
    volumetric = synthesize(lifted, source, steps=3, seed=5, progress=False)
    assert (volumetric - reference).abs().max() > 1e-2  # the random volumetric layers do matter


def test_source_checks(folders, source):
    model = load_synthesis_model(folders["2d"], device="cpu")
    with pytest.raises(ValueError, match=r"volume batch \(b, 1, n, h, w\)"):
        synthesize(model, source[0], progress=False)
    with pytest.raises(ValueError, match="in-plane size 15 x 16 does not fit.*nearest valid sizes: 14 or 16"):
        synthesize(model, source[..., :15, :], progress=False)
    with pytest.raises(ValueError, match="overlap must be smaller than the window"):
        synthesize(model, source, window=4, overlap=4, progress=False)


def test_folder_without_settings_is_a_checkpoint_error(folders, tmp_path):
    folder = tmp_path / "plain"
    tiny_unet().save_pretrained(folder, safe_serialization=True)
    with pytest.raises(CheckpointError, match="has no lift3d settings \\(neither lift3d_training.json nor lift3d.json\\)"):
        load_synthesis_model(folder, device="cpu")


def test_autoencoder_latent_mismatch_names_both_numbers(folders, tmp_path):
    import shutil

    folder = tmp_path / "mismatch"
    shutil.copytree(folders["identity"], folder)
    settings = json.loads((folder / "lift3d_training.json").read_text())
    settings["autoencoder"] = {"name": "identity", "options": {"image_channels": 2}}
    (folder / "lift3d_training.json").write_text(json.dumps(settings))
    with pytest.raises(CheckpointError, match="2 latent channels, so the U-Net must take 4 input channels.*"
                                              "this U-Net takes 2 and gives 1"):
        load_synthesis_model(folder, device="cpu")


def test_latent_model_with_exported_kl_autoencoder(tmp_path, monkeypatch, source):
    """The exported autoencoder is found relative to the model folder, whatever the working directory."""
    from lift3d_plugins.autoencoders import tiny_kl_config

    cfg = TrainConfig()
    cfg.run.stage = "volumes"
    cfg.data.options = {"size": SIZE, "num_slices": SLICES}
    cfg.model.block_out_channels = [16, 32]
    cfg.autoencoder.name = "kl"
    cfg.autoencoder.options = {"config": tiny_kl_config(latent_channels=3, block_out_channels=(8, 8, 8), norm_num_groups=4)}
    torch.manual_seed(0)
    autoencoder = build_autoencoder(cfg)
    unet = lift3d.inflate(new_unet2d(cfg, 6, 3, SIZE // 4))
    folder = export_model(cfg, unet, autoencoder, build_objective(cfg), _Dataset(), tmp_path / "kl")
    assert json.loads((folder / "lift3d_training.json").read_text())["autoencoder"]["options"] == {"path": "autoencoder"}
    monkeypatch.chdir(tmp_path.parent)
    model = load_synthesis_model(folder, device="cpu")
    assert model.latent_channels == 3 and model.size_multiple == 8
    calls = count_calls(model)
    out = synthesize(model, source, steps=2, progress=False)
    assert out.shape == source.shape and torch.isfinite(out).all()
    assert len(calls) == 2
    with pytest.raises(ValueError, match=r"clip_x0 \(--clip-x0\) is for pixel-space models.*'kl' autoencoder "
                                         r"\(downsampling factor 4\)"):
        synthesize(model, source, steps=2, clip_x0=True, progress=False)


def test_reduced_precision_runs_and_returns_float32(folders, source):
    full = synthesize(load_synthesis_model(folders["random"], device="cpu"), source, steps=2, progress=False)
    model = load_synthesis_model(folders["random"], device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    half = synthesize(model, source, steps=2, progress=False)
    assert half.dtype == torch.float32 and (half - full).abs().mean() < 0.02
    with pytest.raises(ValueError, match="Unknown dtype 'float8'; valid: float32, float16, bfloat16"):
        load_synthesis_model(folders["random"], device="cpu", dtype="float8")


# -- several samples, correlated noise ---------------------------------------------------------


def diffusers_scheduler(name, config, steps):
    """The diffusers scheduler of the built-in solver ``name``, made here without lift3d's solver code."""
    import diffusers

    scheduler = getattr(diffusers, DIFFUSERS_CLASSES[name]).from_config(config)
    scheduler.set_timesteps(steps)
    return scheduler


def reference_single_sample(model, source, name, steps, seed):
    """synthesize() as it was before samples and noise_correlation existed: one generator seeds
    the initial noise and then every noise the solver adds."""
    sampler = diffusers_scheduler(name, model.scheduler_config, steps)
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(source.shape, generator=generator) * sampler.init_noise_sigma
    with torch.no_grad():
        for t in sampler.timesteps:
            eps = predict_noise(model, sampler.scale_model_input(latents, t), source, t)
            latents = sampler.step(eps, t, latents, generator=generator).prev_sample
    return latents.clamp(-1, 1)


@pytest.mark.parametrize("name", ["ddim", "dpm", "ddpm"])
def test_one_sample_without_correlation_is_the_single_sample_output(folders, source, name):
    model = load_synthesis_model(folders["random"], device="cpu")
    two = torch.cat([source, source.flip(2)])  # two volumes: sample 0 keeps one generator for the batch
    expected = reference_single_sample(model, two, name, 3, 7)
    assert torch.equal(synthesize(model, two, solver=name, steps=3, seed=7, progress=False), expected)
    assert torch.equal(synthesize(model, two, solver=name, steps=3, seed=7, samples=1, noise_correlation=0.0,
                                  progress=False), expected)
    posterior = synthesize_posterior(model, two, samples=1, solver=name, steps=3, seed=7, progress=False)
    assert torch.equal(posterior.mean, expected) and posterior.std is None and posterior.samples == 1


def test_sample_seeds():
    assert sample_seed(5, 0) == 5 and sample_seed(-3, 0) == -3
    seeds = {sample_seed(seed, k) for seed in range(4) for k in range(1, 6)}
    assert len(seeds) == 20 and not seeds & set(range(10))  # seed 0's sample 1 is not seed 1's sample 0
    assert sample_seed(0, 1) == sample_seed(0, 1)


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_posterior_is_mean_and_std_of_single_samples_with_derived_seeds(folders, source, name):
    model = load_synthesis_model(folders["random"], device="cpu")
    singles = torch.stack([synthesize(model, source, solver=name, steps=2, seed=sample_seed(3, k), progress=False)
                           for k in range(3)])
    calls = count_calls(model)
    posterior = synthesize_posterior(model, source, samples=3, sample_batch=3, solver=name, steps=2, seed=3,
                                     progress=False)
    assert len(calls) == 2  # the three samples share each U-Net call
    assert posterior.samples == 3 and posterior.mean.shape == posterior.std.shape == source.shape
    torch.testing.assert_close(posterior.mean, singles.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(posterior.std, singles.std(0), atol=1e-5, rtol=0)
    assert posterior.std.min() >= 0 and posterior.std.mean() > 1e-2
    mean = synthesize(model, source, solver=name, steps=2, seed=3, samples=3, sample_batch=3, progress=False)
    assert torch.equal(mean, posterior.mean)


def test_antithetic_pairs_negate_the_noise_and_keep_the_even_samples(folders, source, monkeypatch):
    from lift3d.sampling.noise import sample_noise

    assert sample_noise(4, 0, True) == (4, 1.0) and sample_noise(4, 1, True) == (4, -1.0)
    assert sample_noise(4, 3, True) == (sample_seed(4, 2), -1.0) and sample_noise(4, 3) == (sample_seed(4, 3), 1.0)
    model = load_synthesis_model(folders["random"], device="cpu")
    starts = []
    real = synthesis.run_steps
    monkeypatch.setattr(synthesis, "run_steps", lambda solver, net, latents, *a: starts.append(latents.clone())
                        or real(solver, net, latents, *a))
    pair = synthesize_posterior(model, source, samples=4, sample_batch=4, solver="ddim", steps=2, seed=3,
                                antithetic=True, progress=False)
    z = starts[0].split(source.shape[0])
    assert torch.equal(z[1], -z[0]) and torch.equal(z[3], -z[2]) and not torch.equal(z[2].abs(), z[0].abs())
    independent = synthesize_posterior(model, source, samples=3, sample_batch=3, solver="ddim", steps=2, seed=3,
                                       progress=False)
    assert torch.equal(starts[1].split(source.shape[0])[2], z[2])  # sample 2 is the independent run's sample 2
    # drawn one by one (as the fit's cache draws them), the samples are the same
    parts = torch.stack([synthesize(model, source, solver="ddim", steps=2, seed=3, first_sample=k, antithetic=True,
                                    progress=False) for k in range(4)])
    torch.testing.assert_close(pair.mean, parts.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(pair.std, parts.std(0), atol=1e-5, rtol=0)
    assert not torch.allclose(pair.mean, independent.mean)


def test_antithetic_pairs_need_a_deterministic_solver(folders, source):
    model = load_synthesis_model(folders["random"], device="cpu")
    with pytest.raises(ValueError, match=r"need a deterministic solver; 'ddpm'.*deterministic: .*ddim"):
        synthesize_posterior(model, source, samples=2, solver="ddpm", steps=2, antithetic=True, progress=False)
    with pytest.raises(ValueError, match="first_sample must be an integer >= 0"):
        synthesize_posterior(model, source, samples=2, solver="ddim", steps=2, first_sample=-1, progress=False)


def test_sample_batch_caps_the_u_net_batch_and_keeps_the_result(folders, source):
    model = load_synthesis_model(folders["random"], device="cpu")
    batches = []
    model.unet.register_forward_hook(lambda module, args, out: batches.append(args[0].shape[0]))
    together = synthesize_posterior(model, source, samples=4, sample_batch=8, solver="ddpm", steps=2, progress=False)
    assert batches == [4 * SLICES] * 2
    batches.clear()
    capped = synthesize_posterior(model, source, samples=4, sample_batch=3, solver="ddpm", steps=2, progress=False)
    assert batches == [3 * SLICES] * 2 + [SLICES] * 2
    torch.testing.assert_close(capped.mean, together.mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(capped.std, together.std, atol=1e-5, rtol=0)
    batches.clear()
    synthesize_posterior(model, source, samples=2, solver="ddpm", steps=2, progress=False)
    assert batches == [SLICES] * 4  # on the CPU, one sample at a time unless told otherwise
    assert resolve_sample_batch(None, 8, torch.device("cuda")) == 8 and resolve_sample_batch(16, 8, torch.device("cpu")) == 8


def test_out_of_memory_halves_the_sample_batch(folders, source, monkeypatch, caplog):
    model = load_synthesis_model(folders["identity"], device="cpu")
    expected = synthesize_posterior(model, source, samples=4, sample_batch=2, steps=2, progress=False)
    real = synthesis.predict_noise

    def small_memory(model, sample, *args, **kwargs):
        if sample.shape[0] > 2:
            raise torch.OutOfMemoryError("pretend the device is full")
        return real(model, sample, *args, **kwargs)

    monkeypatch.setattr(synthesis, "predict_noise", small_memory)
    with caplog.at_level("WARNING", logger="lift3d.sampling.synthesis"):
        result = synthesize_posterior(model, source, samples=4, sample_batch=4, steps=2, progress=False)
    assert torch.equal(result.mean, expected.mean) and torch.equal(result.std, expected.std)
    assert "out of memory denoising 4 samples together; retrying 2 at a time" in caplog.text


def test_correlate_slices_keeps_unit_variance_and_sets_the_correlation():
    z = torch.randn(400, 1, 5, 16, 16, generator=torch.Generator().manual_seed(0))
    assert correlate_slices(z, 0.0) is z
    for rho in (0.3, 0.8):
        x = correlate_slices(z, rho)
        assert abs(x.var().item() - 1) < 0.02
        corr = torch.corrcoef(rearrange_slices(x))
        off_diagonal = corr[~torch.eye(5, dtype=torch.bool)]
        assert (off_diagonal - rho).abs().max() < 0.03
    same = correlate_slices(z, 1.0)
    assert torch.equal(same, same[:, :, :1].expand_as(same)) and abs(same.var().item() - 1) < 0.02


def rearrange_slices(x):
    return x.transpose(0, 2).reshape(x.shape[2], -1)  # slice k -> all its voxels of all volumes


@pytest.mark.parametrize("name", ["ddim", "ddpm"])
def test_full_correlation_gives_a_slice_invariant_model_identical_slices(folders, name):
    """A 2D model on a source whose slices are all alike: with rho = 1 every slice sees the same noise,
    at the start and (ddpm) at every step, so every slice comes out the same."""
    model = load_synthesis_model(folders["2d"], device="cpu")
    source = long_source(SLICES)[:, :, SLICES // 2:SLICES // 2 + 1].expand(-1, -1, SLICES, -1, -1).contiguous()

    def spread(result):  # largest difference of any slice from the first
        return (result - result[:, :, :1]).abs().max().item()

    assert spread(synthesize(model, source, solver=name, steps=3, progress=False)) > 0.1
    assert spread(synthesize(model, source, solver=name, steps=3, noise_correlation=1.0, progress=False)) < 1e-4
    partial = synthesize(model, source, solver=name, steps=3, noise_correlation=0.5, progress=False)
    assert 1e-2 < spread(partial)


def test_noise_correlation_applies_to_lifted_and_slice_wise(folders, source):
    model = load_synthesis_model(folders["random"], device="cpu")
    for slice_wise in (False, True):
        plain = synthesize(model, source, steps=2, slice_wise=slice_wise, progress=False)
        correlated = synthesize(model, source, steps=2, slice_wise=slice_wise, noise_correlation=0.5, progress=False)
        assert (plain - correlated).abs().mean() > 1e-2


@pytest.mark.parametrize("options, message", [
    ({"samples": 0}, "samples must be a positive integer (1 = a single sample), got 0"),
    ({"samples": True}, "samples must be a positive integer"),
    ({"samples": 2.0}, "samples must be a positive integer"),
    ({"sample_batch": 0}, "sample_batch must be a positive integer or None (the device's default), got 0"),
    ({"noise_correlation": 1.5}, "noise_correlation must be a number from 0 (independent noise per slice) to 1 "
                                 "(the same noise in every slice), got 1.5"),
    ({"noise_correlation": -0.1}, "noise_correlation must be a number from 0"),
    ({"noise_correlation": float("nan")}, "noise_correlation must be a number from 0"),
])
def test_bad_sampling_options_are_one_clear_error(folders, source, options, message):
    model = load_synthesis_model(folders["2d"], device="cpu")
    calls = count_calls(model)
    with pytest.raises(ValueError, match=re.escape(message)):
        synthesize(model, source, steps=2, progress=False, **options)
    assert not calls


def test_std_map_is_written_as_a_scale_without_the_intensity_offset(tmp_path):
    import nibabel as nib
    import numpy as np

    from lift3d.data.volume import TrainingGrid, prepare_volume

    data = np.random.default_rng(0).uniform(100, 900, (SIZE, SIZE, SLICES)).astype(np.float32)
    image = nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0]))
    array, meta = prepare_volume(image, TrainingGrid(size=SIZE, num_slices=SLICES, multiple=2))
    low, high = meta.intensity.low, meta.intensity.high
    std = torch.rand(SLICES, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 1.4  # may exceed 1
    written = nib.load(save_std_volume(tmp_path / "std" / "a_std.nii.gz", std, meta))
    np.testing.assert_allclose(written.affine, image.affine)
    # Axial slices of a RAS volume at its own size: no resampling, so the map is exact.
    expected = std.permute(2, 1, 0).numpy() * (high - low) / 2
    np.testing.assert_allclose(written.get_fdata(), expected, rtol=1e-5, atol=1e-4)


def test_a_model_that_yields_nan_is_blamed_not_the_source(folders, source):
    model = load_synthesis_model(folders["2d"], device="cpu")
    with torch.no_grad():
        next(model.unet.parameters()).fill_(float("nan"))  # weights gone bad after loading
    with pytest.raises(Lift3dError, match=r"the model in .* produced NaN or inf values .*the source was finite"):
        synthesize_posterior(model, source, samples=1, solver="ddim", steps=2, progress=False)
