"""Small P3 copies for tests and benchmarks, in both layouts.

- :func:`write_tfrecord_subset`: the P3 repository layout (``data/<subset>/<split>.tfrecord-NNNNN-of-NNNNN``,
  ``info.<split>.json``, ``stats.<split>.json``), written with :mod:`data_prep.tfrecord`'s encoder;
- :func:`write_parquet_subset`: the parquet export (``<subset>/<split>/NNNN.parquet``) with the column types of
  the export (``list<int32>`` token ids, strings, ``list<string>`` choices, ``bool``, ``float``);
- :func:`generative_rows`, :func:`choice_rows`, :func:`score_eval_rows`: synthetic rows of each P3 kind;
- :func:`sample_rows`: the real rows of the shared P3 sample, to copy into the other layout.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from data_prep.tfrecord import decode_features, encode_example, frame_record, iter_records, parse_example

Row = dict[str, Any]

FEATURES: dict[str, dict[str, Any]] = {
    "inputs": {"dtype": "int32", "shape": [None]},
    "inputs_pretokenized": {"dtype": "string", "shape": []},
    "targets": {"dtype": "int32", "shape": [None]},
    "targets_pretokenized": {"dtype": "string", "shape": []},
    "answer_choices": {"dtype": "string", "shape": [None]},
    "idx": {"dtype": "int32", "shape": [None]},
    "is_correct": {"dtype": "bool", "shape": []},
    "weight": {"dtype": "float32", "shape": []},
}
_KIND = {"string": "bytes", "int32": "int64", "bool": "int64", "float32": "float"}
_ARROW = {
    "inputs": pa.list_(pa.int32()),
    "inputs_pretokenized": pa.string(),
    "targets": pa.list_(pa.int32()),
    "targets_pretokenized": pa.string(),
    "answer_choices": pa.list_(pa.string()),
    "idx": pa.list_(pa.int32()),
    "is_correct": pa.bool_(),
    "weight": pa.float32(),
}


def _fake_ids(text: str) -> list[int]:
    return [3 + (sum(map(ord, word)) % 32000) for word in text.split()]


def generative_rows(n: int, prefix: str = "q", input_words: int = 8, seed: int = 0) -> list[Row]:
    """Rows with distinct inputs and targets (and fake token ids: targets end with EOS = 1)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text = f"{prefix} {i}: " + " ".join(f"w{rng.randrange(1000)}" for _ in range(input_words))
        target = f"answer {prefix} {i}"
        rows.append(
            {
                "inputs": _fake_ids(text),
                "inputs_pretokenized": text + "\n",
                "targets": [*_fake_ids(target), 1],
                "targets_pretokenized": f"\n{target}\n",
            }
        )
    return rows


def choice_rows(n: int, prefix: str = "c", num_choices: int = 3) -> list[Row]:
    """Rows with ``answer_choices`` (stripped) and the target (unstripped) equal to one of them."""
    rows = generative_rows(n, prefix)
    for i, row in enumerate(rows):
        choices = [f"option {prefix} {i}-{c}" for c in range(num_choices)]
        gold = choices[i % num_choices]
        row.update(answer_choices=choices, targets_pretokenized=f"\n{gold}", targets=[*_fake_ids(gold), 1])
    return rows


def score_eval_rows(
    examples: int, num_choices: int = 3, prefix: str = "s", shuffle_seed: int | None = 0
) -> tuple[list[Row], list[int]]:
    """One row per (example, choice) with ``idx``/``is_correct``, shuffled so that an example's rows are not
    adjacent; returns the rows and each example's gold choice."""
    rows, gold = [], []
    for example in range(examples):
        label = (example * 7 + 1) % num_choices
        gold.append(label)
        text = f"{prefix} question {example}: pick one"
        for choice in range(num_choices):
            target = f"{prefix} ending {example}.{choice}"
            rows.append(
                {
                    "idx": [example, choice],
                    "inputs": _fake_ids(text),
                    "inputs_pretokenized": text,
                    "is_correct": choice == label,
                    "targets": [*_fake_ids(target), 1],
                    "targets_pretokenized": target,
                    "weight": 1.0,
                }
            )
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(rows)
    return rows, gold


def write_tfrecord_subset(
    root: Path,
    subset: str,
    split: str,
    rows: Sequence[Row],
    *,
    num_shards: int = 1,
    features: dict[str, dict[str, Any]] | None = None,
    stats: dict[str, Any] | None = None,
) -> Path:
    """``root/data/<subset>/<split>.tfrecord-*`` + ``info.<split>.json`` + ``stats.<split>.json``; returns the folder.

    ``features`` defaults to the spec of the columns the rows have; ``stats`` to the real token counts.
    """
    folder = root / "data" / subset
    folder.mkdir(parents=True, exist_ok=True)
    spec = features or {name: FEATURES[name] for name in sorted({k for row in rows for k in row})}
    for shard in range(num_shards):
        with open(folder / f"{split}.tfrecord-{shard:05d}-of-{num_shards:05d}", "wb") as handle:
            for row in rows[shard * len(rows) // num_shards : (shard + 1) * len(rows) // num_shards]:
                encoded = {}
                for name, value in row.items():
                    values = value if isinstance(value, list) else [value]
                    encoded[name] = (_KIND[FEATURES[name]["dtype"]], values)
                handle.write(frame_record(encode_example(encoded)))
    info = {"features": spec, "num_shards": num_shards, "seqio_version": "0.0.6"}
    (folder / f"info.{split}.json").write_text(json.dumps(info, indent=2))
    if stats is None:
        lengths = [len(row.get("inputs", [])) for row in rows]
        stats = {
            "examples": len(rows),
            "inputs_tokens": sum(lengths),
            "inputs_max_tokens": max(lengths, default=0),
        }
    (folder / f"stats.{split}.json").write_text(json.dumps(stats))
    return folder


def write_parquet_subset(
    root: Path,
    subset: str,
    split: str,
    rows: Sequence[Row],
    *,
    num_files: int = 1,
    row_group_size: int | None = None,
) -> Path:
    """``root/<subset>/<split>/NNNN.parquet`` (the parquet export's layout); returns the subset folder."""
    folder = root / subset
    (folder / split).mkdir(parents=True, exist_ok=True)
    names = sorted({k for row in rows for k in row})
    schema = pa.schema([(name, _ARROW[name]) for name in names])
    for index in range(num_files):
        part = rows[index * len(rows) // num_files : (index + 1) * len(rows) // num_files]
        table = pa.Table.from_pylist(list(part), schema=schema)
        pq.write_table(table, folder / split / f"{index:04d}.parquet", row_group_size=row_group_size)
    return folder


def sample_rows(sample: Path, subset: str, split: str) -> list[Row]:
    """The rows of one split of the real P3 sample, decoded with its info.json."""
    folder = sample / "data" / subset
    spec = json.loads((folder / f"info.{split}.json").read_text())["features"]
    rows = []
    for path in sorted(folder.glob(f"{split}.tfrecord-*")):
        for index, data in iter_records(path):
            rows.append(decode_features(parse_example(data), spec, f"{path}: record {index}"))
    return rows
