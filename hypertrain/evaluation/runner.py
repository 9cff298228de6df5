"""Distributed evaluation: split the work over ranks, gather, count every example once, report.

Work plan (identical on every rank, independent of the world size):

1. every rank reads each evaluation set in the same order (:mod:`hypertrain.evaluation.data`);
2. the examples are cut into **fixed batches**: consecutive examples of one task, at most ``eval.batch_size``;
   a batch's composition (hence its padding and its numbers) does not depend on how many ranks there are;
3. rank r takes the contiguous run of batches ``[r·k, (r+1)·k)``, ``k = ceil(batches / world)``; positions past
   the end wrap around to the first batches (padding), so all ranks run the same number of batches;
4. a rank makes a task's PEFT parameters once for its run of that task's batches (runs are contiguous, so at
   most the boundary tasks are shared between ranks);
5. rows are gathered with ``all_gather_object``; duplicates from the padding are dropped by example index and
   the result must hold every index exactly once.

Because each batch is computed exactly as on one rank, the gathered predictions are those of a 1-rank run.
Scores (ROUGE) are computed on the rank that made the prediction; every rank aggregates the same gathered rows.
Under ZeRO-3 (partitioned parameters: every forward is a collective) the ranks must run the same sequence of
module calls: every rank then makes the PEFT parameters of every task, in order, before its batches, and
generation runs with ``synced_gpus``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from hypertrain.evaluation import p3, sni
from hypertrain.evaluation.adapters import EvalModel, Tokens, eval_model
from hypertrain.evaluation.data import EvalError, EvalSet, load_eval_sets
from hypertrain.evaluation.metrics import SNI_METRICS, aggregate_p3, aggregate_sni
from hypertrain.metric_names import eval_name
from hypertrain.progress import progress

log = logging.getLogger("hypertrain")


@dataclasses.dataclass(frozen=True)
class WorkBatch:
    """Examples ``[start, stop)`` of one task (global indices into the set's episodes)."""

    task: str
    start: int
    stop: int


@dataclasses.dataclass
class SetResult:
    """One evaluation set's outcome (identical on every rank)."""

    name: str
    kind: str
    metrics: dict[str, Any]
    rows: list[dict[str, Any]]
    """Per example, by index: the predictions file."""
    seconds: float


def make_batches(eval_set: EvalSet, batch_size: int) -> list[WorkBatch]:
    """Consecutive examples of one task, at most ``batch_size`` per batch, in set order."""
    batches = []
    for task, indices in eval_set.task_ranges().items():
        for start in range(indices.start, indices.stop, batch_size):
            batches.append(WorkBatch(task, start, min(start + batch_size, indices.stop)))
    return batches


def rank_share(num_batches: int, rank: int, world_size: int) -> list[int]:
    """Batch positions of ``rank``: a contiguous run of ``ceil(n / world)``, wrapping around past the end."""
    if num_batches == 0:
        return []
    per_rank = math.ceil(num_batches / world_size)
    return [(rank * per_rank + i) % num_batches for i in range(per_rank)]


def gather_rows(rows: list[dict[str, Any]], num_examples: int, world_size: int) -> list[dict[str, Any]]:
    """All ranks' rows, each example once (padding duplicates dropped), sorted by index; checks completeness."""
    parts = [rows]
    if world_size > 1:
        parts = [None] * world_size  # type: ignore[list-item]
        dist.all_gather_object(parts, rows)
    unique: dict[int, dict[str, Any]] = {}
    for part in parts:
        for row in part:
            unique.setdefault(row["index"], row)
    if sorted(unique) != list(range(num_examples)):
        missing = sorted(set(range(num_examples)) - set(unique))
        raise RuntimeError(f"evaluation lost examples {missing[:10]} ({len(missing)} of {num_examples})")
    return [unique[i] for i in range(num_examples)]


def is_partitioned(method: torch.nn.Module) -> bool:
    """True under ZeRO-3: DeepSpeed has partitioned the parameters (every forward gathers them collectively)."""
    return any(hasattr(p, "ds_id") for p in method.parameters())


def rank_rows(
    model: EvalModel, tokens: Tokens, eval_set: EvalSet, cfg: Any, rank: int, world_size: int, synced: bool = False
) -> list[dict[str, Any]]:
    """This rank's share of ``eval_set``: one row per example of its batches (padding duplicates included)."""
    episodes = eval_set.episodes
    ranges = eval_set.task_ranges()
    batches = make_batches(eval_set, cfg.eval.batch_size)
    share = [batches[i] for i in rank_share(len(batches), rank, world_size)]
    ready: dict[str, Any] = {}
    if synced:  # every rank: every task's PEFT in the same order (the hypernetwork's forwards are collectives)
        needed = {b.task for b in share}
        for task, indices in ranges.items():
            peft = model.task_peft(task, episodes[indices.start : indices.stop])
            if task in needed:
                ready[task] = peft
    rows: list[dict[str, Any]] = []
    current: tuple[str, Any] | None = None
    shown = progress(sum(b.stop - b.start for b in share), f"eval {eval_set.name}", unit="example") if rank == 0 else None
    for batch in share:
        if synced:
            peft = ready[batch.task]
        elif current is not None and current[0] == batch.task:
            peft = current[1]
        else:
            indices = ranges[batch.task]
            peft = model.task_peft(batch.task, episodes[indices.start : indices.stop])
            current = (batch.task, peft)
        chunk = episodes[batch.start : batch.stop]
        group = eval_set.groups[batch.task]
        if eval_set.kind == "generation":
            predictions = sni.generate(
                model.main, tokens, chunk, peft, max_new_tokens=cfg.eval.max_new_tokens,
                num_beams=cfg.eval.num_beams, synced=synced,
            )
            rows.extend(sni.record(batch.start + i, e, p, group) for i, (e, p) in enumerate(zip(chunk, predictions, strict=True)))
        else:
            scores = p3.score(model.main, tokens, chunk, peft)
            rows.extend(p3.record(batch.start + i, e, s, group) for i, (e, s) in enumerate(zip(chunk, scores, strict=True)))
        if shown is not None:
            shown.update(len(chunk))
    if shown is not None:
        shown.close()
    return rows


def _run_set(
    model: EvalModel, tokens: Tokens, eval_set: EvalSet, cfg: Any, rank: int, world_size: int, synced: bool
) -> SetResult:
    start_time = time.perf_counter()
    rows = rank_rows(model, tokens, eval_set, cfg, rank, world_size, synced)
    rows = gather_rows(rows, len(eval_set.episodes), world_size)
    metrics = aggregate_sni(rows) if eval_set.kind == "generation" else aggregate_p3(rows)
    return SetResult(eval_set.name, eval_set.kind, metrics, rows, time.perf_counter() - start_time)


_SETS_CACHE: dict[tuple[tuple[str, ...], int], list[EvalSet]] = {}


def cached_eval_sets(directories: Sequence[str | Path], max_examples_per_task: int = 0) -> list[EvalSet]:
    """:func:`load_eval_sets`, read once per process (periodic evaluation reuses them)."""
    key = (tuple(str(Path(d).resolve()) for d in directories), max_examples_per_task)
    if key not in _SETS_CACHE:
        _SETS_CACHE[key] = load_eval_sets(directories, max_examples_per_task)
    return _SETS_CACHE[key]


@contextlib.contextmanager
def eval_mode(method: torch.nn.Module) -> Iterator[None]:
    """``method.eval()`` and ``no_grad`` for the block, then the previous mode again."""
    was_training = method.training
    method.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        method.train(was_training)


@contextlib.contextmanager
def preserved_rng(device: torch.device) -> Iterator[None]:
    """Leave torch (CPU and ``device``), Python and NumPy RNGs as they were: training must not notice."""
    py_state, np_state = random.getstate(), np.random.get_state()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def evaluate(
    method: torch.nn.Module,
    cfg: Any,
    tokenizer: Any,
    device: torch.device | str,
    rank: int = 0,
    world_size: int = 1,
    sets: Sequence[EvalSet] | None = None,
) -> list[SetResult]:
    """Evaluate ``method`` (unwrapped module) on ``sets`` (default: ``cfg.eval.data``); collective over ranks."""
    device = torch.device(device)
    if sets is None:
        if not cfg.eval.data:
            raise EvalError("eval.data: no evaluation directories given")
        sets = cached_eval_sets(cfg.eval.data, cfg.eval.max_examples_per_task)
    tokens = Tokens.for_config(cfg, tokenizer, device)
    model = eval_model(method, tokens, cfg.eval.batch_size, cfg.eval.retrieval_instances)
    synced = world_size > 1 and is_partitioned(method)
    with eval_mode(method):
        return [_run_set(model, tokens, s, cfg, rank, world_size, synced) for s in sets]


# --------------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------------


def _key(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_-." else "_" for ch in name)


def flat_metrics(results: Sequence[SetResult]) -> dict[str, float]:
    """MLflow metrics (:mod:`hypertrain.metric_names`): per set, each score overall and per family (S-NI category,
    P3 dataset), as fractions in [0, 1]; the counts and seconds as they are."""
    out: dict[str, float] = {}
    for result in results:
        m, name = result.metrics, result.name
        out[eval_name(name, "num_examples")] = m["num_examples"]
        out[eval_name(name, "time_s")] = result.seconds
        if result.kind == "generation":
            for metric in SNI_METRICS:
                out[eval_name(name, metric)] = m[metric] / 100.0
                for category, values in m["per_category"].items():
                    out[eval_name(name, metric, _key(category))] = values[metric] / 100.0
        else:
            out[eval_name(name, "accuracy")] = m["accuracy"] / 100.0
            out[eval_name(name, "dataset_median_average")] = m["dataset_median_average"] / 100.0
            for dataset, values in m["per_dataset"].items():
                out[eval_name(name, "median", _key(dataset))] = values["median"] / 100.0
                out[eval_name(name, "mean", _key(dataset))] = values["mean"] / 100.0
    return out


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def write_results(results: Sequence[SetResult], out_dir: str | Path, step: int | None = None) -> list[Path]:
    """``metrics.json`` (everything), and per set ``<name>_predictions.jsonl``, the same as a table
    (``<name>_predictions.csv``: the MLflow UI shows it in columns, prediction beside references) and
    ``<name>_tasks.csv`` (P3 also ``<name>_datasets.csv``). Instance scores in the files are ×100, like the
    aggregates."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "metrics.json"]
    summary = {"step": step, "metrics": flat_metrics(results), "sets": {r.name: {"kind": r.kind, **r.metrics} for r in results}}
    files[0].write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    for result in results:
        predictions = out / f"{result.name}_predictions.jsonl"
        tasks = out / f"{result.name}_tasks.csv"
        m = result.metrics
        if result.kind == "generation":
            _write_jsonl(predictions, [
                {k: v for k, v in row.items() if k != "index"} | {metric: 100.0 * row[metric] for metric in SNI_METRICS}
                for row in result.rows
            ])
            categories = {row["task"]: row["category"] for row in result.rows}
            _write_csv(tasks, ["task", "category", "num_examples", *SNI_METRICS], [
                [task, categories[task], v["num_examples"], *(v[metric] for metric in SNI_METRICS)]
                for task, v in m["per_task"].items()
            ])
            files += [predictions, tasks]
        else:
            _write_jsonl(predictions, [{k: v for k, v in row.items() if k != "index"} for row in result.rows])
            _write_csv(tasks, ["subset", "dataset", "num_examples", "accuracy"], [
                [subset, v["dataset"], v["num_examples"], v["accuracy"]] for subset, v in m["per_subset"].items()
            ])
            datasets = out / f"{result.name}_datasets.csv"
            _write_csv(datasets, ["dataset", "num_prompts", "median", "mean"], [
                [dataset, v["num_prompts"], v["median"], v["mean"]] for dataset, v in m["per_dataset"].items()
            ])
            files += [predictions, tasks, datasets]
        files.insert(-2 if result.kind == "generation" else -3, _predictions_table(predictions))
    return files


def _predictions_table(jsonl: Path) -> Path:
    """The predictions file as CSV (lists joined with `` | ``)."""
    rows = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
    header = list(rows[0]) if rows else []
    table = jsonl.with_suffix(".csv")
    _write_csv(table, header, [[" | ".join(map(str, v)) if isinstance(v, list) else v for v in (r.get(k) for k in header)]
                               for r in rows])
    return table


def report(results: Sequence[SetResult], tracker: Any, step: int, out_dir: str | Path, artifact_path: str) -> list[Path]:
    """Write the files to ``out_dir`` and send metrics (at ``step``) and files to the tracker (if any)."""
    files = write_results(results, out_dir, step)
    if tracker is not None:
        tracker.log_metrics(flat_metrics(results), step=step)
        for path in files:
            tracker.log_artifact(path, artifact_path)
    for result in results:
        m = result.metrics
        if result.kind == "generation":
            log.info("eval %s step %d: rougeL %.2f exact_match %.2f (%d examples, %.0f s)", result.name, step,
                     m["rougeL"], m["exact_match"], m["num_examples"], result.seconds)
        else:
            log.info("eval %s step %d: accuracy %.2f, dataset-median average %.2f (%d examples, %.0f s)", result.name,
                     step, m["accuracy"], m["dataset_median_average"], m["num_examples"], result.seconds)
    return files


def evaluation_due(cfg: Any, step: int) -> bool:
    """Evaluate at multiples of ``eval.every`` and at the last step, when ``eval.data`` is set."""
    if not cfg.eval.data:
        return False
    return step == cfg.train.total_steps or bool(cfg.eval.every and step % cfg.eval.every == 0)


def evaluate_in_training(
    method: torch.nn.Module,
    cfg: Any,
    tokenizer: Any,
    step: int,
    tracker: Any,
    rank: int,
    world_size: int,
    device: torch.device | str,
) -> list[SetResult] | None:
    """The trainer's hook, called by every rank after each step's checkpoint logic (a no-op unless due).

    Runs in eval mode without gradients, leaves the RNG streams and the train/eval mode as they were (the
    trainer's exact resume holds), writes ``<run.dir>/eval/step-N/`` on rank 0 and logs to the tracker at ``step``.
    """
    if not evaluation_due(cfg, step):
        return None
    device = torch.device(device)
    with preserved_rng(device):
        results = evaluate(method, cfg, tokenizer, device, rank, world_size)
    if rank == 0:
        tag = f"step-{step:08d}"
        report(results, tracker, step, Path(cfg.run.dir) / "eval" / tag, f"eval/{tag}")
    return results
