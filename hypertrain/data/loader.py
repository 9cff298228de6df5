"""The training loader: one rank's batches, a fixed number per step, resumable at any batch."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator, Sequence
from itertools import islice

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hypertrain.data.stream import MixedStream, Source, batches_before
from hypertrain.episode import Episode


class EpisodeBatches(IterableDataset):
    """Infinite micro-batches for one rank; worker w of W yields this rank's batches w, w+W, w+2W, ...

    ``start_batch`` is the number of this rank's batches already consumed by training (the resume position):
    the first batch yielded is the one an uninterrupted run would have used next.
    """

    def __init__(
        self,
        sources: Sequence[Source],
        collate: Callable[[list[Episode]], dict[str, torch.Tensor]],
        *,
        rank: int,
        world_size: int,
        num_workers: int,
        micro_batch_size: int,
        seed: int,
        shuffle_buffer: int = 1000,
        start_batch: int = 0,
    ) -> None:
        self.sources = list(sources)
        self.collate = collate
        self.rank = rank
        self.world_size = world_size
        self.num_workers = max(1, num_workers)
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.start_batch = start_batch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        # A new DataLoader starts its rotation at worker 0, while batch `start_batch` of the uninterrupted run came
        # from worker start_batch mod W: each physical worker plays the logical worker whose turn it now is.
        worker = (physical + self.start_batch) % self.num_workers
        slot = self.rank * self.num_workers + worker
        stream = MixedStream(self.sources, slot, self.world_size * self.num_workers, self.seed, self.shuffle_buffer)
        done = batches_before(self.start_batch, worker, self.num_workers)
        episodes = stream.iterate(start=done * self.micro_batch_size)
        while True:
            yield self.collate(list(islice(episodes, self.micro_batch_size)))


def build_loader(dataset: EpisodeBatches, pin_memory: bool = False) -> DataLoader:
    """A DataLoader over :class:`EpisodeBatches` (batching happens in the workers)."""
    workers = dataset.num_workers if dataset.num_workers > 1 else 0
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        worker_init_fn=ignore_stop_signals,
    )


def ignore_stop_signals(_worker_id: int) -> None:
    """Loader workers leave stop signals to their rank: a launcher or ``scancel`` that signals the whole process
    tree would otherwise kill them first, and the rank would crash instead of finishing its step and
    checkpointing. Workers end with their rank (the DataLoader shuts them down; they exit if it dies)."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)
