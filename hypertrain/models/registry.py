"""Known T5 v1.1 LM-adapted architectures, by name, buildable without a download.

Configs name a model as ``google/t5-xl-lm-adapt`` (or ``xl``, ``t5-xl``); :func:`t5_config` turns that into a
``T5Config`` of the exact shape, :func:`build_t5` builds it on any device (``meta`` costs no memory, so T5-XL
shapes and parameter counts can be checked anywhere), and :func:`load_t5` loads real weights from a hub name or
a local checkpoint directory at training time. ``tiny`` is a random-weight shape for tests and the demo, paired
with ByT5's byte tokenizer, which needs no vocabulary file.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

T5_VOCAB_SIZE = 32128
BYTE_VOCAB_SIZE = 384  # ByT5: 3 special tokens + 256 bytes + 125 extra ids


@dataclasses.dataclass(frozen=True)
class T5Shape:
    """The hyper-parameters that fix a T5's parameter shapes."""

    d_model: int
    d_ff: int
    num_heads: int
    d_kv: int
    num_layers: int
    num_decoder_layers: int
    vocab_size: int = T5_VOCAB_SIZE
    hub_name: str | None = None
    """Where real weights live; ``None`` for shapes that only exist with random weights."""
    tokenizer: str | None = None
    """Tokenizer name; ``"byt5"`` is ByT5's byte tokenizer (no download)."""


# T5 v1.1 LM-adapted: gated-GELU FFN, untied input/output embeddings, no dropout in the FFN gate,
# relative attention with 32 buckets and max distance 128.
T5_SHAPES: dict[str, T5Shape] = {
    "tiny": T5Shape(64, 128, 4, 16, 2, 2, vocab_size=BYTE_VOCAB_SIZE, tokenizer="byt5"),
    "small": T5Shape(512, 1024, 6, 64, 8, 8, hub_name="google/t5-small-lm-adapt"),
    "base": T5Shape(768, 2048, 12, 64, 12, 12, hub_name="google/t5-base-lm-adapt"),
    "large": T5Shape(1024, 2816, 16, 64, 24, 24, hub_name="google/t5-large-lm-adapt"),
    "xl": T5Shape(2048, 5120, 32, 64, 24, 24, hub_name="google/t5-xl-lm-adapt"),
    "xxl": T5Shape(4096, 10240, 64, 64, 24, 24, hub_name="google/t5-xxl-lm-adapt"),
}

_ALIASES: dict[str, str] = {}
for _key, _shape in T5_SHAPES.items():
    _ALIASES[_key] = _key
    _ALIASES[f"t5-{_key}"] = _key
    if _shape.hub_name:
        _ALIASES[_shape.hub_name] = _key
        _ALIASES[_shape.hub_name.split("/", 1)[1]] = _key


def canonical_name(name: str) -> str | None:
    """Registry key for ``name`` (``"google/t5-xl-lm-adapt"`` → ``"xl"``), or None if unknown."""
    return _ALIASES.get(name.strip().lower())


def get_shape(name: str) -> T5Shape:
    """The registered shape for ``name``; raises a KeyError that lists the known names."""
    key = canonical_name(name)
    if key is None:
        known = ", ".join(sorted(set(_ALIASES)))
        raise KeyError(f"unknown T5 architecture {name!r}; known names: {known}")
    return T5_SHAPES[key]


def t5_config(name: str, **overrides: Any):
    """A ``T5Config`` of the registered shape (v1.1 LM-adapt conventions), with optional overrides."""
    from transformers import T5Config

    shape = get_shape(name)
    kwargs: dict[str, Any] = dict(
        vocab_size=shape.vocab_size,
        d_model=shape.d_model,
        d_ff=shape.d_ff,
        d_kv=shape.d_kv,
        num_heads=shape.num_heads,
        num_layers=shape.num_layers,
        num_decoder_layers=shape.num_decoder_layers,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.1,
        layer_norm_epsilon=1e-6,
        # transformers 5 no longer fills these in for a hand-built config.
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    kwargs.update(overrides)
    return T5Config(**kwargs)


def build_t5(
    name: str,
    device: str | torch.device = "meta",
    dtype: torch.dtype | None = None,
    seed: int | None = 0,
    **config_overrides: Any,
):
    """A ``T5ForConditionalGeneration`` of the registered shape with random weights, built on ``device``.

    On ``meta`` no memory is allocated: use it to check shapes and count parameters of T5-XL/XXL.
    """
    from transformers import T5ForConditionalGeneration

    config = t5_config(name, **config_overrides)
    if seed is not None and str(device) != "meta":
        torch.manual_seed(seed)
    with torch.device(device):
        model = T5ForConditionalGeneration(config)
        untie_lm_head(model)
    if dtype is not None:
        model = model.to(dtype)
    return model


def untie_lm_head(model) -> None:
    """Give ``lm_head`` its own weight, as in T5 v1.1 checkpoints.

    transformers 5 forces ``tie_word_embeddings=True`` on every T5Config, so a model built from a config ties
    ``lm_head`` to the input embedding (T5-XL would count 65.8M parameters too few). ``from_pretrained`` of a
    v1.1 checkpoint unties them itself, because the checkpoint holds two different matrices.
    """
    if model.lm_head.weight is not model.shared.weight:
        return
    weight = torch.empty_like(model.shared.weight)
    if weight.device.type != "meta":
        torch.nn.init.normal_(weight, mean=0.0, std=1.0)  # T5's init for lm_head (factor 1.0)
    model.lm_head.weight = torch.nn.Parameter(weight)
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        tied.pop("lm_head.weight", None)


def is_local_checkpoint(name_or_path: str) -> bool:
    path = Path(name_or_path).expanduser()
    return path.is_dir() and (path / "config.json").is_file()


def load_t5(name_or_path: str, dtype: torch.dtype | None = None, seed: int = 0, **kwargs: Any):
    """The main model's weights: a local checkpoint directory, a hub name, or a random-weight registry shape.

    - a directory with ``config.json`` → ``from_pretrained(path)``;
    - a registry name with a hub name (``xl``, ``google/t5-xl-lm-adapt``) → ``from_pretrained(hub_name)``;
    - a registry name without one (``tiny``) → random weights from ``seed``.
    """
    from transformers import T5ForConditionalGeneration

    if is_local_checkpoint(name_or_path):
        return T5ForConditionalGeneration.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    key = canonical_name(name_or_path)
    if key is None:
        # Not ours: let transformers resolve it (another hub id), with its own error if it cannot.
        return T5ForConditionalGeneration.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    shape = T5_SHAPES[key]
    if shape.hub_name is None:
        attn = kwargs.get("attn_implementation")
        overrides = {"attn_implementation": attn} if attn else {}
        return build_t5(key, device="cpu", dtype=dtype, seed=seed, **overrides)
    return T5ForConditionalGeneration.from_pretrained(shape.hub_name, dtype=dtype, **kwargs)


def load_tokenizer(name_or_path: str):
    """The tokenizer that goes with a model name or checkpoint; ``byt5`` (and ``tiny``) need no download."""
    from transformers import AutoTokenizer, ByT5Tokenizer

    key = canonical_name(name_or_path)
    if name_or_path == "byt5" or (key is not None and T5_SHAPES[key].tokenizer == "byt5"):
        return ByT5Tokenizer()
    if key is not None and not is_local_checkpoint(name_or_path):
        return AutoTokenizer.from_pretrained(T5_SHAPES[key].hub_name)
    return AutoTokenizer.from_pretrained(name_or_path)


def count_parameters(model: torch.nn.Module) -> dict[str, int]:
    """Trainable and frozen parameter counts (works on the meta device)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {"trainable": trainable, "frozen": frozen, "total": trainable + frozen}
