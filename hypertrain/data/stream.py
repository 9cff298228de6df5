"""Deterministic, exactly resumable episode streams over WebDataset shards.

Every data-loader worker of every rank owns one *slot* (``rank * workers + worker`` of ``world * workers``).
A slot reads an infinite stream of episodes, pass after pass over its part of the data:

- **split**: with at least as many shards as slots, each slot owns the shards ``slot::num_slots``; with fewer
  (small datasets), every slot reads all shards and keeps the samples whose index in the pass is ``slot``
  modulo ``num_slots``. Either way the slots partition every pass, so no episode is seen twice per pass;
- **shuffle**: each pass visits the slot's shards in a seeded order and draws samples through a seeded
  shuffle buffer, so tasks mix even though the prep writes shards task by task;
- **mixing**: several sources (manifests) are mixed per sample by a seeded weighted draw.

P3 training rows get their demonstrations here (:mod:`hypertrain.demonstrations`): a slot reads a whole shard, then
draws each of its rows' K demonstrations from the rest of the shard's pool, seeded by the pass and the position.

The stream is a pure function of (seed, slot, position): resuming at position ``n`` replays the mixing draws
(cheap), skips whole passes by arithmetic over the manifest's shard counts, and re-reads only the current pass
of each source up to its offset. Tar members are read by webdataset; JSON is decoded only for kept samples.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from data_prep.shards import ShardError, check_shard_file, read_manifest
from hypertrain.demonstrations import ShardPools, demonstration_rng, drawn_shots
from hypertrain.episode import Episode

Payload = tuple["bytes | Episode", str]
"""A sample's raw JSON (or, for rows whose demonstrations the loader draws, the episode built) and where it came
from (``<shard>: member <key>.json``), for error messages."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One prepared directory (its manifest) and its mixing weight."""

    name: str
    directory: Path
    shards: tuple[tuple[str, int], ...]
    """(path, num_samples) per shard, in manifest order."""
    tasks: tuple[str, ...]
    weight: float = 1.0
    checksums: tuple[tuple[int | None, str], ...] = ()
    """(bytes, sha256) per shard as the manifest records them (bytes is None in manifests that predate it)."""
    shots: int = 0
    """K when the loader draws each row's demonstrations from its shard (P3 training), else 0."""

    @property
    def num_samples(self) -> int:
        return sum(count for _, count in self.shards)


def load_source(directory: str | Path, weight: float = 1.0) -> Source:
    """Read a manifest and check that its shards are present and non-empty (``data_prep.verify`` checks hashes)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    shards, checksums = [], []
    for entry in manifest["shards"]:
        path = directory / entry["file"]
        if not path.is_file() or path.stat().st_size == 0:
            raise ShardError(f"{path}: shard listed in {directory / 'manifest.json'} is missing or empty")
        shards.append((str(path), int(entry["num_samples"])))
        checksums.append((entry.get("bytes"), str(entry["sha256"])))
    if not shards:
        raise ShardError(f"{directory}: manifest lists no shards")
    if weight <= 0:
        raise ValueError(f"{directory}: mixing weight must be > 0, got {weight}")
    name = f"{manifest['source']}/{manifest['split']}:{directory.name}"
    return Source(name, directory, tuple(shards), tuple(sorted(manifest["tasks"])), weight, tuple(checksums),
                  drawn_shots(manifest))


def check_shards(sources: Sequence[Source], mode: str, part: int = 0, parts: int = 1) -> list[str]:
    """Compare shards with their manifests before training: size (``size``) and also sha256 (``sha256``).

    Checks every ``parts``-th shard from ``part`` on (so ranks share the work), several files at once; returns one
    message per bad shard, naming it. ``mode`` ``none`` checks nothing.
    """
    if mode == "none":
        return []
    jobs = [
        (path, size, digest)
        for source in sources
        for (path, _), (size, digest) in zip(source.shards, source.checksums, strict=True)
    ][part::parts]

    def problem(job: tuple[str, int | None, str]) -> str | None:
        path, size, digest = job
        try:
            check_shard_file(path, size, digest if mode == "sha256" else None)
        except ShardError as err:
            return str(err)
        return None

    with ThreadPoolExecutor(max_workers=min(8, max(1, len(jobs)))) as pool:
        return [message for message in pool.map(problem, jobs) if message]


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

    def _pass_payloads(self, pass_index: int) -> Iterator[Payload]:
        """The samples this slot owns in one pass, in shard-visit order (before the shuffle buffer), each with the
        shard and member it came from: raw JSON, or (rows whose demonstrations the loader draws) the episode with
        its hypernetwork input built from the rest of the shard."""
        shards = list(self.my_shards)
        self._rng("shards", pass_index).shuffle(shards)
        shots = self.source.shots
        index = 0
        for path, expected in shards:
            members = _shard_members(path, expected)
            pools = None
            if shots:
                members = list(members)  # the pool: every row of the shard, owned by this slot or not
                pools = ShardPools.of([_episode(payload, f"{path}: member {key}.json") for key, payload in members])
            for position, (key, payload) in enumerate(members):
                if self.shard_level or index % self.num_slots == self.slot:
                    where = f"{path}: member {key}.json"
                    if pools is None:
                        yield payload, where
                    else:
                        rng = demonstration_rng(self.seed, self.source.name, pass_index, Path(path).name, position)
                        try:
                            yield pools.with_demonstrations(position, shots, rng, where), where
                        except ValueError as err:
                            raise ShardError(str(err)) from err
                index += 1

    def _shuffled_pass(self, pass_index: int) -> Iterator[Payload]:
        rng = self._rng("buffer", pass_index)
        buffer: list[Payload] = []
        for payload in self._pass_payloads(pass_index):
            if len(buffer) < self.shuffle_buffer:
                buffer.append(payload)
                continue
            pick = rng.randrange(len(buffer))
            buffer[pick], payload = payload, buffer[pick]
            yield payload
        rng.shuffle(buffer)
        yield from buffer

    def iterate(self, start: int = 0) -> Iterator[Payload]:
        """Payloads (with where each came from) from position ``start`` (samples already consumed from this slot's
        stream) on, forever."""
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


def _shard_members(path: str, expected: int) -> Iterator[tuple[str, bytes]]:
    """(key, JSON bytes) of every member of one shard; a truncated or modified shard raises :class:`ShardError`."""
    import webdataset as wds

    members = iter(wds.DataPipeline(wds.SimpleShardList([path]), wds.tarfile_to_samples()))
    read = 0
    while True:
        try:
            sample = next(members)
        except StopIteration:
            break
        except Exception as err:  # truncated or corrupt tar
            raise ShardError(
                f"{path}: unreadable after {read} members ({type(err).__name__}: {err}); re-run data_prep.verify"
            ) from err
        read += 1
        if "json" not in sample:
            raise ShardError(f"{path}: member {sample.get('__key__')!r} has no .json part (not an episode)")
        yield sample["__key__"], sample["json"]
    if read != expected:  # a truncated tar ends early without an error; an extra member reads fine
        raise ShardError(
            f"{path}: holds {read} episodes, the manifest says {expected} (truncated or modified; re-run "
            "data_prep.verify)"
        )


def _episode(payload: bytes | Episode, where: str) -> Episode:
    if isinstance(payload, Episode):
        return payload
    try:
        return Episode.from_json(payload)
    except (ValueError, TypeError, KeyError) as err:  # bad JSON, missing field: name shard and member
        raise ShardError(f"{where}: not a valid episode ({err})") from err


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
            payload, where = next(iterators[self._draw(rng, choices)])
            yield _episode(payload, where)

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
