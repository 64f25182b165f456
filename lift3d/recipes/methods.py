"""Methods a recipe compares, their predictions on a list of subjects, and their scores.

A ``Method`` is a model folder and how it is sampled (solver, steps, K samples, informed start), or
the 3D U-Net baseline (one pass). ``Predictor`` samples a method on subjects, caching each sample in
a file keyed by everything it depends on, so a re-run and a larger K reuse what was drawn.
``scored`` gives every metric lift3d has, per subject, against the target (and, where the dataset
provides one, against its clean target), with the tissue Dice of a segmenter and, for K >= 2, how well
the std map predicts the error.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from lift3d.evaluation.metrics import METRICS, PLANE_METRICS, UNCERTAINTY_METRICS, summarize, uncertainty_scores
from lift3d.evaluation.planes import score_pair_all
from lift3d.io.writing import atomic_path, make_folder, write_text_atomic


def solver_revision(solver: str | None) -> dict[str, int]:
    """``{"solver_revision": n}`` for a solver revised since its first version (a key's part), else nothing."""
    from lift3d.sampling.solvers import SOLVERS

    revision = SOLVERS.get(solver).revision if solver else 0
    return {"solver_revision": revision} if revision else {}


@dataclass(frozen=True)
class Method:
    """One way to predict the target: ``folder`` a lift3d model folder (None: the baseline network)."""

    name: str
    folder: Path | None
    run_id: str = ""  # the training phase's id: a retrained model never reuses old samples
    solver: str = ""
    steps: int = 0
    samples: int = 1
    start: str = "noise"
    strength: float | None = None
    antithetic: bool = False  # the K samples drawn in antithetic pairs (``lift3d.sampling.noise.sample_noise``)

    @property
    def evaluations(self) -> int:
        """Network passes per volume: the solver's steps (plus one for an informed start) times K."""
        from lift3d.sampling.synthesis import evaluations_of

        return 1 if self.folder is None else evaluations_of(self.steps, self.samples, self.start, self.strength)

    @property
    def description(self) -> str:
        if self.folder is None:
            return "one pass"
        text = f"{self.solver}-{self.steps}"
        if self.start != "noise":
            text += f" from the {self.start} at strength {self.strength:g}"
        return text + (f", mean of {self.samples}" + " antithetic" * self.antithetic if self.samples > 1 else "")


@dataclass
class Prediction:
    mean: torch.Tensor  # (b, 1, n, h, w): the mean of the method's K samples
    std: torch.Tensor | None  # (b, 1, n, h, w), their per-voxel std; None for one sample
    seconds_per_volume: float  # sampling time of all K samples, model loading excluded


class Predictor:
    """Samples of methods on subjects, one cached file per (model run, solver, sample k, subjects)."""

    def __init__(self, seed: int, device: torch.device, cache: Path, baseline: nn.Module | None = None) -> None:
        self.seed, self.device, self.cache, self.baseline = seed, device, Path(cache), baseline
        self._models: dict[Path, Any] = {}

    def _key(self, method: Method, k: int, pairs: Sequence[Any]) -> dict[str, Any]:
        return {"model": str(method.folder), "run_id": method.run_id, "solver": method.solver, "steps": method.steps,
                "start": method.start, "strength": method.strength, "seed": self.seed, "sample": k,
                "subjects": [p.subject for p in pairs]} | solver_revision(method.solver) | (
                    {"antithetic": True} if method.antithetic and k % 2 else {})  # an even sample is independent

    def draw(self, method: Method, k: int, sources: torch.Tensor) -> torch.Tensor:
        from lift3d.sampling.synthesis import load_synthesis_model, synthesize

        if method.folder is None:
            with torch.no_grad():
                return torch.cat([self.baseline(s[None].to(self.device)).clamp(-1, 1).cpu() for s in sources])
        if method.folder not in self._models:
            self._models[method.folder] = load_synthesis_model(method.folder, device=self.device)
        # All subjects in one batch: every method sees the same initial noise for the same subject.
        return synthesize(self._models[method.folder], sources, solver=method.solver, steps=method.steps,
                          seed=self.seed, first_sample=k, antithetic=method.antithetic, start=method.start,
                          strength=method.strength, progress=False).cpu()

    def sample(self, method: Method, k: int, pairs: Sequence[Any]) -> tuple[torch.Tensor, float]:
        from safetensors.torch import load_file, save_file

        key = self._key(method, k, pairs)
        name = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        tensors, meta = self.cache / f"{name}.safetensors", self.cache / f"{name}.json"
        if tensors.is_file() and meta.is_file() and not (tensors.is_symlink() or meta.is_symlink()):
            return load_file(str(tensors))["prediction"], float(json.loads(meta.read_text())["seconds_per_volume"])
        sources = torch.stack([p.source for p in pairs])
        tic = time.perf_counter()
        prediction = self.draw(method, k, sources)
        seconds = (time.perf_counter() - tic) / len(pairs)
        make_folder(self.cache)
        with atomic_path(tensors, ".safetensors") as tmp:
            save_file({"prediction": prediction.contiguous()}, str(tmp))
        write_text_atomic(meta, json.dumps({"key": key, "seconds_per_volume": seconds}, indent=1))
        return prediction, seconds

    def __call__(self, method: Method, pairs: Sequence[Any]) -> Prediction:
        draws = [self.sample(method, k, pairs) for k in range(method.samples)]
        stack = torch.stack([prediction for prediction, _ in draws])
        std = stack.std(dim=0) if len(draws) > 1 else None
        return Prediction(stack.mean(dim=0), std, sum(seconds for _, seconds in draws))


def score_subjects(prediction: Prediction, pairs: Sequence[Any], reference: str = "target",
                   segmenter=None) -> list[dict[str, Any]]:
    """Per-subject scores against ``reference`` (``"target"`` or a reference the dataset keeps in ``extra``, such
    as ``"clean_target"``): every volume, per-plane and through-plane metric inside the mask; with a
    ``segmenter`` the tissue Dice; with K >= 2 samples the std map's agreement with the error."""
    from lift3d.evaluation.segmentation import tissue_dice

    rows = []
    for i, pair in enumerate(pairs):
        row = score_pair_all(prediction.mean[i, 0].numpy(), pair, reference)
        truth = pair.target if reference == "target" else pair.extra[reference]
        if segmenter is not None:
            row |= tissue_dice(segmenter, prediction.mean[i, 0], truth[0], labels=pair.extra.get("tissue"),
                               mask=pair.extra.get("mask"))
        if prediction.std is not None:
            mask = pair.extra.get("mask")
            row |= uncertainty_scores(prediction.std[i, 0].numpy(), prediction.mean[i, 0].numpy(), truth[0].numpy(),
                                      None if mask is None else mask[0].numpy())
        rows.append(row)
    return rows


def scored(method: Method, prediction: Prediction, pairs: Sequence[Any], segmenter=None) -> dict[str, Any]:
    """Everything a results table shows of ``method`` on ``pairs``: per-subject rows and their summary,
    cost, and the same against the clean target when every pair carries one."""
    rows = score_subjects(prediction, pairs, segmenter=segmenter)
    known = (*METRICS, *PLANE_METRICS, *UNCERTAINTY_METRICS)
    for row in rows:  # a tissue absent from both segmentations has no Dice: a score that could not be taken
        row.update({k: None for k, v in row.items() if k.startswith("dice_") and v != v})
    names = [k for k in rows[0] if k in known or k.startswith("dice_")] if rows else None  # tissue Dice too
    entry: dict[str, Any] = {"method": method.name, "solver": method.description, "samples": method.samples,
                             "unet_evaluations": method.evaluations, "model": str(method.folder or "baseline"),
                             "seconds_per_volume": prediction.seconds_per_volume, "subjects": rows,
                             "summary": summarize(rows, names)}
    if method.antithetic:
        entry["antithetic"] = True
    if prediction.std is not None:
        entry["uncertainty"] = uncertainty_summary(rows)
    if pairs and all("clean_target" in p.extra for p in pairs):
        clean = score_subjects(prediction, pairs, "clean_target")
        entry["clean_target"] = {"subjects": clean, "summary": summarize(clean)}
    return entry


def uncertainty_summary(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How well a K-sample std map predicts the error: per subject, the voxel-wise Spearman correlation of std
    with |error| inside the mask (its minimum, and on how many subjects it is positive), and across subjects
    Spearman's correlation of the mean std with the MAE."""
    from scipy.stats import spearmanr

    voxel = [float(r["std_error_spearman"]) for r in rows]
    across = None
    if len(rows) >= 3:
        std, mae = [float(r["std_mean"]) for r in rows], [float(r["mae"]) for r in rows]
        across = None if len(set(std)) < 2 or len(set(mae)) < 2 else float(spearmanr(std, mae).statistic)
    return {"std_error_spearman_min": min(voxel), "std_error_spearman_positive": sum(v > 0 for v in voxel),
            "subjects": len(rows), "subject_std_mae_spearman": across}

