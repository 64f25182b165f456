"""``lift3d predict``: a model made by ``lift3d fit`` on new files, sampled as the fit chose on validation.

It is ``lift3d-synthesize`` with the fit's solver, steps and sample count (or, for any other lift3d model
folder, its objective's few-step preset, ``--fast``): the same checks, names and atomic writes.
"""

from __future__ import annotations

import argparse

from lift3d.cli._common import UserError


def synthesize_arguments(args: argparse.Namespace) -> list[str]:
    """The ``lift3d-synthesize`` command line that ``lift3d predict`` runs."""
    from lift3d.recipes.predict import FIT_FILE, SamplingChoice, model_folder
    from lift3d.io.schemas import read_json

    folder = model_folder(args.model)
    if not folder.is_dir():
        raise UserError(f"--model {args.model}: no such folder; give the run folder of lift3d fit or a model folder")
    argv = ["--model", str(folder), "--source", *map(str, args.source), "--out", str(args.out), "--seed",
            str(args.seed)] + (["--name-by-folder"] if _in_subject_folders(folder, args.source) else [])
    if (folder / FIT_FILE).is_file():
        choice = read_json(folder / FIT_FILE, SamplingChoice, folder=folder, what="sampling choice")
        samples = args.samples or choice.samples
        argv += ["--solver", choice.solver, "--steps", str(choice.steps), "--samples", str(samples)]
        argv += ["--antithetic"] if choice.antithetic and samples >= 2 else []
    else:
        argv += ["--fast"] + (["--samples", str(args.samples)] if args.samples else [])
    return argv + (["--device", args.device] if args.device else [])


def _in_subject_folders(folder, sources: list[str]) -> bool:
    """Whether every source is the model's source contrast in a subject folder (``data/sub-01/T1.nii.gz`` for a
    model trained on ``T1``): then each output is named by its subject, as ``lift3d-evaluate`` matches it."""
    from pathlib import Path

    from lift3d.diffusion.export import read_training_settings
    from lift3d.cli.synthesize import subject_name

    data = read_training_settings(folder).data
    contrast = ((data.options if data is not None else None) or {}).get("source")
    return bool(contrast) and all(Path(p).is_file() and subject_name(Path(p)) == contrast for p in sources)


def run_predict(args: argparse.Namespace) -> int:
    from lift3d.cli.synthesize import main as synthesize

    return synthesize(synthesize_arguments(args))
