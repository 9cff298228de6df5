"""Metric functions (pure Python): S-NI exact match and ROUGE-L, P3 rank-classification accuracy.

S-NI follows the official evaluation (``eval/automatic/evaluation.py`` of the S-NI repository, default track):

- **exact match**: both strings lower-cased, every ``string.punctuation`` character removed, whitespace collapsed
  (SQuAD's normalisation *without* removing articles), then compared;
- **ROUGE-L**: the F-measure of ``rouge_score.rouge_scorer.RougeScorer(['rougeL'], use_stemmer=True)`` with its
  default tokenizer (lower-case, ``[^a-z0-9]+`` → space, Porter stemmer on tokens longer than 3 characters) on the
  raw strings;
- each is the maximum over the instance's references; an aggregate is ``100 · sum / count`` over instances (not a
  mean of task means); categories are keyed ``"_".join(category.lower().split())``.

The official script rounds aggregates to 4 decimals when it prints them; these functions do not round.
P3 (T0's rank classification): the prediction is the argmax of the choices' summed log-probabilities; accuracy is
per prompted subset, summarised per dataset by the median and the mean over its prompts.
"""

from __future__ import annotations

import functools
import math
import statistics
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

_PUNCTUATION = frozenset(string.punctuation)
SNI_METRICS = ("exact_match", "rougeL")


def normalize_answer(text: str) -> str:
    """Lower-case, drop every ``string.punctuation`` character, collapse whitespace (articles are kept)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


@functools.cache
def _rouge_scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure in [0, 1] (rouge-score's default tokenizer with the Porter stemmer)."""
    return float(_rouge_scorer().score(target=reference, prediction=prediction)["rougeL"].fmeasure)


def max_over_references(metric: Callable[[str, str], float], prediction: str, references: Sequence[str]) -> float:
    """The best score of ``prediction`` against any reference."""
    if not references:
        raise ValueError("an instance needs at least one reference")
    return max(metric(prediction, reference) for reference in references)


def sni_instance_scores(prediction: str | None, references: Sequence[str]) -> dict[str, float]:
    """``exact_match`` (0/1) and ``rougeL`` ([0, 1]) of one instance, each the max over its references.

    A missing prediction (``None``) counts as the empty string, as in the official evaluation.
    """
    prediction = "" if prediction is None else prediction
    return {
        "exact_match": max_over_references(exact_match, prediction, references),
        "rougeL": max_over_references(rouge_l, prediction, references),
    }


def category_key(category: str) -> str:
    """The official per-category key: lower-cased, whitespace runs → ``_`` (``"Word Analogy"`` → ``word_analogy``)."""
    return "_".join(category.lower().split())


def aggregate_sni(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Overall, per-task and per-category means ×100 of instance rows with ``task``, ``category``,
    ``exact_match`` and ``rougeL`` (instance scores in [0, 1]). Every mean is over instances."""
    sums: dict[tuple[str, str], list[float]] = {}  # (kind, name) -> [count, exact_match, rougeL]
    for row in rows:
        for key in (("overall", ""), ("task", row["task"]), ("category", row["category"])):
            acc = sums.setdefault(key, [0.0] * (1 + len(SNI_METRICS)))
            acc[0] += 1
            for i, metric in enumerate(SNI_METRICS, start=1):
                acc[i] += float(row[metric])

    def means(acc: Sequence[float]) -> dict[str, Any]:
        count = int(acc[0])
        scores = {m: (100.0 * acc[i] / count if count else math.nan) for i, m in enumerate(SNI_METRICS, start=1)}
        return {**scores, "num_examples": count}

    return {
        **means(sums.get(("overall", ""), [0.0] * (1 + len(SNI_METRICS)))),
        "per_category": {name: means(acc) for (kind, name), acc in sorted(sums.items()) if kind == "category"},
        "per_task": {name: means(acc) for (kind, name), acc in sorted(sums.items()) if kind == "task"},
    }


def rank_classify(scores: Sequence[float]) -> int:
    """Index of the highest score (the first one on ties)."""
    if not scores:
        raise ValueError("rank classification needs at least one choice")
    best = 0
    for index, score in enumerate(scores):
        if score > scores[best]:
            best = index
    return best


def aggregate_p3(rows: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy ×100 per prompted subset (``task``) and overall (over examples), and per dataset the median and
    mean over its subsets (T0 reports the median); ``dataset_median_average`` is the mean of those medians.

    Rows carry ``task``, ``dataset`` and ``correct`` (bool).
    """
    subsets: dict[str, dict[str, Any]] = {}
    correct_total = count_total = 0
    for row in rows:
        acc = subsets.setdefault(row["task"], {"dataset": row["dataset"], "correct": 0, "num_examples": 0})
        if acc["dataset"] != row["dataset"]:
            raise ValueError(f"subset {row['task']} belongs to datasets {acc['dataset']!r} and {row['dataset']!r}")
        acc["correct"] += int(bool(row["correct"]))
        acc["num_examples"] += 1
        correct_total += int(bool(row["correct"]))
        count_total += 1
    per_subset = {
        name: {"dataset": acc["dataset"], "accuracy": 100.0 * acc["correct"] / acc["num_examples"],
               "num_examples": acc["num_examples"]}
        for name, acc in sorted(subsets.items())
    }
    by_dataset: dict[str, list[float]] = {}
    for entry in per_subset.values():
        by_dataset.setdefault(entry["dataset"], []).append(entry["accuracy"])
    per_dataset = {
        name: {"median": statistics.median(values), "mean": statistics.fmean(values), "num_prompts": len(values)}
        for name, values in sorted(by_dataset.items())
    }
    medians = [entry["median"] for entry in per_dataset.values()]
    return {
        "accuracy": 100.0 * correct_total / count_total if count_total else math.nan,
        "dataset_median_average": statistics.fmean(medians) if medians else math.nan,
        "num_examples": count_total,
        "per_dataset": per_dataset,
        "per_subset": per_subset,
    }
