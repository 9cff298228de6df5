"""Evaluation sets: prepared directories (S-NI test split, P3 eval split) read into memory in a fixed order.

Every rank reads the whole set in the same order (tasks sorted by name, a task's episodes in shard order, which
for the S-NI test split is the official file order), so example indices are global and the work can be split by
index. A task's hypernetwork input is stored once (P3's demonstrations are the same for every episode of a
subset), and source-specific ``extra`` fields are dropped, to keep large sets small.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from hypertrain.episode import Episode
from hypertrain.evaluation.metrics import category_key
from hypertrain.names import safe_filename

Kind = Literal["generation", "multiple_choice"]
LANGUAGE_FIELDS = ("Input_language", "Output_language", "Instruction_language")
KIND_OF_SOURCE: dict[str, Kind] = {"sni": "generation", "p3": "multiple_choice"}


class EvalError(ValueError):
    """An evaluation set cannot be evaluated as asked (wrong split, non-English S-NI task, ...)."""


@dataclasses.dataclass
class EvalSet:
    """One prepared directory, ready to evaluate."""

    name: str
    """Metric prefix (``sni``, ``p3``; ``<source>_<directory name>`` when two sets share a source)."""
    kind: Kind
    directory: Path
    episodes: list[Episode]
    """Tasks sorted by name, each task's episodes in shard order."""
    groups: dict[str, str]
    """Task → its group: the S-NI category key (first category), or the P3 dataset of the subset."""

    def task_ranges(self) -> dict[str, range]:
        """Task → the range of its episode indices (tasks are contiguous)."""
        ranges: dict[str, range] = {}
        start = 0
        for index in range(1, len(self.episodes) + 1):
            if index == len(self.episodes) or self.episodes[index].task != self.episodes[start].task:
                ranges[self.episodes[start].task] = range(start, index)
                start = index
        return ranges


def _manifest_dir(path: str | Path) -> Path:
    path = Path(path)
    return path.parent if path.name == "manifest.json" else path


def _check_english(episode: Episode, directory: Path) -> None:
    """S-NI's default track (rouge-score's ASCII tokenizer) is only valid for English; refuse anything else."""
    extra: dict[str, Any] = episode.extra
    languages = {field: extra[field] for field in LANGUAGE_FIELDS if field in extra}
    if extra.get("track") == "xlingual" or any(value != ["English"] for value in languages.values()):
        raise EvalError(
            f"{directory}: task {episode.task} is not English ({languages or 'xlingual track'}); S-NI's official "
            "metrics score non-English tasks with the cross-lingual track (GPT-2 tokens, no stemmer), which this "
            "evaluation does not implement: prepare the English test split (data_prep.sni drops non-English tasks)"
        )


def load_eval_set(directory: str | Path, max_examples_per_task: int = 0, name: str | None = None) -> EvalSet:
    """Read a prepared directory (or its ``manifest.json``); ``max_examples_per_task`` > 0 keeps each task's first N."""
    from data_prep.shards import iter_shard_episodes, read_manifest
    from hypertrain.demonstrations import drawn_shots

    directory = _manifest_dir(directory)
    manifest = read_manifest(directory)
    source = str(manifest.get("source", ""))
    if drawn_shots(manifest):
        raise EvalError(
            f"{directory}: P3 training rows, whose demonstrations the training loader draws; evaluate a directory "
            "prepared with data_prep.p3 --split eval (fixed demonstrations per subset)"
        )
    by_task: dict[str, list[Episode]] = {}
    hyper: dict[str, str] = {}
    for shard in manifest["shards"]:
        for episode in iter_shard_episodes(directory / shard["file"]):
            kept = by_task.setdefault(episode.task, [])
            if max_examples_per_task and len(kept) >= max_examples_per_task:
                continue
            first = hyper.setdefault(episode.task, episode.hyper_input)
            if episode.hyper_input == first:
                episode.hyper_input = first  # one string per task, not one per episode
            if source == "sni":
                _check_english(episode, directory)
            episode.extra = {}
            kept.append(episode)
    episodes = [episode for task in sorted(by_task) for episode in by_task[task]]
    if not episodes:
        raise EvalError(f"{directory}: no episodes to evaluate")

    has_choices = [e.choices is not None and e.label is not None for e in episodes]
    kind = KIND_OF_SOURCE.get(source) or ("multiple_choice" if all(has_choices) else "generation")
    if kind == "multiple_choice" and not all(has_choices):
        bad = next(e for e, ok in zip(episodes, has_choices, strict=True) if not ok)
        raise EvalError(
            f"{directory}: episode {bad.id} of {bad.task} has no answer choices/label; rank classification needs "
            "the P3 eval split (python -m data_prep.p3 --split eval)"
        )
    for episode in episodes:
        if not episode.targets and kind == "generation":
            raise EvalError(f"{directory}: episode {episode.id} has no reference output")
        if kind == "multiple_choice" and not 0 <= episode.label < len(episode.choices):  # type: ignore[arg-type, operator]
            raise EvalError(f"{directory}: episode {episode.id}: label {episode.label} is not a choice index")

    subsets = (manifest.get("extra") or {}).get("subsets") or {}
    groups: dict[str, str] = {}
    for task, task_episodes in by_task.items():
        categories = task_episodes[0].categories if task_episodes else []
        if kind == "generation":
            groups[task] = category_key(categories[0]) if categories else "uncategorized"
        else:
            groups[task] = (subsets.get(task) or {}).get("dataset") or (categories[0] if categories else task)
    # the name becomes file names under --out: a manifest's "source" must not point anywhere else
    return EvalSet(safe_filename(name or source or directory.name), kind, directory, episodes, groups)


def load_eval_sets(directories: Sequence[str | Path], max_examples_per_task: int = 0) -> list[EvalSet]:
    """Several sets; a set is named by its source, or ``<source>_<directory name>`` when sources repeat."""
    sets = [load_eval_set(d, max_examples_per_task) for d in directories]
    counts: dict[str, int] = {}
    for s in sets:
        counts[s.name] = counts.get(s.name, 0) + 1
    for s in sets:
        if counts[s.name] > 1:
            s.name = safe_filename(f"{s.name}_{s.directory.name}")
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise EvalError(f"evaluation sets need distinct names, got {names}")
    return sets
