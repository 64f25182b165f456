"""Checkpoints in safetensors only: the volumetric layers alone, or the whole lifted model.

A lifted-model folder is a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)
when the model is a diffusers model, plus ``lift3d.json`` with the settings that re-lift a fresh
2D model identically. Nothing is pickled and nothing is read with ``torch.load``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from safetensors.torch import save as _safetensors_bytes
from torch import nn

import lift3d
from lift3d.inflate import inflate, is_lifted, lift_settings, volumetric_state_dict

SETTINGS_FILE = "lift3d.json"
GENERIC_WEIGHTS = "model.safetensors"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the model."""


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file``, but byte-for-byte reproducible, written atomically.

    safetensors keeps ``__metadata__`` in a hash map, so its key order (and the file's sha256)
    changes from process to process. The header is rewritten here with the keys sorted; tensor
    offsets are relative to the end of the header, so only the header changes.
    """
    path = Path(path)
    raw = _safetensors_bytes({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + length])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)  # keep the data 8-byte aligned, as safetensors does
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length:])
    os.replace(tmp, path)
    return path


def read_safetensors(path: str | os.PathLike, what: str = "checkpoint file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; a missing or corrupt one is a :class:`CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({exc})") from None


def _metadata(model: nn.Module) -> dict[str, str]:
    settings = lift_settings(model)
    return {"format": "lift3d", "lift3d_version": lift3d.__version__,
            **{k: json.dumps(v) for k, v in settings.items()}}


def _check_keys(expected: set[str], found: set[str], what: str) -> None:
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if missing or unexpected:
        def show(keys: list[str]) -> str:
            return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "") if keys else "none"
        raise CheckpointError(f"{what} does not match the model: missing keys: {show(missing)}; "
                              f"unexpected keys: {show(unexpected)}")


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, torch.Tensor], what: str) -> None:
    """Strict load whose error names the missing and unexpected keys and any shape mismatch."""
    _check_keys(set(model.state_dict()), set(state_dict), what)
    own = model.state_dict()
    bad = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}" for k, v in state_dict.items()
           if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        raise CheckpointError(f"{what} has tensors of the wrong shape: " + "; ".join(bad[:5]))
    model.load_state_dict(state_dict, strict=True)


def save_volumetric(model: nn.Module, path: str | os.PathLike, *, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write only the volumetric layers (an adapter), with the settings as safetensors metadata.

    ``state_dict`` overrides the weights written (e.g. EMA weights), keys as in the model.
    """
    path = Path(path)
    weights = volumetric_state_dict(model) if state_dict is None else {
        k: v for k, v in state_dict.items() if lift3d.is_volumetric_parameter(k)}
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_safetensors(weights, path, _metadata(model))


def inflate_arguments(lift: dict[str, Any]) -> dict[str, Any]:
    """:func:`lift3d.inflate` keywords from saved lift settings; settings written before layer kinds
    existed (no ``kind``, a top-level ``groups``) are the full layer."""
    options = lift.get("options", {"groups": lift.get("groups", 1)})
    return {"kind": lift.get("kind", "full"), "kernel_size": lift["kernel_size"], "where": lift["where"],
            "padding_mode": lift["padding_mode"], **options}


def load_volumetric(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load volumetric layers saved by :func:`save_volumetric` into a lifted model. Returns the metadata."""
    weights, metadata = read_safetensors(Path(path))
    if metadata.get("format") != "lift3d":
        raise CheckpointError(f"{path} has no lift3d metadata; it was not written by lift3d.save_volumetric")
    saved_kind, own_kind = json.loads(metadata.get("kind", '"full"')), lift_settings(model)["kind"]
    if saved_kind != own_kind:
        raise CheckpointError(f"volumetric checkpoint {path} holds layers of kind {saved_kind!r}, but the model's "
                              f"are {own_kind!r}; lift it with lift3d.inflate(model, kind={saved_kind!r})")
    own = volumetric_state_dict(model)
    _check_keys(set(own), set(weights), f"volumetric checkpoint {path}")
    full = {**model.state_dict(), **weights}
    load_state_dict_checked(model, full, f"volumetric checkpoint {path}")
    return {k: json.loads(v) if k not in ("format", "lift3d_version") else v for k, v in metadata.items()}


def _is_diffusers(model: nn.Module) -> bool:
    return hasattr(model, "save_pretrained") and hasattr(type(model), "from_config")


def save_diffusers_folder(model: nn.Module, folder: str | os.PathLike,
                          state_dict: dict[str, torch.Tensor] | None = None,
                          metadata: dict[str, str] | None = None) -> Path:
    """``save_pretrained(safe_serialization=True)``, but with ``state_dict`` as the weights.

    diffusers' ``save_pretrained`` always writes the live weights (it ignores a ``state_dict``
    argument), so EMA weights are written over its safetensors file here.
    """
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    save_safetensors(state_dict or model.state_dict(), folder / DIFFUSERS_WEIGHTS, metadata or {"format": "pt"})
    return folder


def save_lifted(model: nn.Module, folder: str | os.PathLike, *, state_dict: dict[str, torch.Tensor] | None = None,
                extra: dict[str, Any] | None = None) -> Path:
    """Write the whole lifted model to ``folder`` atomically (a temp folder, then a rename).

    diffusers models are written with ``save_pretrained(safe_serialization=True)``; other modules as
    ``model.safetensors``. ``lift3d.json`` records the class, the lift settings and ``extra``.
    """
    if not is_lifted(model):
        raise ValueError(f"{type(model).__name__} is not lifted; save a 2D model with its own tools")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        if _is_diffusers(model):
            save_diffusers_folder(model, tmp, state_dict, _metadata(model))
            weights_file = DIFFUSERS_WEIGHTS
        else:
            save_safetensors(state_dict or model.state_dict(), tmp / GENERIC_WEIGHTS, _metadata(model))
            weights_file = GENERIC_WEIGHTS
        settings = {"lift3d_version": lift3d.__version__,
                    "class": f"{type(model).__module__}.{type(model).__qualname__}",
                    "diffusers_class": type(model).__name__ if _is_diffusers(model) else None,
                    "weights": weights_file, "lift": lift_settings(model), **(extra or {})}
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=2))
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_settings(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``lift3d.json`` of a lifted-model folder, with a clear error when it is not one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    path = folder / SETTINGS_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {SETTINGS_FILE}: it is not a lifted lift3d model folder "
                              "(for a plain 2D diffusers folder, load it with diffusers and call lift3d.inflate)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc})") from None


def load_lifted(folder: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a lifted model from ``folder``.

    For diffusers models the 2D model is rebuilt from ``config.json``; for any other module pass
    the freshly built 2D ``model`` and it is lifted with the saved settings and loaded. The model
    comes back in eval mode, as from ``from_pretrained``.
    """
    folder = Path(folder)
    settings = read_settings(folder)
    if model is None:
        name = settings.get("diffusers_class")
        if not name:
            raise CheckpointError(f"{folder} holds a {settings.get('class')}; pass the 2D model to load_lifted(folder, model)")
        import diffusers

        cls = getattr(diffusers, name, None)
        if cls is None:
            raise CheckpointError(f"{folder} names diffusers class {name!r}, which this diffusers lacks")
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise CheckpointError(f"{folder} has no config.json for its {name}")
        model = cls.from_config(json.loads(config_path.read_text()))
    inflate(model, **inflate_arguments(settings["lift"]))
    weights, _ = read_safetensors(folder / settings.get("weights", GENERIC_WEIGHTS))
    load_state_dict_checked(model, weights, f"model weights in {folder}")
    return model.eval()  # as diffusers' from_pretrained does
