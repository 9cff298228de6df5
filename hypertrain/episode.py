"""The one record type that flows from data prep to the trainer: an *episode*.

An episode is one query for the main model together with what the hypernetwork reads about its task. Every
prep job (S-NI, P3, demo) writes episodes; everything downstream reads them and never needs to know which
dataset they came from. On disk each episode is one WebDataset sample whose ``.json`` member holds
:meth:`Episode.to_json`.
"""

from __future__ import annotations

import dataclasses
import json
import string
from typing import Any

MAIN_INPUTS = ("query", "few_shot")
"""What the main model reads (``data.main_input``): the query alone, or the hypernetwork's input and the query in one
sequence (FT-Few-Shot and the PEFT baselines trained on it)."""
FEW_SHOT_QUERY = "\n\nNow complete the following example -\nInput: {input}\nOutput:"
"""Tk-Instruct's query block after Def+2Pos (its ``Input:`` text gets a final period like the demonstrations')."""

SCHEMA_FIELDS = ("id", "task", "source", "categories", "hyper_input", "input", "targets", "choices", "label")


@dataclasses.dataclass
class Episode:
    id: str
    """Unique within a dataset (S-NI: the instance id; P3: subset/split/row)."""
    task: str
    """Task name: the S-NI task, or the P3 prompted subset."""
    source: str
    """``sni``, ``p3`` or ``demo``."""
    categories: list[str]
    hyper_input: str
    """The hypernetwork's input (S-NI: Def+2Pos; P3: K demonstrations)."""
    input: str
    """The main model's input."""
    targets: list[str]
    """All reference outputs, in order (the first one is the training target)."""
    choices: list[str] | None = None
    """Answer choices for multiple-choice episodes, else None."""
    label: int | None = None
    """Index of the correct choice, else None."""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Optional source-specific fields (e.g. P3's original token ids), stored flat beside the schema."""

    def to_json(self) -> bytes:
        """Canonical UTF-8 JSON (fixed key order, no whitespace variance) so shards are reproducible."""
        record = {name: getattr(self, name) for name in SCHEMA_FIELDS}
        for key in sorted(self.extra):
            if key in record:
                raise ValueError(f"episode {self.id}: extra field {key!r} shadows a schema field")
            record[key] = self.extra[key]
        return json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_json(cls, data: bytes | str | dict[str, Any]) -> Episode:
        record = json.loads(data) if isinstance(data, bytes | str) else dict(data)
        missing = [name for name in SCHEMA_FIELDS if name not in record]
        if missing:
            raise ValueError(f"episode record lacks field(s) {missing}: {str(record)[:200]}")
        kwargs = {name: record.pop(name) for name in SCHEMA_FIELDS}
        return cls(**kwargs, extra=record)


def main_input(episode: Episode, mode: str = "query") -> str:
    """The main model's input text for ``data.main_input`` ``mode``.

    ``query``: the episode's ``input`` as is (FT-Zero-Shot; HART, HyperTuning and PHA, whose hypernetwork reads the
    demonstrations). ``few_shot``: the demonstrations and the query in one sequence (FT-Few-Shot): for S-NI
    Tk-Instruct's layout, Def+2Pos then ``Now complete the following example - Input: <query>. Output:``; for other
    sources (P3's K demonstrations) the demonstrations, a blank line and the query.
    """
    if mode == "query":
        return episode.input
    if mode != "few_shot":
        raise ValueError(f"unknown main input {mode!r} (known: {', '.join(MAIN_INPUTS)})")
    if episode.source in ("sni", "demo"):
        query = episode.input.strip()
        if query and query[-1] not in string.punctuation:
            query += "."
        return episode.hyper_input + FEW_SHOT_QUERY.format(input=query)
    return f"{episode.hyper_input}\n\n{episode.input}"
