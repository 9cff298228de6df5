"""Deterministic, exactly resumable episode streams over WebDataset shards.

Every data-loader worker of every rank owns one *slot* (``rank * workers + worker`` of ``world * workers``).
A slot reads an infinite stream of episodes, pass after pass over its part of the data:

- **split**: with at least as many shards as slots, each slot owns the shards ``slot::num_slots``; with fewer
  (small datasets), every slot reads all shards and keeps the samples whose index in the pass is ``slot``
  modulo ``num_slots``. Either way the slots partition every pass, so no episode is seen twice per pass;
- **shuffle**: each pass visits the slot's shards in a seeded order and draws samples through a seeded
  shuffle buffer, so tasks mix even though the prep writes shards task by task;
- **mixing**: several sources (manifests) are mixed per sample by a seeded weighted draw.

The stream is a pure function of (seed, slot, position): resuming at position ``n`` replays the mixing draws
(cheap), skips whole passes by arithmetic over the manifest's shard counts, and re-reads only the current pass
of each source up to its offset. Tar members are read by webdataset; JSON is decoded only for kept samples.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

from data_prep.shards import ShardError, read_manifest
from hypertrain.episode import Episode


@dataclasses.dataclass(frozen=True)
class Source:
    """One prepared directory (its manifest) and its mixing weight."""

    name: str
    directory: Path
    shards: tuple[tuple[str, int], ...]
    """(path, num_samples) per shard, in manifest order."""
    tasks: tuple[str, ...]
    weight: float = 1.0

    @property
    def num_samples(self) -> int:
        return sum(count for _, count in self.shards)


def load_source(directory: str | Path, weight: float = 1.0) -> Source:
    """Read a manifest and check that its shards are present and non-empty (``data_prep.verify`` checks hashes)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    shards = []
    for entry in manifest["shards"]:
        path = directory / entry["file"]
        if not path.is_file() or path.stat().st_size == 0:
            raise ShardError(f"{path}: shard listed in {directory / 'manifest.json'} is missing or empty")
        shards.append((str(path), int(entry["num_samples"])))
    if not shards:
        raise ShardError(f"{directory}: manifest lists no shards")
    if weight <= 0:
        raise ValueError(f"{directory}: mixing weight must be > 0, got {weight}")
    name = f"{manifest['source']}/{manifest['split']}:{directory.name}"
    return Source(name, directory, tuple(shards), tuple(sorted(manifest["tasks"])), weight)


def task_list(sources: Sequence[Source]) -> list[str]:
    """The run's task list: the sorted union of the sources' tasks (index = ``task_ids`` in batches)."""
    return sorted({task for source in sources for task in source.tasks})


class SlotStream:
    """The infinite sample stream of one slot over one source (see the module docstring)."""

    def __init__(self, source: Source, slot: int, num_slots: int, seed: int, shuffle_buffer: int) -> None:
        self.source = source
        self.slot = slot
        self.num_slots = num_slots
        self.seed = seed
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.shard_level = len(source.shards) >= num_slots
        if self.shard_level:
            self.my_shards = list(source.shards[slot::num_slots])
            self.samples_per_pass = sum(count for _, count in self.my_shards)
        else:
            self.my_shards = list(source.shards)
            total = source.num_samples
            self.samples_per_pass = max(0, (total - slot + num_slots - 1) // num_slots)
        if self.samples_per_pass == 0:
            raise ShardError(
                f"{source.name}: {source.num_samples} samples cannot feed {num_slots} loader slots "
                "(ranks x workers); use fewer data workers or more data"
            )

    def _rng(self, what: str, pass_index: int) -> random.Random:
        slot = self.slot if self.shard_level or what == "buffer" else "all"
        return random.Random(f"{self.seed}/{self.source.name}/{what}/{slot}/{pass_index}")

    def _pass_payloads(self, pass_index: int) -> Iterator[bytes]:
        """The raw JSON payloads this slot owns in one pass, in shard-visit order (before the shuffle buffer)."""
        import webdataset as wds

        shards = list(self.my_shards)
        self._rng("shards", pass_index).shuffle(shards)
        pipeline = wds.DataPipeline(wds.SimpleShardList([path for path, _ in shards]), wds.tarfile_to_samples())
        for index, sample in enumerate(pipeline):
            if self.shard_level or index % self.num_slots == self.slot:
                yield sample["json"]

    def _shuffled_pass(self, pass_index: int) -> Iterator[bytes]:
        rng = self._rng("buffer", pass_index)
        buffer: list[bytes] = []
        for payload in self._pass_payloads(pass_index):
            if len(buffer) < self.shuffle_buffer:
                buffer.append(payload)
                continue
            pick = rng.randrange(len(buffer))
            buffer[pick], payload = payload, buffer[pick]
            yield payload
        rng.shuffle(buffer)
        yield from buffer

    def iterate(self, start: int = 0) -> Iterator[bytes]:
        """Payloads from position ``start`` (samples already consumed from this slot's stream) on, forever."""
        pass_index, offset = divmod(start, self.samples_per_pass)
        while True:
            count = 0
            for count, payload in enumerate(self._shuffled_pass(pass_index), start=1):
                if count > offset:
                    yield payload
            if count != self.samples_per_pass:
                raise ShardError(
                    f"{self.source.name}: slot {self.slot} read {count} samples in pass {pass_index}, "
                    f"the manifest promises {self.samples_per_pass} (re-run data_prep.verify)"
                )
            pass_index, offset = pass_index + 1, 0


class MixedStream:
    """Episodes of one slot drawn from several sources by a seeded weighted choice per sample."""

    def __init__(self, sources: Sequence[Source], slot: int, num_slots: int, seed: int, shuffle_buffer: int) -> None:
        self.streams = [SlotStream(s, slot, num_slots, seed, shuffle_buffer) for s in sources]
        self.weights = [s.weight for s in sources]
        self.seed = seed
        self.slot = slot

    def iterate(self, start: int = 0) -> Iterator[Episode]:
        """Episodes from position ``start`` of this slot's mixed stream on, forever."""
        rng = random.Random(f"{self.seed}/mix/{self.slot}")
        choices = range(len(self.streams))
        consumed = [0] * len(self.streams)
        for _ in range(start):  # replay the draws: tells each source how far to skip
            consumed[self._draw(rng, choices)] += 1
        iterators = [stream.iterate(skip) for stream, skip in zip(self.streams, consumed, strict=True)]
        while True:
            yield Episode.from_json(next(iterators[self._draw(rng, choices)]))

    def _draw(self, rng: random.Random, choices: range) -> int:
        if len(self.weights) == 1:
            return 0
        return rng.choices(choices, weights=self.weights)[0]


def batches_before(consumed: int, worker: int, num_workers: int) -> int:
    """How many of a rank's first ``consumed`` batches came from ``worker``.

    PyTorch's DataLoader takes batches from its workers in strict rotation (batch k from worker k mod W), and
    every worker here yields forever, so the rotation never skips a worker.
    """
    if consumed <= worker:
        return 0
    return (consumed - worker + num_workers - 1) // num_workers
