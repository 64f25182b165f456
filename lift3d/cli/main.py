"""The ``lift3d`` command: one entry point, one argparse subcommand per task.

A subcommand is a ``add_<name>_parser(subparsers)`` function that sets ``func`` on its parser;
``func(args)`` returns the exit status.
"""

from __future__ import annotations

import argparse
import json
import sys

import lift3d
from lift3d.cli._common import run_cli
from lift3d.plugins import AUTOLOAD_ENV, KINDS, get_plugin_manager

# Layer kinds have their own registry (lift3d.layers.registry), filled through the same plugin manager.
LISTED_KINDS = (*KINDS, "layer_kinds")


def _registry(kind: str):
    manager = get_plugin_manager()
    if kind == "layer_kinds":
        from lift3d.layers.registry import build_registry

        return build_registry(manager.pm)
    return manager.registry(kind)


def _plugins(args: argparse.Namespace) -> int:
    kinds = [args.kind] if args.kind else list(LISTED_KINDS)
    for i, kind in enumerate(kinds):
        entries = list(_registry(kind).entries())
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
        help="list registered datasets, autoencoders, timestep samplers, objectives, segmenters and layer kinds",
        description=(
            "List every registered plugin by kind: its name, the package that provides it and the "
            f"module that defines it. Set {AUTOLOAD_ENV}=1 to hide installed third-party plugins."
        ),
    )
    parser.add_argument("--kind", choices=LISTED_KINDS, help="list only this kind of plugin")
    parser.set_defaults(func=_plugins)


def _demo(args: argparse.Namespace) -> int:
    from lift3d.recipes.demo import run_demo

    run_demo(args.out, dataset=args.dataset, scale=args.scale, seed=args.seed, threads=args.threads)
    return 0


def _threads(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}; valid: 'auto' or a positive integer")
    return value


def add_demo_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole pipeline on real brain MRI built into lift3d (CPU, minutes)",
        description=(
            "Stage 1 (slice-wise diffusion) -> inflate -> stage 2 (volumetric fine-tuning) -> synthesis of "
            "held-out volumes, slice-wise and lifted -> evaluation. Data: by default the built-in 'icbm152' "
            "dataset, T1w -> T2w subjects made from the ICBM 152 2009c template that ships with lift3d (one real "
            "brain, a random deformation, bias field and noise per subject; 13 training and 6 held-out subjects); "
            "'--dataset phantom' uses the generated phantom instead. Nothing is downloaded. Writes the lifted "
            "model (safetensors), the synthesised NIfTI, metrics.json and orthogonal-view PNGs with error maps "
            "into --out, then prints where each file is and the slice-wise vs lifted metrics."
        ),
    )
    parser.add_argument("--out", default="demo-out", help="output folder (default: demo-out)")
    parser.add_argument("--dataset", default="icbm152", choices=("icbm152", "phantom"),
                        help="'icbm152' (default: real anatomy from the packaged ICBM 152 template) or 'phantom' "
                             "(generated rings-and-ellipsoids head)")
    parser.add_argument("--scale", default="default", choices=("default", "quick"),
                        help="'default' (about 5 minutes on 2 idle CPU cores, up to 10 on a busy machine) or "
                             "'quick' (seconds, too short to learn anything; for a first look and for tests)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed for training and sampling, and for the icbm152 subjects (default: 0)")
    parser.add_argument("--threads", type=_threads, default="auto",
                        help="torch CPU threads, or 'auto' (default): torch's own choice, but 1 when the load average "
                             "is at or above the CPU count, since on a CPU shared with other jobs extra threads make "
                             "every step many times slower")
    parser.set_defaults(func=_demo)


def _option(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"invalid option {text!r}; give KEY=VALUE, e.g. rank=16")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _inflate(args: argparse.Namespace) -> int:
    from lift3d.lifting.checkpoint import lift_export

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
    parser.add_argument("--kind", default="", help="layer kind (see `lift3d plugins --kind layer_kinds`); "
                        "default: lift3d.inflate's default")
    parser.add_argument("--kernel-size", type=int, default=3, help="odd kernel size along the slices (default: 3)")
    parser.add_argument("--where", default="auto", help="placement preset (default: auto)")
    parser.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                        help="an option of the layer kind, e.g. --option rank=16 (repeatable)")
    parser.add_argument("--seed", type=int, default=0, help="seed of a kind's random parts (default: 0)")
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
