"""``build_method(config, device)``: the configured method as an ``nn.Module`` (``forward(batch) -> MethodOutput``).

A method is registered in :data:`BUILDERS` (method name → builder). On the ``meta`` device nothing is
downloaded or allocated: the main model is built from its registered shape (or a local checkpoint's
``config.json``), which is what ``hypertrain params`` uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hypertrain.config import Config, ConfigError
from hypertrain.models import registry
from hypertrain.models.t5_main import FrozenT5

Device = str | torch.device


def resolve_dtype(name: str, device: Device) -> torch.dtype:
    """``auto``: bf16 on GPU, fp32 elsewhere (CPU tests, meta)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def build_t5_model(config: Config, device: Device = "cpu"):
    """The main model's ``T5ForConditionalGeneration`` (real weights, or shapes only on ``meta``)."""
    name = config.model.name
    attn = config.model.attn_implementation
    dtype = resolve_dtype(config.model.dtype, device)
    if torch.device(device).type == "meta":
        if registry.canonical_name(name) is not None:
            return registry.build_t5(name, device="meta", attn_implementation=attn)
        if registry.is_local_checkpoint(name):
            from transformers import AutoConfig, T5ForConditionalGeneration

            with torch.device("meta"):
                model = T5ForConditionalGeneration(AutoConfig.from_pretrained(name, attn_implementation=attn))
                registry.untie_lm_head(model)
            return model
        raise ConfigError(f"model.name: {name!r} is neither a registered T5 shape nor a local checkpoint")
    return registry.load_t5(name, dtype=dtype, seed=config.train.seed, attn_implementation=attn).to(device)


def build_main(config: Config, device: Device = "cpu") -> FrozenT5:
    """The frozen main model, ready for per-example PEFT parameters."""
    return FrozenT5(build_t5_model(config, device), config.model.attn_implementation)


def hart_options(config: Config) -> dict[str, Any]:
    """HartMethod's keyword arguments from ``config.hart``; ``method: hypertuning`` means the parallel generator."""
    hart = config.hart
    implied = "parallel" if config.method == "hypertuning" else "autoregressive"
    generator = hart.generator or implied
    if config.method == "hypertuning" and generator != "parallel":
        raise ConfigError(
            "hart.generator: method hypertuning uses the parallel generator, got autoregressive"
        )
    alpha = hart.alpha if hart.alpha is not None else (1.0 if generator == "autoregressive" else 0.0)
    return dict(
        generator=generator,
        peft=hart.peft,
        prefix_length=hart.prefix_length,
        lora_rank=hart.lora_rank,
        lora_alpha=hart.lora_alpha,
        lora_targets=tuple(hart.lora_targets),
        hyper_decoder_layers=hart.hyper_decoder_layers,
        alpha=alpha,
        consistency=hart.consistency,
        fusion=hart.fusion,
        share_head_layernorm=hart.share_head_layernorm,
        decode=hart.decode,
        compile_decode=hart.compile_decode,
        seed=config.train.seed,
    )


def build_hart(config: Config, device: Device = "cpu") -> nn.Module:
    """HART or HyperTuning: the hypernetwork is a trainable copy of the main checkpoint."""
    from hypertrain.models.hart import HartMethod

    options = hart_options(config)
    main = build_main(config, device)
    layers = main.num_decoder_layers
    if options["hyper_decoder_layers"] > layers:
        raise ConfigError(
            f"hart.hyper_decoder_layers: {options['hyper_decoder_layers']} > the model's {layers}"
        )
    return HartMethod(main, **options)


def build_pha(config: Config, device: Device = "cpu") -> nn.Module:
    """PHA: retriever, prototypes (sorted task list) and adapter hypernetwork over the frozen main model."""
    from hypertrain.models.pha import build_pha_method

    return build_pha_method(config, build_main(config, device), device)


def build_finetune(config: Config, device: Device = "cpu") -> nn.Module:
    """Full fine-tuning: the main T5 with every weight trainable (FT-Zero-Shot / FT-Few-Shot)."""
    from hypertrain.models.finetune import FullFineTuning

    return FullFineTuning(build_main(config, device))


def build_prefix_tuning(config: Config, device: Device = "cpu") -> nn.Module:
    """Prefix-Tuning: learned prefixes for every self-attention layer of the frozen T5."""
    from hypertrain.models.prefix_tuning import PrefixTuning

    options = config.prefix_tuning
    return PrefixTuning(build_main(config, device), options.prefix_length, options.reparam, options.reparam_hidden)


def base_model_name(name: str) -> str:
    """What an adapter names as its base model: the hub checkpoint of a registered shape, else ``name`` itself."""
    key = registry.canonical_name(name)
    return (registry.T5_SHAPES[key].hub_name or name) if key else name


def build_lora(config: Config, device: Device = "cpu") -> nn.Module:
    """LoRA through Hugging Face ``peft`` on the frozen T5's ``lora.target_modules``."""
    from hypertrain.models.lora import LoraTuning

    options = config.lora
    return LoraTuning(
        build_main(config, device), options.rank, options.alpha, options.dropout, options.target_modules,
        base_model=base_model_name(config.model.name),
    )


BUILDERS: dict[str, Callable[[Config, Device], nn.Module]] = {
    "hart": build_hart,
    "hypertuning": build_hart,
    "pha": build_pha,
    "finetune": build_finetune,
    "prefix_tuning": build_prefix_tuning,
    "lora": build_lora,
}


def build_method(config: Config, device: Device = "cpu") -> nn.Module:
    """The method named by ``config.method``, built on ``device``."""
    builder = BUILDERS.get(config.method)
    if builder is None:
        raise ConfigError(
            f"method: no builder for {config.method!r} yet (known: {', '.join(sorted(BUILDERS))})"
        )
    return builder(config, device)
