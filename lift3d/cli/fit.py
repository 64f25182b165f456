"""``lift3d fit`` and ``lift3d predict``: the validated recipe on your own data, and prediction with its model."""

from __future__ import annotations

import argparse
from pathlib import Path

from lift3d.cli import arguments
from lift3d.cli._common import UserError


def _fit(args: argparse.Namespace) -> int:
    from lift3d.recipes.fit import FitRequest, fit

    if args.dataset == "paired-nifti" and args.data is None:
        raise UserError("--data FOLDER is needed for paired-nifti: a folder of <subject>/<contrast>.nii.gz")
    options = dict(args.option)
    if args.data is not None:
        options["root"] = str(args.data)
    if args.mask is not None:
        options["mask"] = args.mask
    fit(FitRequest(out=args.out, source=args.source, target=args.target, dataset=args.dataset, options=options,
                   device=args.device, seed=args.seed, baseline=args.baseline, split=args.split))
    return 0


def add_fit_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "fit", help="fit lift3d to your own data: plan, train, choose on validation, score, report",
        description="The validated recipe on a folder of NIfTI pairs (or any dataset plugin): fingerprint the data, "
                    "write an editable plan (RUN/plan.json), split the subjects, train stage 1 (slice-wise) and "
                    "stage 2 (lifted, variants chosen on validation), choose the solver and sample count on "
                    "validation within 8 network passes, optionally train the 3D U-Net baseline, synthesise the "
                    "test subjects as NIfTI on their own grids, score them with paired intervals and write "
                    "RUN/report.html. Every phase is kept: re-running the command skips what is done, and an "
                    "edited plan.json re-runs only what it changes.",
        epilog="Folder layout: FOLDER/<subject>/<contrast>.nii.gz, contrasts named by their file names (T1, T2, PD, "
               "FLAIR...); a brainmask.nii.gz (or mask.nii.gz) in every subject folder is used as the mask. "
               "Example: lift3d fit --data my-data --source T1 --target FLAIR --out runs/t1-flair")
    parser.add_argument("--data", type=Path, help="the folder of subject folders (paired-nifti)")
    parser.add_argument("--source", required=True, help="the source contrast's file name, e.g. T1")
    parser.add_argument("--target", required=True, help="the target contrast's file name, e.g. T2")
    parser.add_argument("--out", type=Path, required=True, help="the run folder (created; re-use it to resume)")
    parser.add_argument("--mask", help="the mask's file name in each subject folder (default: found if present)")
    parser.add_argument("--dataset", default="paired-nifti", help="a dataset plugin (default: paired-nifti)")
    parser.add_argument("--option", action="append", default=[], type=arguments.key_value, metavar="KEY=VALUE",
                        help="a dataset option (repeatable), e.g. --option cache=false")
    parser.add_argument("--split", type=Path, help='a JSON file {"train": [...], "val": [...], "test": [...]} '
                                                   "(default: a seeded split from the plan)")
    parser.add_argument("--baseline", action="store_true", help="also train and score MONAI's 3D U-Net (needs monai)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--seed", type=arguments.training_seed, default=0,
                        help="the seed of the split and of training (default: 0)")
    parser.set_defaults(func=_fit)


def _predict(args: argparse.Namespace) -> int:
    from lift3d.cli.predict import run_predict

    return run_predict(args)


def add_predict_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "predict", help="synthesise the target contrast of new files with a fitted model",
        description="Synthesise with a model made by lift3d fit (RUN or RUN/model), sampled as the fit chose on "
                    "validation, or with any lift3d model folder. Each result is written on its source's own grid "
                    "and affine as OUT/<name>_synth.nii.gz (its std map, with K >= 2 samples, in OUT/std/).")
    parser.add_argument("--model", required=True, type=Path, help="the run folder of lift3d fit, or a model folder")
    parser.add_argument("--source", required=True, nargs="+", help="NIfTI files, or one folder of them; the "
                        "model's source contrast in subject folders (data/*/T1.nii.gz for a T1 model) gives outputs "
                        "named by subject (sub-01_synth.nii.gz), as lift3d-evaluate matches them")
    parser.add_argument("--out", required=True, type=Path, help="the output folder")
    parser.add_argument("--samples", type=arguments.integer_in(1, 64, "a sample count"),
                        help="K samples: their mean, and a std map (default: the fit's choice)")
    parser.add_argument("--seed", type=arguments.seed, default=0, help="the seed of the first sample (default: 0)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.set_defaults(func=_predict)
