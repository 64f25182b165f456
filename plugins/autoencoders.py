"""Built-in autoencoders: a diffusers KL autoencoder (latent diffusion) and identity (pixel space).

Make-A-Volume (Zhu et al., MICCAI 2023, sec. 2.2) runs its diffusion in the latent space of a
pretrained KL autoencoder with downsampling factor f = 4. Both classes follow
``lift3d.plugins.protocols.Autoencoder`` on slice batches ``(B, C, H, W)``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lift3d.diffusion.autoencoding import tiny_kl_config  # noqa: F401 (the plugin's config helper)
from lift3d.lifting.checkpoint import build_diffusers_model, load_state_dict_checked, read_safetensors
from lift3d.io.schemas import AUTOENCODER_CLASSES, ModelConfig, read_json, validate
from lift3d.plugins import hookimpl

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
_PICKLE_WEIGHTS = ("diffusion_pytorch_model.bin", "pytorch_model.bin", "diffusion_pytorch_model.ckpt")
DEFAULT_CHUNK_SIZE = 16


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(
            f"autoencoder folder {str(folder)!r} has no {CONFIG_NAME}; expected {CONFIG_NAME} and "
            f"{WEIGHTS_NAME} as written by AutoencoderKL.save_pretrained(..., safe_serialization=True)"
        )
    return read_json(path, ModelConfig, folder=folder, what="autoencoder config").model_dump(
        by_alias=True, exclude_unset=True)


def _read_weights(folder: Path) -> dict[str, Tensor]:
    path = folder / WEIGHTS_NAME
    if not path.exists():
        pickles = [name for name in _PICKLE_WEIGHTS if (folder / name).exists()]
        hint = (
            f"; found {', '.join(pickles)}, but lift3d never loads pickled weights: convert them to "
            f"safetensors with save_pretrained(..., safe_serialization=True) in a trusted session"
            if pickles else ""
        )
        raise FileNotFoundError(f"autoencoder folder {str(folder)!r} has no {WEIGHTS_NAME}{hint}")
    return read_safetensors(path, "autoencoder weights", folder=folder)[0]


def _build_vae(config: dict[str, Any], where: str) -> "AutoencoderKL":
    """An AutoencoderKL from a config dict, checked like a config.json read from a folder."""
    from diffusers import AutoencoderKL

    checked = validate({"_class_name": "AutoencoderKL", **config}, ModelConfig, where, "autoencoder config")
    checked.checked_class(AUTOENCODER_CLASSES, Path(where))
    try:
        return AutoencoderKL.from_config(checked.model_dump(by_alias=True, exclude_unset=True))
    except Exception as exc:  # diffusers raises TypeError/ValueError/KeyError/AttributeError for bad configs
        raise ValueError(f"{where} is not a valid AutoencoderKL config: {exc}") from None


class KLAutoencoder(nn.Module):
    """``kl``: a diffusers ``AutoencoderKL`` behind lift3d's slice API.

    ``encode`` returns the posterior mode (deterministic) unless ``sample=True``; latents are
    ``(mode - shift_factor) * scaling_factor``. Both directions run ``chunk_size`` slices at a time
    so a 100+ slice volume fits in memory; call them under ``torch.no_grad()`` when the autoencoder
    is frozen, or autograd keeps every chunk's activations alive anyway.
    """

    def __init__(
        self,
        vae: "AutoencoderKL",
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        sample: bool = False,
        scaling_factor: float | None = None,
    ) -> None:
        super().__init__()
        config = vae.config
        if config.in_channels != config.out_channels:
            raise ValueError(
                f"lift3d needs an autoencoder that reconstructs its input channels, got "
                f"in_channels={config.in_channels} and out_channels={config.out_channels}"
            )
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        if scaling_factor is not None:
            if not scaling_factor > 0:
                raise ValueError(f"scaling_factor must be > 0, got {scaling_factor!r}")
            # In the config, so save() and a later load keep it.
            vae.register_to_config(scaling_factor=float(scaling_factor))
        self.vae = vae
        self.chunk_size = chunk_size
        self.sample = bool(sample)

    @classmethod
    def from_config(cls, config: dict[str, Any], **options: Any) -> "KLAutoencoder":
        """A freshly initialised autoencoder from an ``AutoencoderKL`` config dict."""
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict of AutoencoderKL arguments, got {type(config).__name__}")
        return cls(_build_vae(config, "the kl autoencoder config"), **options)

    @classmethod
    def from_folder(cls, path: str | os.PathLike, **options: Any) -> "KLAutoencoder":
        """Load ``config.json`` + ``diffusion_pytorch_model.safetensors`` from a local folder."""
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"autoencoder folder {str(folder)!r} does not exist or is not a folder")
        config = _read_config(folder)
        if "scaling_factor" not in config and options.get("scaling_factor") is None:
            # diffusers would fall back to Stable Diffusion's 0.18215, which is wrong for any other autoencoder.
            raise ValueError(
                f"autoencoder config {str(folder / CONFIG_NAME)!r} has no scaling_factor, so its latents' scale is "
                f"unknown; export it with lift3d-finetune --run.stage autoencoder (which measures it), add "
                f"\"scaling_factor\": 1 / latents.std() to the config, or pass scaling_factor= to the kl plugin"
            )
        state = _read_weights(folder)
        vae = build_diffusers_model(folder / CONFIG_NAME, folder, AUTOENCODER_CLASSES)
        load_state_dict_checked(vae, state, f"autoencoder weights {str(folder / WEIGHTS_NAME)!r}")
        return cls(vae, **options)

    def save(self, folder: str | os.PathLike) -> None:
        """Write ``config.json`` + ``diffusion_pytorch_model.safetensors`` (never a pickle)."""
        self.vae.save_pretrained(folder, safe_serialization=True)

    @property
    def image_channels(self) -> int:
        return int(self.vae.config.in_channels)

    @property
    def latent_channels(self) -> int:
        return int(self.vae.config.latent_channels)

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def shift_factor(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def encode(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """``(B, image_channels, H, W)`` in [-1, 1] -> scaled latents ``(B, latent_channels, H/f, W/f)``."""
        f = self.downsampling_factor
        if x.ndim != 4 or x.shape[1] != self.image_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"encode expects slices (B, {self.image_channels}, H, W) with H and W divisible by "
                f"{f}, got {tuple(x.shape)}"
            )
        chunks = []
        for chunk in x.to(self.dtype).split(self.chunk_size):
            posterior = self.vae.encode(chunk).latent_dist
            z = posterior.sample(generator=generator) if self.sample else posterior.mode()
            chunks.append((z - self.shift_factor) * self.scaling_factor)
        return torch.cat(chunks)

    def decode(self, z: Tensor) -> Tensor:
        """Scaled latents ``(B, latent_channels, h, w)`` -> slices ``(B, image_channels, h*f, w*f)``."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"decode expects latents (B, {self.latent_channels}, h, w), got {tuple(z.shape)}")
        chunks = [
            self.vae.decode(chunk / self.scaling_factor + self.shift_factor).sample
            for chunk in z.to(self.dtype).split(self.chunk_size)
        ]
        return torch.cat(chunks)

    def extra_repr(self) -> str:
        return (
            f"image_channels={self.image_channels}, latent_channels={self.latent_channels}, "
            f"f={self.downsampling_factor}, scaling_factor={self.scaling_factor}, "
            f"chunk_size={self.chunk_size}, sample={self.sample}"
        )


def create_kl_autoencoder(
    *,
    path: str | os.PathLike | None = None,
    config: dict[str, Any] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    sample: bool = False,
    scaling_factor: float | None = None,
) -> KLAutoencoder:
    """The ``kl`` factory: give exactly one of ``path`` (a saved folder) or ``config`` (a dict)."""
    if (path is None) == (config is None):
        raise ValueError(
            f"the kl autoencoder needs exactly one of path= (a folder with {CONFIG_NAME} and "
            f"{WEIGHTS_NAME}) or config= (an AutoencoderKL config dict, e.g. tiny_kl_config()); "
            f"got path={path!r}, config={'a dict' if config is not None else None}"
        )
    options = dict(chunk_size=chunk_size, sample=sample, scaling_factor=scaling_factor)
    if path is not None:
        return KLAutoencoder.from_folder(path, **options)
    return KLAutoencoder.from_config(config, **options)


class IdentityAutoencoder(nn.Module):
    """``identity``: pixel-space diffusion; latents are the slices themselves (f = 1, scale 1)."""

    downsampling_factor = 1
    scaling_factor = 1.0

    def __init__(self, *, image_channels: int = 1) -> None:
        super().__init__()
        if isinstance(image_channels, bool) or not isinstance(image_channels, int) or image_channels < 1:
            raise ValueError(f"image_channels must be a positive int, got {image_channels!r}")
        self.image_channels = image_channels
        self.latent_channels = image_channels

    def _check(self, x: Tensor, what: str) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.image_channels:
            raise ValueError(f"{what} expects slices (B, {self.image_channels}, H, W), got {tuple(x.shape)}")
        return x

    def encode(self, x: Tensor) -> Tensor:
        return self._check(x, "encode")

    def decode(self, z: Tensor) -> Tensor:
        return self._check(z, "decode")

    def extra_repr(self) -> str:
        return f"image_channels={self.image_channels}"


@hookimpl
def lift3d_register_autoencoders(registry):
    registry.add("kl", create_kl_autoencoder)
    registry.add("identity", IdentityAutoencoder)
