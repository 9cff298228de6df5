"""What every method (HART, HyperTuning, PHA) shares with the trainer: the batch and the output.

The engine knows nothing method-specific: it hands a :data:`Batch` to ``method(batch)`` and gets a
:class:`MethodOutput` whose ``loss`` it backpropagates and whose ``parts`` it logs.

Batch keys (all tensors, first dimension = batch size B; produced by the collator from episodes):

==========================  ===============  ==============================================================
key                         shape / dtype    meaning
==========================  ===============  ==============================================================
``input_ids``               [B, T] long      main-model input (episode ``input``)
``attention_mask``          [B, T] long      1 = token, 0 = padding
``labels``                  [B, S] long      target tokens ending with EOS; padding is -100
``hyper_input_ids``         [B, H] long      hypernetwork input (episode ``hyper_input``)
``hyper_attention_mask``    [B, H] long
``task_ids``                [B] long         index of the episode's task in the run's sorted task list
==========================  ===============  ==============================================================
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

Batch = dict[str, torch.Tensor]


@dataclasses.dataclass
class MethodOutput:
    """A method's training output: the loss to backpropagate and its named parts (detached, for logging)."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    logits: torch.Tensor | None = None


class Method(Protocol):
    """A trainable method: an ``nn.Module`` whose forward maps a batch to a :class:`MethodOutput`."""

    def __call__(self, batch: Batch) -> MethodOutput: ...
