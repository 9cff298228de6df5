"""C4 → pretraining episodes for HyperTuning-PT (and HART with pretraining).

``python -m data_prep.c4 --src c4 --out data/c4/train --split train --max-files 8``

Input is C4 as released (``allenai/c4``, English): ``en/c4-<split>.NNNNN-of-NNNNN.json.gz``, gzip-compressed JSON
Lines, one document per line with ``text``, ``timestamp`` and ``url``. Each document long enough becomes one
episode: its first ``sum(chunk_words)`` whitespace-separated words are cut into four consecutive chunks of
``--chunk-words`` words (the text between them is kept exactly as written, newlines included); the hypernetwork
reads chunks 1 and 4 (joined by a blank line), the main model reads chunk 2 and its target is chunk 3 (HyperTuning's
pretraining task). Units of work are files, so a job array splits the file list (then ``python -m data_prep.merge``).

Documents shorter than the four chunks are skipped and counted (``record:too_short``). Bad input (a line that is
not UTF-8 or not JSON, a record without a string ``text``, a damaged gzip stream) stops the job with an error naming
the file and line, or with ``--skip-bad`` is skipped and counted; a damaged stream keeps the documents read before
the damage and counts the rest of the file as ``file:bad_gzip``.
"""

from __future__ import annotations

import argparse
import functools
import gzip
import json
import re
import sys
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from data_prep.runner import PrepError, SkipLog, UnitResult, add_run_options, prep_main, run_prep_for
from hypertrain.config import C4PrepConfig
from hypertrain.episode import Episode

SOURCE = "c4"
FILE_PATTERN = re.compile(r"^c4-(?P<split>[a-z]+)\.(?P<index>\d{5})-of-(?P<count>\d{5})\.json\.gz$")
WORD = re.compile(r"\S+")
HYPER_SEPARATOR = "\n\n"
"""Between chunks 1 and 4 in the hypernetwork's input."""


def split_files(src: str | Path, split: str) -> list[Path]:
    """The split's files in name order, from a C4 root (``<src>/en/``) or its ``en/`` folder."""
    root = Path(src)
    folder = root / "en" if (root / "en").is_dir() else root
    if not folder.is_dir():
        raise PrepError(f"--src {src}: not a directory")
    files = sorted(p for p in folder.iterdir() if (m := FILE_PATTERN.match(p.name)) and m["split"] == split)
    if not files:
        raise PrepError(f"{folder}: no c4-{split}.NNNNN-of-NNNNN.json.gz files (C4's released layout)")
    return files


def four_chunks(text: str, lengths: Sequence[int]) -> list[str] | None:
    """The text of the first ``sum(lengths)`` words cut into consecutive chunks of ``lengths`` words (whitespace
    between words of a chunk kept, between chunks dropped), or None when the text has fewer words."""
    words = []
    needed = sum(lengths)
    for match in WORD.finditer(text):
        words.append(match.span())
        if len(words) == needed:
            break
    if len(words) < needed:
        return None
    chunks, start = [], 0
    for length in lengths:
        first, last = words[start], words[start + length - 1]
        chunks.append(text[first[0] : last[1]])
        start += length
    return chunks


class _Bad(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number from 1, raw line) of a gzip file; a damaged stream raises :class:`_Bad` after the good lines."""
    number = 0
    try:
        with gzip.open(path, "rb") as handle:
            for number, line in enumerate(handle, start=1):  # noqa: B007 (number is read after the loop)
                yield number, line
    except (OSError, EOFError, zlib.error) as err:
        raise _Bad("file:bad_gzip", f"{path}: damaged gzip stream after line {number} ({err})") from None


def _document(number: int, line: bytes, path: Path) -> str:
    """The ``text`` of one JSON line; :class:`_Bad` naming the file and line otherwise."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise _Bad("record:bad_utf8", f"{path}: line {number} is not UTF-8 ({err})") from None
    except json.JSONDecodeError as err:
        raise _Bad("record:bad_json", f"{path}: line {number} is not JSON ({err.msg} at column {err.colno})") from None
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise _Bad("record:no_text", f"{path}: line {number} has no string field 'text'")
    return text


def file_episodes(path: Path, cfg: C4PrepConfig) -> UnitResult:
    """One C4 file's episodes (picklable entry point for the worker pool)."""
    task = path.name.removesuffix(".json.gz")
    skipped = SkipLog()
    episodes: list[Episode] = []
    documents = 0
    try:
        for number, line in _lines(path):
            if cfg.max_documents_per_file and len(episodes) >= cfg.max_documents_per_file:
                break
            if not line.strip():
                continue
            documents += 1
            try:
                text = _document(number, line, path)
            except _Bad as bad:
                if not cfg.skip_bad:
                    raise PrepError(f"{bad} (use --skip-bad to skip and count it)") from None
                skipped.note(bad.reason, file=path.name, line=number)
                continue
            chunks = four_chunks(text, cfg.chunk_words)
            if chunks is None:
                skipped.note("record:too_short", file=path.name, line=number)
                continue
            episodes.append(Episode(
                id=f"{task}/{number}", task=task, source=SOURCE, categories=[],
                hyper_input=chunks[0] + HYPER_SEPARATOR + chunks[3], input=chunks[1], targets=[chunks[2]],
            ))
    except _Bad as bad:  # the gzip stream: what was read before the damage stays
        if not cfg.skip_bad:
            raise PrepError(f"{bad} (use --skip-bad to keep the documents before it and count the rest)") from None
        skipped.note(bad.reason, file=path.name, error=str(bad).replace(str(path), path.name))
    return UnitResult(task, episodes, skipped=skipped, extra={"documents_read": {task: documents}})


def prepare(cfg: C4PrepConfig) -> dict[str, Any]:
    """Run the C4 prep (or one job-array piece of it); returns the manifest written."""
    files = split_files(cfg.src, cfg.split)
    if cfg.max_files:
        files = files[: cfg.max_files]
    return run_prep_for(cfg, source=SOURCE, units=files, fn=functools.partial(file_episodes, cfg=cfg))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_prep.c4", description=__doc__.splitlines()[0])
    defaults = C4PrepConfig()
    add = parser.add_argument
    add("--src", required=True, help="C4 as released: the folder holding en/c4-<split>.*.json.gz (or en/ itself)")
    add("--out", required=True, help="output directory for shards and manifest.json")
    add("--split", required=True, choices=["train", "validation"])
    add("--chunk-words", type=int, nargs=4, default=defaults.chunk_words, metavar=("C1", "C2", "C3", "C4"),
        help="words in chunks 1-4: hypernetwork reads 1 and 4, main model reads 2 and predicts 3 "
             "(default: %(default)s)")
    add("--max-files", type=int, default=defaults.max_files, help="first N files of the split; 0: all (default)")
    add("--max-documents-per-file", type=int, default=defaults.max_documents_per_file,
        help="episodes kept per file; 0: all (default)")
    add_run_options(parser, defaults, unit="file")
    return parser


def _report(manifest: dict[str, Any]) -> list[str]:
    read = sum(manifest.get("extra", {}).get("documents_read", {}).values())
    return [f"read {read} documents; {manifest['num_samples']} became episodes"]


def main(argv: Sequence[str] | None = None) -> int:
    return prep_main(build_parser(), C4PrepConfig, "c4_prep", prepare, argv, _report)


if __name__ == "__main__":
    sys.exit(main())
