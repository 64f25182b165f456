"""``python -m lift3d.finetune`` / ``accelerate launch -m lift3d.finetune``: same as ``lift3d-finetune``."""

import sys

from lift3d.cli.finetune import main

if __name__ == "__main__":
    sys.exit(main())
