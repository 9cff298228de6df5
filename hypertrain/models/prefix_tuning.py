"""Prefix-Tuning (Li & Liang, 2021): one learned set of key/value prefixes for every self-attention layer of the
frozen T5's encoder and decoder, shared by all tasks (HART's PEFT baseline, trained on FT-Few-Shot's input).

The prefixes go in through the same injection as HART's generated ones (:class:`~hypertrain.models.t5_main.PeftParams`,
batch 1, broadcast to the batch), which reaches the encoder; Hugging Face PEFT's prefix tuning reaches only T5's
decoder. With ``reparam`` (Li & Liang's reparametrisation, the default) each stack's prefixes are an MLP of a
smaller learned matrix P' [p, d_model]: ``P = Linear(tanh(Linear(P')))`` reshaped to [layers, key/value, heads, p,
d_kv]; only P' and the MLP train, and the prefixes are recomputed at every step. Without it, the key/value tensors
themselves are the parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from hypertrain.models.base import Batch, MethodOutput
from hypertrain.models.t5_main import FrozenT5, PeftParams, Prefix

STACKS = ("encoder", "decoder")


class StackPrefixes(nn.Module):
    """The prefixes of one stack: ``forward() -> [layers, 2, heads, p, d_kv]`` (2 = key, value)."""

    def __init__(
        self, layers: int, heads: int, d_kv: int, d_model: int, prefix_length: int, reparam: bool, hidden: int
    ) -> None:
        super().__init__()
        self.shape = (prefix_length, layers, 2, heads, d_kv)
        out = layers * 2 * heads * d_kv
        if reparam:
            self.input = nn.Parameter(torch.randn(prefix_length, d_model))  # nn.Embedding's N(0, 1)
            self.mlp = nn.Sequential(nn.Linear(d_model, hidden), nn.Tanh(), nn.Linear(hidden, out))
            self.direct = None
        else:
            # The scale of T5's own keys and values at initialisation, not of its embeddings: N(0, 1/d_model).
            self.input, self.mlp = None, None
            self.direct = nn.Parameter(torch.randn(prefix_length, out) / d_model**0.5)

    def forward(self) -> Tensor:
        flat = self.direct if self.mlp is None else self.mlp(self.input)
        # [p, L, 2, H, d_kv] -> [L, 2, H, p, d_kv]
        return flat.reshape(self.shape).permute(1, 2, 3, 0, 4)


class PrefixTuning(nn.Module):
    """Learned prefixes over a frozen :class:`FrozenT5`; ``forward(batch) -> MethodOutput`` with ``parts = {"lm"}``."""

    needs_hyper_input = False

    def __init__(self, main: FrozenT5, prefix_length: int = 32, reparam: bool = True, reparam_hidden: int = 512) -> None:
        super().__init__()
        self.main = main
        layers = {"encoder": main.num_encoder_layers, "decoder": main.num_decoder_layers}
        self.prefixes = nn.ModuleDict({
            stack: StackPrefixes(layers[stack], main.num_heads, main.d_kv, main.d_model, prefix_length, reparam,
                                 reparam_hidden)
            for stack in STACKS
        })

    def peft(self) -> PeftParams:
        """Every layer's (key, value) prefix with batch 1 (the injection broadcasts it to the batch)."""
        dtype = next(self.main.parameters()).dtype

        def layers(stack: str) -> list[Prefix | None]:
            kv = self.prefixes[stack]().to(dtype).unsqueeze(2)  # [L, 2, 1, H, p, d_kv]
            return [(layer[0], layer[1]) for layer in kv]

        return PeftParams(encoder_prefix=layers("encoder"), decoder_prefix=layers("decoder"))

    def forward(self, batch: Batch) -> MethodOutput:
        out = self.main(batch["input_ids"], batch.get("attention_mask"), labels=batch["labels"], peft=self.peft())
        return MethodOutput(loss=out.loss, parts={"lm": out.loss.detach()}, logits=out.logits)

    @torch.no_grad()
    def task_peft(self, task: str, episodes: Sequence[Any]) -> PeftParams:
        """Evaluation: the same prefixes for every task."""
        return self.peft()

    def components(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by component, for ``hypertrain params`` (each parameter in exactly one)."""
        parts: dict[str, list[nn.Parameter]] = {}
        for stack in STACKS:
            module = self.prefixes[stack]
            if module.mlp is None:
                parts[f"{stack} prefixes"] = [module.direct]
            else:
                parts[f"{stack} prefix input (reparametrisation)"] = [module.input]
                parts[f"{stack} prefix MLP (reparametrisation)"] = list(module.mlp.parameters())
        parts["main model"] = list(self.main.parameters())
        return parts
