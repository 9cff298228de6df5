"""Benchmark: P3 prep throughput (episodes/s) for 16-shot training episodes and for eval regrouping, both layouts.

The real sample's rows are replicated into a temporary P3 copy, written in the repository layout (TFRecord) and
as the parquet export: ``--train-subsets`` copies of the generative subset with ``--train-rows`` rows each
(every input made unique), and ``--eval-subsets`` score-eval subsets with ``--eval-examples`` examples of 4
choices each (rows shuffled so an example's rows are not adjacent, train split as large as validation).

    python benchmarks/prep_p3.py [--src ../shared/data/p3_sample] [--train-rows 1500] [--eval-examples 1000]
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from p3_fixtures import sample_rows, write_parquet_subset, write_tfrecord_subset  # noqa: E402

from data_prep import p3  # noqa: E402
from hypertrain.config import P3PrepConfig  # noqa: E402

DEFAULT_SRC = Path(__file__).resolve().parents[2] / "shared" / "data" / "p3_sample"
GENERATIVE = "adversarial_qa_dbert_based_on"
SCORE_EVAL = "hellaswag_complete_first_then_score_eval"


def train_rows(sample: Path, count: int, copy: int) -> list[dict]:
    base = sample_rows(sample, GENERATIVE, "train")
    rows = []
    for i in range(count):
        row = dict(base[i % len(base)])
        row["inputs_pretokenized"] = f"{row['inputs_pretokenized']} [{copy}.{i}]"
        rows.append(row)
    return rows


def eval_rows(sample: Path, examples: int, seed: int) -> list[dict]:
    base = sample_rows(sample, SCORE_EVAL, "validation")
    per_example: dict[int, list[dict]] = {}
    for row in base:
        per_example.setdefault(row["idx"][0], []).append(row)
    originals = sorted(per_example)
    rows = []
    for example in range(examples):
        for row in per_example[originals[example % len(originals)]]:
            rows.append(
                dict(
                    row,
                    idx=[example, row["idx"][1]],
                    inputs_pretokenized=f"{row['inputs_pretokenized']} [{example}]",
                )
            )
    random.Random(seed).shuffle(rows)
    return rows


def build(sample: Path, root: Path, args: argparse.Namespace) -> dict[str, int]:
    counts = {"train_rows": 0, "eval_rows": 0}
    for copy in range(args.train_subsets):
        rows = train_rows(sample, args.train_rows, copy)
        name = f"{GENERATIVE}_copy{copy}"
        write_tfrecord_subset(root / "tfrecord", name, "train", rows)
        write_parquet_subset(root / "parquet", name, "train", rows)
        counts["train_rows"] += len(rows)
    for copy in range(args.eval_subsets):
        name = SCORE_EVAL.replace("_score_eval", f"_copy{copy}_score_eval")
        for split, seed in (("validation", copy), ("train", 100 + copy)):
            rows = eval_rows(sample, args.eval_examples, seed)
            write_tfrecord_subset(root / "tfrecord", name, split, rows)
            write_parquet_subset(root / "parquet", name, split, rows)
            if split == "validation":
                counts["eval_rows"] += len(rows)
    return counts


def time_prep(src: Path, out: Path, split: str, workers: int) -> tuple[float, int]:
    subsets = [f"{GENERATIVE}_copy*"] if split == "train" else ["*_copy*_score_eval"]
    cfg = P3PrepConfig(
        src=str(src),
        out=str(out),
        split=split,
        subsets=subsets,
        shots=16,
        mixing_cap=0,
        workers=workers,
        shard_max_samples=2000,
    )
    start = time.perf_counter()
    manifest = p3.prepare(cfg)
    return time.perf_counter() - start, manifest["num_samples"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC)
    parser.add_argument("--train-subsets", type=int, default=2)
    parser.add_argument("--train-rows", type=int, default=1500)
    parser.add_argument("--eval-subsets", type=int, default=2)
    parser.add_argument("--eval-examples", type=int, default=1000)
    parser.add_argument(
        "--repeats", type=int, default=2, help="alternating runs per setting; the best is kept"
    )
    args = parser.parse_args()

    results: dict[tuple[str, str, int], tuple[float, int]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        counts = build(args.src, root, args)
        settings = [
            (layout, split, workers)
            for layout in ("tfrecord", "parquet")
            for split in ("train", "eval")
            for workers in (1, 2)
        ]
        for repeat in range(args.repeats):
            for layout, split, workers in settings:
                seconds, episodes = time_prep(
                    root / layout, root / f"out-{layout}-{split}-{workers}-{repeat}", split, workers
                )
                best = results.get((layout, split, workers), (float("inf"), episodes))[0]
                results[(layout, split, workers)] = (min(best, seconds), episodes)
        same = all(
            (root / f"out-tfrecord-{split}-1-0" / "manifest.json").read_bytes()
            == (root / f"out-tfrecord-{split}-2-0" / "manifest.json").read_bytes()
            for split in ("train", "eval")
        )

    print(
        f"P3 prep: {args.train_subsets} training subsets x {args.train_rows} rows ({counts['train_rows']} rows, 16 shots); "
        f"{args.eval_subsets} score-eval subsets x {args.eval_examples} examples x 4 choices ({counts['eval_rows']} rows); "
        f"best of {args.repeats}"
    )
    print(f"{'layout':>9} {'split':>6} {'workers':>8} {'episodes':>9} {'seconds':>8} {'episodes/s':>11}")
    for (layout, split, workers), (seconds, episodes) in results.items():
        print(
            f"{layout:>9} {split:>6} {workers:>8} {episodes:>9} {seconds:>8.2f} {episodes / seconds:>11.0f}"
        )
    print(f"manifests identical across worker counts: {same}")


if __name__ == "__main__":
    main()
