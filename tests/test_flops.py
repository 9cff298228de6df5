"""FLOP accounting (``hypertrain.flops``): one T5 layer by hand, whole methods against torch's FLOP counter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hypertrain import flops as F
from hypertrain.config import Config, load_config
from hypertrain.models.build import build_method

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
XL = F.T5Dims(d_model=2048, d_ff=5120, num_heads=32, d_kv=64, encoder_layers=24, decoder_layers=24, vocab_size=32128)


def test_one_t5_layer_by_hand():
    T, p, d, f, inner = 384, 32, 2048, 5120, 2048
    # forward: q, k, v, o (4 d·inner) and the gated FFN (3 d·f) per token, 2 FLOPs per multiply-add; scores and
    # context over T + p keys (2 (T + p) inner per query, times 2)
    forward = 2 * T * (4 * d * inner + 3 * d * f) + 4 * T * (T + p) * inner
    assert forward == 38_352_715_776  # T5-XL encoder layer, 384 tokens + 32 prefix columns: 38.4 GFLOP
    trainable, grad = F.encoder_layer(XL, T, prefix=p, x_grad=True, trainable=True)
    assert grad and trainable.forward == forward and trainable.backward == 2 * forward
    # frozen weights: the projections need the activation gradient only (1x), the attention products both (2x)
    frozen, _ = F.encoder_layer(XL, T, prefix=p, x_grad=True, trainable=False, prefix_grad=True)
    weights, attention = 2 * T * (4 * d * inner + 3 * d * f), 4 * T * (T + p) * inner
    assert frozen.forward == forward and frozen.backward == weights + 2 * attention
    # the main encoder's first layer: its input has no gradient, only the prefix keys/values do
    first, grad = F.encoder_layer(XL, T, prefix=p, x_grad=False, trainable=False, prefix_grad=True)
    qkv = 2 * T * 3 * d * inner
    assert grad and first.backward == weights - qkv + attention / 2 * 1 + attention / 2 * 2
    # nothing needs a gradient: no backward at all
    none, grad = F.encoder_layer(XL, T, x_grad=False, trainable=False)
    assert not grad and none.backward == 0


def test_decoder_layer_with_kv_cache_by_hand():
    d, f, inner, H = 2048, 5120, 2048, 1024
    step, _ = F.decoder_layer(XL, 2, H, cached=10, cross_kv=False, x_grad=True, memory_grad=True, trainable=True)
    forward = 2 * 2 * (6 * d * inner + 3 * d * f) + 4 * 2 * 12 * inner + 4 * 2 * H * inner
    assert step.forward == forward and step.backward == 2 * forward
    first, _ = F.decoder_layer(XL, 2, H, cross_kv=True, x_grad=True, memory_grad=True, trainable=True)
    assert first.forward - step.forward == pytest.approx(2 * 2 * H * d * inner - 4 * 2 * 10 * inner)


def _batch(b: int, t: int, tt: int, h: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "input_ids": torch.randint(3, 300, (b, t), generator=g),
        "attention_mask": torch.ones(b, t, dtype=torch.long),
        "labels": torch.randint(3, 300, (b, tt), generator=g),
        "hyper_input_ids": torch.randint(3, 300, (b, h), generator=g),
        "hyper_attention_mask": torch.ones(b, h, dtype=torch.long),
        "task_ids": torch.arange(b),
    }


@pytest.mark.parametrize(
    ("config", "overrides"),
    [
        ("hart_tiny.yaml", []),
        ("hart_tiny.yaml", ["hart.decode=hf"]),
        ("hart_tiny.yaml", ["hart.fusion=false", "hart.share_head_layernorm=true"]),
        ("hart_tiny.yaml", ["method=hypertuning", "hart.generator=parallel"]),
        ("pha_tiny.yaml", ["pha.tasks=[a,b,c]", "train.micro_batch_size=3", "train.global_batch_size=6"]),
    ],
)
def test_training_step_matches_torch_flop_counter(config, overrides):
    """Forward and backward counted separately by torch.utils.flop_counter (eager attention, every matmul)."""
    cfg = load_config(Config, CONFIGS / config, ["model.attn_implementation=eager", *overrides])
    torch.manual_seed(0)
    method = build_method(cfg, "cpu").train()
    b, t, tt, h = 3, 20, 7, 24
    batch = _batch(b, t, tt, h)
    with FlopCounterMode(display=False) as forward:
        out = method(batch)
    with FlopCounterMode(display=False) as backward:
        out.loss.backward()
    parts = F.breakdown(cfg, F.Lengths(t, tt, h))
    model = sum(parts.values(), F.Flops())
    assert forward.get_total_flops() == pytest.approx(b * model.forward, rel=1e-9)
    assert backward.get_total_flops() == pytest.approx(b * model.backward, rel=1e-9)
    assert F.flops_per_sample(cfg, input_tokens=t, target_tokens=tt, hyper_tokens=h) == pytest.approx(model.total)


def test_t5_xl_hart_per_sample():
    hart = load_config(Config, CONFIGS / "hart_t5xl.yaml")
    parts = F.breakdown(hart)
    total = F.flops_per_sample(hart)
    # the estimate is ~10 TFLOP; counting the fusion cross-attention, attention scores and the
    # generator gives 12.3
    assert 12.0e12 < total < 12.6e12
    assert parts["hypernetwork encoder"].total / total == pytest.approx(0.63, abs=0.01)
    assert parts["hypernetwork decoder"].total / total < 0.05
    hypertuning = F.flops_per_sample(load_config(Config, CONFIGS / "hypertuning_t5xl.yaml"))
    assert total / hypertuning == pytest.approx(1.0, abs=0.01)  # same work, HART's is spread over L steps
    # shorter padded batches cost less; recomputation adds the checkpointed stacks' forward
    assert F.flops_per_sample(hart, input_tokens=128) < total
    both = load_config(Config, CONFIGS / "hart_t5xl.yaml", ["train.activation_checkpointing=both"])
    extra = parts["hypernetwork encoder"].forward + parts["main encoder"].forward + parts["main decoder"].forward
    assert F.flops_per_sample(both, recompute=True) == pytest.approx(total + extra)
    assert F.flops_per_sample(both) == pytest.approx(total)


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA GeForce GTX 1080", None),
        (None, None),
    ],
)
def test_peak_flops_table(name, peak):
    assert F.peak_flops(name, None) == peak


def test_peak_flops_override():
    assert F.peak_flops("NVIDIA H100 80GB HBM3", 500e12) == 500e12
    assert F.peak_flops(None, 1e12) == 1e12
    with pytest.raises(ValueError):
        F.peak_flops("NVIDIA A100-SXM4-80GB", 0.0)


def test_dims_for_registry_names_local_checkpoints_and_clear_errors(tmp_path):
    from hypertrain.config import ConfigError
    from hypertrain.models.registry import t5_config

    assert F.dims_for("google/t5-xl-lm-adapt") == XL
    t5_config("tiny").save_pretrained(tmp_path)  # a local checkpoint's config.json
    assert F.dims_for(str(tmp_path)).d_model == 64
    with pytest.raises(ConfigError, match="model.name: .* cannot be read"):
        F.dims_for(str(tmp_path / "absent"))
