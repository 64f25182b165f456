"""Checkpoints in safetensors only: the volumetric layers alone, or the whole lifted model.

A lifted-model folder is a diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``)
when the model is a diffusers model, plus ``lift3d.json`` with the settings that re-lift a fresh
2D model identically. Nothing is pickled and nothing is read with ``torch.load``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from safetensors.torch import save as _safetensors_bytes
from torch import nn

import lift3d
from lift3d.lifting.inflate import inflate, is_lifted, lift_settings, volumetric_state_dict
from lift3d.io.budget import check_bytes
from lift3d.io.errors import Lift3dError
from lift3d.io.paths import check_contained, inside  # noqa: F401 (inside: re-exported)
from lift3d.io.schemas import MODEL_CLASSES, LiftedModelSettings, LiftSettings, ModelConfig, read_json, validate
from lift3d.io.writing import atomic_path, clean_stale_temporaries, temporary_path

SETTINGS_FILE = "lift3d.json"
MODEL_CONFIG = "config.json"
GENERIC_WEIGHTS = "model.safetensors"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"


class CheckpointError(Lift3dError):
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
    with atomic_path(path) as tmp:
        tmp.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length:])
    return path


def read_safetensors(path: str | os.PathLike, what: str = "checkpoint file", *,
                     folder: str | os.PathLike | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file; a missing, corrupt or oversized one is a ``CheckpointError``.

    ``folder``, when given, is the folder the file must stay in (a symlink out of it is refused).
    """
    path = Path(path)
    if folder is not None:
        check_contained(folder, path, what)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    check_bytes(path.stat().st_size, f"{path}: its tensors", copies=2)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError) as exc:
        raise CheckpointError(f"{path} is not a readable safetensors file ({str(exc)[:160]})") from None


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
    # A tensor is loaded as the dtype it was saved in; a header edited to another dtype (I32 for F32)
    # would otherwise be cast silently and give wrong results.
    bad = [f"{k}: file {v.dtype} vs model {own[k].dtype}" for k, v in state_dict.items()
           if v.dtype != own[k].dtype and not (v.is_floating_point() and own[k].is_floating_point())]
    if bad:
        raise CheckpointError(f"{what} has tensors of the wrong dtype: " + "; ".join(bad[:5]))
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
    """``lift3d.lifting.inflate`` keywords from saved lift settings; settings written before layer kinds
    existed (no ``kind``, a top-level ``groups``) are the full layer, and ``low-rank`` settings written before
    the rank floor (neither ``rank`` nor ``rank_min``) have the plain C/8 rank."""
    options = lift.get("options", {"groups": lift.get("groups", 1)})
    if lift.get("kind") == "low-rank" and not {"rank", "rank_min"} & set(options or {}):
        options = {**(options or {}), "rank_min": 1}  # written before the rank floor: plain C/8
    return {"kind": lift.get("kind", "full"), "kernel_size": lift["kernel_size"], "where": lift["where"],
            "padding_mode": lift["padding_mode"], **options}


def _volumetric_metadata(metadata: dict[str, str], path: str | os.PathLike) -> dict[str, Any]:
    """The lift settings ``save_volumetric`` wrote as JSON strings, each read back, or one line naming the key."""
    settings: dict[str, Any] = {}
    for key, value in metadata.items():
        if key in ("format", "lift3d_version"):
            settings[key] = value
            continue
        try:
            settings[key] = json.loads(value)
        except (ValueError, RecursionError):
            raise CheckpointError(f"{path}: its metadata key {key!r} is not JSON ({value[:40]!r}); lift3d writes each "
                                  "lift setting as JSON (save_volumetric)") from None
    return settings


def load_volumetric(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load volumetric layers saved by ``save_volumetric`` into a lifted model. Returns the metadata."""
    weights, metadata = read_safetensors(Path(path))
    if metadata.get("format") != "lift3d":
        raise CheckpointError(f"{path} has no lift3d metadata; it was not written by lift3d.save_volumetric")
    settings = _volumetric_metadata(metadata, path)
    saved_kind, own_kind = settings.get("kind", "full"), lift_settings(model)["kind"]
    if saved_kind != own_kind:
        raise CheckpointError(f"volumetric checkpoint {path} holds layers of kind {saved_kind!r}, but the model's "
                              f"are {own_kind!r}; lift it with lift3d.inflate(model, kind={saved_kind!r})")
    own = volumetric_state_dict(model)
    _check_keys(set(own), set(weights), f"volumetric checkpoint {path}")
    full = {**model.state_dict(), **weights}
    load_state_dict_checked(model, full, f"volumetric checkpoint {path}")
    return settings


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
    # Refuse what the reader would refuse (a kernel_size of 1025...) before a byte is written.
    validate(lift_settings(model), LiftSettings, folder / SETTINGS_FILE, "lift settings")
    folder.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(folder.parent)
    tmp = temporary_path(folder)
    tmp.mkdir()
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
            old = temporary_path(folder)
            os.replace(folder, old)
            os.replace(tmp, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def model_folder(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder}" if not folder.exists()
                              else f"{folder} is not a folder")
    return folder


def read_settings(folder: str | os.PathLike) -> dict[str, Any]:
    """The checked ``lift3d.json`` of a lifted-model folder, with a clear error when it is not one."""
    folder = model_folder(folder)
    path = folder / SETTINGS_FILE
    if not path.is_file():
        raise CheckpointError(f"{folder} has no {SETTINGS_FILE}: it is not a lifted lift3d model folder "
                              "(for a plain 2D diffusers folder, load it with diffusers and call lift3d.lifting.inflate)")
    return read_json(path, LiftedModelSettings, folder=folder, what=SETTINGS_FILE).model_dump(
        by_alias=True, exclude_unset=True)


def build_diffusers_model(config_path: Path, folder: Path, allowed: tuple[str, ...] = MODEL_CLASSES) -> nn.Module:
    """A diffusers model built from a checked, local ``config.json``, never from a string (which diffusers
    would take for a hub id or another folder). Its size is counted on the meta device first and
    checked against the memory budget before any weight is allocated."""
    config = read_json(config_path, ModelConfig, folder=folder, what=MODEL_CONFIG)
    name = config.checked_class(allowed, config_path)
    import diffusers

    cls = getattr(diffusers, name)
    values = config.model_dump(by_alias=True, exclude_unset=True)
    try:
        with torch.device("meta"):
            sizing = cls.from_config(values)
        check_bytes(sum(p.numel() * p.element_size() for p in sizing.parameters()),
                    f"{config_path}: the {name}'s weights", copies=2)
        del sizing
        return cls.from_config(values)
    except Lift3dError:
        raise
    except Exception as exc:  # diffusers' own check of a bad block type, group count or shape
        raise _unbuildable(exc, values, config_path, name) from None


def _unbuildable(exc: Exception, values: dict[str, Any], config_path: Path, name: str) -> CheckpointError:
    """diffusers' refusal of a config, told as lift3d tells it: the key whose value diffusers named (a block
    type, an activation), else what kind of value to look at, with diffusers' words quoted at the end."""
    said = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    named = [key for key, value in values.items() if not key.startswith("_") and any(
        isinstance(item, str) and len(item) >= 3 and item in said for item in (value if isinstance(value, list) else [value]))]
    what = (f"{named[0]} holds a value diffusers does not build a {name} from" if named else
            f"diffusers cannot build a {name} from it; a block type, activation or embedding name in it is not one "
            "diffusers knows")
    return CheckpointError(f"{config_path}: {what} (diffusers: {said})")


def load_unet2d(folder: str | os.PathLike) -> nn.Module:
    """A 2D diffusers U-Net from a local folder (config.json + safetensors); never from a hub."""
    folder = model_folder(folder)
    if not (folder / MODEL_CONFIG).exists():
        raise CheckpointError(f"{folder} is not a diffusers model folder: {MODEL_CONFIG} is missing")
    weights = folder / DIFFUSERS_WEIGHTS
    if not weights.exists():
        raise CheckpointError(f"{folder} has no {DIFFUSERS_WEIGHTS} (lift3d reads safetensors only)")
    model = build_diffusers_model(folder / MODEL_CONFIG, folder)
    load_state_dict_checked(model, read_safetensors(weights, folder=folder)[0],
                            f"{weights} (for the model {MODEL_CONFIG} describes)")
    return model


def load_lifted(folder: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """Rebuild a lifted model from ``folder``.

    For diffusers models the 2D model is rebuilt from ``config.json``; for any other module pass
    the freshly built 2D ``model`` and it is lifted with the saved settings and loaded. The model
    comes back in eval mode, as from ``from_pretrained``.
    """
    folder = model_folder(folder)
    settings = read_settings(folder)
    if model is None:
        if not settings.get("diffusers_class"):
            raise CheckpointError(f"{folder} holds a {settings.get('class')}; pass the 2D model to load_lifted(folder, model)")
        if not (folder / MODEL_CONFIG).exists():
            raise CheckpointError(f"{folder} has no {MODEL_CONFIG} for its {settings['diffusers_class']}")
        model = build_diffusers_model(folder / MODEL_CONFIG, folder, (settings["diffusers_class"],))
    try:  # inflate sizes the layers on the meta device before it allocates them
        inflate(model, **inflate_arguments(settings["lift"]))
    except (ValueError, TypeError) as exc:
        error = type(exc) if isinstance(exc, Lift3dError) else CheckpointError
        raise error(f"{folder / SETTINGS_FILE}: its lift settings do not apply to this model: {exc}") from None
    weights_path = inside(folder, settings.get("weights", GENERIC_WEIGHTS), f"{folder / SETTINGS_FILE}'s weights")
    weights, _ = read_safetensors(weights_path, "model weights", folder=folder)
    load_state_dict_checked(model, weights, f"{weights_path} (for the model {SETTINGS_FILE} describes)")
    return model.eval()  # as diffusers' from_pretrained does


def lift_export(stage1: str | os.PathLike, out: str | os.PathLike, *, seed: int = 0, **settings: Any) -> Path:
    """Lift a saved 2D model folder (a stage-1 export, or any diffusers 2D U-Net folder) into ``out``:
    ``lift3d.inflate`` with ``settings`` (``kind``, ``kernel_size``, ``where``, the kind's options),
    written with ``save_lifted``; the folder's other files (training settings, noise schedule,
    autoencoder) come along, so ``out`` is what stage 2 fine-tunes (``model.pretrained``) or synthesis
    loads. ``seed`` seeds the random parts of a kind (low-rank's down projection). ``out`` must not exist
    yet, nor lie inside ``stage1``; it is written whole or not at all."""
    stage1, out = model_folder(stage1), Path(out)
    if out.exists():
        raise CheckpointError(f"{out} exists already; choose a new folder for the lifted model")
    if out.resolve().is_relative_to(stage1.resolve()):
        raise CheckpointError(f"{out} lies inside the model it lifts ({stage1}); choose a folder outside it")
    if (stage1 / SETTINGS_FILE).exists():
        raise CheckpointError(f"{stage1} is lifted already ({SETTINGS_FILE}); lift a 2D model folder")
    unet = load_unet2d(stage1)
    torch.manual_seed(seed)
    inflate(unet, **settings)
    validate(lift_settings(unet), LiftSettings, out / SETTINGS_FILE, "lift settings")  # named by out, not its temporary
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(out.parent)
    tmp = temporary_path(out)
    try:
        save_lifted(unet, tmp)
        for item in stage1.iterdir():
            if item.name.startswith(".") or (tmp / item.name).exists():
                continue
            check_contained(stage1, item, f"{stage1}'s {item.name}")
            (shutil.copytree if item.is_dir() else shutil.copyfile)(item, tmp / item.name)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
