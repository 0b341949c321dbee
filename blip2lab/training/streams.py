"""Batches for the training loop as a function of the micro-step (what `loop.train` calls),
made ahead by DataLoader workers, and resumable: asked for micro-step i out of order (a
resumed run), a stream restarts there.

    Prefetched   a map-style stream (`loop.BatchStream`, a pure function of the step) whose
                 batches DataLoader workers compute ahead, in order
    ShardStream  an iterable dataset (webdataset shards): micro-step i is the i-th full batch
                 of this rank's endless sequence of epochs; resuming at i replays the shards
                 up to there (same shard order and shuffle: both are seeded by the epoch)
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterator, Optional

from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler

__all__ = ["Prefetched", "ShardStream"]


class _Steps(Dataset):
    """Micro-step i -> the stream's batch i (so a DataLoader worker makes a whole batch)."""

    def __init__(self, stream: Callable[[int], dict]):
        self.stream = stream

    def __getitem__(self, i: int) -> dict:
        return self.stream(i)

    def __len__(self) -> int:
        return 2**62


class _From(Sampler):
    def __init__(self, start: int):
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


class Prefetched:
    """`stream(i)` for i = start, start + 1, ..., computed by `num_workers` processes ahead of
    the loop (0: in this process, when asked). The batches are the stream's, so a run with
    workers trains exactly as one without."""

    def __init__(self, stream: Callable[[int], dict], num_workers: int = 0, prefetch: int = 4):
        self.stream, self.num_workers, self.prefetch = stream, num_workers, prefetch
        self._it: Optional[Iterator[dict]] = None
        self._next = -1

    def __call__(self, micro: int) -> dict:
        if self.num_workers == 0:
            return self.stream(micro)
        if self._it is None or micro != self._next:
            loader = DataLoader(_Steps(self.stream), batch_size=None, sampler=_From(micro),
                                num_workers=self.num_workers, prefetch_factor=self.prefetch)
            self._it = iter(loader)
        self._next = micro + 1
        return next(self._it)

    def close(self) -> None:
        self._it = None  # the DataLoader's workers stop with their iterator


class ShardStream:
    """Full batches of `batch_size` from an iterable dataset with `set_epoch`, epoch after
    epoch (each rank and worker reads its own shards: training/datasets.py)."""

    def __init__(self, dataset: IterableDataset, batch_size: int, collate: Callable[[list], dict],
                 num_workers: int = 0):
        self.dataset, self.batch_size, self.collate, self.num_workers = dataset, batch_size, collate, num_workers
        self.epoch, self._next = 0, -1
        self._it: Optional[Iterator[dict]] = None

    def __call__(self, micro: int) -> dict:
        if self._it is None or micro != self._next:
            self._seek(micro)
        self._next = micro + 1
        return self._batch()

    def _open(self) -> None:
        self.dataset.set_epoch(self.epoch)
        self._it = iter(DataLoader(self.dataset, batch_size=self.batch_size, collate_fn=self.collate,
                                   num_workers=self.num_workers, drop_last=True))

    def _batch(self) -> dict:
        for _ in range(2):
            try:
                return next(self._it)
            except StopIteration:  # the epoch is over on this rank: the next one, reshuffled
                self.epoch += 1
                self._open()
        report = getattr(self.dataset, "report", lambda: "")()
        raise RuntimeError(f"an epoch of this rank's shards holds no full batch of {self.batch_size}: {report}")

    def _seek(self, micro: int) -> None:
        self.epoch = 0
        self._open()
        for _ in range(micro):
            self._batch()
