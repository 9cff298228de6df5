"""Full fine-tuning: every weight of the T5 itself trains (HART's FT-Zero-Shot and FT-Few-Shot baselines).

There is no hypernetwork: the main model reads what ``data.main_input`` says (the query alone for FT-Zero-Shot,
Def+2Pos and the query in one sequence for FT-Few-Shot) and is trained on the target with the engine's usual
machinery (ZeRO, 8-bit Adam, checkpoints, MLflow). Evaluation sees it like any other method: its "PEFT
parameters" for a task are none (:meth:`FullFineTuning.task_peft`), so the harness runs the model as it is.
``hypertrain export --hf`` writes the trained weights as a Hugging Face checkpoint that ``model.name: <dir>`` loads
as a frozen main model or as a hypernetwork's initialisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from hypertrain.models.base import Batch, MethodOutput
from hypertrain.models.t5_main import FrozenT5


class FullFineTuning(nn.Module):
    """The main T5 with all parameters trainable; ``forward(batch) -> MethodOutput`` with ``parts = {"lm"}``."""

    needs_hyper_input = False

    def __init__(self, main: FrozenT5) -> None:
        super().__init__()
        self.main = main  # FrozenT5 freezes on install; here everything trains
        self.main.t5.requires_grad_(True)

    def forward(self, batch: Batch) -> MethodOutput:
        out = self.main(batch["input_ids"], batch.get("attention_mask"), labels=batch["labels"])
        return MethodOutput(loss=out.loss, parts={"lm": out.loss.detach()}, logits=out.logits)

    def task_peft(self, task: str, episodes: Sequence[Any]) -> None:
        """Evaluation: the trained model needs no per-task parameters."""
        return None

    def components(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by component, for ``hypertrain params`` (each parameter in exactly one)."""
        t5 = self.main.t5
        return {
            "embeddings (shared)": list(t5.shared.parameters()),
            "encoder": [p for n, p in t5.encoder.named_parameters() if not n.startswith("embed_tokens")],
            "decoder": [p for n, p in t5.decoder.named_parameters() if not n.startswith("embed_tokens")],
            "lm head": list(t5.lm_head.parameters()),
        }
