"""S-NI generation: the main model answers a batch of one task's instances with that task's PEFT parameters."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hypertrain.episode import Episode
from hypertrain.evaluation.adapters import Tokens
from hypertrain.evaluation.metrics import sni_instance_scores

if TYPE_CHECKING:
    from hypertrain.models.t5_main import FrozenT5, PeftParams


def generate(
    main: FrozenT5,
    tokens: Tokens,
    episodes: Sequence[Episode],
    peft: PeftParams,
    *,
    max_new_tokens: int = 128,
    num_beams: int = 1,
    synced: bool = False,
) -> list[str]:
    """Decoded predictions (greedy for ``num_beams=1``; no sampling) for a batch of one task's episodes."""
    ids, mask = tokens.main_inputs(episodes)
    out = main.generate(
        ids, mask, peft=peft, max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
        synced_gpus=synced,
    )
    return tokens.decode(out)


def record(index: int, episode: Episode, prediction: str | None, category: str) -> dict[str, Any]:
    """One predictions-file row: the instance, its prediction and its scores (raw, in [0, 1])."""
    return {
        "index": index,
        "task": episode.task,
        "category": category,
        "id": episode.id,
        "prediction": "" if prediction is None else prediction,
        "references": list(episode.targets),
        **sni_instance_scores(prediction, episode.targets),
    }
