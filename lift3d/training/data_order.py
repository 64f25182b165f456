"""Data order and per-item randomness: noise and timesteps are drawn per item from a generator seeded by
(seed, step, dataset index), and the order per epoch from (seed, epoch), so a resumed run repeats an
uninterrupted one, and two processes with half the batch each see what one process with the whole batch sees."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import Tensor, nn

logger = logging.getLogger("lift3d.training.data_order")


def item_generator(seed: int, step: int, index: int) -> torch.Generator:
    """The generator for one item's noise and timestep: a function of (seed, step, index) only."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 10_007 + index) % (2**63 - 1))


@dataclass
class BatchPlan:
    """Which dataset indices each process reads at each micro-batch, for any resume point.

    Epoch e shuffles all items with seed (seed, e); a global micro-batch is ``batch_size *
    num_processes`` consecutive items of that order (an incomplete tail is dropped), and process
    r takes its r-th slice of it.
    """

    num_items: int
    batch_size: int
    num_processes: int
    rank: int
    seed: int

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.num_processes

    @property
    def batches_per_epoch(self) -> int:
        return self.num_items // self.global_batch

    def __post_init__(self) -> None:
        if self.batches_per_epoch < 1:
            raise ValueError(f"the dataset has {self.num_items} training items, fewer than one global batch "
                             f"({self.batch_size} per process x {self.num_processes} processes); lower data.batch_size")

    def indices(self, micro_step: int) -> list[int]:
        epoch, k = divmod(micro_step, self.batches_per_epoch)
        order = torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))
        start = k * self.global_batch + self.rank * self.batch_size
        return order[start:start + self.batch_size].tolist()

    def iterate(self, first_micro_step: int) -> Iterator[tuple[int, list[int]]]:
        step = first_micro_step
        while True:
            yield step, self.indices(step)
            step += 1


class PlannedBatches(torch.utils.data.Sampler):
    def __init__(self, plan: BatchPlan, first_micro_step: int, count: int) -> None:
        self.plan, self.first, self.count = plan, first_micro_step, count

    def __iter__(self):
        for step in range(self.first, self.first + self.count):
            yield self.plan.indices(step)

    def __len__(self) -> int:
        return self.count


class IndexedView(torch.utils.data.Dataset):
    """Adds each item's dataset index, which seeds its noise."""

    def __init__(self, view) -> None:
        self.view = view

    def __len__(self) -> int:
        return len(self.view)

    def __getitem__(self, index: int) -> dict:
        return {**self.view[index], "index": index}


def as_volumes(x: Tensor) -> Tensor:
    """Stage-1 slices ``(b, c, h, w)`` are volumes of one slice ``(b, c, 1, h, w)``."""
    return x.unsqueeze(2) if x.dim() == 4 else x


class LatentEncoder:
    """Encodes source and target volumes with the frozen autoencoder, optionally caching per item.

    With a 2.5D ``context`` the source latents get their neighbouring slices on channels
    (``lift3d.data.context``). Training items carry a source padded by ``context`` slices on
    each side (a stage-1 item, a stage-2 window); an unpadded whole volume has its edge slices
    repeated. Either way slice ``k`` gets the channels it has in the whole volume.
    """

    def __init__(self, autoencoder, cache: bool, context: int = 0) -> None:
        self.autoencoder, self.cache, self.context = autoencoder, {} if cache else None, context

    def with_context(self, source: Tensor, target: Tensor) -> Tensor:
        from lift3d.data.context import centre_with_context, with_source_context

        if source.shape[2] == target.shape[2] + 2 * self.context:
            return centre_with_context(source, self.context)
        return with_source_context(source, self.context)

    @torch.no_grad()
    def _encode(self, x: Tensor) -> Tensor:
        from lift3d.diffusion.autoencoding import encode_volume

        ae = self.autoencoder
        dtype = next((p.dtype for p in ae.parameters()), x.dtype) if isinstance(ae, nn.Module) else x.dtype
        return encode_volume(ae, x.to(dtype)).float()

    def __call__(self, batch: dict, device: torch.device) -> tuple[Tensor, Tensor]:
        source, target = as_volumes(batch["source"]).to(device), as_volumes(batch["target"]).to(device)
        if self.cache is None:
            zt = self._encode(target)
            return zt, self.with_context(self._encode(source), zt)
        # The slice count is in the key: stage 1's slice i and the validation's volume i are other items.
        starts = batch.get("start", [0] * len(batch["index"]))
        keys = [(i, starts[j], source.shape[2], target.shape[2]) for j, i in enumerate(batch["index"])]
        missing = [j for j, k in enumerate(keys) if k not in self.cache]
        if missing:
            zt, zs = self._encode(target[missing]), self._encode(source[missing])
            for j, a, b in zip(missing, zt, zs):
                self.cache[keys[j]] = (a.cpu(), b.cpu())
        zt = torch.stack([self.cache[k][0] for k in keys]).to(device)
        zs = torch.stack([self.cache[k][1] for k in keys]).to(device)
        return zt, self.with_context(zs, zt)


def draw_noise(latents: Tensor, indices: list[int], step: int, seed: int, sampler, num_train_timesteps: int):
    """Per-item noise ``(b, c, n, h, w)`` and timesteps ``(b, n)``, each from its own generator."""
    noises, timesteps = [], []
    for z, index in zip(latents, indices):
        g = item_generator(seed, step, index)
        noises.append(torch.randn(z.shape, generator=g))
        timesteps.append(sampler(1, z.shape[1], num_train_timesteps, generator=g)[0])
    return torch.stack(noises).to(latents.device), torch.stack(timesteps).to(latents.device)
