"""One evaluation interface over HART/HyperTuning and PHA: "PEFT parameters for a task from its episodes".

The protocol is HART's: the PEFT parameters of a task are made **once** and then reused for every instance of it
(a batch of 1 that :class:`~hypertrain.models.t5_main.PeftParams` broadcasts). Generation and choice scoring then
only need the frozen main model (``.main``) and those parameters, so they are method-independent.

- HART / HyperTuning: the hypernetwork reads the task's ``hyper_input`` (S-NI: Def+2Pos; P3: the subset's fixed
  demonstrations) once and writes the prefixes (and fusion states).
- PHA: a known training task with ``pha.eval_task_source: task_id`` uses its prototype; otherwise the task's
  instances retrieve the prototype (``pha.retrieval`` / ``top_k``; encoded in fixed chunks so every rank gets
  the same bits), then the adapters are generated from it. A set new-task embedding (a checkpoint taken after
  ``start_new_task``) is used as is.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from hypertrain.episode import Episode, main_input

if TYPE_CHECKING:
    from hypertrain.models.t5_main import FrozenT5, PeftParams

log = logging.getLogger("hypertrain")


def _whole(param: torch.nn.Parameter) -> contextlib.AbstractContextManager[Any]:
    """Read a parameter outside its module's forward: gathered under ZeRO-3 (collective), else as is."""
    if not hasattr(param, "ds_id"):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters([param], modifier_rank=None)


class Tokens:
    """The training collator's tokenization (truncation, EOS, padding to the longest), on ``device``; ``input_eos``
    False leaves EOS off the main model's inputs (T0's evaluation protocol)."""

    def __init__(
        self, tokenizer: Any, max_input: int, max_target: int, max_hyper: int, device: torch.device,
        main_input_mode: str = "query", input_eos: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_input, self.max_target, self.max_hyper = max_input, max_target, max_hyper
        self.device = device
        self.main_input_mode = main_input_mode
        self.input_eos = input_eos

    @classmethod
    def for_config(cls, cfg: Any, tokenizer: Any, device: torch.device | str) -> Tokens:
        """The tokenization a run's configuration says (``data`` budgets and main input, ``eval.input_eos``)."""
        return cls(tokenizer, cfg.data.max_input_tokens, cfg.data.max_target_tokens, cfg.data.max_hyper_input_tokens,
                   torch.device(device), cfg.data.main_input, input_eos=cfg.eval.input_eos)

    def _encode(self, texts: Sequence[str], max_length: int, special_tokens: bool = True) -> tuple[Tensor, Tensor]:
        out = self.tokenizer(list(texts), max_length=max_length, truncation=True, padding="longest", return_tensors="pt",
                             add_special_tokens=special_tokens)
        return out["input_ids"].to(self.device), out["attention_mask"].to(self.device)

    def inputs(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Main-model inputs: ending with EOS as in training, or without (``eval.input_eos: false``, T0's way)."""
        return self._encode(texts, self.max_input, special_tokens=self.input_eos)

    def main_inputs(self, episodes: Sequence[Episode]) -> tuple[Tensor, Tensor]:
        """The main model's input of each episode, as in training (``data.main_input``)."""
        return self.inputs([main_input(e, self.main_input_mode) for e in episodes])

    def hyper(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        return self._encode(texts, self.max_hyper)

    def labels(self, texts: Sequence[str]) -> Tensor:
        """Target token ids ending with EOS, padding -100."""
        ids, mask = self._encode(texts, self.max_target)
        return ids.masked_fill(mask == 0, -100)

    def decode(self, ids: Tensor) -> list[str]:
        return self.tokenizer.batch_decode(ids, skip_special_tokens=True)


class EvalModel(Protocol):
    """What evaluation needs from a method."""

    main: FrozenT5

    def task_peft(self, task: str, episodes: Sequence[Episode]) -> PeftParams:
        """The PEFT parameters (batch 1) for ``task``, from its episodes."""
        ...


class HartEval:
    """HART / HyperTuning: prefixes (and fusion states) from the task's hypernetwork input."""

    def __init__(self, method: Any, tokens: Tokens) -> None:
        self.method, self.tokens, self.main = method, tokens, method.main
        self._warned: set[str] = set()

    def task_peft(self, task: str, episodes: Sequence[Episode]) -> PeftParams:
        text = episodes[0].hyper_input
        if task not in self._warned and any(e.hyper_input is not text and e.hyper_input != text for e in episodes):
            self._warned.add(task)
            log.warning("eval: the episodes of %s have different hypernetwork inputs; the first one is used", task)
        ids, mask = self.tokens.hyper([text])
        return self.method.generate_peft(ids, mask)


class PhaEval:
    """PHA: the task's prototype (known task) or the one its instances retrieve, then the generated adapters."""

    def __init__(self, method: Any, tokens: Tokens, chunk_size: int, retrieval_instances: int = 0) -> None:
        self.method, self.tokens, self.main = method, tokens, method.main
        self.chunk_size = chunk_size
        self.retrieval_instances = retrieval_instances
        self.retrieved: dict[str, list[str] | None] = {}
        """Task → the prototype task(s) its instances retrieved (for the report)."""

    def task_embedding(self, task: str, episodes: Sequence[Episode]) -> Tensor:
        """The task embedding [d'] its adapters are generated from."""
        from hypertrain.models.pha import retrieve

        method, cfg = self.method, self.method.config
        if method.new_task_embedding is not None:
            with _whole(method.new_task_embedding):
                return method.new_task_embedding.detach().clone()
        if cfg.eval_task_source == "task_id" and task in method.tasks:
            self.retrieved[task] = [task]
            with _whole(method.prototypes.weight):
                return method.prototypes.weight[method.prototypes.index(task)].detach().clone()
        chosen = episodes[: self.retrieval_instances] if self.retrieval_instances else episodes
        z = []
        for start in range(0, len(chosen), self.chunk_size):
            ids, mask = self.tokens.main_inputs(chosen[start : start + self.chunk_size])
            z.append(method.encode(ids, mask)[1])
        with _whole(method.prototypes.weight):
            protos = method.prototypes.weight
            result = retrieve(
                torch.cat(z).float(), protos.float(), mode=cfg.retrieval, top_k=cfg.top_k,
                temperature=cfg.top_k_temperature, tasks=method.tasks,
            )
            embedding = result.embedding.to(protos.dtype)
        self.retrieved[task] = result.tasks
        return embedding

    def task_peft(self, task: str, episodes: Sequence[Episode]) -> PeftParams:
        from hypertrain.models.t5_main import PeftParams

        method = self.method
        embedding = self.task_embedding(task, episodes).unsqueeze(0)
        rows = torch.zeros(1, dtype=torch.long, device=embedding.device)
        encoder = method.encoder_peft()
        return PeftParams(
            encoder_adapters=encoder.encoder_adapters if encoder is not None else None,
            decoder_adapters=method.decoder_adapters(embedding, rows),
        )


def eval_model(method: Any, tokens: Tokens, chunk_size: int, retrieval_instances: int = 0) -> EvalModel:
    """The evaluation view of a built method (an unwrapped ``nn.Module``: HART, HyperTuning, PHA, or one that is its
    own view, such as full fine-tuning)."""
    if hasattr(method, "task_peft") and hasattr(method, "main"):
        return method
    if hasattr(method, "generate_peft"):
        return HartEval(method, tokens)
    if hasattr(method, "prototypes") and hasattr(method, "decoder_adapters"):
        return PhaEval(method, tokens, chunk_size, retrieval_instances)
    raise TypeError(f"cannot evaluate a {type(method).__name__}: it has neither generate_peft (HART) nor prototypes (PHA)")
