"""P3 on disk: which files hold which subset and split, in either layout, and reading their rows.

1. The original repository: ``[data/]<subset>/<split>.tfrecord-NNNNN-of-NNNNN`` (``tf.train.Example`` records,
   read by :mod:`data_prep.tfrecord` with CRC checks), ``info.<split>.json`` (the feature spec) and
   ``stats.<split>.json`` (token counts).
2. Its parquet export: ``<subset>/<split>/NNNN.parquet`` (also ``<subset>/[prefix-]<split>[-NNNNN-of-NNNNN].parquet``).

:func:`discover` tells the layout from the files; :func:`read_rows` yields the same row dicts for both.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import re
from collections import defaultdict
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq

from data_prep.p3_mixture import SubsetName, match_dataset
from data_prep.runner import PrepError
from data_prep.tfrecord import TFRecordError, decode_features, iter_records, parse_example

INPUT, TARGET = "inputs_pretokenized", "targets_pretokenized"
INPUT_IDS, TARGET_IDS = "inputs", "targets"
SCORE_COLUMNS = ("idx", "is_correct")
Layout = Literal["tfrecord", "parquet"]

_TFRECORD_RE = re.compile(r"^(?P<split>[A-Za-z0-9_]+)\.tfrecord-(?P<shard>\d{5})-of-(?P<total>\d{5})$")
_PARQUET_RE = re.compile(
    r"^(?:(?P<prefix>.*?)-)?(?P<split>[A-Za-z][A-Za-z0-9_]*)(?:-\d{5}-of-\d{5}(?:-[0-9a-f]+)?)?\.parquet$"
)


# --------------------------------------------------------------------------------------------------
# Layout: which files hold which subset and split
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SplitFiles:
    """The files of one split of one subset, in row order."""

    subset_dir: str
    split: str
    layout: Layout
    files: tuple[str, ...]

    @property
    def where(self) -> str:
        return f"{self.subset_dir} ({self.split} split)"

    def sidecar(self, kind: str) -> Path:
        """``info.<split>.json`` / ``stats.<split>.json`` beside the data."""
        return Path(self.subset_dir) / f"{kind}.{self.split}.json"


@dataclasses.dataclass(frozen=True)
class Subset:
    """One prompted subset folder: its name, what the name says, and its splits."""

    name: SubsetName
    path: str
    splits: dict[str, SplitFiles]

    @property
    def folder(self) -> str:
        return self.name.folder

    @property
    def categories(self) -> list[str]:
        """The episodes' categories: the subset's dataset (none when no known dataset matches)."""
        return [self.name.dataset] if self.name.dataset else []


def _subset_root(src: Path) -> Path:
    return src / "data" if (src / "data").is_dir() else src


def _tfrecord_splits(folder: Path) -> dict[str, SplitFiles]:
    shards: dict[str, dict[int, tuple[int, Path]]] = defaultdict(dict)
    for path in folder.iterdir():
        match = _TFRECORD_RE.match(path.name)
        if match:
            shards[match["split"]][int(match["shard"])] = (int(match["total"]), path)
    splits = {}
    for split, found in sorted(shards.items()):
        totals = {total for total, _ in found.values()}
        total = max(totals)
        if len(totals) > 1 or sorted(found) != list(range(total)):
            raise PrepError(
                f"{folder}: split {split!r} has TFRecord shards {sorted(found)} of {sorted(totals)} "
                f"(expected 00000..{total - 1:05d} of {total:05d}: a shard is missing)"
            )
        files = tuple(str(found[i][1]) for i in range(total))
        splits[split] = SplitFiles(str(folder), split, "tfrecord", files)
    return splits


def _parquet_split(folder: Path, path: Path) -> str:
    parts = [p for p in path.relative_to(folder).parts[:-1] if p not in ("data", "partial")]
    if parts:
        return parts[0].removeprefix("partial-")
    match = _PARQUET_RE.match(path.name)
    if not match:
        raise PrepError(
            f"{path}: cannot tell the split of this parquet file (expected <split>/*.parquet or <split>-*.parquet)"
        )
    return match["split"]


def _parquet_splits(folder: Path) -> dict[str, SplitFiles]:
    files: dict[str, list[str]] = defaultdict(list)
    for path in sorted(folder.rglob("*.parquet")):
        files[_parquet_split(folder, path)].append(str(path))
    return {s: SplitFiles(str(folder), s, "parquet", tuple(f)) for s, f in sorted(files.items())}


def discover(src: str | Path) -> tuple[Layout, dict[str, Subset]]:
    """Detect the layout of ``src`` and list its subset folders (sorted) with their splits."""
    src = Path(src)
    if not src.is_dir():
        raise PrepError(f"--src {src}: not a directory")
    root = _subset_root(src)
    subsets: dict[str, Subset] = {}
    layouts: dict[Layout, str] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        splits = _tfrecord_splits(folder)
        parquet = _parquet_splits(folder)
        if splits and parquet:
            raise PrepError(f"{folder}: holds both TFRecord and parquet files; use one layout per copy of P3")
        splits = splits or parquet
        if not splits:
            continue
        layout = next(iter(splits.values())).layout
        layouts.setdefault(layout, folder.name)
        subsets[folder.name] = Subset(match_dataset(folder.name), str(folder), splits)
    if len(layouts) > 1:
        raise PrepError(
            f"{root}: mixes layouts (TFRecord in {layouts['tfrecord']}, parquet in {layouts['parquet']})"
        )
    if not layouts:
        raise PrepError(
            f"{src}: unknown layout: no subset folder holds P3 data (expected [data/]<subset>/<split>.tfrecord-"
            "00000-of-0000N as in the P3 repository, or <subset>/<split>/*.parquet as in its parquet export)"
        )
    return next(iter(layouts)), subsets


# --------------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------------


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PrepError(f"{path}: missing ({what})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PrepError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise PrepError(f"{path}: expected a JSON object")
    return data


def _feature_spec(split: SplitFiles) -> dict[str, dict[str, Any]]:
    info = read_json(
        split.sidecar("info"), "every split of the P3 repository layout has one; it declares the features"
    )
    features = info.get("features")
    if not isinstance(features, dict) or not all(isinstance(f, dict) for f in features.values()):
        raise PrepError(f"{split.sidecar('info')}: has no 'features' mapping")
    return features


def _parquet_columns(split: SplitFiles) -> tuple[str, ...]:
    columns: tuple[str, ...] | None = None
    for path in split.files:
        names = tuple(pq.read_schema(path).names)
        if columns is not None and set(names) != set(columns):
            raise PrepError(
                f"{path}: columns {sorted(names)} differ from {split.files[0]}'s {sorted(columns)}"
            )
        columns = names
    return columns or ()


def columns_of(split: SplitFiles) -> frozenset[str]:
    """The features (TFRecord, from ``info.<split>.json``) or columns (parquet) of a split."""
    if split.layout == "tfrecord":
        return frozenset(_feature_spec(split))
    return frozenset(_parquet_columns(split))


def count_rows(split: SplitFiles) -> int:
    """Rows of a split (TFRecord: one pass over the files, checking every record's CRCs)."""
    if split.layout == "parquet":
        return sum(pq.ParquetFile(path).metadata.num_rows for path in split.files)
    return sum(sum(1 for _ in iter_records(path)) for path in split.files)


def read_rows(
    split: SplitFiles, columns: Collection[str], indices: Sequence[int] | None = None
) -> dict[int, dict[str, Any]]:
    """``{row index: {column: value}}`` for the rows in sorted ``indices`` (all rows if None), in row order.

    ``columns`` that the split does not have are left out of the rows; a declared feature missing from a record
    (TFRecord) or a null value (parquet) raises :class:`PrepError` naming the file and row.
    """
    present = [c for c in columns if c in columns_of(split)]
    rows = (
        _read_tfrecord(split, present, indices)
        if split.layout == "tfrecord"
        else _read_parquet(split, present, indices)
    )
    for index, row in rows.items():
        for name, value in row.items():
            if value is None or (name in (INPUT, TARGET) and not isinstance(value, str)):
                raise PrepError(
                    f"{split.where}: row {index}: {name} is {value!r}, expected {'a string' if value is not None else 'a value'}"
                )
    return rows


def _read_tfrecord(
    split: SplitFiles, columns: list[str], indices: Sequence[int] | None
) -> dict[int, dict[str, Any]]:
    spec = {c: _feature_spec(split)[c] for c in columns}
    wanted = None if indices is None else set(indices)
    last = max(wanted, default=-1) if wanted is not None else None
    rows: dict[int, dict[str, Any]] = {}
    base = 0
    for path in split.files:
        if last is not None and base > last:
            break  # every wanted row has been read
        local = -1
        for local, data in iter_records(path):
            index = base + local
            if last is not None and index > last:
                break
            if wanted is not None and index not in wanted:
                continue
            where = f"{path}: record {local}"
            try:
                raw = parse_example(data, spec)
            except ValueError as err:
                raise TFRecordError(f"{where}: {err}") from None
            rows[index] = decode_features(raw, spec, where)
        base += local + 1
    return rows


def _read_parquet(
    split: SplitFiles, columns: list[str], indices: Sequence[int] | None
) -> dict[int, dict[str, Any]]:
    rows: dict[int, dict[str, Any]] = {}
    base = 0
    for path in split.files:
        handle = pq.ParquetFile(path)
        for group in range(handle.num_row_groups):
            size = handle.metadata.row_group(group).num_rows
            if indices is None:
                local = None
            else:
                lo, hi = bisect.bisect_left(indices, base), bisect.bisect_left(indices, base + size)
                local = [i - base for i in indices[lo:hi]]
            if local != []:
                table = handle.read_row_group(group, columns=columns)
                if local is not None:
                    table = table.take(local)
                for offset, row in zip(local or range(size), table.to_pylist(), strict=True):
                    rows[base + offset] = row
            base += size
    return rows
