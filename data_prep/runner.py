"""Run a prep job: units of work (one task each) → episodes → shards + manifest, in parallel or as one piece
of a Slurm job array.

A source module (``data_prep.sni``, ``data_prep.p3``) supplies the ordered list of units and a picklable
function that turns one unit into a :class:`UnitResult`. This module does the rest the same way for every
source: it takes this piece's contiguous block of units, maps them over ``workers`` processes **in order**
(so the output never depends on the number of workers), writes the episodes through
:class:`~data_prep.shards.EpisodeShardWriter` and writes the (partial) manifest.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import multiprocessing
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from data_prep.shards import (
    EpisodeShardWriter,
    build_manifest,
    manifest_filename,
    merge_extra,
    shard_prefix,
    verify,
    write_json_atomic,
)
from data_prep.staging import commit, discard, staging_dir
from hypertrain.episode import Episode
from hypertrain.progress import progress

U = TypeVar("U")


class PrepError(RuntimeError):
    """Bad input: the message names the file and the record or field."""


class SkipLog(Counter):
    """reason → count of skipped tasks/records (a Counter), plus which ones they were, for the manifest."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.records: list[dict[str, Any]] = []

    def note(self, reason: str, **where: Any) -> None:
        """Count one skip under ``reason`` and remember where it was (task, file, index, id, error)."""
        self[reason] += 1
        self.records.append({"reason": reason, **where})

    def __reduce__(self):  # Counter's pickling would drop the records (results cross process boundaries)
        return (_restore_skip_log, (dict(self), self.records))


def _restore_skip_log(counts: dict[str, int], records: list[dict[str, Any]]) -> SkipLog:
    log = SkipLog(counts)
    log.records = records
    return log


class SkippedRecords:
    """The manifest's ``skipped_records``: every skip with where it was, up to ``limit`` entries (then counted)."""

    def __init__(self, limit: int = 10_000) -> None:
        self.limit = limit
        self.records: list[dict[str, Any]] = []
        self.unlisted = 0

    def add(self, skipped: SkipLog) -> None:
        room = max(0, self.limit - len(self.records))
        self.records.extend(skipped.records[:room])
        self.unlisted += len(skipped.records[room:])

    def listing(self) -> dict[str, Any]:
        return {"records": self.records, "unlisted": self.unlisted}


@dataclasses.dataclass
class UnitResult:
    """What one unit of work (one task / prompted subset) produced."""

    task: str
    episodes: list[Episode]
    categories: list[str] = dataclasses.field(default_factory=list)
    skipped: SkipLog = dataclasses.field(default_factory=SkipLog)
    """reason → count; ``task:<why>`` for whole units skipped, ``instance:<why>`` for records; and which records
    they were (listed in the manifest's ``skipped_records``)."""
    dropped: str | None = None
    """Set when a filter removed the whole unit (e.g. ``non_english``): listed under ``dropped_tasks``."""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Source-specific facts for the manifest's ``extra`` (merged across units and pieces)."""
    pools: list[int] | None = None
    """Sizes of consecutive groups of ``episodes`` that must each be a shard of their own (P3 training: the loader
    draws demonstrations within a shard); several units may then be blocks of one task. The worker that made them
    writes them (:func:`write_pools`) and sends back only the shard entries."""
    written: list[dict[str, Any]] | None = None
    """Shards the worker wrote itself (manifest entries), when ``pools`` was set."""


def write_pools(result: UnitResult, out: Path, prefix: str, max_samples: int, max_bytes: int) -> UnitResult:
    """In the worker: write a pooled result's episodes as shards ``<prefix>-NNNNNN.tar`` in ``out``, one pool per
    shard, and keep only their manifest entries (nothing large travels back to the writing process)."""
    if result.pools is None or not result.episodes:
        return result
    with EpisodeShardWriter(out, prefix, max_samples, max_bytes) as writer:
        start = 0
        for size in result.pools:
            writer.new_shard()
            for episode in result.episodes[start : start + size]:
                writer.write(episode)
            start += size
    return dataclasses.replace(result, episodes=[], written=writer.shards)


@dataclasses.dataclass(frozen=True)
class _Work:
    """One unit as a worker runs it: its function, and where and under which name pooled shards go."""

    fn: Callable[[Any], UnitResult]
    out: Path
    split: str
    max_samples: int
    max_bytes: int

    def __call__(self, item: tuple[int, Any]) -> UnitResult:
        index, unit = item
        # the unit's index in the whole run names its shards: a job array writes what one run writes
        return write_pools(self.fn(unit), self.out, f"{self.split}-u{index:06d}", self.max_samples, self.max_bytes)


def piece_of(units: Sequence[U], num_jobs: int, job_index: int) -> list[U]:
    """Contiguous block ``job_index`` of ``num_jobs`` near-equal blocks; concatenated in order they give ``units``."""
    if num_jobs < 1:
        raise ValueError(f"--num-jobs must be >= 1, got {num_jobs}")
    if not 0 <= job_index < num_jobs:
        raise ValueError(f"--job-index must be in [0, {num_jobs}), got {job_index}")
    start = len(units) * job_index // num_jobs
    stop = len(units) * (job_index + 1) // num_jobs
    return list(units[start:stop])


def map_in_order(
    fn: Callable[[U], UnitResult], units: Sequence[U], workers: int, desc: str
) -> Iterator[UnitResult]:
    """``map(fn, units)`` over ``workers`` processes, results in input order, with progress (a bar on a terminal,
    a line every 30 s in a log)."""
    bar = progress(len(units), desc, unit="unit")
    try:
        if workers <= 1 or len(units) <= 1:
            for unit in units:
                yield fn(unit)
                bar.update()
            return
        context = multiprocessing.get_context("spawn")
        with context.Pool(processes=workers) as pool:
            # At most 2 units per worker in flight: finished results never pile up (each holds a unit's episodes)
            # while this process writes the earlier ones.
            pending: collections.deque = collections.deque()
            queue = iter(units)
            for unit in itertools.islice(queue, 2 * workers):
                pending.append(pool.apply_async(fn, (unit,)))
            while pending:
                result = pending.popleft().get()
                for unit in itertools.islice(queue, 1):
                    pending.append(pool.apply_async(fn, (unit,)))
                yield result
                bar.update()
    finally:
        bar.close()


def run_prep(
    *,
    source: str,
    split: str,
    out_dir: str | Path,
    units: Sequence[U],
    fn: Callable[[U], UnitResult],
    options: Mapping[str, Any],
    workers: int = 1,
    num_jobs: int = 1,
    job_index: int = 0,
    shard_max_samples: int = 10000,
    shard_max_bytes: int = 256 * 1024**2,
    dropped_tasks: Mapping[str, list[str]] | None = None,
    filters: Mapping[str, Any] | None = None,
    verify_output: bool = True,
) -> dict[str, Any]:
    """Prepare this piece's units into shards plus the (partial) manifest; returns the manifest.

    A single run stages its output and swaps it in for ``out_dir`` once complete and verified; a job-array piece
    leaves its output in the shared staging directory for ``data_prep.merge`` (see :mod:`data_prep.staging`).
    """
    mine = piece_of(list(enumerate(units)), num_jobs, job_index)
    prefix = shard_prefix(split, num_jobs, job_index)
    # Nothing is written into out_dir until the new output is complete and verified (data_prep.staging).
    staging = staging_dir(out_dir, shared=num_jobs > 1)
    if num_jobs == 1:
        discard(staging)  # leftovers of a killed run of this pid
    try:
        work = _Work(fn, staging, split, shard_max_samples, shard_max_bytes)
        manifest = _write_piece(
            staging, prefix, mine, work, workers, f"{source} {split}", shard_max_samples, shard_max_bytes,
            dropped_tasks or {}, dict(source=source, split=split, options=options, filters=filters),
        )
        write_json_atomic(staging / manifest_filename(num_jobs, job_index), manifest)
        if num_jobs == 1:
            if verify_output:
                verify(staging, members=False)
            commit(staging, out_dir)
    except BaseException:
        if num_jobs == 1:
            discard(staging)
        raise
    return manifest


def _write_piece(
    staging: Path,
    prefix: str,
    mine: Sequence[U],
    fn: Callable[[U], UnitResult],
    workers: int,
    desc: str,
    shard_max_samples: int,
    shard_max_bytes: int,
    dropped_tasks: Mapping[str, list[str]],
    about: dict[str, Any],
) -> dict[str, Any]:
    """Map ``fn`` over this piece's units, write their episodes as shards into ``staging``; the manifest."""
    tasks: dict[str, int] = {}
    categories: dict[str, list[str]] = {}
    skipped: Counter[str] = Counter()
    dropped: dict[str, list[str]] = {reason: list(names) for reason, names in dropped_tasks.items()}
    merged_extra: dict[str, Any] = {}
    skipped_records = SkippedRecords()
    written: list[dict[str, Any]] = []
    with EpisodeShardWriter(staging, prefix, shard_max_samples, shard_max_bytes) as writer:
        for result in map_in_order(fn, mine, workers, desc=desc):
            skipped_records.add(result.skipped)
            skipped.update(result.skipped)
            merge_extra(merged_extra, result.extra)
            if result.dropped:
                dropped.setdefault(result.dropped, []).append(result.task)
            count = sum(shard["num_samples"] for shard in result.written or ()) + len(result.episodes)
            if not count:
                continue
            if result.task in tasks and result.pools is None:
                raise PrepError(f"task {result.task!r} was produced twice")
            for episode in result.episodes:
                writer.write(episode)
            written += result.written or []
            tasks[result.task] = tasks.get(result.task, 0) + count
            categories[result.task] = list(result.categories)
    return build_manifest(
        **about,
        shards=writer.shards + written,
        tasks=tasks,
        skipped=dict(skipped),
        categories=categories,
        dropped_tasks=dropped,
        extra=merged_extra,
        skipped_records=skipped_records.listing(),
    )


def run_prep_for(
    cfg: Any,
    *,
    source: str,
    units: Sequence[U],
    fn: Callable[[U], UnitResult],
    dropped_tasks: Mapping[str, list[str]] | None = None,
    filters: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """:func:`run_prep` with the options every prep config shares (``split``, ``out``, ``workers``, job-array
    piece, shard limits); the manifest records the options, less where and how the work ran."""
    options = dataclasses.asdict(cfg)
    for key in ("workers", "src", "out", "verify"):  # where and how the work ran does not change the output
        options.pop(key)
    return run_prep(
        source=source,
        split=cfg.split,
        out_dir=cfg.out,
        units=units,
        fn=fn,
        options=options,
        workers=cfg.workers,
        num_jobs=cfg.num_jobs,
        job_index=cfg.job_index,
        shard_max_samples=cfg.shard_max_samples,
        shard_max_bytes=cfg.shard_max_bytes,
        dropped_tasks=dropped_tasks,
        filters=filters,
        verify_output=cfg.verify,
    )


def add_run_options(parser: argparse.ArgumentParser, defaults: Any, unit: str) -> None:
    """The command-line options every prep job shares: shard limits, parallel workers, job-array piece, --skip-bad."""
    add = parser.add_argument
    add("--shard-max-samples", type=int, default=defaults.shard_max_samples, help="episodes per shard (default: %(default)s)")
    add("--shard-max-bytes", type=int, default=defaults.shard_max_bytes, help="bytes per shard (default: %(default)s)")
    add("--workers", type=int, default=defaults.workers, help=f"processes preparing {unit}s")
    add("--num-jobs", type=int, default=defaults.num_jobs, help="pieces of a job array (then run data_prep.merge)")
    add("--job-index", type=int, default=defaults.job_index, help="this piece (e.g. $SLURM_ARRAY_TASK_ID)")
    add("--skip-bad", action="store_true", help=f"skip and count bad {unit}s/records instead of stopping")
    add("--no-verify", dest="verify", action="store_false",
        help="swap the new output in without checking its files first (size, sha256; default: check)")


def prep_main(
    parser: argparse.ArgumentParser,
    config_cls: type,
    section: str,
    prepare: Callable[[Any], dict[str, Any]],
    argv: Sequence[str] | None = None,
    report: Callable[[dict[str, Any]], list[str]] | None = None,
) -> int:
    """A prep command: parse, build the ``section`` config, run ``prepare``; print what was written (and
    ``report``'s lines). Exit 2 with the error on bad input or options."""
    from hypertrain.config import ConfigError, from_dict

    args = parser.parse_args(argv)
    try:
        cfg = from_dict(config_cls, vars(args), prefix=section)
        manifest = prepare(cfg)
    except (PrepError, ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(summarize(manifest, cfg.out))
    for line in report(manifest) if report else ():
        print(line)
    if cfg.num_jobs > 1:
        print(f"piece {cfg.job_index} of {cfg.num_jobs} done; run `python -m data_prep.merge {cfg.out}` after all pieces")
    return 0


def summarize(manifest: Mapping[str, Any], out_dir: str | Path) -> str:
    """A short human report of what a prep job wrote, dropped and skipped."""
    lines = [
        f"wrote {manifest['num_samples']} episodes of {len(manifest['tasks'])} tasks "
        f"in {len(manifest['shards'])} shard(s) to {out_dir}"
    ]
    for reason, names in manifest.get("dropped_tasks", {}).items():
        shown = ", ".join(names[:5]) + (" ..." if len(names) > 5 else "")
        lines.append(f"dropped {len(names)} task(s): {reason} ({shown})")
    for reason, count in manifest.get("skipped", {}).items():
        lines.append(f"skipped {count}: {reason}")
    return "\n".join(lines)
