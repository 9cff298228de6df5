"""Small experiments in one process, without DeepSpeed: the learning test and ``benchmarks/curves.py``.

The engine (:mod:`hypertrain.engine`) is what users run; these helpers drive the *same* methods, collator and
evaluation harness with a plain AdamW loop, so that many short runs (seeds, ablations) fit in a CPU budget. Every
run is deterministic for a seed on CPU.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from hypertrain.config import Config
from hypertrain.data.collate import EpisodeCollator
from hypertrain.episode import Episode
from hypertrain.evaluation.data import EvalSet


def batches(
    episodes: Sequence[Episode], collate: EpisodeCollator, batch_size: int, seed: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Endless shuffled batches (a new permutation each epoch, from ``seed``)."""
    rng = random.Random(seed)
    order = list(range(len(episodes)))
    while True:
        rng.shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield collate([episodes[i] for i in order[start : start + batch_size]])


def collator_for(cfg: Config, tasks: Sequence[str], method: torch.nn.Module | None = None) -> EpisodeCollator:
    """The engine's collator for ``cfg`` (``task_ids`` index the sorted task list)."""
    from hypertrain.models.registry import load_tokenizer

    return EpisodeCollator(
        load_tokenizer(cfg.model.tokenizer or cfg.model.name),
        {task: i for i, task in enumerate(sorted(tasks))},
        cfg.data.max_input_tokens,
        cfg.data.max_target_tokens,
        cfg.data.max_hyper_input_tokens,
        main_input_mode=cfg.data.main_input,
        with_hyper=getattr(method, "needs_hyper_input", True),
    )


@dataclasses.dataclass
class Run:
    """A trained method and its per-step training losses (total and parts)."""

    method: torch.nn.Module
    losses: list[float]
    parts: dict[str, list[float]]


def train(
    cfg: Config,
    episodes: Sequence[Episode],
    steps: int | None = None,
    prepare: Callable[[torch.nn.Module], None] | None = None,
) -> Run:
    """Build ``cfg``'s method and train it for ``steps`` (default ``train.total_steps``) with AdamW, the configured
    lr schedule and gradient clipping; one batch of ``train.global_batch_size`` per step. ``prepare`` may change
    the built method before the optimizer sees it (an ablation: freeze or zero a part)."""
    from hypertrain.engine import linear_schedule
    from hypertrain.models.build import build_method

    steps = steps or cfg.train.total_steps
    tasks = sorted({e.task for e in episodes})
    if cfg.method == "pha" and not cfg.pha.tasks:
        cfg.pha.tasks = tasks
    torch.manual_seed(cfg.train.seed)
    method = build_method(cfg, "cpu").train()
    if prepare is not None:
        with torch.no_grad():
            prepare(method)
    params = [p for p in method.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, linear_schedule(cfg.train.warmup_steps, cfg.train.total_steps, cfg.train.schedule)
    )
    stream = batches(episodes, collator_for(cfg, tasks, method), cfg.train.global_batch_size, cfg.train.seed)
    losses: list[float] = []
    parts: dict[str, list[float]] = {}
    for _ in range(steps):
        out = method(next(stream))
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        if cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        optimizer.step()
        schedule.step()
        losses.append(float(out.loss.detach()))
        for name, value in out.parts.items():
            parts.setdefault(name, []).append(float(value))
    method.eval()
    return Run(method, losses, parts)


def generation_set(episodes: Sequence[Episode], name: str = "sni") -> EvalSet:
    """S-NI-style episodes (e.g. a filtered selection) as an evaluation set: tasks sorted, order kept within each."""
    from hypertrain.evaluation.data import EvalSet
    from hypertrain.evaluation.metrics import category_key

    ordered = sorted(episodes, key=lambda e: e.task)  # stable: each task's episodes keep their order
    groups = {e.task: category_key(e.categories[0]) if e.categories else "uncategorized" for e in ordered}
    return EvalSet(name, "generation", Path("."), ordered, groups)


def rouge_l(
    method: torch.nn.Module, cfg: Config, data: str | Path | EvalSet, max_examples_per_task: int = 0
) -> dict[str, Any]:
    """The evaluation harness's S-NI metrics of ``method`` on a prepared directory or an :class:`EvalSet`."""
    from hypertrain.evaluation.data import load_eval_set
    from hypertrain.evaluation.runner import evaluate
    from hypertrain.models.registry import load_tokenizer

    eval_set = data if not isinstance(data, str | Path) else load_eval_set(data, max_examples_per_task)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name)
    return evaluate(method, cfg, tokenizer, "cpu", sets=[eval_set])[0].metrics


def save_main_model(method: torch.nn.Module, cfg: Config, out: str | Path) -> Path:
    """A trained full fine-tuning method's T5 as a Hugging Face directory (``model.name: <out>`` loads it)."""
    from hypertrain.export import write_hf_checkpoint

    return write_hf_checkpoint(method, cfg, out)
