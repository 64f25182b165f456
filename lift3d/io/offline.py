"""Nothing lift3d does reaches a model hub: the offline switches of huggingface_hub and diffusers.

lift3d builds every model from a validated local dict, so no string ever reaches a hub lookup; these
switches are the second wall, set before diffusers is imported and re-applied where it already was.
"""

from __future__ import annotations

import os
import sys

SWITCHES = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DIFFUSERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "DISABLE_TELEMETRY": "1"}


def go_offline() -> None:
    """Set the offline switches in this process (and its children), also in already imported modules."""
    os.environ.update(SWITCHES)
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
        if hasattr(constants, "HF_HUB_DISABLE_TELEMETRY"):
            constants.HF_HUB_DISABLE_TELEMETRY = True
    hub_utils = sys.modules.get("diffusers.utils.constants")
    if hub_utils is not None and hasattr(hub_utils, "HF_HUB_OFFLINE"):
        hub_utils.HF_HUB_OFFLINE = True
