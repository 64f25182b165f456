"""A low-rank volumetric layer: Make-A-Volume's slice conv (sec. 2.3) in a narrow bottleneck.

    f' = f + up(conv1d_n(down(f)))     down: 1x1 C -> r, conv1d along n in r channels, up: 1x1 r -> C

``up`` starts at zero, so ``f' == f`` bit for bit at initialisation, as LoRA's B (Hu et al., 2021);
``down`` and the conv start random so that ``up`` has something to learn from. The rank is
``r = max(rank_min, C/8)`` (at most C): at r = C/8 the layer costs about 2rC + 3r^2 = 0.3 C^2
multiply-adds per voxel against the full layer's 3 C^2, and the floor keeps narrow layers from a
bottleneck of a few channels (``benchmarks/results/inflate-overhead.md`` gives the cost of the floor).

``train_down=False`` keeps ``down`` fixed at its random draw (a buffer, saved with the weights), as
LoRA-FA does (Zhang et al., 2023): its weight gradient is then not needed, so the full-width input
of the layer is not kept for backward (``_FixedProjection``), only the r-channel tensors inside
the bottleneck.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lift3d.layers.functional import check_slice_conv, conv_along_slices
from lift3d.layers.registry import LAYER_KINDS


RANK_MIN = 16
"""The default floor of the low-rank layer's rank (``rank_min``)."""


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def rank_for(channels: int, rank: int | None = None, rank_ratio: float = 0.125, rank_min: int = 1) -> int:
    """``rank`` when given, else ``channels * rank_ratio`` rounded but at least ``rank_min``; never more
    than ``channels``."""
    _positive_int(rank_min, "rank_min")
    if rank is not None:
        return min(_positive_int(rank, "rank"), channels)
    if isinstance(rank_ratio, bool) or not isinstance(rank_ratio, (int, float)) or not 0 < rank_ratio <= 1:
        raise ValueError(f"rank_ratio must be in (0, 1], got {rank_ratio!r}")
    return max(1, min(channels, max(rank_min, round(channels * rank_ratio))))


class _FixedProjection(torch.autograd.Function):
    """``down(x)``, a 1x1 conv with fixed weights: its backward needs the weight alone, so ``x`` is not
    kept (``F.conv2d`` would keep it, for a weight gradient nobody asks for)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(weight)
        ctx.input_dtype = x.dtype
        return F.conv2d(x, weight[:, :, None, None], bias)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (weight,) = ctx.saved_tensors
        grad_x = F.conv2d(grad, weight.t().to(grad.dtype)[:, :, None, None]).to(ctx.input_dtype)
        return grad_x, None, None


@LAYER_KINDS.register("low-rank")
class LowRankVolumetricConv(nn.Module):
    """Residual low-rank 1D conv over slices, acting on a ``(b n) c h w`` batch of slices.

    The rank: ``rank`` when given (at most C), else ``max(rank_min, round(C * rank_ratio))``, at most C.
    Parameters: ``down_weight`` ``(r, C)`` and ``down_bias`` ``(r,)`` (buffers when ``train_down`` is
    off), ``weight`` ``(r, r, kernel_size)`` (the conv along n), ``up_weight`` ``(C, r)`` and ``bias``
    ``(C,)``, the last two at zero.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 3,
        *,
        rank: int | None = None,
        rank_ratio: float = 0.125,
        rank_min: int = RANK_MIN,
        train_down: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_slice_conv(kernel_size, padding_mode)
        r = rank_for(channels, rank, rank_ratio, rank_min)
        self.channels, self.rank, self.kernel_size, self.padding_mode = channels, r, kernel_size, padding_mode
        self.train_down = bool(train_down)
        self.fused = False  # set by fuse_into: the centre tap then lives in the host conv
        factory = {"device": device, "dtype": dtype}
        down_weight, down_bias = torch.empty(r, channels, **factory), torch.empty(r, **factory)
        if self.train_down:
            self.down_weight, self.down_bias = nn.Parameter(down_weight), nn.Parameter(down_bias)
        else:
            self.register_buffer("down_weight", down_weight)
            self.register_buffer("down_bias", down_bias)
        self.weight = nn.Parameter(torch.empty(r, r, kernel_size, **factory))
        self.up_weight = nn.Parameter(torch.empty(channels, r, **factory))
        self.bias = nn.Parameter(torch.empty(channels, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The single place of the identity initialisation: ``up`` and the bias at zero (``down``
        and the conv drawn as ``nn.Conv2d``/``nn.Conv1d`` draw theirs)."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down_weight, a=math.sqrt(5))
            nn.init.zeros_(self.down_bias)
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up_weight)
        nn.init.zeros_(self.bias)
        self.fused = False

    def init_random_(self, std: float | None = None, generator: torch.Generator | None = None) -> None:
        """Random weights everywhere, ``up`` included (for tests and ablations)."""
        with torch.no_grad():
            for tensor in (self.down_weight, self.down_bias, self.weight, self.up_weight, self.bias):
                fan_in = tensor[0].numel() if tensor.dim() > 1 else self.rank
                tensor.normal_(0.0, std if std is not None else 1.0 / math.sqrt(fan_in), generator=generator)

    def extra_repr(self) -> str:
        return (f"{self.channels}, rank={self.rank}, kernel_size={self.kernel_size}, "
                f"padding_mode={self.padding_mode!r}, train_down={self.train_down}" + (", fused" if self.fused else ""))

    def forward(self, x: Tensor, num_slices: int) -> Tensor:
        """``x``: ``(b n) c h w`` with ``n = num_slices``. Returns the same shape."""
        if x.shape[0] % num_slices:
            raise ValueError(f"batch of {x.shape[0]} slices is not a whole number of volumes of {num_slices} slices")
        if x.shape[1] != self.channels:
            raise ValueError(f"LowRankVolumetricConv expects {self.channels} channels, got {x.shape[1]} "
                             f"(input {tuple(x.shape)})")
        if not self.train_down and not self.fused and torch.is_grad_enabled() and x.requires_grad:
            z = _FixedProjection.apply(x, self.down_weight, self.down_bias)
        else:
            z = F.conv2d(x, self.down_weight[:, :, None, None], self.down_bias)
        z = conv_along_slices(z, self.weight, num_slices, padding_mode=self.padding_mode, skip_centre=self.fused)
        delta = F.conv2d(z, self.up_weight[:, :, None, None], None if self.fused else self.bias)
        if self.fused and not (torch.is_grad_enabled() and x.requires_grad):
            return x.add_(delta)  # inference: the fused host's output is nobody else's
        return x + delta

    def forward_reference(self, x: Tensor, num_slices: int) -> Tensor:
        """The same layer with the einops sandwich and ``F.conv1d``, for checking."""
        from einops import rearrange

        h, w = x.shape[-2:]
        z = F.conv2d(x, self.down_weight[:, :, None, None], self.down_bias)
        z = rearrange(z, "(b n) r h w -> (b h w) r n", n=num_slices)
        pad = self.kernel_size // 2
        z = F.conv1d(F.pad(z, (pad, pad), mode="constant" if self.padding_mode == "zeros" else "replicate"), self.weight)
        z = rearrange(z, "(b h w) r n -> (b n) r h w", h=h, w=w)
        return x + F.conv2d(z, self.up_weight[:, :, None, None], self.bias)

    # Inference fast path (lift3d.lifting.fuse): fold the residual and the centre tap into the host conv.

    def centre_map(self) -> tuple[Tensor, Tensor]:
        """What the layer does to a slice from the slice itself, ``y -> A y + c``, in float64:
        ``A = I + up W_centre down`` and ``c = bias + up W_centre down_bias``."""
        up, centre = self.up_weight.double(), self.weight[:, :, self.kernel_size // 2].double()
        eye = torch.eye(self.channels, dtype=torch.float64, device=up.device)
        return eye + up @ centre @ self.down_weight.double(), self.bias.double() + up @ centre @ self.down_bias.double()

    def fuse_into(self, host: nn.Conv2d) -> nn.Module:
        """Fold into ``host``, which then computes ``y' = A y + c`` (``centre_map``); the layer
        keeps only the off-centre taps and reads ``down(y)`` as ``down A^-1 (y' - c) + down_bias``."""
        from lift3d.layers.fused import fold_into_host

        matrix, offset = self.centre_map()
        inverse = fold_into_host(host, matrix, offset)
        with torch.no_grad():
            down = self.down_weight.double() @ inverse
            self.down_bias.copy_(self.down_bias.double() - down @ offset)
            self.down_weight.copy_(down)
        self.register_buffer("inverse", inverse.to(self.up_weight.dtype), persistent=False)
        self.register_buffer("centre_bias", offset.to(self.up_weight.dtype), persistent=False)
        self.fused = True
        return self

    def unfuse(self, y: Tensor) -> Tensor:
        """The 2D host's output from the fused host's: ``A^-1 (y' - c)``."""
        return F.conv2d(y - self.centre_bias[:, None, None], self.inverse[:, :, None, None])
