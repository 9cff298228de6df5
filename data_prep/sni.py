"""Super-NaturalInstructions → episode shards.

``python -m data_prep.sni --src natural-instructions --out data/sni/train --split train``

Input is a checkout of the S-NI repository: ``tasks/<task>.json`` and ``splits/<name>/{train,test,excluded}_tasks.txt``.
For every task of the split that is not excluded and is English-only (input, output and instruction language all
exactly ``["English"]``), up to ``--max-instances-per-task`` instances become episodes (the test split keeps the
first N in file order, as the official evaluation does; the train split samples N with the seed, kept in file
order). Each episode's ``hyper_input`` is the task's Def+2Pos text (:func:`format_def_pos`), its ``input`` the
instance input verbatim and its ``targets`` all reference outputs.

Bad input (non-UTF-8, unparseable JSON, missing Definition/Instances/Positive Examples, an instance without
output) stops the job with an error naming the file and field, or with ``--skip-bad`` is skipped and counted in
the manifest's ``skipped``. Tasks removed by the split/language filter are listed in ``dropped_tasks``.
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import string
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from data_prep.runner import PrepError, SkipLog, UnitResult, add_run_options, prep_main, run_prep_for
from hypertrain.config import SNIPrepConfig
from hypertrain.episode import Episode

SOURCE = "sni"
LANGUAGE_FIELDS = ("Input_language", "Output_language", "Instruction_language")
OVERSIZED_CHARS = 100_000
"""Instances with an input or output longer than this are counted in the manifest's ``extra.oversized_instances``."""
SPLIT_FILES = {"train": "train_tasks.txt", "test": "test_tasks.txt"}
EXCLUDED_FILE = "excluded_tasks.txt"


# --------------------------------------------------------------------------------------------------
# The hypernetwork's input
# --------------------------------------------------------------------------------------------------


def _end_with_punctuation(text: str) -> str:
    """Tk-Instruct's rule: a sentence that does not end in punctuation gets a final period."""
    text = text.strip()
    return text if text and text[-1] in string.punctuation else text + "."


def format_def_pos(
    definition: str, positive_examples: Sequence[dict[str, str]], explanations: bool = False
) -> str:
    """The Def+2Pos text the hypernetwork reads, in Tk-Instruct's layout::

        Definition: <definition>.

        Positive Example 1 -
        Input: <input>.
        Output: <output>.

        Positive Example 2 -
        Input: <input>.
        Output: <output>.

    Each part is stripped and, as in Tk-Instruct, gets a final period when it does not already end in
    punctuation; blocks are separated by one blank line and the text has no trailing newline. With
    ``explanations`` (Tk-Instruct's "pos + expl." input) each example also gets an ``Explanation: <text>.`` line,
    where the task file has one.
    """
    blocks = [f"Definition: {_end_with_punctuation(definition)}"]
    for number, example in enumerate(positive_examples, start=1):
        blocks.append(
            f"Positive Example {number} -\n"
            f"Input: {_end_with_punctuation(example['input'])}\n"
            f"Output: {_end_with_punctuation(example['output'])}"
            + (f"\nExplanation: {_end_with_punctuation(example['explanation'])}"
               if explanations and isinstance(example.get("explanation"), str) and example["explanation"].strip()
               else "")
        )
    return "\n\n".join(blocks)


# --------------------------------------------------------------------------------------------------
# Task selection
# --------------------------------------------------------------------------------------------------


def read_task_list(path: Path) -> list[str]:
    """Task names of a split file (one per line; blank lines and ``#`` comments ignored)."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as err:
        raise PrepError(f"split file not found: {path}") from err
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


def select_tasks(cfg: SNIPrepConfig) -> tuple[list[str], dict[str, list[str]]]:
    """The split's task names to read (sorted) and the tasks dropped before reading, by reason."""
    src = Path(cfg.src)
    splits_dir = src / "splits" / cfg.splits_name
    if not (src / "tasks").is_dir():
        raise PrepError(f"{src}: not an S-NI checkout (no tasks/ directory)")
    listed = read_task_list(splits_dir / SPLIT_FILES[cfg.split])
    excluded_path = splits_dir / EXCLUDED_FILE
    excluded = set(read_task_list(excluded_path)) if excluded_path.is_file() else set()

    dropped: dict[str, list[str]] = {}
    keep: list[str] = []
    for task in sorted(set(listed)):
        if task in excluded:
            dropped.setdefault("excluded", []).append(task)
        elif not (src / "tasks" / f"{task}.json").is_file():
            dropped.setdefault("missing_task_file", []).append(task)
        else:
            keep.append(task)
    missing = dropped.get("missing_task_file", [])
    if missing and not cfg.allow_missing_tasks:
        raise PrepError(
            f"{len(missing)} task(s) of {splits_dir / SPLIT_FILES[cfg.split]} have no file in {src / 'tasks'} "
            f"(first: {missing[0]}); pass --allow-missing-tasks to drop and count them"
        )
    return keep, dropped


# --------------------------------------------------------------------------------------------------
# One task → episodes (runs in worker processes)
# --------------------------------------------------------------------------------------------------


class _Skip(Exception):
    """A whole task is bad; ``reason`` is its ``skipped`` key."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _load_task(path: Path) -> dict[str, Any]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _Skip("task:not_utf8", f"{path}: not valid UTF-8 at byte {err.start} ({err.reason})") from err
    try:
        task = json.loads(text)  # S-NI files contain bare NaN (e.g. "URL": [NaN]); Python's json accepts it
    except json.JSONDecodeError as err:
        raise _Skip("task:invalid_json", f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from err
    if not isinstance(task, dict):
        raise _Skip("task:invalid_json", f"{path}: top level is {type(task).__name__}, expected an object")
    return task


def _text_field(task: dict[str, Any], field: str, path: Path) -> str:
    """A field S-NI stores as a list holding one string (Definition)."""
    value = task.get(field)
    if isinstance(value, list) and value and isinstance(value[0], str) and value[0].strip():
        return value[0]
    if isinstance(value, str) and value.strip():
        return value
    reason = f"task:missing_{field.lower().replace(' ', '_')}"
    raise _Skip(reason, f"{path}: field '{field}' is missing or empty")


def _positive_examples(task: dict[str, Any], path: Path, count: int) -> list[dict[str, str]]:
    examples = task.get("Positive Examples")
    if not isinstance(examples, list):
        raise _Skip("task:missing_positive_examples", f"{path}: field 'Positive Examples' is missing")
    for index, example in enumerate(examples[:count]):
        for key in ("input", "output"):
            if not isinstance(example, dict) or not isinstance(example.get(key), str):
                raise _Skip(
                    "task:bad_positive_example", f"{path}: field 'Positive Examples'[{index}].{key} is missing"
                )
    return examples[:count]


def read_task_file(path: Path) -> tuple[str, list[dict[str, str]], dict[str, Any]]:
    """A user's S-NI-layout task file: its definition, all its positive examples and the whole record.

    Raises ``ValueError`` naming the file and the field (``Definition``, ``Positive Examples``[i].input, ...)."""
    try:
        task = _load_task(path)
        definition = _text_field(task, "Definition", path)
        examples = _positive_examples(task, path, len(task.get("Positive Examples") or []))
    except _Skip as err:
        raise ValueError(str(err)) from None
    return definition, examples, task


def _is_english_only(task: dict[str, Any]) -> bool:
    return all(task.get(field) == ["English"] for field in LANGUAGE_FIELDS)


def _instance_indices(num_instances: int, cfg: SNIPrepConfig, task_name: str) -> list[int]:
    cap = cfg.max_instances_per_task
    if cap <= 0 or num_instances <= cap:
        return list(range(num_instances))
    if cfg.split == "test":
        return list(range(cap))  # the official evaluation set: the first N in file order
    rng = random.Random(f"{cfg.seed}/{task_name}")  # per-task stream: independent of workers and job pieces
    return sorted(rng.sample(range(num_instances), cap))


def _instance_problem(instance: Any) -> tuple[str, str] | None:
    """(skipped reason, field) if the instance cannot make an episode."""
    if not isinstance(instance, dict):
        return "instance:not_an_object", "instance"
    if not isinstance(instance.get("id"), str) or not instance["id"]:
        return "instance:missing_id", "id"
    if not isinstance(instance.get("input"), str):
        return "instance:missing_input", "input"
    output = instance.get("output")
    if not isinstance(output, list) or not output or not all(isinstance(o, str) for o in output):
        return "instance:missing_output", "output"
    return None


def task_episodes(task_name: str, cfg: SNIPrepConfig) -> UnitResult:
    """Read one task file and build its episodes (picklable entry point for the worker pool)."""
    path = Path(cfg.src) / "tasks" / f"{task_name}.json"
    try:
        task = _load_task(path)
        if not _is_english_only(task):
            languages = {field: task.get(field) for field in LANGUAGE_FIELDS}
            return UnitResult(task_name, [], dropped="non_english", extra={"languages": {task_name: languages}})
        definition = _text_field(task, "Definition", path)
        instances = task.get("Instances")
        if not isinstance(instances, list):
            raise _Skip("task:missing_instances", f"{path}: field 'Instances' is missing or not a list")
        positives = _positive_examples(task, path, cfg.num_pos_examples)
    except _Skip as skip:
        if not cfg.skip_bad:
            raise PrepError(f"{skip} (use --skip-bad to skip and count it)") from None
        skipped = SkipLog()
        relative = f"tasks/{task_name}.json"
        skipped.note(skip.reason, task=task_name, file=relative, error=str(skip).replace(str(path), relative))
        return UnitResult(task_name, [], skipped=skipped)

    hyper_input = format_def_pos(definition, positives, cfg.pos_explanations)
    categories = [c for c in task.get("Categories", []) if isinstance(c, str)]
    skipped = SkipLog()
    oversized = 0
    episodes: list[Episode] = []
    seen_ids: set[str] = set()
    for index in _instance_indices(len(instances), cfg, task_name):
        instance = instances[index]
        problem = _instance_problem(instance)
        if problem is None and instance["id"] in seen_ids:
            problem = ("instance:duplicate_id", "id")
        if problem is not None:
            reason, field = problem
            ident = instance.get("id") if isinstance(instance, dict) else None
            if not cfg.skip_bad:
                raise PrepError(
                    f"{path}: Instances[{index}] (id {ident!r}): field '{field}' is missing, empty or invalid "
                    "(use --skip-bad to skip and count it)"
                )
            skipped.note(reason, task=task_name, index=index, id=ident if isinstance(ident, str) else None)
            continue
        seen_ids.add(instance["id"])
        if max(len(instance["input"]), *(len(o) for o in instance["output"])) > OVERSIZED_CHARS:
            oversized += 1
        episodes.append(
            Episode(
                id=instance["id"],
                task=task_name,
                source=SOURCE,
                categories=categories,
                hyper_input=hyper_input,
                input=instance["input"],
                targets=list(instance["output"]),
            )
        )
    extra: dict[str, Any] = {}
    if len(positives) < cfg.num_pos_examples:
        extra["fewer_positive_examples"] = [task_name]
    if oversized:  # kept (the collator cuts text before tokenizing), but worth knowing about
        extra["oversized_instances"] = {task_name: oversized}
    if not episodes and not skipped:
        skipped.note("task:no_instances", task=task_name, file=f"tasks/{task_name}.json")
    return UnitResult(task_name, episodes, categories=categories, skipped=skipped, extra=extra)


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def prepare(cfg: SNIPrepConfig) -> dict[str, Any]:
    """Run the S-NI prep (or one job-array piece of it); returns the manifest written."""
    if cfg.split not in SPLIT_FILES:
        raise PrepError(f"--split must be one of {sorted(SPLIT_FILES)}, got {cfg.split!r}")
    tasks, dropped = select_tasks(cfg)
    return run_prep_for(
        cfg, source=SOURCE, units=tasks, fn=functools.partial(task_episodes, cfg=cfg), dropped_tasks=dropped
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep.sni", description=__doc__.splitlines()[0])
    defaults = SNIPrepConfig()
    add = parser.add_argument
    add("--src", required=True, help="checkout of the S-NI repository (holds tasks/ and splits/)")
    add("--out", required=True, help="output directory for shards and manifest.json")
    add("--split", required=True, choices=sorted(SPLIT_FILES))
    add("--splits-name", default=defaults.splits_name, help="folder under splits/ (default: %(default)s)")
    add("--max-instances-per-task", type=int, default=defaults.max_instances_per_task,
        help="instances kept per task; 0 keeps all (default: %(default)s)")
    add("--num-pos-examples", type=int, default=defaults.num_pos_examples,
        help="positive examples in the hypernetwork input (default: %(default)s)")
    add("--pos-explanations", action="store_true",
        help="add each positive example's explanation to Def+2Pos (Tk-Instruct's input; default: without)")
    add("--seed", type=int, default=defaults.seed, help="seed of the train split's instance sample")
    add_run_options(parser, defaults, unit="task")
    add("--strict-task-list", dest="allow_missing_tasks", action="store_false",
        help="fail if a task of the split file has no task file (default: drop and count it)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return prep_main(build_parser(), SNIPrepConfig, "sni_prep", prepare, argv)


if __name__ == "__main__":
    sys.exit(main())
