"""``hypertrain predict``: answer with the frozen main model and a generated adapter, exactly as evaluation does.

Inputs go through the evaluation harness's own functions (:func:`hypertrain.evaluation.sni.generate` for free text,
:func:`hypertrain.evaluation.p3.score` for rank classification when choices are given), with the adapter's
tokenization settings, so a prediction here is the one ``hypertrain eval`` makes for the same instance.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hypertrain.adapter import AdapterError, jsonl_records


def read_inputs(path: Path) -> list[dict[str, Any]]:
    """``{"input": ..., "choices": [...] (optional)}`` per line; other fields (e.g. ``output``) are kept."""
    rows = []
    for number, row in jsonl_records(path):
        if not isinstance(row.get("input"), str):
            raise AdapterError(f"{path} line {number}: field 'input' is missing or not a string")
        choices = row.get("choices")
        if choices is not None and (not isinstance(choices, list) or len(choices) < 2
                                    or not all(isinstance(c, str) for c in choices)):
            raise AdapterError(f"{path} line {number}: field 'choices' must be a list of at least two strings")
        rows.append(row)
    if not rows:
        raise AdapterError(f"{path}: no inputs")
    return rows


def predict(adapter_dir: str | Path, rows: Sequence[dict[str, Any]], *, device: str = "cpu",
            main_model: str | None = None, max_new_tokens: int | None = None, num_beams: int | None = None,
            batch_size: int | None = None) -> list[dict[str, Any]]:
    """One result per row: ``prediction`` (and ``scores`` per choice for rows with choices)."""
    import torch

    from hypertrain import adapter
    from hypertrain.episode import Episode
    from hypertrain.evaluation import p3, sni
    from hypertrain.evaluation.adapters import Tokens
    from hypertrain.models.registry import load_tokenizer

    generated = adapter.load(adapter_dir, device)
    cfg = generated.run_config
    main = generated.main_model(device, main_model)
    tokens = Tokens.for_config(cfg, load_tokenizer(cfg.model.tokenizer or main_model or cfg.model.name), device)
    size = batch_size or cfg.eval.batch_size
    episodes = [Episode(id=str(i), task=generated.config["task"], source="user", categories=[], hyper_input="",
                        input=row["input"], targets=[str(row.get("output", ""))], choices=row.get("choices"))
                for i, row in enumerate(rows)]
    results: list[dict[str, Any]] = [dict(row) for row in rows]
    free = [i for i, e in enumerate(episodes) if not e.choices]
    ranked = [i for i, e in enumerate(episodes) if e.choices]
    with torch.no_grad():
        for start in range(0, len(free), size):
            chunk = free[start : start + size]
            texts = sni.generate(main, tokens, [episodes[i] for i in chunk], generated.peft,
                                 max_new_tokens=max_new_tokens or cfg.eval.max_new_tokens,
                                 num_beams=num_beams or cfg.eval.num_beams)
            for i, text in zip(chunk, texts, strict=True):
                results[i]["prediction"] = text
        for start in range(0, len(ranked), size):
            chunk = ranked[start : start + size]
            scores = p3.score(main, tokens, [episodes[i] for i in chunk], generated.peft)
            for i, row_scores in zip(chunk, scores, strict=True):
                best = max(range(len(row_scores)), key=row_scores.__getitem__)
                results[i].update(prediction=episodes[i].choices[best], scores=row_scores)  # type: ignore[index]
    return results


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "predict", help="answer inputs with the frozen main model and a generated adapter",
        description="Answer with the frozen main model and an adapter from `hypertrain generate`: greedy or beam "
        "search, or rank classification when choices are given. One JSON object per input on stdout.",
    )
    parser.add_argument("--adapter", required=True, help="a directory written by `hypertrain generate`")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", help="one input text")
    source.add_argument("--inputs", help="JSONL of {\"input\": ..., \"choices\": [...] (optional)}")
    parser.add_argument("--choices", nargs="+", default=None, help="answer choices for --input (rank classification)")
    parser.add_argument("--num-beams", type=int, default=None, help="beam search width (default: the run's eval)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's eval.max_new_tokens")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the run's eval.batch_size")
    parser.add_argument("--main-model", default=None,
                        help="another path to the main model the adapter was made for (checked against its shapes)")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        if args.input is not None:
            if args.choices is not None and len(args.choices) < 2:
                raise AdapterError("--choices: give at least two")
            rows = [{"input": args.input, **({"choices": args.choices} if args.choices else {})}]
        else:
            if args.choices:
                raise AdapterError("--choices goes with --input; with --inputs put 'choices' in each line")
            rows = read_inputs(Path(args.inputs))
        results = predict(args.adapter, rows, device=args.device, main_model=args.main_model,
                          max_new_tokens=args.max_new_tokens, num_beams=args.num_beams, batch_size=args.batch_size)
    except (AdapterError, FileNotFoundError) as err:
        print(f"predict: {err}", file=sys.stderr)
        return 2
    for row in results:
        print(json.dumps(row, ensure_ascii=False))
    return 0
