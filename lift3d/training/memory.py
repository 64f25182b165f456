"""The memory check before training allocates anything: the stage measures the model it would build, on
torch's meta device (``lift3d.training.stages.Stage.memory``), and its weights, gradients and AdamW
moments (and EMA) are checked against the memory budget (``lift3d.io.budget``)."""

from __future__ import annotations

from lift3d.training.config import TrainConfig
from lift3d.training.sizing import check_training_bytes
from lift3d.training.stages import get_stage


def model_memory(cfg: TrainConfig) -> tuple[int, int, str] | None:
    """``(weight bytes, trained weight bytes, description)`` of the model ``cfg``'s stage builds, measured without
    allocating it; None when it is read from a folder (``model.pretrained``) and measured there."""
    return get_stage(cfg.run.stage).memory(cfg)


def check_memory(cfg: TrainConfig) -> None:
    """Refuse a config whose noise schedule or model (weights, gradients and AdamW moments) would not fit in
    the memory budget (``lift3d.io.budget``), with one line giving the size and the limit."""
    measured = model_memory(cfg)
    if measured is not None:
        weights, trained, what = measured
        ema = cfg.optim.ema
        check_training_bytes(weights, trained, f"{what}: its weights, gradients and AdamW moments"
                             + (" and EMA" if ema else ""), ema)
