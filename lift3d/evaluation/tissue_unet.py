"""The built-in tissue segmenter (``tissue-unet``): a small 2.5D U-Net (Ronneberger et al., MICCAI 2015) that
labels CSF, grey and white matter slice by slice, seeing ``context`` neighbouring slices on each side.

lift3d trains it on the real target contrast (``lift3d-finetune --run.stage segmenter``) and scores synthesis
with it (``lift3d.evaluation.segmentation``). On disk it is a folder of ``segmenter.json`` (checked by
``lift3d.io.schemas.SegmenterSettings``) and ``model.safetensors``: nothing read from it runs code.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from lift3d.data.context import with_source_context
from lift3d.io.budget import check_bytes
from lift3d.io.errors import Lift3dError
from lift3d.io.paths import check_contained
from lift3d.io.schemas import SEGMENTER_FORMAT, SegmenterSettings, read_json, validate
from lift3d.io.writing import write_bytes_atomic, write_text_atomic

PLUGIN = "tissue-unet"
SETTINGS_NAME = "segmenter.json"
WEIGHTS_NAME = "model.safetensors"
CHUNK_SLICES = 32  # slices segmented at once: memory stays bounded for a volume of hundreds


class SegmenterError(Lift3dError):
    """A segmenter folder that lift3d cannot load: missing, not its format, or weights that do not fit."""


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(8, channels), channels)


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each followed by GroupNorm and SiLU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.Conv2d(in_channels, out_channels, 3, padding=1), _norm(out_channels), nn.SiLU(),
                         nn.Conv2d(out_channels, out_channels, 3, padding=1), _norm(out_channels), nn.SiLU())


class TissueUNet(nn.Module):
    """``(b, in_channels, h, w)`` -> ``(b, num_classes, h, w)`` logits, for any ``h`` and ``w`` (an upsampled
    level takes its skip connection's size)."""

    def __init__(self, in_channels: int, num_classes: int, block_out_channels: tuple[int, ...] = (16, 32, 64)) -> None:
        super().__init__()
        widths = [int(w) for w in block_out_channels]
        self.down = nn.ModuleList([ConvBlock(in_channels, widths[0])]
                                  + [ConvBlock(a, b) for a, b in zip(widths, widths[1:])])
        self.up = nn.ModuleList([ConvBlock(b + a, a) for a, b in zip(widths, widths[1:])])
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        for block, skip in zip(reversed(self.up), reversed(skips[:-1])):
            x = block(torch.cat([F.interpolate(x, size=skip.shape[-2:], mode="nearest"), skip], dim=1))
        return self.head(x)


class TissueSegmenter:
    """``tissue-unet``: a ``TissueUNet`` behind ``lift3d.plugins.protocols.Segmenter``.

    ``probabilities(volume)`` gives ``(K + 1, n, h, w)`` softmax probabilities (background first),
    ``segment(volume)`` their argmax. ``context`` slices on each side are the network's input channels,
    the edge slice repeated at the volume's borders (``lift3d.data.context.with_source_context``).
    """

    def __init__(self, network: TissueUNet, classes: tuple[str, ...], context: int = 1,
                 block_out_channels: tuple[int, ...] = (16, 32, 64), input_grid: dict[str, Any] | None = None,
                 training: dict[str, Any] | None = None) -> None:
        self.network, self.classes, self.context = network, tuple(classes), int(context)
        self.block_out_channels = tuple(int(w) for w in block_out_channels)
        self.input_grid, self.training = input_grid, training

    @classmethod
    def new(cls, classes: tuple[str, ...], *, context: int = 1, block_out_channels: tuple[int, ...] = (16, 32, 64),
            input_grid: dict[str, Any] | None = None) -> "TissueSegmenter":
        network = TissueUNet(2 * context + 1, len(classes) + 1, block_out_channels)
        return cls(network, classes, context, block_out_channels, input_grid)

    def slices(self, volume: Tensor) -> Tensor:
        """``(c, n, h, w)`` or ``(n, h, w)`` -> the network's input, ``(n, 2 context + 1, h, w)``."""
        if volume.dim() == 3:
            volume = volume[None]
        if volume.dim() != 4 or volume.shape[0] != 1:
            raise ValueError(f"tissue-unet segments one single-channel volume (1, n, h, w) or (n, h, w); "
                             f"got shape {tuple(volume.shape)}")
        stacked = with_source_context(volume[None].float(), self.context)  # (1, d, n, h, w)
        return rearrange(stacked, "1 d n h w -> n d h w")

    @torch.no_grad()
    def probabilities(self, volume: Tensor) -> Tensor:
        device = next(self.network.parameters()).device
        x = self.slices(volume).to(device)
        training = self.network.training
        self.network.eval()
        try:
            out = [self.network(chunk).float().softmax(1) for chunk in x.split(CHUNK_SLICES)]
        finally:
            self.network.train(training)
        return rearrange(torch.cat(out), "n k h w -> k n h w").cpu()

    def segment(self, volume: Tensor) -> Tensor:
        return self.probabilities(volume).argmax(0)

    def settings(self) -> dict[str, Any]:
        return {"format": SEGMENTER_FORMAT, "version": 1, "plugin": PLUGIN, "classes": list(self.classes),
                "network": {"block_out_channels": list(self.block_out_channels), "context": self.context},
                "input_grid": self.input_grid, "training": self.training}

    def save(self, folder: str | Path) -> Path:
        """Write ``segmenter.json`` and ``model.safetensors`` into ``folder`` (created if missing)."""
        from safetensors.torch import save

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        settings = validate(json.loads(json.dumps(self.settings())), SegmenterSettings, folder / SETTINGS_NAME,
                            "segmenter config")  # what is written must read back
        state = {k: v.detach().cpu().float().contiguous() for k, v in self.network.state_dict().items()}
        # Atomic, and never through a link at either name (lift3d.io.writing).
        write_bytes_atomic(folder / WEIGHTS_NAME, save(state, metadata={"format": SEGMENTER_FORMAT}))
        write_text_atomic(folder / SETTINGS_NAME, settings.model_dump_json(indent=2, exclude_none=True) + "\n")
        return folder


def read_settings(folder: str | Path) -> SegmenterSettings:
    """A segmenter folder's ``segmenter.json``, checked; every problem is one ``Lift3dError`` line."""
    folder = Path(folder)
    if not folder.is_dir():
        problem = "not found" if not folder.exists() else "is a file, not a folder"
        raise SegmenterError(f"segmenter folder {folder}: {problem}; a segmenter is a folder holding {SETTINGS_NAME} "
                             f"and its weights (lift3d-finetune --run.stage segmenter writes one)")
    if not (folder / SETTINGS_NAME).exists():
        present = ", ".join(sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))[:8]) or "nothing"
        raise SegmenterError(f"segmenter folder {folder} has no {SETTINGS_NAME} (it holds: {present})")
    return read_json(folder / SETTINGS_NAME, SegmenterSettings, folder=folder, what="segmenter config")


def _read_weights(folder: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS_NAME
    if not path.is_file():
        pickles = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt"))
        hint = f"; it holds {', '.join(pickles)}, but lift3d never loads pickled weights" if pickles else ""
        raise SegmenterError(f"segmenter folder {folder} has no {WEIGHTS_NAME}{hint}")
    check_contained(folder, path, "segmenter weights")
    check_bytes(path.stat().st_size, f"{path}: its tensors", copies=2)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, OverflowError) as exc:
        raise SegmenterError(f"{path} is not a readable safetensors file ({str(exc)[:160]})") from None


def _check_weights(folder: Path, own: dict[str, Tensor], weights: dict[str, Tensor]) -> None:
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    wrong = [f"{k}: file {tuple(v.shape)} vs network {tuple(own[k].shape)}" for k, v in weights.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    not_float = [k for k, v in weights.items() if not v.is_floating_point()]
    parts = [f"missing {', '.join(missing[:4])}" if missing else "",
             f"unexpected {', '.join(unexpected[:4])}" if unexpected else "", "; ".join(wrong[:3]),
             f"not floating point: {', '.join(not_float[:4])}" if not_float else ""]
    if any(parts):
        raise SegmenterError(f"{folder / WEIGHTS_NAME} does not fit the network of {SETTINGS_NAME}: "
                             + "; ".join(p for p in parts if p))
    if not all(torch.isfinite(v).all() for v in weights.values()):
        raise SegmenterError(f"{folder / WEIGHTS_NAME} holds NaN or inf weights")


def load_tissue_segmenter(path: str | Path) -> TissueSegmenter:
    """The ``tissue-unet`` segmenter saved in the folder ``path`` (``TissueSegmenter.save``)."""
    folder = Path(path)
    settings = read_settings(folder)
    if settings.plugin != PLUGIN or settings.network is None:
        raise SegmenterError(f"{folder / SETTINGS_NAME}: plugin {settings.plugin!r} with network "
                             f"{'none' if settings.network is None else 'given'}; {PLUGIN!r} needs its network settings")
    classes, context = tuple(settings.classes), settings.network.context
    widths = tuple(settings.network.block_out_channels)
    with torch.device("meta"):  # the size the settings ask for, checked before anything is allocated
        size = sum(p.numel() for p in TissueUNet(2 * context + 1, len(classes) + 1, widths).parameters())
    check_bytes(4 * size, f"{folder / SETTINGS_NAME}: a tissue U-Net of widths {list(widths)}")
    weights = _read_weights(folder)
    grid = None if settings.input_grid is None else settings.input_grid.model_dump()
    segmenter = TissueSegmenter.new(classes, context=context, block_out_channels=widths, input_grid=grid)
    segmenter.training = settings.training
    _check_weights(folder, segmenter.network.state_dict(), weights)
    segmenter.network.load_state_dict({k: v.float() for k, v in weights.items()})
    segmenter.network.eval().requires_grad_(False)
    return segmenter
