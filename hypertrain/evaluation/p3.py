"""P3 rank classification (T0): score every answer choice by the summed log-probability of its target tokens.

A choice's score is ``sum_t log p(y_t | y_<t, x)`` over its tokens including the final EOS, with no length
normalisation; the prediction is the argmax. Each example's input is encoded **once** (with the task's PEFT
parameters); the decoder then reads those states for all its choices at once (rows repeat the states, they are
never recomputed). :func:`score_choices_reencoding` is the naive reference that encodes every (input, choice)
pair (tests and ``benchmarks/eval.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from hypertrain.episode import Episode
from hypertrain.evaluation.adapters import Tokens
from hypertrain.evaluation.metrics import rank_classify

if TYPE_CHECKING:
    from hypertrain.models.t5_main import FrozenT5, PeftParams


def shift_right(labels: Tensor, start_token: int, pad_token: int) -> Tensor:
    """Teacher-forcing decoder inputs: ``[start, y_1, ..., y_{n-1}]`` (padding ``-100`` → pad)."""
    inputs = labels.new_full(labels.shape, pad_token)
    inputs[:, 1:] = labels[:, :-1]
    inputs[:, 0] = start_token
    return inputs.masked_fill(inputs == -100, pad_token)


def sequence_log_likelihood(logits: Tensor, labels: Tensor) -> Tensor:
    """[R, S, V] logits, [R, S] labels (-100 = padding) → [R] summed token log-probabilities (float32)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * (labels != -100)).sum(dim=-1)


def _decoder_log_likelihood(
    main: FrozenT5, peft: PeftParams | None, states: Tensor, mask: Tensor, labels: Tensor
) -> Tensor:
    config = main.config
    decoder_inputs = shift_right(labels, config.decoder_start_token_id, config.pad_token_id)
    out = main(attention_mask=mask, decoder_input_ids=decoder_inputs, peft=peft, encoder_states=states, use_cache=False)
    return sequence_log_likelihood(out.logits, labels)


def choice_rows(tokens: Tokens, episodes: Sequence[Episode]) -> tuple[Tensor, Tensor]:
    """Labels [R, S] of every choice of every episode, and the episode row each belongs to [R]."""
    texts = [choice for e in episodes for choice in e.choices or ()]
    owner = [i for i, e in enumerate(episodes) for _ in e.choices or ()]
    return tokens.labels(texts), torch.tensor(owner, dtype=torch.long, device=tokens.device)


@torch.no_grad()
def score_choices(
    main: FrozenT5, peft: PeftParams | None, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, owner: Tensor
) -> Tensor:
    """[R] choice scores: one encoder pass over the B inputs, one decoder pass over the R choices."""
    states = main.encode(input_ids, attention_mask, peft)
    return _decoder_log_likelihood(main, peft, states.index_select(0, owner), attention_mask.index_select(0, owner), labels)


@torch.no_grad()
def score_choices_reencoding(
    main: FrozenT5, peft: PeftParams | None, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, owner: Tensor
) -> Tensor:
    """The naive reference: every (input, choice) pair is its own row of a full forward pass, so each input is
    encoded once per choice (T0's original way)."""
    ids, mask = input_ids.index_select(0, owner), attention_mask.index_select(0, owner)
    return _decoder_log_likelihood(main, peft, main.encode(ids, mask, peft), mask, labels)


def score(main: FrozenT5, tokens: Tokens, episodes: Sequence[Episode], peft: PeftParams) -> list[list[float]]:
    """Per episode, the score of each of its choices."""
    ids, mask = tokens.main_inputs(episodes)
    labels, owner = choice_rows(tokens, episodes)
    flat = score_choices(main, peft, ids, mask, labels, owner).tolist()
    out: list[list[float]] = [[] for _ in episodes]
    for row, value in zip(owner.tolist(), flat, strict=True):
        out[row].append(value)
    return out


def record(index: int, episode: Episode, scores: list[float], dataset: str) -> dict[str, Any]:
    """One predictions-file row: the example, every choice's score, the prediction and whether it is right."""
    prediction = rank_classify(scores)
    return {
        "index": index,
        "task": episode.task,
        "dataset": dataset,
        "id": episode.id,
        "choices": list(episode.choices or ()),
        "scores": scores,
        "prediction": prediction,
        "label": episode.label,
        "correct": prediction == episode.label,
    }
