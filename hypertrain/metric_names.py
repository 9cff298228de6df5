"""Metric names in MLflow: sections the UI groups by, and evaluation scores as fractions.

Training rows keep their short names in ``metrics.jsonl``; in MLflow they go by section:

- ``train/loss`` (the method's whole objective) and ``train/loss/<part>``; **``train/loss/lm``**, the main
  model's cross-entropy on the target, is the one that compares across methods;
- ``opt/lr``, ``opt/grad_norm``, ``opt/skipped_steps``, ``opt/nonfinite_steps``;
- ``perf/...``: throughput, step and data-wait time, memory, MFU;
- ``system/...``: MLflow's system monitors (:mod:`hypertrain.system_metrics`).

Evaluation logs ``eval/<set>/<metric>`` and ``eval/<set>/<metric>/<family>`` (S-NI: the task category; P3: the
dataset, with ``median`` and ``mean`` over its prompts), scores as **fractions in [0, 1]** (so 0.006 is 0.6%), plus
``eval/<set>/num_examples`` and ``time_s``. Runs logged this way carry the tag ``hypertrain.metric_names: 2``;
``hypertrain compare`` reads them and earlier runs alike and shows every score on the papers' 0-100 scale.
"""

from __future__ import annotations

from collections.abc import Mapping

VERSION_TAG = "hypertrain.metric_names"
VERSION = "2"
SCORES = frozenset({"rougeL", "exact_match", "accuracy", "dataset_median_average", "median", "mean"})
"""Evaluation metrics that are scores (logged as fractions, shown ×100)."""
OPTIMIZER = frozenset({"lr", "grad_norm", "skipped_steps", "nonfinite_steps"})
SECTIONS = ("train/", "opt/", "perf/", "eval/", "system/")


def sectioned(key: str) -> str:
    """A training row's key as MLflow names it (``loss`` → ``train/loss``, ``lr`` → ``opt/lr``, ...)."""
    if key.startswith(SECTIONS):
        return key
    if key == "loss" or key.startswith("loss/"):
        return f"train/{key}"
    return f"opt/{key}" if key in OPTIMIZER else f"perf/{key}"


def sectioned_row(row: Mapping[str, float]) -> dict[str, float]:
    return {sectioned(k): v for k, v in row.items()}


def eval_name(set_name: str, metric: str, family: str | None = None) -> str:
    return f"eval/{set_name}/{metric}" + (f"/{family}" if family else "")


def _today(key: str) -> str:
    """An earlier run's eval key in today's order: ``eval/s/category/C/m`` → ``eval/s/m/C``,
    ``eval/s/dataset/D/median`` → ``eval/s/median/D``."""
    parts = key.split("/")
    if len(parts) == 5 and parts[2] in ("category", "dataset"):
        return "/".join([parts[0], parts[1], parts[4], parts[3]])
    return key


def is_current(tags: Mapping[str, str]) -> bool:
    return tags.get(VERSION_TAG) == VERSION


def readable_eval(metrics: Mapping[str, float], tags: Mapping[str, str]) -> dict[str, float]:
    """A run's ``eval/`` metrics in today's names, scores on the 0-100 scale (earlier runs logged them so)."""
    current = is_current(tags)
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if not key.startswith("eval/"):
            continue
        name = key if current else _today(key)
        parts = name.split("/")
        score = len(parts) >= 3 and parts[2] in SCORES
        out[name] = value * 100.0 if current and score else value
    return out


def training_key(short: str, tags: Mapping[str, str]) -> str:
    """Where a training metric (``loss``, ``samples_per_s``, ...) is in a run: sectioned, or its old short name."""
    return sectioned(short) if is_current(tags) else short
