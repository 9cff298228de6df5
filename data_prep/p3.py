"""P3 (Public Pool of Prompts) → few-shot episode shards: T0's training mixture and held-out evaluation.

``python -m data_prep.p3 --src P3 --out data/p3/train --split train``
``python -m data_prep.p3 --src P3 --out data/p3/eval --split eval``

Input: a copy of P3 in one of two layouts, detected from the files (:func:`discover`):

1. the original repository: ``[data/]<subset>/<split>.tfrecord-NNNNN-of-NNNNN`` (``tf.train.Example`` records,
   read by :mod:`data_prep.tfrecord` with CRC checks) with ``info.<split>.json`` (the feature spec) and
   ``stats.<split>.json`` (token counts);
2. its parquet export: ``<subset>/<split>/NNNN.parquet`` (also ``<subset>/[prefix-]<split>[-NNNNN-of-NNNNN].parquet``).

``--split train`` writes each kept training row of every T0 training subset once, as an episode whose
``hyper_input`` is empty: the training loader draws its K demonstrations from the other rows of its shard (a pool
of one subset) at every pass (:mod:`hypertrain.demonstrations`). Subsets whose average input length exceeds
``--max-avg-input-tokens`` are dropped, each subset keeps at most ``--mixing-cap // (templates of its dataset)``
rows (T0's rule), and a subset is prepared in blocks of at most ``--rows-per-unit`` rows whose workers write their
own shards. Row counts come from ``stats.train.json`` (counted where it is absent).

``--split eval`` writes one multiple-choice episode per example of the held-out ``_score_eval`` subsets (rows
regrouped by ``idx[0]``; choices in ``idx[1]`` order, ``label`` = the ``is_correct`` one) or, for subsets with
``answer_choices``, per row; every episode of a subset shares one fixed, seeded set of K demonstrations from
its ``--demo-split``. Details, formats and limits: ``docs/p3.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import functools
import hashlib
import itertools
import random
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_prep.p3_layout import (
    INPUT,
    INPUT_IDS,
    SCORE_COLUMNS,
    TARGET,
    TARGET_IDS,
    SplitFiles,
    Subset,
    columns_of,
    count_rows,
    discover,
    read_json,
    read_rows,
)
from data_prep.p3_mixture import HART_EXCLUDED_EVAL
from data_prep.runner import PrepError, SkipLog, UnitResult, add_run_options, prep_main, run_prep_for
from data_prep.shards import TASKS_IN_BLOCKS
from hypertrain.config import P3PrepConfig
from hypertrain.demonstrations import DRAWN_BY_LOADER
from hypertrain.demonstrations import render as render_demonstrations
from hypertrain.episode import Episode
from hypertrain.progress import progress

SOURCE = "p3"


# --------------------------------------------------------------------------------------------------
# Seeded sampling (stable across Python versions: only Random.random() is used)
# --------------------------------------------------------------------------------------------------


def seeded_rng(seed: int, *parts: str) -> random.Random:
    """A stream of its own for each (seed, subset, purpose): independent of workers and job-array pieces."""
    digest = hashlib.sha256("/".join((str(seed), *parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def random_order(rng: random.Random, n: int) -> Iterator[int]:
    """``range(n)`` in a uniformly random order, produced lazily (Fisher–Yates with a dict of swaps)."""
    swaps: dict[int, int] = {}
    for i in range(n):
        j = i + int(rng.random() * (n - i))
        yield swaps.get(j, j)
        swaps[j] = swaps.get(i, i)


# --------------------------------------------------------------------------------------------------
# Episodes
# --------------------------------------------------------------------------------------------------


class _Skip(Exception):
    """A whole subset cannot be prepared; ``reason`` is its ``skipped`` key."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _bad(cfg: P3PrepConfig, skipped: SkipLog, reason: str, message: str) -> None:
    """Bad example or row: an error, or with ``--skip-bad`` one more count under ``reason``."""
    if not cfg.skip_bad:
        raise PrepError(f"{message} (use --skip-bad to skip and count it)")
    skipped.note(reason, error=message)


@dataclasses.dataclass(frozen=True)
class Unit:
    """One prompted subset to prepare (picklable for the worker pool)."""

    subset: Subset
    cap: int | None = None
    """Training rows kept at most (T0's mixing cap), None for no cap."""
    rows: int = 0
    """Training: rows of the subset's train split."""
    chunk: int = 0
    chunks: int = 1
    """Training: this unit prepares block ``chunk`` of ``chunks`` near-equal blocks of the kept rows."""
    problem: str | None = None
    """Training: why the subset could not even be counted (with ``--skip-bad``: reported by its unit)."""


@dataclasses.dataclass
class Choices:
    """One multiple-choice example."""

    example: int
    input: str
    choices: list[str]
    label: int
    extra: dict[str, Any]


def _valid_idx(idx: Any) -> bool:
    return isinstance(idx, list) and len(idx) == 2 and all(isinstance(i, int) for i in idx)


def _score_eval_problem(entries: list[tuple[int, int, dict[str, Any]]]) -> tuple[str, str] | None:
    """(reason, message) if the rows ``(row, choice, row dict)`` of one example do not make one question."""
    choices = [choice for _, choice, _ in entries]
    if len(set(choices)) != len(choices):
        dup = sorted(c for c, n in Counter(choices).items() if n > 1)
        return "duplicate_choice_index", f"choice index {dup[0]} appears more than once"
    if choices != list(range(len(choices))):
        missing = sorted(set(range(max(choices) + 1)) - set(choices))
        return "missing_choice_index", f"choice index {missing[0]} is missing (has {choices})"
    if (
        len({row[INPUT] for _, _, row in entries}) > 1
        or len({str(row.get(INPUT_IDS)) for _, _, row in entries}) > 1
    ):
        return "inputs_disagree", "rows disagree on the input"
    correct = [choice for _, choice, row in entries if row["is_correct"]]
    if not correct:
        return "no_correct_choice", "no choice is marked is_correct"
    if len(correct) > 1:
        return "several_correct_choices", f"choices {correct} are all marked is_correct"
    return None


def regroup_score_eval(
    split: SplitFiles,
    rows: Mapping[int, dict[str, Any]],
    cfg: P3PrepConfig,
    skipped: SkipLog,
    prefix: str = "",
) -> list[Choices]:
    """Group ``_score_eval`` rows (one per example and choice) by ``idx[0]`` into questions, in example order.

    Choices follow ``idx[1]``; the label is the choice with ``is_correct``. A bad example raises (naming the
    split, example and rows) or, with ``--skip-bad``, is counted as ``instance:<prefix><reason>``.
    """
    groups: dict[int, list[tuple[int, int, dict[str, Any]]]] = defaultdict(list)
    for index, row in rows.items():
        idx = row["idx"]
        if not _valid_idx(idx):
            _bad(
                cfg,
                skipped,
                f"instance:{prefix}bad_idx",
                f"{split.where}: row {index}: idx {idx!r} is not [example, choice]",
            )
            continue
        groups[idx[0]].append((index, idx[1], row))
    questions = []
    for example in sorted(groups):
        entries = sorted(groups[example], key=lambda entry: (entry[1], entry[0]))
        problem = _score_eval_problem(entries)
        if problem:
            reason, why = problem
            where = f"{split.where}: example {example} (rows {[e[0] for e in entries]})"
            _bad(cfg, skipped, f"instance:{prefix}{reason}", f"{where}: {why}")
            continue
        first = entries[0][2]
        label = next(choice for choice, (_, _, row) in enumerate(entries) if row["is_correct"])
        extra: dict[str, Any] = {}
        if keeps_token_ids(cfg) and INPUT_IDS in first:
            extra["input_ids"] = first[INPUT_IDS]
        if keeps_token_ids(cfg) and TARGET_IDS in first:
            extra["choice_ids"] = [row[TARGET_IDS] for _, _, row in entries]
        choices = [row[TARGET] for _, _, row in entries]
        questions.append(Choices(example, first[INPUT], choices, label, extra))
    return questions


def answer_choice_questions(
    split: SplitFiles, rows: Mapping[int, dict[str, Any]], cfg: P3PrepConfig, skipped: SkipLog
) -> list[Choices]:
    """One question per row of a subset with ``answer_choices``; the label is the choice equal to the target."""
    questions = []
    for index, row in rows.items():
        choices = [c.strip() for c in row.get("answer_choices") or []]
        target = row[TARGET].strip()
        matches = [i for i, choice in enumerate(choices) if choice == target]
        if len(matches) != 1:
            reason = "target_not_in_choices" if not matches else "target_matches_several_choices"
            how = "is not one of" if not matches else "matches several of"
            _bad(
                cfg,
                skipped,
                f"instance:{reason}",
                f"{split.where}: row {index}: target {target!r} {how} answer_choices {choices}",
            )
            continue
        extra: dict[str, Any] = {}
        if keeps_token_ids(cfg) and INPUT_IDS in row:
            extra["input_ids"] = row[INPUT_IDS]
        if keeps_token_ids(cfg) and TARGET_IDS in row:
            extra["target_ids"] = row[TARGET_IDS]
        questions.append(Choices(index, row[INPUT], choices, matches[0], extra))
    return questions


def _is_score_eval(split: SplitFiles) -> bool:
    return set(SCORE_COLUMNS) <= columns_of(split)


def keeps_token_ids(cfg: P3PrepConfig) -> bool:
    """``--token-ids`` / ``--no-token-ids``; by default the eval split keeps P3's token ids and the train split
    does not (the collator tokenizes the text again; the ids would double the shards)."""
    return cfg.token_ids if cfg.token_ids is not None else cfg.split == "eval"


def _text_columns(cfg: P3PrepConfig) -> list[str]:
    return [INPUT, TARGET, INPUT_IDS, TARGET_IDS] if keeps_token_ids(cfg) else [INPUT, TARGET]


def _require_text(split: SplitFiles) -> None:
    missing = [c for c in (INPUT, TARGET) if c not in columns_of(split)]
    if missing:
        what = split.sidecar("info") if split.layout == "tfrecord" else split.files[0]
        raise _Skip("task:missing_text_feature", f"{what}: declares no {missing[0]!r} feature")


# ----- training -----


def balanced(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` sizes that differ by at most one."""
    return [total * (i + 1) // parts - total * i // parts for i in range(parts)]


def _distinct_enough(rows: list[tuple[int, dict[str, Any]]], shots: int) -> tuple[list[tuple[int, dict]], list[int]]:
    """The rows of one pool that can get ``shots`` demonstrations with another input from it, and the indices of
    the others (dropping rows shrinks the pool, so until nothing changes)."""
    dropped: list[int] = []
    while True:
        counts = Counter(row[INPUT].strip() for _, row in rows)
        fine = [(i, row) for i, row in rows if len(rows) - counts[row[INPUT].strip()] >= shots]
        if len(fine) == len(rows):
            return rows, dropped
        dropped += [i for i, row in rows if len(rows) - counts[row[INPUT].strip()] < shots]
        rows = fine


def train_episodes(unit: Unit, cfg: P3PrepConfig) -> tuple[list[Episode], dict[str, Any], SkipLog, list[int]]:
    """One block of a training subset's kept rows, each stored once (``hyper_input`` empty: the loader draws its
    demonstrations from the rest of its pool), and the pool sizes: each pool is written as a shard of its own."""
    subset = unit.subset
    split = subset.splits.get("train")
    if split is None:
        raise _Skip("task:no_train_split", f"{subset.path}: no train split (has {sorted(subset.splits)})")
    if unit.problem:
        raise PrepError(unit.problem)
    _require_text(split)
    skipped = SkipLog()
    keep: Sequence[int] = range(unit.rows)
    if unit.cap is not None and unit.rows > unit.cap:  # a seeded uniform sample, kept in row order
        keep = sorted(itertools.islice(random_order(seeded_rng(cfg.seed, subset.folder, "rows"), unit.rows), unit.cap))
    if len(keep) <= cfg.shots:
        raise _Skip(
            "task:too_few_rows",
            f"{split.where}: {len(keep)} rows, need more than --shots {cfg.shots} for demonstrations",
        )
    block = keep[len(keep) * unit.chunk // unit.chunks : len(keep) * (unit.chunk + 1) // unit.chunks]
    rows = read_rows(split, _text_columns(cfg), block)
    if len(rows) != len(block):
        raise PrepError(f"{split.where}: {len(rows)} of the {len(block)} rows expected in this block exist "
                        f"(the split has fewer than the {unit.rows} rows its stats declare)")
    ordered = list(rows.items())
    episodes: list[Episode] = []
    pools: list[int] = []
    start = 0
    for size in balanced(len(ordered), -(-len(ordered) // cfg.shard_max_samples)):
        pool, bad = _distinct_enough(ordered[start : start + size], cfg.shots)
        start += size
        for index in bad:
            _bad(cfg, skipped, "instance:too_few_distinct_demonstrations",
                 f"{split.where}: row {index}: fewer than {cfg.shots} other rows with a different input in its pool")
        if not pool:
            continue
        pools.append(len(pool))
        for index, row in pool:
            extra = {}
            if keeps_token_ids(cfg) and INPUT_IDS in row:
                extra["input_ids"] = row[INPUT_IDS]
            if keeps_token_ids(cfg) and TARGET_IDS in row:
                extra["target_ids"] = row[TARGET_IDS]
            episodes.append(Episode(
                id=f"{subset.folder}/train/{index}", task=subset.folder, source=SOURCE, categories=subset.categories,
                hyper_input="", input=row[INPUT], targets=[row[TARGET]], extra=extra,
            ))
    facts: dict[str, Any] = {"kept_rows": len(block)}
    if unit.chunk == 0:
        facts.update(rows=unit.rows, cap=unit.cap, blocks=unit.chunks)
    return episodes, facts, skipped, pools


# ----- evaluation -----


def _demo_split(subset: Subset, cfg: P3PrepConfig) -> SplitFiles:
    """``--demo-split`` if the subset has it, else another split than the evaluated one (train, validation, test, ...)."""
    if cfg.demo_split in subset.splits:
        return subset.splits[cfg.demo_split]
    preference = {"train": 0, "validation": 1, "test": 2}
    others = sorted(
        (s for s in subset.splits if s != cfg.eval_split), key=lambda s: (preference.get(s, 3), s)
    )
    if not others:
        raise _Skip(
            "task:no_demo_split",
            f"{subset.path}: no split other than {cfg.eval_split!r} to draw demonstrations from",
        )
    return subset.splits[others[0]]


def fixed_demonstrations(
    subset: Subset, cfg: P3PrepConfig, skipped: SkipLog
) -> tuple[list[tuple[str, str]], dict[str, Any]]:
    """One seeded set of K demonstrations for all evaluation episodes of ``subset`` (HART's protocol).

    Candidates are drawn in a seeded random order from the demonstration split (score-eval: its examples, with
    the gold choice as the target); only drawn candidates are read and checked, and a bad one is replaced by the
    next draw when ``--skip-bad`` allows.
    """
    split = _demo_split(subset, cfg)
    _require_text(split)
    score_eval = _is_score_eval(split)
    candidates: Sequence[int]
    if score_eval:  # candidates are examples: first learn which rows each one has
        rows_of: dict[int, list[int]] = defaultdict(list)
        for index, row in read_rows(split, ["idx"]).items():
            if _valid_idx(row["idx"]):
                rows_of[row["idx"][0]].append(index)
            else:
                _bad(
                    cfg,
                    skipped,
                    "instance:demo_bad_idx",
                    f"{split.where}: row {index}: idx {row['idx']!r} is not [example, choice]",
                )
        candidates = sorted(rows_of)
    else:
        candidates = range(count_rows(split))
    order = random_order(seeded_rng(cfg.seed, subset.folder, "demonstrations"), len(candidates))
    chosen: list[tuple[str, str]] = []
    chosen_ids: list[int] = []
    while len(chosen) < cfg.shots:
        batch = [candidates[position] for position in itertools.islice(order, cfg.shots - len(chosen))]
        if not batch:
            break
        if score_eval:
            indices = sorted(i for key in batch for i in rows_of[key])
            rows = read_rows(split, [INPUT, TARGET, *SCORE_COLUMNS], indices)
            found = regroup_score_eval(split, rows, cfg, skipped, prefix="demo_")
            good = {q.example: (q.input, q.choices[q.label]) for q in found}
        else:
            rows = read_rows(split, [INPUT, TARGET], sorted(batch))
            good = {key: (rows[key][INPUT], rows[key][TARGET]) for key in batch}
        for key in batch:
            if key in good:
                chosen_ids.append(key)
                chosen.append(good[key])
    if len(chosen) < cfg.shots:
        raise _Skip(
            "task:too_few_demonstrations",
            f"{split.where}: only {len(chosen)} usable demonstrations, --shots asks for {cfg.shots}",
        )
    kind = "examples" if score_eval else "rows"
    return chosen, {"demo_split": split.split, f"demo_{kind}": chosen_ids}


def eval_episodes(unit: Unit, cfg: P3PrepConfig) -> tuple[list[Episode], dict[str, Any], SkipLog]:
    """Multiple-choice episodes of one evaluation subset, all sharing one fixed demonstration set."""
    subset = unit.subset
    split = subset.splits.get(cfg.eval_split)
    if split is None:
        raise _Skip(
            "task:no_eval_split", f"{subset.path}: no {cfg.eval_split!r} split (has {sorted(subset.splits)})"
        )
    _require_text(split)
    skipped = SkipLog()
    columns = _text_columns(cfg)
    if _is_score_eval(split):
        kind = "score_eval"
        rows = read_rows(split, [*columns, *SCORE_COLUMNS])
        questions = regroup_score_eval(split, rows, cfg, skipped)
    elif "answer_choices" in columns_of(split):
        kind = "answer_choices"
        rows = read_rows(split, [*columns, "answer_choices"])
        questions = answer_choice_questions(split, rows, cfg, skipped)
    else:
        raise _Skip(
            "task:not_multiple_choice",
            f"{split.where}: neither idx/is_correct (a _score_eval subset) nor answer_choices: cannot rank choices",
        )
    if not questions and not skipped:
        raise _Skip("task:no_examples", f"{split.where}: no examples")
    demos, facts = fixed_demonstrations(subset, cfg, skipped)
    hyper_input = render_demonstrations(demos)
    episodes = [
        Episode(
            id=f"{subset.folder}/{split.split}/{q.example}",
            task=subset.folder,
            source=SOURCE,
            categories=subset.categories,
            hyper_input=hyper_input,
            input=q.input,
            targets=[q.choices[q.label]],
            choices=q.choices,
            label=q.label,
            extra=q.extra,
        )
        for q in questions
    ]
    return episodes, {"kind": kind, "rows": len(rows), **facts}, skipped


def _relative(message: str, subset: Subset) -> str:
    """Error text for the manifest without the machine's path to ``--src`` (manifests stay comparable)."""
    return message.replace(subset.path, subset.folder)


def _skipped_unit(reason: str, subset: Subset, facts: Mapping[str, Any]) -> SkipLog:
    skipped = SkipLog()
    skipped.note(reason, task=subset.folder, error=facts["error"])
    return skipped


def subset_episodes(unit: Unit, cfg: P3PrepConfig) -> UnitResult:
    """Prepare one subset (picklable entry point for the worker pool)."""
    subset = unit.subset
    facts: dict[str, Any] = {"dataset": subset.name.dataset, "template": subset.name.template}
    try:
        if cfg.split == "train":
            episodes, more, skipped, pools = train_episodes(unit, cfg)
        else:
            (episodes, more, skipped), pools = eval_episodes(unit, cfg), None
    except _Skip as skip:
        if not cfg.skip_bad:
            raise PrepError(f"{skip} (use --skip-bad to skip and count it)") from None
        facts.update(skipped={skip.reason: 1}, error=_relative(str(skip), subset))
        return UnitResult(
            subset.folder, [], skipped=_skipped_unit(skip.reason, subset, facts), extra={"subsets": {subset.folder: facts}}
        )
    except PrepError as err:  # unreadable data (corrupt TFRecord, missing info.json or feature, ...)
        if not cfg.skip_bad:
            raise
        facts.update(skipped={"task:unreadable": 1}, error=_relative(str(err), subset))
        return UnitResult(
            subset.folder,
            [],
            skipped=_skipped_unit("task:unreadable", subset, facts),
            extra={"subsets": {subset.folder: facts}},
        )
    facts.update(more, episodes=len(episodes))
    if skipped:
        facts["skipped"] = dict(sorted(skipped.items()))
    for record in skipped.records:
        record.update(task=subset.folder, error=_relative(record["error"], subset))
    return UnitResult(subset.folder, episodes, categories=subset.categories, skipped=skipped,
                      extra={"subsets": {subset.folder: facts}}, pools=pools)


# --------------------------------------------------------------------------------------------------
# Selection and run-level filters
# --------------------------------------------------------------------------------------------------


def select_subsets(subsets: Mapping[str, Subset], cfg: P3PrepConfig) -> list[str]:
    """The subset folders to prepare: ``--subsets`` (names or globs) or the default list of the split."""
    if not cfg.subsets:
        wanted = "t0_train" if cfg.split == "train" else "t0_eval"
        return [name for name, s in subsets.items() if getattr(s.name, wanted)]
    chosen: set[str] = set()
    for pattern in cfg.subsets:
        is_glob = any(ch in pattern for ch in "*?[")
        matches = fnmatch.filter(subsets, pattern) if is_glob else [pattern] if pattern in subsets else []
        if not matches:
            raise PrepError(f"--subsets {pattern!r} matches no subset folder of --src ({len(subsets)} found)")
        if cfg.split == "train":
            score = [m for m in matches if subsets[m].name.score_eval]
            if score and not is_glob:
                raise PrepError(
                    f"--subsets {pattern!r} is a _score_eval subset (one row per answer choice): it cannot train"
                )
            matches = [m for m in matches if m not in score]
        chosen.update(matches)
    return sorted(chosen)


def average_input_tokens(split: SplitFiles) -> float:
    """Mean input length in tokens: ``inputs_tokens / examples`` of ``stats.<split>.json``; for the parquet
    export (which has no stats file) the mean length of the ``inputs`` token lists."""
    path = split.sidecar("stats")
    if split.layout == "tfrecord" or path.is_file():
        stats = read_json(path, "needed by the length filter; --max-avg-input-tokens 0 turns it off")
        try:
            examples, tokens = int(stats["examples"]), int(stats["inputs_tokens"])
        except (KeyError, TypeError, ValueError) as err:
            raise PrepError(f"{path}: lacks a numeric 'examples' / 'inputs_tokens' ({err})") from None
        return tokens / examples if examples else 0.0
    if INPUT_IDS not in columns_of(split):
        raise PrepError(
            f"{split.files[0]}: no 'inputs' column to measure input lengths (--max-avg-input-tokens 0 turns the filter off)"
        )
    tokens = rows = 0
    for path in split.files:
        for batch in pq.ParquetFile(path).iter_batches(columns=[INPUT_IDS]):
            lengths = pc.list_value_length(batch.column(0))
            tokens += pc.sum(lengths).as_py() or 0
            rows += len(batch)
    return tokens / rows if rows else 0.0


def plan(cfg: P3PrepConfig) -> tuple[list[Unit], dict[str, list[str]], dict[str, Any]]:
    """Units to prepare, tasks dropped before reading (by reason) and the run-level filter decisions.

    Deterministic from ``--src`` and the options, so every job-array piece computes the same plan.
    """
    layout, subsets = discover(cfg.src)
    names = select_subsets(subsets, cfg)
    unmatched = sorted(name for name, s in subsets.items() if s.name.dataset is None)
    dropped: dict[str, list[str]] = {}
    filters: dict[str, Any] = {
        "layout": layout,
        "subsets_found": len(subsets),
        "unmatched_subsets": unmatched,
    }
    if not cfg.subsets and unmatched:
        dropped["unknown_dataset"] = unmatched
    if cfg.split == "eval":
        filters["eval_set"] = cfg.eval_set
        if cfg.eval_set == "hart" and not cfg.subsets:
            left_out = [name for name in names if subsets[name].name.dataset in HART_EXCLUDED_EVAL]
            if left_out:
                dropped["not_in_eval_set:hart"] = left_out
            names = [name for name in names if name not in left_out]
        return [Unit(subsets[name]) for name in names], dropped, filters

    if cfg.max_avg_input_tokens:
        averages = {}
        with progress(len(names), "p3 input lengths", unit="subset") as bar:
            for name in names:
                split = subsets[name].splits.get("train")
                if split is not None:
                    averages[name] = round(average_input_tokens(split), 2)
                bar.update()
        too_long = [name for name, avg in averages.items() if avg > cfg.max_avg_input_tokens]
        if too_long:
            dropped[f"avg_input_tokens>{cfg.max_avg_input_tokens}"] = too_long
        filters["avg_input_tokens"] = averages
        names = [name for name in names if name not in too_long]

    filters["demonstrations"] = {"drawn_by": DRAWN_BY_LOADER, "shots": cfg.shots}
    filters[TASKS_IN_BLOCKS] = True
    templates = Counter(s.name.dataset for s in subsets.values() if s.name.dataset and not s.name.score_eval)
    filters["templates_per_dataset"] = dict(sorted(templates.items()))
    filters["mixing_cap"] = cfg.mixing_cap
    units = []
    for name in names:
        dataset = subsets[name].name.dataset
        cap = cfg.mixing_cap // templates[dataset] if cfg.mixing_cap and dataset else None
        split = subsets[name].splits.get("train")
        try:
            rows = train_rows(split) if split is not None else 0
        except PrepError as err:
            if not cfg.skip_bad:
                raise
            units.append(Unit(subsets[name], cap, problem=str(err)))
            continue
        kept = min(rows, cap) if cap else rows
        blocks = max(1, -(-kept // cfg.rows_per_unit))
        units += [Unit(subsets[name], cap, rows, block, blocks) for block in range(blocks)]
    return units, dropped, filters


def train_rows(split: SplitFiles) -> int:
    """Rows of a train split: ``examples`` of its ``stats.train.json`` when present (the reader checks it), else
    counted (parquet metadata, or one pass over the TFRecords)."""
    path = split.sidecar("stats")
    if split.layout == "tfrecord" and path.is_file():
        try:
            return int(read_json(path, "")["examples"])
        except (KeyError, TypeError, ValueError):
            pass
    return count_rows(split)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def prepare(cfg: P3PrepConfig) -> dict[str, Any]:
    """Run the P3 prep (or one job-array piece of it); returns the manifest written."""
    units, dropped, filters = plan(cfg)
    return run_prep_for(
        cfg,
        source=SOURCE,
        units=units,
        fn=functools.partial(subset_episodes, cfg=cfg),
        dropped_tasks=dropped,
        filters=filters,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep.p3", description=__doc__.splitlines()[0])
    defaults = P3PrepConfig()
    add = parser.add_argument
    add("--src", required=True, help="copy of P3: [data/]<subset>/<split>.tfrecord-* or the parquet export")
    add("--out", required=True, help="output directory for shards and manifest.json")
    add("--split", required=True, choices=["train", "eval"])
    add(
        "--subsets",
        nargs="+",
        default=[],
        metavar="NAME_OR_GLOB",
        help="subset folders to prepare (default: T0's training mixture / held-out _score_eval subsets)",
    )
    add("--shots", type=int, default=defaults.shots, help="demonstrations per episode (default: %(default)s)")
    add(
        "--max-avg-input-tokens",
        type=int,
        default=defaults.max_avg_input_tokens,
        help="drop training subsets with a longer average input; 0 keeps all (default: %(default)s)",
    )
    add(
        "--mixing-cap",
        type=int,
        default=defaults.mixing_cap,
        help="a training subset keeps at most this // (templates of its dataset) rows; 0 keeps all (default: %(default)s)",
    )
    add(
        "--eval-split",
        default=defaults.eval_split,
        help="split evaluated by --split eval (default: %(default)s)",
    )
    add(
        "--demo-split",
        default=defaults.demo_split,
        help="split of the fixed evaluation demonstrations (default: %(default)s, else another split)",
    )
    add(
        "--eval-set",
        choices=["hart", "t0"],
        default=defaults.eval_set,
        help="held-out datasets of --split eval: HART's tables (no StoryCloze) or T0's (default: %(default)s)",
    )
    add("--token-ids", dest="token_ids", action="store_const", const=True, default=None,
        help="keep P3's T5 token ids beside the text (default: eval yes, train no)")
    add("--no-token-ids", dest="token_ids", action="store_const", const=False, help="leave P3's token ids out")
    add("--rows-per-unit", type=int, default=defaults.rows_per_unit,
        help="training subsets are prepared in blocks of this many rows, one unit of work each (default: %(default)s)")
    add("--seed", type=int, default=defaults.seed, help="seed of row caps and evaluation demonstration draws")
    add_run_options(parser, defaults, unit="subset")
    return parser


def _report(manifest: dict[str, Any]) -> list[str]:
    unmatched = manifest["filters"].get("unmatched_subsets")
    return [f"{len(unmatched)} subset folder(s) match no known P3 dataset: {', '.join(unmatched[:5])}"] if unmatched else []


def main(argv: Sequence[str] | None = None) -> int:
    return prep_main(build_parser(), P3PrepConfig, "p3_prep", prepare, argv, _report)


if __name__ == "__main__":
    sys.exit(main())
