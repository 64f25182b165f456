"""The 3D U-Net baseline users compare lift3d with: MONAI's ``BasicUNet`` (3D), trained with L1 from source
to target on whole volumes, keeping the weights best on the validation subjects. One network wherever it
runs: without MONAI it is refused, never replaced by a look-alike."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from lift3d.io.errors import Lift3dError


def build_unet3d(features: Sequence[int]) -> tuple[nn.Module, str]:
    """``BasicUNet(spatial_dims=3)`` with ``features`` (6 numbers), and a line describing it."""
    try:
        import monai
        from monai.networks.nets import BasicUNet
    except ImportError:
        raise Lift3dError("the 3D U-Net baseline is MONAI's BasicUNet, and MONAI is not installed: "
                          "pip install 'lift3d[bench]' (or run without the baseline)") from None
    net = BasicUNet(spatial_dims=3, in_channels=1, out_channels=1, features=tuple(features))
    return net, f"MONAI {monai.__version__} BasicUNet(spatial_dims=3), features {list(features)}"


def train_unet3d(train_pairs, val_pairs, *, features: Sequence[int], steps: int, batch: int, lr: float,
                 val_every: int, seed: int, device) -> tuple[nn.Module, dict[str, Any]]:
    """L1 regression source -> target on whole volumes (Adam); returns the net with the weights of the
    step best on ``val_pairs`` (mean L1) in eval mode, and what was done (for a report)."""
    torch.manual_seed(seed)  # seeded weights
    net, description = build_unet3d(features)
    net.to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    sources = torch.stack([p.source for p in train_pairs])
    targets = torch.stack([p.target for p in train_pairs])
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    best: tuple[float, int, dict] = (math.inf, 0, {})
    history = []
    for step in range(1, steps + 1):
        if len(order) < batch:
            order += torch.randperm(len(sources), generator=generator).tolist()
        chosen, order = order[:batch], order[batch:]
        net.train()
        loss = (net(sources[chosen].to(device)) - targets[chosen].to(device)).abs().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % val_every == 0 or step == steps:
            net.eval()
            with torch.no_grad():
                val = float(np.mean([(net(p.source[None].to(device)).clamp(-1, 1).cpu() - p.target[None]).abs().mean()
                                     for p in val_pairs]))
            history.append({"step": step, "train_l1": loss.item(), "val_l1": val})
            if val < best[0]:
                best = (val, step, {k: v.detach().cpu().clone() for k, v in net.state_dict().items()})
    net.load_state_dict(best[2])
    info = {"model": description, "parameters": sum(p.numel() for p in net.parameters()), "loss": "L1",
            "steps": steps, "batch_volumes": batch, "lr": lr, "chosen_step": best[1], "chosen_val_l1": best[0],
            "history": history}
    return net.eval(), info
