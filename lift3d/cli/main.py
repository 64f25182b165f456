"""The ``lift3d`` command: one entry point, one argparse subcommand per task.

A subcommand is a ``add_<name>_parser(subparsers)`` function that sets ``func`` on its parser;
``func(args)`` returns the exit status.
"""

from __future__ import annotations

import argparse
import importlib
import sys

import lift3d
from lift3d.cli import arguments
from lift3d.cli._common import UserError, run_cli
from lift3d.cli.fit import add_fit_parser, add_predict_parser
from lift3d.plugins import AUTOLOAD_ENV, PluginError, get_plugin_manager

# The modules that define a registry; each registers its built-ins when imported. Solvers and stages are
# imported only if present, so a tree without one of them still lists the rest.
REGISTRY_MODULES = (
    "lift3d.plugins.registries",
    "lift3d.layers.registry",
    "lift3d.diffusion.objectives",
    "lift3d.evaluation.segmentation",
    "lift3d.sampling.solvers",
    "lift3d.training.stages",
)


def import_registries() -> None:
    """Import every module that defines a registry, so the catalogue holds every kind."""
    for name in REGISTRY_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is None or not (name == exc.name or name.startswith(exc.name + ".")):
                raise  # a dependency is missing, not the registry's module


def _plugins(args: argparse.Namespace) -> int:
    import_registries()
    manager = get_plugin_manager()
    kinds = manager.kinds()
    if args.kind and args.kind not in kinds:
        raise PluginError(f"Unknown plugin kind {args.kind!r}; available: {', '.join(kinds)}")
    for i, kind in enumerate([args.kind] if args.kind else kinds):
        entries = list(manager.registry(kind).entries())
        if i:
            print()
        print(f"{kind}:")
        if not entries:
            print("  (none)")
            continue
        rows = [(e.name, e.package, e.plugin) for e in entries]
        widths = [max(len(row[col]) for row in rows) for col in range(2)]
        for name, package, module in rows:
            print(f"  {name:<{widths[0]}}  {package:<{widths[1]}}  {module}")
    return 0


def add_plugins_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "plugins",
        help="list every registered name of every kind: datasets, solvers, stages, layer kinds...",
        description=(
            "List every registered name by kind (built-in and from installed plugins): the name, the package "
            f"that provides it and the module that defines it. Set {AUTOLOAD_ENV}=1 to hide installed "
            "third-party plugins."
        ),
    )
    parser.add_argument("--kind", help="list only this kind (e.g. datasets, solvers, stages, layer_kinds)")
    parser.set_defaults(func=_plugins)


def _demo(args: argparse.Namespace) -> int:
    from lift3d.recipes.demo import run_demo

    run_demo(args.out, dataset=args.dataset, scale=args.scale, seed=args.seed, threads=args.threads)
    return 0


def add_demo_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on real brain MRI built into lift3d (CPU, minutes)",
        description=(
            "'lift3d fit' at a small scale: stage 1 (slice-wise diffusion) -> inflate -> stage 2 (volumetric "
            "fine-tuning) -> the few-step sampler chosen on validation subjects -> a distilled one- or two-pass "
            "student -> synthesis of held-out volumes, slice-wise, lifted and distilled -> evaluation. Data: by default the built-in 'icbm152' "
            "dataset, T1w -> T2w subjects made from the ICBM 152 2009c template that ships with lift3d (one real "
            "brain, a random deformation, bias field and noise per subject; 13 training, 3 validation and 6 test subjects); "
            "'--dataset phantom' uses the generated phantom instead. Nothing is downloaded. Writes the fit's run "
            "folder (plan.json, each phase, the chosen model in safetensors), the synthesised NIfTI, the subjects "
            "as a paired-nifti folder, metrics.json, a report and orthogonal-view PNGs with error maps into --out, "
            "then prints where each file is and the metrics. Run again into the same --out, it keeps what is done."
        ),
    )
    parser.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    parser.add_argument("--dataset", default="icbm152", choices=("icbm152", "phantom"),
                        help="'icbm152' (default: real anatomy from the packaged ICBM 152 template) or 'phantom' "
                             "(generated rings-and-ellipsoids head)")
    parser.add_argument("--scale", default="default", choices=("default", "quick"),
                        help="'default' (about 7 minutes on 2 idle CPU cores, more on a busy machine) or "
                             "'quick' (seconds, too short to learn anything; for a first look and for tests)")
    parser.add_argument("--seed", type=arguments.training_seed, default=0,
                        help="seed for training and sampling, and for the icbm152 subjects (default: 0)")
    parser.add_argument("--threads", type=arguments.threads, default="auto",
                        help="torch CPU threads, or 'auto' (default): torch's own choice, but 1 when the load average "
                             "is at or above the CPU count, since on a CPU shared with other jobs extra threads make "
                             "every step many times slower")
    parser.set_defaults(func=_demo)


def _check_kernel_size(kernel_size: int) -> None:
    """The range a lifted model's ``lift3d.json`` may hold, read from its schema: checked before anything is
    built or written, so no folder is left that its own reader refuses."""
    from lift3d.io.schemas import LiftSettings

    bounds = {name: getattr(m, name) for m in LiftSettings.model_fields["kernel_size"].metadata
              for name in ("ge", "le") if hasattr(m, name)}
    if not bounds["ge"] <= kernel_size <= bounds["le"] or kernel_size % 2 == 0:
        raise UserError(f"--kernel-size {kernel_size} is not usable; valid: an odd integer from {bounds['ge']} "
                        f"to {bounds['le']}")


def _inflate(args: argparse.Namespace) -> int:
    from lift3d.lifting.checkpoint import lift_export

    _check_kernel_size(args.kernel_size)
    settings = {"kernel_size": args.kernel_size, "where": args.where, **dict(args.option)}
    if args.kind:
        settings["kind"] = args.kind
    out = lift_export(args.stage1, args.out, seed=args.seed, **settings)
    report = lift3d.report(lift3d.load_lifted(out))
    print(f"lifted {args.stage1} -> {out}: {report.num_layers} volumetric layers, "
          f"+{report.volumetric_parameters:,} parameters")
    return 0


def add_inflate_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "inflate",
        help="lift a saved 2D model folder (a stage-1 export) into a lifted model folder",
        description=(
            "Insert identity-initialised volumetric layers into the 2D U-Net of STAGE1 (a lift3d stage-1 export or "
            "a diffusers 2D U-Net folder) and write the lifted model to OUT, with STAGE1's other files (training "
            "settings, noise schedule, autoencoder). OUT is then what stage 2 fine-tunes (--model.pretrained OUT) "
            "and what lift3d-synthesize loads; until trained, it synthesises exactly what STAGE1 does."
        ),
    )
    parser.add_argument("stage1", metavar="STAGE1", help="the 2D model folder to lift")
    parser.add_argument("out", metavar="OUT", help="the new lifted model folder (must not exist)")
    parser.add_argument("--kind", default="", help="layer kind (`lift3d plugins --kind layer_kinds` lists them); "
                        "default: lift3d.inflate's default")
    # any whole number parses (its range is checked with the lifted model's schema); anything else names the range
    parser.add_argument("--kernel-size", type=arguments.integer_in(-2**31, 2**31, "an odd integer from 1 to 1023"),
                        default=3, help="odd kernel size along the slices (default: 3)")
    parser.add_argument("--where", default="auto", help="placement preset (default: auto)")
    parser.add_argument("--option", type=arguments.key_value, action="append", default=[], metavar="KEY=VALUE",
                        help="an option of the layer kind, e.g. --option rank=16 (repeatable)")
    parser.add_argument("--seed", type=arguments.seed, default=0, help="seed of a kind's random parts (default: 0)")
    parser.set_defaults(func=_inflate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lift3d",
        description="Lift a pretrained 2D diffusion U-Net into a volume-aware 3D model (Make-A-Volume).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {lift3d.__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="<command>")
    add_plugins_parser(subparsers)
    add_demo_parser(subparsers)
    add_fit_parser(subparsers)
    add_predict_parser(subparsers)
    add_inflate_parser(subparsers)
    return parser


@run_cli
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
