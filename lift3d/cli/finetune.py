"""``lift3d-finetune``: train one stage (``--run.stage``: stage 1 ``slices``, stage 2 ``volumes`` by default, or
any registered stage, ``lift3d.training.stages``) from a TOML config.

Multi-process and mixed precision come from Accelerate:
``accelerate launch -m lift3d.finetune --config stage2.toml`` (or the console script alone).
"""

from __future__ import annotations

import argparse
import logging
import sys

from lift3d.cli._common import run_cli

DESCRIPTION = """\
Fine-tune a 2D diffusion U-Net into a volume-aware one (Make-A-Volume).

Stage 1 (--run.stage slices) trains a slice-wise latent diffusion U-Net: the source latent is
concatenated to the noisy target latent, with a timestep per slice. Stage 2 (--run.stage volumes,
the default) takes a stage-1 output or any local diffusers 2D U-Net folder (--model.pretrained),
inserts identity-initialised volumetric layers with lift3d.lifting.inflate, and fine-tunes on whole volumes
with one timestep per volume (make-a-volume: weight 2T - t). --run.stage segmenter trains the tissue
segmenter that lift3d-evaluate --segmenter scores synthesis with, on the real targets and their tissue maps;
--run.stage autoencoder the KL autoencoder of the latent stages. Each stage reads its own section and the
shared ones it needs, and refuses an option it ignores (`lift3d plugins --kind stages` lists the stages).

Options come from defaults, then the --config TOML file, then --section.field flags. The result
is written to <run.output_dir>/model (safetensors), with training-state checkpoints beside it
(safetensors and JSON only: resuming refuses a checkpoint folder holding any other file).
"""

EPILOG = """\
examples:
  lift3d-finetune --config examples/configs/phantom-stage1.toml
  lift3d-finetune --config examples/configs/phantom-stage2.toml --model.pretrained runs/stage1/model
  accelerate launch -m lift3d.finetune --config examples/configs/phantom-stage2.toml --optim.mixed_precision bf16
  accelerate launch "$(which lift3d-finetune)" --config stage2.toml   (not: accelerate launch lift3d-finetune)
  lift3d-finetune --config stage2.toml --run.resume latest
  lift3d-finetune --run.stage segmenter --data.dataset icbm152 --run.max_steps 600 --data.batch_size 16
"""


def build_parser() -> argparse.ArgumentParser:
    from lift3d.training.config import add_arguments

    parser = argparse.ArgumentParser(prog="lift3d-finetune", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


@run_cli
def main(argv: list[str] | None = None) -> int:
    from lift3d.cli._common import UserError
    from lift3d.training.config import from_args
    from lift3d.training.loop import NonFiniteLossError, train

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    try:
        train(from_args(args))
    except NonFiniteLossError as exc:
        raise UserError(str(exc)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
