"""LoRA (Hu et al., 2021) through Hugging Face ``peft``: one adapter for all tasks over the frozen T5 (HART's PEFT
baseline, trained on FT-Few-Shot's input).

``peft.get_peft_model`` replaces the targeted ``nn.Linear`` projections of the main T5 in place by LoRA layers
(``W x + (alpha / r) B A x``; B starts at zero, so step 0 is the plain model). The :class:`FrozenT5` wrapper, its
prefix and fusion machinery and the trainer see the same module tree as before, with the LoRA matrices as the
only trainable parameters. :meth:`LoraTuning.save_adapter` writes the adapter in PEFT's own format
(``adapter_config.json`` + ``adapter_model.safetensors``), which ``PeftModel.from_pretrained(t5, DIR)`` loads onto
the plain T5 named in ``base_model_name_or_path``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from hypertrain.models.base import Batch, MethodOutput
from hypertrain.models.t5_main import FrozenT5

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class LoraTuning(nn.Module):
    """A LoRA adapter on the frozen :class:`FrozenT5`; ``forward(batch) -> MethodOutput`` with ``parts = {"lm"}``."""

    needs_hyper_input = False

    def __init__(
        self,
        main: FrozenT5,
        rank: int = 8,
        alpha: float = 16.0,
        dropout: float = 0.0,
        target_modules: Sequence[str] = ("q", "v"),
        base_model: str = "",
    ) -> None:
        from peft import LoraConfig, get_peft_model

        super().__init__()
        self.main = main
        config = LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
            task_type="SEQ_2_SEQ_LM",
        )
        try:
            with warnings.catch_warnings():  # peft calls an HF property that transformers 5 deprecates
                warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
                peft_model = get_peft_model(main.t5, config)
            # what the adapter names as its base: the checkpoint it was trained on (peft would take the loaded
            # model's name_or_path, empty for a random-weight shape)
            peft_model.peft_config["default"].base_model_name_or_path = base_model or None
        except ValueError as err:  # peft's message lists what it looked for
            raise ValueError(f"lora.target_modules {list(target_modules)}: {err}") from err
        # Kept out of the module tree: its parameters are main's (same objects), registered once, under main.
        self.__dict__["peft_model"] = peft_model
        self.main.t5.requires_grad_(False)
        for name, param in self.main.t5.named_parameters():
            param.requires_grad_("lora_" in name)

    def forward(self, batch: Batch) -> MethodOutput:
        out = self.main(batch["input_ids"], batch.get("attention_mask"), labels=batch["labels"])
        return MethodOutput(loss=out.loss, parts={"lm": out.loss.detach()}, logits=out.logits)

    def task_peft(self, task: str, episodes: Sequence[Any]) -> None:
        """Evaluation: the adapter sits in the model; there are no per-task parameters."""
        return None

    def save_adapter(self, directory: str | Path) -> Path:
        """The adapter in PEFT's format (``adapter_config.json``, ``adapter_model.safetensors``) in ``directory``."""
        # embeddings never train here: no lookup of the base model's vocabulary (it would reach for the hub)
        self.peft_model.save_pretrained(str(directory), safe_serialization=True, save_embedding_layers=False)
        return Path(directory)

    def components(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by component, for ``hypertrain params`` (each parameter in exactly one)."""
        lora = [p for n, p in self.main.named_parameters() if "lora_" in n]
        ids = {id(p) for p in lora}
        return {
            "LoRA matrices": lora,
            "main model": [p for p in self.main.parameters() if id(p) not in ids],
        }
