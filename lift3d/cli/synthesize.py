"""``lift3d-synthesize``: synthesise the target modality of source NIfTI volumes with a trained model.

Each source is prepared exactly as in training (closest canonical orientation, slice axis first,
percentile normalisation to [-1, 1], resampling to the training grid), synthesised with
``lift3d.sampling.synthesis.synthesize_posterior`` (Make-A-Volume, DDIM-200 by default), and written as
``<name>_synth.nii.gz`` back on the source's own grid with the source's affine; with ``--samples K``
that is the mean of K samples, and their per-voxel std goes to ``std/<name>_std.nii.gz``. Every
input and the output folder are checked before the first volume is synthesised: no output may
overwrite an input or another output, and each grid must fit the memory budget. Each file is written
under a temporary name and renamed into place (a mean together with its std map, the std first),
and temporaries a killed run left behind are removed at the next start.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import torch

from lift3d.cli._common import OUTPUT_SUFFIX, STD_DIR, STD_SUFFIX, UserError, run_cli
from lift3d.data.nifti import IMAGE_SUFFIXES, image_suffix, list_image_files, load_image, save_volume
from lift3d.data.orientation import orientation_codes, slice_shape
from lift3d.data.volume import TrainingGrid, prepare_volume
from lift3d.io.budget import check_count
from lift3d.io.errors import BudgetError
from lift3d.io.writing import clean_stale_temporaries, commit_together, refuse_links, temporary_path
from lift3d.cli import arguments
from lift3d.diffusion.objectives import OBJECTIVES
from lift3d.recipes.predict import finer_than_grid, model_grid
from lift3d.sampling.solvers import SOLVERS, build_solver
from lift3d.sampling.synthesis import (DTYPES, STARTS, SynthesisModel, check_antithetic, check_clip_x0, check_start,
                                      load_synthesis_model, resolve_sample_batch, resolve_window, save_std_volume,
                                      synthesize_posterior, evaluations_of)

# Float32 volumes of the synthesis grid held at once besides the K samples and their stack: the
# source, its encoding, the noisy sample, the noise prediction, the mean and the std. A lower bound
# (the U-Net's activations come on top), so no run that fits is refused.
SYNTHESIS_COPIES = 6

DESCRIPTION = """\
Synthesise the target modality for one or many source volumes with a model exported by
lift3d-finetune (<output_dir>/model): a lifted stage-2 model denoises all slices of a volume
jointly; a stage-1 model (or --slice-wise) denoises each slice on its own.

Each source is prepared as in training: reoriented to the closest canonical (RAS) orientation,
sliced along the training slice axis, intensities clipped at the training percentiles and mapped
to [-1, 1], and resampled to the training in-plane size and slice count. The result is resampled
back and written on the source's own grid, with its affine and header, as <name>_synth.nii.gz.

With --samples K, K samples are drawn per source (on a GPU batched through the U-Net; --sample-
batch sets how many at once): <name>_synth.nii.gz is their mean, and std/<name>_std.nii.gz their per-voxel
standard deviation (an uncertainty map, in the same intensity units; a scale, so the intensity
offset is not added). The mean of several samples usually scores better than one sample.

A model trained with the flow objective (--diffusion.objective flow) samples well in a few steps
(--solver flow --steps 2). --fast takes the few-step setting chosen for the model's objective on
validation subjects (benchmarks/RESULTS.md); --start estimate --strength S starts from the model's own
one-pass estimate, noised to where the last fraction S of the steps begins (SDEdit). Every run prints
its U-Net evaluations and seconds per volume.
"""

EPILOG = """\
examples:
  lift3d-synthesize --model runs/stage2/model --source sub-01_T1.nii.gz --out synth/
  lift3d-synthesize --model runs/stage2/model --source test-t1/ --out synth/ --solver dpm
  lift3d-synthesize --model runs/stage2/model --source a.nii.gz --out synth/ --num-slices native --window 16
  lift3d-synthesize --model runs/stage2/model --source a.nii.gz --out ablation/ --slice-wise
  lift3d-synthesize --model runs/stage2/model --source a.nii.gz --out mean8/ --solver dpm --samples 8
  lift3d-synthesize --model runs/flow-stage2/model --source a.nii.gz --out fast/ --fast --samples 4
  lift3d-synthesize --model runs/flow-stage2/model --source a.nii.gz --out few/ --solver flow --steps 2
"""


def solver_help() -> tuple[str, str]:
    """The help of --solver and of --steps, read from the solver and objective registries (plugins included)."""
    solvers, steps = [], []
    for name in SOLVERS.names():
        cls = SOLVERS.get(name)
        kind = "stochastic" if cls.stochastic else "deterministic"
        solvers.append(f"{name}: {cls.summary or cls.__name__}, {kind} ({' and '.join(cls.inverts)} models)")
        defaults = [f"{n} on {objective} models" for objective, n in cls.inverts.items()]
        if len(defaults) == 1:
            steps.append(f"{defaults[0].split(' on ')[0]} for {name}")
        elif defaults:
            steps.append(f"{defaults[0].replace(' on ', f' for {name} on ', 1)}, {', '.join(defaults[1:])}")
    chosen = [f"{getattr(OBJECTIVES.get(o), 'default_solver', '?')} for {o} models" for o in OBJECTIVES.names()]
    return (f"the solver that steps the model from noise back to a volume, built from its training noise schedule; "
            f"one that inverts the model's objective. {'; '.join(solvers)}. Default: {', '.join(chosen)}",
            f"solver steps (default: {', '.join(steps)}); more is slower and usually better")


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    """--samples, --antithetic, --sample-batch and --noise-correlation: how many samples, and their noise."""
    parser.add_argument("--samples", type=arguments.positive, metavar="K",
                        help=f"draw K samples per source and write their mean as <name>{OUTPUT_SUFFIX} and "
                        f"their per-voxel standard deviation as {STD_DIR}/<name>{STD_SUFFIX} (an uncertainty "
                        "map). K times the work of one sample, less per sample when batched. Default: 1 (one "
                        "sample, no std map), or the --fast preset's")
    parser.add_argument("--antithetic", action="store_true",
                        help="draw the K samples in antithetic pairs: every second sample starts from the noise of "
                        "the one before, negated. The noise's odd effect cancels in each pair's mean, so the mean "
                        "of K is closer to the posterior mean than K independent samples (about 0.1 dB on ICBM at "
                        "K = 2); the std map is each pair's spread. Needs --samples 2 or more and a deterministic "
                        "solver (not ddpm)")
    parser.add_argument("--sample-batch", type=arguments.positive, metavar="N",
                        help="denoise N of the K samples together (default: all K on a GPU, 1 on the CPU, "
                        "where batching measured slower). Lower it if GPU memory is short; a batch that runs "
                        "out of memory is halved and retried anyway. The result does not depend on it beyond "
                        "float rounding")
    parser.add_argument("--noise-correlation", type=arguments.correlation, default=0.0, metavar="RHO",
                        help="correlate the noise of all slices of a volume by RHO in [0, 1] (each voxel's "
                        "noise stays N(0, 1), as sqrt(RHO) x shared + sqrt(1 - RHO) x own-per-slice would "
                        "give): the initial noise, and a stochastic solver's (ddpm's) noise at every step. 0 = "
                        "independent slices, "
                        "as in training; 1 = the same noise in every slice. Default: 0")


def build_parser() -> argparse.ArgumentParser:
    solvers, steps = solver_help()
    parser = argparse.ArgumentParser(prog="lift3d-synthesize", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, metavar="FOLDER",
                        help="model folder exported by lift3d-finetune (<output_dir>/model): the U-Net, "
                        "lift3d_training.json (autoencoder, conditioning, training grid) and scheduler/")
    parser.add_argument("--source", nargs="+", required=True, metavar="PATH",
                        help=f"source volumes ({', '.join(IMAGE_SUFFIXES)}), or one folder: every such file in it "
                        f"except hidden ones and earlier outputs (<name>{OUTPUT_SUFFIX})")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help=f"output folder, created if missing; one <name>{OUTPUT_SUFFIX} per source (an "
                        "existing file of that name is replaced). It may not be a source's folder, and no output "
                        "may replace a source")
    parser.add_argument("--name-by-folder", action="store_true",
                        help="name each output by its source's folder, as in a paired-nifti folder "
                             f"(data/sub-01/T1.nii.gz -> sub-01{OUTPUT_SUFFIX}); without it, by the file name, and "
                             "by the folder only where file names repeat")
    parser.add_argument("--solver", choices=SOLVERS.names(), help=solvers)
    # the option's name before solvers were a registered kind; kept so old commands still run
    parser.add_argument("--scheduler", dest="solver", choices=SOLVERS.names(), help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=arguments.positive, metavar="N", help=steps)
    parser.add_argument("--fast", action="store_true",
                        help="the few-step preset of the model's objective, chosen on validation subjects (solver, "
                        "steps and start; any of them given explicitly wins): a flow model in a few U-Net passes")
    parser.add_argument("--start", choices=STARTS, default=None,
                        help="noise (default): the whole schedule from Gaussian noise. estimate: one U-Net pass on "
                        "the noise estimates the target, which is noised afresh to where the last --strength of "
                        "the steps begins (SDEdit). source: the same from the source volume itself")
    parser.add_argument("--strength", type=arguments.strength, metavar="S",
                        help="with --start estimate or source: the fraction of the steps that run, in (0, 1)")
    parser.add_argument("--seed", type=arguments.seed, default=0,
                        help="seed of the initial noise (and of a stochastic solver's added noise); the same seed and "
                        "options give the same volume. With --samples K, sample 0 uses the seed itself and "
                        "sample k a seed hashed from (seed, k) (lift3d.sampling.synthesis.sample_seed). Default: 0")
    add_sample_arguments(parser)
    parser.add_argument("--window", type=arguments.window, metavar="N",
                        help="denoise in overlapping windows of N slices, blending their noise predictions "
                        "at every step (saves memory on long volumes). 0 = always the whole volume. Default: "
                        "the whole volume unless it has more slices than the model was fine-tuned on, then "
                        "windows of that many slices")
    parser.add_argument("--overlap", type=arguments.non_negative, metavar="N",
                        help="slices shared by neighbouring windows, 0 to N - 1 (default: a quarter of the window, "
                        "at least 1); the shared slices are blended with raised-cosine weights")
    parser.add_argument("--slice-wise", action="store_true",
                        help="the paper's 'w/o volumetric layers' ablation: switch the volumetric layers off "
                        "so each slice is denoised by the 2D model on its own; everything else is unchanged")
    parser.add_argument("--clip-x0", action="store_true",
                        help="clamp the solver's estimate of the clean volume to [-1, 1] at every step. Pixel-"
                        "space models only (identity autoencoder); helps an epsilon model that drifts to "
                        "black or white slices")
    parser.add_argument("--num-slices", type=arguments.slice_count, metavar="N|native",
                        help="resample each source to N slices instead of the training slice count; "
                        "'native' keeps the source's own slice count (longer volumes are then windowed)")
    parser.add_argument("--size", type=arguments.in_plane_size, metavar="N|HxW|native",
                        help="in-plane size to resample each slice to instead of the training size; "
                        "'native' keeps the source's own. Both sides must be multiples of the model's "
                        "size multiple (autoencoder factor x U-Net downsampling)")
    parser.add_argument("--device", type=arguments.device, metavar="DEVICE",
                        help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                        help="dtype of the U-Net and autoencoder; the solver stays float32. Default: float32")
    return parser


# Inputs and outputs


def subject_name(path: Path) -> str:
    suffix = image_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.name


def collect_sources(paths: list[str]) -> tuple[list[Path], list[Path]]:
    """The source files, and those skipped in a source folder as earlier outputs of this tool (their output
    names: ``output_names``)."""
    skipped: list[Path] = []
    if len(paths) == 1 and Path(paths[0]).is_dir():
        folder = Path(paths[0])
        found = list_image_files(folder)
        # A lift3d output is not a source: re-synthesising it would write <name>_synth_synth.nii.gz.
        skipped = [p for p in found if p.name.endswith(OUTPUT_SUFFIX)]
        sources = [p for p in found if not p.name.endswith(OUTPUT_SUFFIX)]
        if not sources:
            only = f" besides earlier outputs ({', '.join(p.name for p in skipped)})" if skipped else ""
            raise UserError(f"source folder {folder} holds no image file ({', '.join(IMAGE_SUFFIXES)}){only}")
    else:
        sources = []
        for text in paths:
            path = Path(text)
            if not path.exists():
                raise UserError(f"source file not found: {path}")
            if path.is_dir():
                raise UserError(f"source {path} is a folder; give a folder only as the single --source path")
            sources.append(path)
    return sources, skipped


def output_names(sources: list[Path], by_folder: bool = False) -> dict[Path, str]:
    """The name each source's outputs take: its file name without the suffix, or, when file names repeat in
    different subject folders (``data/sub-01/T1.nii.gz``, ``data/sub-02/T1.nii.gz``), its folder's name, as
    ``lift3d-evaluate`` matches a prediction to its subject folder. Two sources that would still share a name
    are refused, naming both."""
    stems = {path: subject_name(path) for path in sources}
    if not by_folder and len(set(stems.values())) == len(sources):
        return stems
    folders = {path: path.resolve().parent.name for path in sources}
    if len(set(folders.values())) == len(sources):
        return folders
    if by_folder:
        raise UserError("--name-by-folder: sources in one folder would share a name; give one source per folder")
    by_name: dict[str, list[Path]] = {}
    for path in sources:
        by_name.setdefault(stems[path], []).append(path)
    clashes = [(name, group) for name, group in by_name.items() if len(group) > 1]
    name, group = clashes[0]
    more = f" (and {len(clashes) - 1} more such name(s))" if len(clashes) > 1 else ""
    both = " and ".join(str(p) for p in group)
    raise UserError(f"sources {both} would both be written as {name}{OUTPUT_SUFFIX}, one over the other{more}; "
                    "rename one, or synthesise them into different --out folders")


def output_paths(out: Path, name: str) -> tuple[Path, Path]:
    """Where the mean and std map of the source named ``name`` (``output_names``) go."""
    return out / f"{name}{OUTPUT_SUFFIX}", out / STD_DIR / f"{name}{STD_SUFFIX}"


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_out(out: Path, sources: list[Path], folder: Path | None, names: dict[Path, str]) -> None:
    """Refuse an ``--out`` that is a source's folder, or where an output would replace a source."""
    for where in ([folder] if folder is not None else []) + [p.parent for p in sources]:
        if _same_file(out, where):
            raise UserError(f"--out {out} is the folder of the sources ({where}); the outputs would mix with them, "
                            "and a later run would read them back as sources: choose another --out folder")
    for source in sources:
        for dest in output_paths(out, names[source]):
            clash = next((p for p in sources if _same_file(dest, p)), None)
            if clash is not None:
                raise UserError(f"--out {out}: writing {dest} would replace the source {clash}; choose another "
                                "--out folder")


def prepare_out(out: Path) -> bool:
    """Create ``out`` if needed and prove it writable; returns whether it was created."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = temporary_path(out / "write-test")
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise UserError(f"cannot write to --out {out}: {exc.strerror or exc}") from None
    return created


# The training grid


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _nearest(value: int, multiple: int) -> str:
    lower = value // multiple * multiple
    return f"{lower} or {lower + multiple}" if lower >= multiple else str(multiple)


def source_grid(model: SynthesisModel, image: nib.Nifti1Image, path: Path, *, size: Any = None,
                num_slices: Any = None, samples: int = 1) -> TrainingGrid:
    """The grid ``path`` is synthesised on: the training grid, with the --size/--num-slices overrides.

    It is refused unless ``samples`` syntheses on it fit the memory budget (``lift3d.io.budget``).
    """
    settings = model_grid(model)
    axis = settings["slice_axis"]
    native = slice_shape(image.shape[:3], orientation_codes(image.affine), axis)
    n = native[0] if num_slices == arguments.NATIVE or settings["num_slices"] is None else (num_slices or settings["num_slices"])
    multiple = model.size_multiple
    trained = "x".join(map(str, _pair(settings["size"])))
    if size == arguments.NATIVE:
        h, w = native[1:]
        if h % multiple or w % multiple:
            fix = "x".join(str(max(multiple, (s + multiple // 2) // multiple * multiple)) for s in (h, w))
            nearest = "; ".join(f"{s}: {_nearest(s, multiple)}" for s in dict.fromkeys((h, w)) if s % multiple)
            raise UserError(
                f"{path}: its in-plane size after reorienting to {axis} slices is {h}x{w}, which this model cannot "
                f"take: both sides must be multiples of {multiple} (autoencoder factor x U-Net downsampling); "
                f"nearest valid sizes for {nearest}. Resample in-plane with --size {fix} (the result is resampled "
                f"back onto the source's grid), or omit --size to use the training size {trained}")
        grid_size: Any = (h, w)
    else:
        grid_size = size or settings["size"]
    options = ([f"--num-slices {num_slices}"] if num_slices not in (None, arguments.NATIVE) else []) + (
        [f"--size {'x'.join(map(str, _pair(size)))}"] if size not in (None, arguments.NATIVE) else [])
    origin = ", ".join(options) or str(path)
    try:
        grid = TrainingGrid(grid_size, int(n), axis, multiple, settings["percentiles"])
    except BudgetError as exc:
        raise BudgetError(f"{origin}: {exc}") from None
    except ValueError as exc:
        if size not in (None, arguments.NATIVE):
            raise UserError(f"--size {'x'.join(map(str, _pair(size)))} does not fit this model: {exc}. The source "
                            f"is resampled in-plane to --size and back, so any valid size works; omit --size to use "
                            f"the training size {trained}") from None
        raise UserError(f"{path}: cannot build its synthesis grid: {exc}") from None
    if (line := finer_than_grid(image, grid, str(path))) is not None:
        print(f"lift3d-synthesize: {line}", file=sys.stderr)
    n, h, w = grid.shape
    copies = SYNTHESIS_COPIES + 2 * samples
    check_count(n * h * w, 4, f"{origin}: synthesis on a grid of {n} x {h} x {w} float32 voxels ({samples} sample(s), "
                f"at least {copies} volumes at once)", copies=copies)
    return grid


def _synthesise_one(model: SynthesisModel, path: Path, grid: TrainingGrid, out: Path, name: str,
                    args: argparse.Namespace) -> str:
    array, meta = prepare_volume(load_image(path), grid, path=path)
    source = torch.from_numpy(array)[None, None]
    tic = time.perf_counter()
    result = synthesize_posterior(model, source, samples=args.samples, sample_batch=args.sample_batch,
                                  solver=args.solver, steps=args.steps, seed=args.seed, window=args.window,
                                  overlap=args.overlap, slice_wise=args.slice_wise, clip_x0=args.clip_x0,
                                  noise_correlation=args.noise_correlation, start=args.start,
                                  strength=args.strength, antithetic=args.antithetic, progress=None)
    elapsed = time.perf_counter() - tic
    dest, std_dest = output_paths(out, name)
    write_result(dest, std_dest, result, meta)
    n, h, w = grid.shape
    windows = resolve_window(model, n, args.window, args.overlap, args.slice_wise)
    how = f", windows of {windows[0]} slices overlapping by {windows[1]}" if windows else ""
    cost = f"{result.unet_evaluations} U-Net evaluations, {elapsed:.1f} s per volume"
    if result.std is None:
        return f"{path} -> {dest} ({n}x{h}x{w} grid{how}, {cost})"
    return (f"{path} -> {dest} (mean of {result.samples}), {std_dest} (std) ({n}x{h}x{w} grid{how}, {cost}, "
            f"{elapsed / result.samples:.1f} s per sample)")


def write_result(dest: Path, std_dest: Path, result: Any, meta: Any) -> None:
    """Write the mean (and std map) of one source. Both go to temporaries first and are then
    renamed into place together, the std first and the mean last: a reader that sees a mean sees
    its std. A std map left by an earlier run with more samples is removed with the new mean, as
    it no longer describes it."""
    mean_tmp = temporary_path(dest, ".nii.gz")
    std_tmp = temporary_path(std_dest, ".nii.gz") if result.std is not None else None
    try:
        if std_tmp is not None:
            save_std_volume(std_tmp, result.std[0, 0], meta)
        save_volume(mean_tmp, result.mean[0], meta)
        if std_tmp is None:
            std_dest.unlink(missing_ok=True)
        commit_together(([(std_tmp, std_dest)] if std_tmp is not None else []) + [(mean_tmp, dest)])
    except OSError as exc:
        raise UserError(f"cannot write {dest}: {exc.strerror or exc}; nothing partial was left behind") from None
    finally:
        for tmp in (mean_tmp, std_tmp):
            if tmp is not None:
                tmp.unlink(missing_ok=True)


def choose_solver(model: SynthesisModel, args: argparse.Namespace) -> None:
    """Fill --solver, --steps, --samples, --start and --strength from --fast (the objective's few-step preset) or
    the objective's default solver; what the user gave explicitly wins."""
    preset = dict(model.objective.fast) if args.fast else {}
    if args.solver is None:
        args.solver = preset.get("solver", model.objective.default_solver)
    if args.steps is None and preset.get("solver", args.solver) == args.solver:
        args.steps = preset.get("steps")
    if args.samples is None:
        args.samples = preset.get("samples", 1)
    if args.start is None:
        args.start = preset.get("start", "noise")
        if args.strength is None and args.start != "noise":
            args.strength = preset.get("strength")


def check_windows(model: SynthesisModel, grids: list[TrainingGrid], args: argparse.Namespace) -> None:
    """--window and --overlap against each grid, with an error that names the options."""
    if args.window and args.overlap is not None and args.overlap >= args.window:
        raise UserError(f"--overlap {args.overlap} with --window {args.window}: overlap must be smaller than the "
                        f"window ({args.window} slices), got {args.overlap}; valid --overlap: 0 to {args.window - 1}")
    for grid in grids:
        try:
            resolve_window(model, grid.num_slices, args.window, args.overlap, args.slice_wise)
        except ValueError as exc:
            raise UserError(f"--overlap {args.overlap}: {exc}; the window is the {model.max_slices} slices the model "
                            "was fine-tuned on: give --window too, or a smaller --overlap") from None


@run_cli
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    sources, skipped = collect_sources(args.source)
    out = Path(args.out)
    folder = Path(args.source[0]) if len(args.source) == 1 and Path(args.source[0]).is_dir() else None
    names = output_names(sources, args.name_by_folder)
    check_out(out, sources, folder, names)
    refuse_links(out, STD_DIR)  # a link there would take the std maps, and the clean-up, to another folder
    model = load_synthesis_model(args.model, device=args.device, dtype=args.dtype)
    if model.image_channels != 1:
        raise UserError(f"{args.model}: its autoencoder takes {model.image_channels}-channel images, but a "
                        "NIfTI source is a single-channel 3D volume")
    choose_solver(model, args)
    # Read and check every source before the first (slow) synthesis, keeping only its grid.
    grids = [source_grid(model, load_image(p), p, size=args.size, num_slices=args.num_slices, samples=args.samples)
             for p in sources]
    check_windows(model, grids, args)
    if args.antithetic and args.samples < 2:
        raise UserError(f"--antithetic pairs samples, but --samples is {args.samples}: give --samples 2 or more")
    try:  # checks --solver against the model's objective, --steps, and the start
        steps = len(build_solver(args.solver, model.objective, model.scheduler_config, args.steps).timesteps)
        check_start(args.start, args.strength, model.conditioning, args.solver)
        check_antithetic(args.antithetic, args.solver)
    except ValueError as exc:
        raise UserError(f"{args.model}: {exc}") from None
    if args.clip_x0:
        check_clip_x0(model)
    created = prepare_out(out)
    for where in (out, out / STD_DIR):
        clean_stale_temporaries(where)  # what a killed run left
    mode = ("slice-wise (2D model)" if not model.lifted else
            "slice-wise (volumetric layers off)" if args.slice_wise else "volume-wise")
    sampling = ""
    if args.samples > 1:
        batch = resolve_sample_batch(args.sample_batch, args.samples, model.device)
        sampling = f", {args.samples} {'antithetic ' * args.antithetic}samples ({batch} at a time)"
    if args.noise_correlation:
        sampling += f", noise correlated across slices by {args.noise_correlation:g}"
    if skipped:
        print(f"lift3d-synthesize: skipping {len(skipped)} earlier output(s) in {folder} "
              f"({', '.join(p.name for p in skipped)}); give them as --source files to synthesise them")
    start = f", from its {args.start} noised at strength {args.strength:g}" if args.start != "noise" else ""
    evaluations = evaluations_of(steps, args.samples, args.start, args.strength)
    print(f"lift3d-synthesize: {len(sources)} volume(s), {model.objective.name} model, {args.solver} {steps} steps"
          f"{start}, {mode}, seed {args.seed}{sampling} ({evaluations} U-Net evaluations per volume), on {model.device}")
    written = 0
    try:
        for path, grid in zip(sources, grids):
            print(_synthesise_one(model, path, grid, out, names[path], args), flush=True)
            written += 1
    finally:
        if created and not written:
            for empty in (out / STD_DIR, out):
                if empty.is_dir() and not any(empty.iterdir()):
                    empty.rmdir()
    return 0
