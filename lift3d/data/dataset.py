"""Base class for dataset plugins: lazy subjects, an optional cache, and the two training views.

Stage 1 reads ``VolumeDataset.slices`` (every slice of every subject, for shuffling);
stage 2 reads ``VolumeDataset.volumes`` (whole volumes, or windows of ``window`` consecutive
slices). Both views index the same dataset object, so they always agree on the data.
"""

from __future__ import annotations

import abc
from functools import lru_cache

import torch
from torch.utils.data import Dataset

from lift3d.plugins.protocols import VolumePair


class VolumeDataset(abc.ABC):
    """Subclass and implement ``subjects``, ``load`` and set ``num_slices``.

    ``load(i)`` returns a ``VolumePair`` whose volumes are ``(c, num_slices, h, w)``.
    With ``cache=True`` loaded pairs are kept in memory (``cache_size`` most recent, None = all).
    """

    num_slices: int

    def __init__(self, *, cache: bool = False, cache_size: int | None = None) -> None:
        self._cached_load = lru_cache(maxsize=cache_size)(self.load) if cache else self.load

    @abc.abstractmethod
    def subjects(self) -> list[str]:
        """Subject identifiers, in dataset order."""

    @abc.abstractmethod
    def load(self, index: int) -> VolumePair:
        """Read, align and normalise subject ``index``."""

    def __len__(self) -> int:
        return len(self.subjects())

    def __getitem__(self, index: int) -> VolumePair:
        if not -len(self) <= index < len(self):
            raise IndexError(f"subject index {index} out of range for {len(self)} subjects")
        return self._cached_load(index % len(self))

    def slices(self, context: int = 0) -> "SliceView":
        return SliceView(self, context=context)

    def volumes(self, window: int | None = None, stride: int | None = None, context: int = 0) -> "VolumeView":
        return VolumeView(self, window=window, stride=stride, context=context)


def _item(pair: VolumePair, sl: slice | int) -> dict:
    item = {"source": pair.source[:, sl], "subject": pair.subject}
    if pair.target is not None:
        item["target"] = pair.target[:, sl]
    return item


class SliceView(Dataset):
    """Every slice of every subject: items ``{"source": (c, h, w), "target": (c, h, w)}``.

    With ``context = C`` (2.5D, ``lift3d.data.context``) the source is the window of slices
    ``k - C .. k + C`` around the target slice, ``(c, 2 C + 1, h, w)``, the edge slice repeated
    (the target's one slice, padded by ``C`` on each side).
    """

    def __init__(self, dataset: VolumeDataset, context: int = 0) -> None:
        self.dataset, self.context = dataset, int(context)

    def __len__(self) -> int:
        return len(self.dataset) * self.dataset.num_slices

    def __getitem__(self, index: int) -> dict:
        subject, k = divmod(index, self.dataset.num_slices)
        pair = self.dataset[subject]
        item = _item(pair, k)
        if self.context:
            from lift3d.data.context import padded_indices

            item["source"] = pair.source[:, padded_indices(k, 1, pair.source.shape[1], self.context)]
        return item


class VolumeView(Dataset):
    """Whole volumes, or windows of ``window`` consecutive slices every ``stride`` slices.

    Items are ``{"source": (c, n, h, w), "target": (c, n, h, w), "subject": str, "start": int}``.
    The last window is aligned to the end of the volume so every slice is covered.
    With ``context = C`` (2.5D) the source is padded by ``C`` slices of the whole volume on each
    side, ``(c, window + 2 C, h, w)``, so a window's edge slices keep their real neighbours.
    """

    def __init__(self, dataset: VolumeDataset, window: int | None = None, stride: int | None = None,
                 context: int = 0) -> None:
        n = dataset.num_slices
        window = n if window is None else int(window)
        if not 1 <= window <= n:
            raise ValueError(f"window must be between 1 and the slice count {n}, got {window}")
        stride = window if stride is None else int(stride)
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        starts = list(range(0, n - window + 1, stride))
        if starts[-1] != n - window:
            starts.append(n - window)
        self.dataset, self.window, self.starts, self.context = dataset, window, starts, int(context)

    def __len__(self) -> int:
        return len(self.dataset) * len(self.starts)

    def __getitem__(self, index: int) -> dict:
        subject, w = divmod(index, len(self.starts))
        start = self.starts[w]
        pair = self.dataset[subject]
        item = _item(pair, slice(start, start + self.window))
        if self.context:
            from lift3d.data.context import padded_indices

            item["source"] = pair.source[:, padded_indices(start, self.window, pair.source.shape[1], self.context)]
        item["start"] = start
        return item


def stack_items(items: list[dict]) -> dict:
    """A ``collate_fn`` for both views: stacks tensors, keeps strings and ints as lists."""
    out: dict = {}
    for key in items[0]:
        values = [it[key] for it in items]
        out[key] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
    return out
