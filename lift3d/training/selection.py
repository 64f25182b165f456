"""Which weights a run scores and exports: the live ones, their EMA (``optim.ema``), or those of the step best
on sampled validation (``run.validate_every``, ``lift3d.training.validation``), kept as the loop runs."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lift3d.lifting.checkpoint import CheckpointError
from lift3d.training.state import TRAINER_STATE, load_validation_state


class ValidationTracker:
    """Sampled validation during the loop (``lift3d.training.validation``): scores, and the best step kept."""

    def __init__(self, sampled, unet: nn.Module, params: list[nn.Parameter], ema, every: int) -> None:
        self.sampled, self.unet, self.params, self.ema, self.every = sampled, unet, params, ema, every
        self.names = [n for n, p in unet.named_parameters() if p.requires_grad]
        self.best = None
        self.first: dict[str, float] | None = None

    def score(self, step: int) -> dict[str, float]:
        from lift3d.training.validation import Best, better, snapshot

        with exported_weights(self.ema, self.params):
            scores = self.sampled.score(self.unet)
            if better(scores, self.best):
                self.best = Best(step, scores, snapshot(self.params, self.names))
        if step == 0:
            self.first = scores
        return scores

    def due(self, step: int, max_steps: int) -> bool:
        return step % self.every == 0 or step == max_steps

    def state(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        return self.best.weights, {"step": self.best.step, "scores": self.best.scores, "first": self.first}

    def restore(self, folder: Path) -> None:
        from lift3d.training.validation import SELECTION_METRIC, Best

        weights, info = load_validation_state(folder, dict(zip(self.names, self.params)))
        if info is None:
            raise CheckpointError(f"checkpoint {folder} holds no validation state, but this run has "
                                  f"run.validate_every = {self.every}; resume with the setting it was saved with")
        key = f"val_{SELECTION_METRIC}"
        if key not in info["scores"] or (info["first"] is not None and key not in info["first"]):
            raise CheckpointError(f"{folder / TRAINER_STATE}: its validation scores hold no {key}")
        self.best, self.first = Best(info["step"], info["scores"], weights), info["first"]


@contextlib.contextmanager
def exported_weights(ema, params: list[nn.Parameter], tracker: ValidationTracker | None = None):
    """Within: the weights that are scored and exported (EMA if on; the best validation step's if
    sampled validation ran). Afterwards the live training weights are back."""
    stored = [p.detach().clone() for p in params] if (ema is not None or tracker is not None) else None
    if ema is not None:
        ema.copy_to(params)
    if tracker is not None and tracker.best is not None:
        with torch.no_grad():
            for p, name in zip(params, tracker.names):
                p.copy_(tracker.best.weights[name].to(p.device, p.dtype))
    try:
        yield
    finally:
        if stored is not None:
            with torch.no_grad():
                for p, value in zip(params, stored):
                    p.copy_(value)
