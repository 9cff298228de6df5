"""Episode shards: a crash-safe, reproducible WebDataset writer, the manifest, job-array merge and verify.

Layout of a prepared directory::

    <out>/<split>-000000.tar ...          shards (one ``<key>.json`` member per episode)
    <out>/manifest.json                   what the shards hold (see :func:`build_manifest`)

Job-array pieces write ``<split>-j0003-000000.tar`` and ``manifest.part-0003-of-0008.json``;
:func:`merge_manifests` joins the parts into one ``manifest.json`` (shards are not renamed).

Guarantees:
- a shard exists under its final name only once it is complete (written as ``.tmp``, renamed on close);
- the same episodes give byte-identical tars (fixed mtime/owner/mode, canonical JSON) and manifests;
- every shard's sample count and sha256 are in the manifest, and :func:`verify` re-checks them.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hypertrain.episode import Episode

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
_PART_RE = re.compile(r"manifest\.part-(\d{4})-of-(\d{4})\.json$")
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class ShardError(RuntimeError):
    """A prepared directory does not match its manifest (missing, corrupt or truncated shard, bad counts)."""


def sample_key(episode_id: str) -> str:
    """WebDataset key for an episode id: dots and slashes would split or nest the key, so map them to ``_``."""
    return _KEY_UNSAFE.sub("_", episode_id)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def shard_prefix(split: str, num_jobs: int = 1, job_index: int = 0) -> str:
    return split if num_jobs == 1 else f"{split}-j{job_index:04d}"


class EpisodeShardWriter:
    """Writes episodes into size- and count-bounded tar shards (WebDataset's layout: ``<key>.json`` members).

    Written with :mod:`tarfile` (no webdataset import, so prep worker processes do not load torch). Each shard is
    written to ``<name>.tmp`` and renamed when complete, so a killed job never leaves a truncated shard under a
    final name; tar headers are fixed (mtime 0, owner ``hypertrain``, mode 0444) so equal input gives equal bytes.
    Use as a context manager; :attr:`shards` lists what was written.
    """

    def __init__(self, out_dir: str | Path, prefix: str, max_samples: int, max_bytes: int) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[dict[str, Any]] = []
        self._keys: set[str] = set()
        self._next_index = 0
        self._path: Path | None = None
        self._handle: Any = None
        self._tar: tarfile.TarFile | None = None
        self._count = 0
        remove_stale_shards(self.out_dir, prefix)

    def write(self, episode: Episode) -> None:
        key = sample_key(episode.id)
        if key in self._keys:
            raise ValueError(f"duplicate episode id {episode.id!r} (key {key!r}) in {self.prefix}")
        self._keys.add(key)
        if self._tar is not None and (self._count >= self.max_samples or self._handle.tell() >= self.max_bytes):
            self._finish()
        if self._tar is None:
            self._open()
        payload = episode.to_json()
        info = tarfile.TarInfo(f"{key}.json")
        info.size, info.mtime, info.mode = len(payload), 0, 0o444
        info.uname = info.gname = "hypertrain"
        self._tar.addfile(info, io.BytesIO(payload))
        self._count += 1

    def new_shard(self) -> None:
        """End the current shard (if it holds anything): what is written next starts a shard of its own."""
        if self._tar is not None and self._count:
            self._finish()

    def _open(self) -> None:
        self._path = self.out_dir / f"{self.prefix}-{self._next_index:06d}.tar"
        self._next_index += 1
        self._handle = open(f"{self._path}.tmp", "wb")  # noqa: SIM115 (closed in _finish / __exit__)
        self._tar = tarfile.open(fileobj=self._handle, mode="w|", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self._count = 0

    def _finish(self) -> None:
        assert self._tar is not None and self._path is not None
        self._tar.close()
        self._handle.close()
        tmp = Path(f"{self._path}.tmp")
        if self._count:
            entry = {"file": self._path.name, "num_samples": self._count, "bytes": tmp.stat().st_size,
                     "sha256": sha256_file(tmp)}
            os.replace(tmp, self._path)
            self.shards.append(entry)
        else:
            tmp.unlink(missing_ok=True)
        self._tar = self._handle = None

    def close(self) -> None:
        if self._tar is not None:
            self._finish()

    def __enter__(self) -> EpisodeShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # leave no partial shard behind under any name
            with contextlib.suppress(Exception):
                if self._tar is not None:
                    self._tar.close()
            if self._handle is not None:
                self._handle.close()
            for tmp in self.out_dir.glob(f"{self.prefix}-*.tar.tmp"):
                tmp.unlink(missing_ok=True)


def remove_stale_shards(out_dir: Path, prefix: str) -> None:
    """Delete shards of an earlier run with the same prefix, so the directory holds only this run's."""
    pattern = re.compile(re.escape(prefix) + r"-\d{6}\.tar(\.tmp)?$")
    for path in out_dir.iterdir():
        if pattern.match(path.name):
            path.unlink()


TASKS_IN_BLOCKS = "tasks_in_blocks"
"""A ``filters`` key: the prep split tasks into blocks (units), so a task's episodes may come from several pieces."""


def build_manifest(
    *,
    source: str,
    split: str,
    options: Mapping[str, Any],
    shards: list[dict[str, Any]],
    tasks: Mapping[str, int],
    skipped: Mapping[str, int],
    categories: Mapping[str, list[str]] | None = None,
    dropped_tasks: Mapping[str, list[str]] | None = None,
    filters: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    skipped_records: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The manifest of a prepared directory. Keys are sorted when written, so equal content gives equal bytes.

    - ``tasks``: task → number of episodes written;
    - ``skipped``: reason → count (``task:<why>`` counts tasks, ``instance:<why>`` counts instances);
    - ``dropped_tasks``: reason → task names that the task filter removed before reading;
    - ``filters``: run-level decisions made before the work was split (identical in every job-array piece);
    - ``extra``: source-specific facts gathered per unit (merged across pieces: dicts union, numbers add);
    - ``skipped_records``: ``records`` (each skip: reason, task, file, index/id, error) and ``unlisted`` (skips
      beyond the listing's cap, counted only).
    """
    num_samples = sum(shard["num_samples"] for shard in shards)
    if num_samples != sum(tasks.values()):
        raise AssertionError(f"shards hold {num_samples} samples but tasks count {sum(tasks.values())}")
    return {
        "format_version": FORMAT_VERSION,
        "source": source,
        "split": split,
        "options": dict(options),
        "num_samples": num_samples,
        "shards": shards,
        "tasks": dict(sorted(tasks.items())),
        "categories": dict(sorted((categories or {}).items())),
        "skipped": dict(sorted(skipped.items())),
        "dropped_tasks": {k: sorted(v) for k, v in sorted((dropped_tasks or {}).items())},
        "filters": dict(filters or {}),
        "extra": dict(extra or {}),
        "skipped_records": dict(skipped_records or {"records": [], "unlisted": 0}),
    }


def manifest_filename(num_jobs: int = 1, job_index: int = 0) -> str:
    if num_jobs == 1:
        return MANIFEST_NAME
    return f"manifest.part-{job_index:04d}-of-{num_jobs:04d}.json"


def write_json_atomic(path: str | Path, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Read ``manifest.json`` (or a directory holding one), with errors that name the file."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ShardError(f"no manifest at {path}") from err
    except json.JSONDecodeError as err:
        raise ShardError(f"{path}: manifest is not valid JSON ({err})") from err
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ShardError(f"{path}: manifest format_version {version!r}, this hypertrain reads {FORMAT_VERSION}")
    return manifest


def merge_manifests(out_dir: str | Path, remove_parts: bool = True, verify_output: bool = True) -> dict[str, Any]:
    """Join the partial manifests of a job array into ``manifest.json`` and swap the result in for ``out_dir``.

    The pieces wrote into the array's staging directory (:mod:`data_prep.staging`); ``out_dir`` keeps its
    earlier content until the merged output is complete and (unless ``verify_output`` is false) verified.
    All parts must be present and agree on everything but ``job_index``. Episodes keep piece order, so the
    merged directory holds the same episodes, in the same order, as a single run over the same input.
    """
    from data_prep.staging import commit, staging_dir

    target = Path(out_dir)
    staged = staging_dir(target, shared=True)
    if not staged.is_dir():
        raise ShardError(f"{target}: no job-array output to merge (expected the pieces' staging directory {staged})")
    parts: dict[int, Path] = {}
    totals = set()
    for path in sorted(staged.iterdir()):
        match = _PART_RE.match(path.name)
        if match:
            parts[int(match.group(1))] = path
            totals.add(int(match.group(2)))
    if not parts:
        raise ShardError(f"{staged}: no partial manifests (manifest.part-*-of-*.json) to merge")
    if len(totals) != 1:
        raise ShardError(
            f"{staged}: partial manifests from different job arrays: of-{sorted(totals)} (delete {staged} and "
            "run the array again)"
        )
    (num_jobs,) = totals
    missing = sorted(set(range(num_jobs)) - set(parts))
    if missing:
        raise ShardError(f"{staged}: job-array pieces {missing} of {num_jobs} have no partial manifest yet")

    pieces = [json.loads(parts[i].read_text(encoding="utf-8")) for i in range(num_jobs)]
    first = pieces[0]
    shared_keys = ("source", "split", "filters")
    for index, piece in enumerate(pieces):
        for key in shared_keys:
            if piece[key] != first[key]:
                raise ShardError(f"{parts[index].name}: {key} differs from piece 0")
        options = {k: v for k, v in piece["options"].items() if k != "job_index"}
        if options != {k: v for k, v in first["options"].items() if k != "job_index"}:
            raise ShardError(f"{parts[index].name}: options differ from piece 0")

    tasks: dict[str, int] = {}
    categories: dict[str, list[str]] = {}
    skipped: Counter[str] = Counter()
    shards: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    skipped_records: dict[str, Any] = {"records": [], "unlisted": 0}
    # Run-level drops appear in every piece, per-unit drops in one: a set union counts each task once.
    dropped: dict[str, set[str]] = {}
    for index, piece in enumerate(pieces):
        for reason, names in piece["dropped_tasks"].items():
            dropped.setdefault(reason, set()).update(names)
        overlap = set(tasks) & set(piece["tasks"])
        if overlap and not first["filters"].get(TASKS_IN_BLOCKS):
            raise ShardError(f"{parts[index].name}: tasks {sorted(overlap)[:3]} also appear in another piece")
        for task, count in piece["tasks"].items():  # a task prepared in blocks may span pieces
            tasks[task] = tasks.get(task, 0) + count
        categories.update(piece["categories"])
        skipped.update(piece["skipped"])
        shards.extend(piece["shards"])
        extra = merge_extra(extra, piece.get("extra", {}))
        skipped_records = merge_extra(skipped_records, piece.get("skipped_records", {}))

    options = dict(first["options"], job_index=0, num_jobs=1)
    manifest = build_manifest(
        source=first["source"],
        split=first["split"],
        options=options,
        shards=shards,
        tasks=tasks,
        skipped=dict(skipped),
        categories=categories,
        dropped_tasks={reason: sorted(names) for reason, names in dropped.items()},
        filters=first["filters"],
        extra=extra,
        skipped_records=skipped_records,
    )
    manifest["merged_from"] = num_jobs
    write_json_atomic(staged / MANIFEST_NAME, manifest)
    if verify_output:
        verify(staged, members=False)
    if remove_parts:
        for path in parts.values():
            path.unlink()
    commit(staged, target)
    return manifest


def merge_extra(into: dict[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """Fold source-specific manifest facts together: dicts union, numbers add, lists concatenate;
    anything else must be equal."""
    for key, value in new.items():
        if key not in into:
            into[key] = json.loads(json.dumps(value))
        elif isinstance(value, Mapping) and isinstance(into[key], dict):
            merge_extra(into[key], value)
        elif isinstance(value, int | float) and not isinstance(value, bool) and isinstance(into[key], int | float):
            into[key] += value
        elif isinstance(value, list) and isinstance(into[key], list):
            into[key].extend(value)
        elif into[key] != value:
            raise ShardError(f"extra.{key} disagrees between parts: {into[key]!r} vs {value!r}")
    return into


def iter_shard_episodes(path: str | Path) -> Iterable[Episode]:
    """Episodes of one shard, in order (plain tarfile: strict, raises on truncation)."""
    for _key, payload in _iter_members(Path(path)):
        yield Episode.from_json(payload)


def _iter_members(path: Path) -> Iterable[tuple[str, bytes]]:
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            handle = tar.extractfile(member)
            assert handle is not None
            data = handle.read()
            if len(data) != member.size:
                raise ShardError(f"{path}: member {member.name} is truncated")
            yield member.name, data


def read_episodes(out_dir: str | Path) -> list[Episode]:
    """All episodes of a prepared directory, in manifest order (for tests and small evaluation sets)."""
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    episodes: list[Episode] = []
    for shard in manifest["shards"]:
        episodes.extend(iter_shard_episodes(out_dir / shard["file"]))
    return episodes


def verify(out_dir: str | Path, members: bool = True) -> dict[str, Any]:
    """Re-read every shard of ``out_dir`` and check it against the manifest; raise ShardError on a mismatch.

    Checks: each listed shard exists with its size and sha256, it reads to the end as a tar (truncation is caught),
    every member is ``<key>.json`` holding a valid episode, per-shard and total sample counts match, and
    the per-task counts match the episodes found. ``members=False`` checks the files only (presence, size,
    sha256): what a prep job checks before it swaps its output in, since its writer counted and hashed those very
    bytes (reading the tars back would cost about as much as the prep itself).
    """
    out_dir = Path(out_dir)
    manifest = read_manifest(out_dir)
    from hypertrain.progress import progress

    task_counts: Counter[str] = Counter()
    total = 0
    with progress(len(manifest["shards"]), f"verify {out_dir.name}", unit="shard") as bar:
        for shard in manifest["shards"]:
            path = out_dir / shard["file"]
            check_shard_file(path, shard.get("bytes"), shard["sha256"])
            if members:
                total += _check_members(path, shard, task_counts)
            bar.update()
    if not members:
        return {"shards": len(manifest["shards"]), "num_samples": manifest["num_samples"], "tasks": len(manifest["tasks"])}
    if total != manifest["num_samples"]:
        raise ShardError(f"{out_dir}: shards hold {total} samples, manifest says {manifest['num_samples']}")
    if dict(task_counts) != manifest["tasks"]:
        diff = {t for t in set(task_counts) | set(manifest["tasks"]) if task_counts[t] != manifest["tasks"].get(t)}
        raise ShardError(f"{out_dir}: per-task counts differ from the manifest for {sorted(diff)[:5]}")
    return {"shards": len(manifest["shards"]), "num_samples": total, "tasks": len(task_counts)}


def check_shard_file(path: str | Path, size: int | None, sha256: str | None) -> None:
    """Raise ShardError naming ``path`` unless it exists with the manifest's ``size`` and ``sha256`` (each checked
    only when given: older manifests record no size; a size-only check passes no digest)."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: shard listed in the manifest is missing")
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise ShardError(f"{path}: {actual} bytes, the manifest says {size} (truncated or replaced; re-run the prep)")
    if sha256 is not None and sha256_file(path) != sha256:
        raise ShardError(f"{path}: sha256 differs from the manifest (corrupt or modified; re-run the prep)")


def _check_members(path: Path, shard: Mapping[str, Any], task_counts: Counter[str]) -> int:
    """Read a shard's members as episodes (counted per task into ``task_counts``); returns how many."""
    count = 0
    try:
        for name, payload in _iter_members(path):
            if not name.endswith(".json"):
                raise ShardError(f"{path}: unexpected member {name} (episodes are <key>.json)")
            try:
                episode = Episode.from_json(payload)
            except ValueError as err:
                raise ShardError(f"{path}: member {name} is not a valid episode: {err}") from err
            task_counts[episode.task] += 1
            count += 1
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ShardError(f"{path}: unreadable or truncated tar ({err})") from err
    if count != shard["num_samples"]:
        raise ShardError(f"{path}: holds {count} samples, manifest says {shard['num_samples']}")
    return count
