"""Episodes → a padded, tokenized :data:`~hypertrain.models.base.Batch`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hypertrain.episode import Episode, main_input

IGNORE_INDEX = -100
CHARS_PER_TOKEN_BOUND = 32
"""Characters kept per token of the limit before tokenizing (a T5 SentencePiece token rarely spans 16; a byte
token spans at most one)."""


class EpisodeCollator:
    """Tokenizes the main input, the first target and the hypernetwork input of each episode, and pads.

    The main input is the episode's query or, with ``main_input_mode="few_shot"``, its demonstrations and query in
    one sequence (:func:`~hypertrain.episode.main_input`); ``with_hyper=False`` (a method without a hypernetwork)
    gives zero-width hypernetwork tensors. Inputs are truncated to their maximum lengths (the tokenizer appends EOS
    within the limit). Padding is to the longest sequence in the batch, or to the maximum lengths with
    ``pad_to_max`` (static shapes, which compiled or CUDA-graphed steps want). Label padding is -100. ``task_ids``
    index the run's sorted task list; a task outside it gets -1.
    """

    def __init__(
        self,
        tokenizer,
        task_index: Mapping[str, int],
        max_input_tokens: int,
        max_target_tokens: int,
        max_hyper_input_tokens: int,
        pad_to_max: bool = False,
        main_input_mode: str = "query",
        with_hyper: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.task_index = dict(task_index)
        self.max_input_tokens = max_input_tokens
        self.max_target_tokens = max_target_tokens
        self.max_hyper_input_tokens = max_hyper_input_tokens
        self.pad_to_max = pad_to_max
        self.main_input_mode = main_input_mode
        self.with_hyper = with_hyper

    def _encode(self, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
        # Tokenizing a 5 MB input in full to keep its first few hundred tokens takes seconds: cut the text first,
        # keeping far more characters than max_length tokens can cover. Should a cut text still give fewer tokens
        # than the limit (pathological whitespace runs), the batch is encoded again from the full texts.
        limit = max_length * CHARS_PER_TOKEN_BOUND
        clipped = [text[:limit] for text in texts]
        encoded = self._tokenize(clipped, max_length)
        cut = [len(text) > limit for text in texts]
        if any(cut) and any(c and int(n) < max_length for c, n in zip(cut, encoded["attention_mask"].sum(1), strict=True)):
            encoded = self._tokenize(list(texts), max_length)
        return encoded

    def _tokenize(self, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            texts,
            max_length=max_length,
            truncation=True,
            padding="max_length" if self.pad_to_max else "longest",
            return_tensors="pt",
        )

    def __call__(self, episodes: Sequence[Episode]) -> dict[str, torch.Tensor]:
        main = self._encode([main_input(e, self.main_input_mode) for e in episodes], self.max_input_tokens)
        if self.with_hyper:
            hyper = self._encode([e.hyper_input for e in episodes], self.max_hyper_input_tokens)
        else:  # a method without a hypernetwork (full fine-tuning): zero-width, nothing tokenized or counted
            empty = torch.zeros(len(episodes), 0, dtype=torch.long)
            hyper = {"input_ids": empty, "attention_mask": empty}
        target = self._encode([e.targets[0] for e in episodes], self.max_target_tokens)
        labels = target["input_ids"].masked_fill(target["attention_mask"] == 0, IGNORE_INDEX)
        return {
            "input_ids": main["input_ids"],
            "attention_mask": main["attention_mask"],
            "labels": labels,
            "hyper_input_ids": hyper["input_ids"],
            "hyper_attention_mask": hyper["attention_mask"],
            "task_ids": torch.tensor([self.task_index.get(e.task, -1) for e in episodes], dtype=torch.long),
        }
