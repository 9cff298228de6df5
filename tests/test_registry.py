"""The T5 v1.1 LM-adapted registry: shapes by name, meta-device builds, local checkpoints, the byte tokenizer."""

from __future__ import annotations

import pytest
import torch

from hypertrain.models.registry import (
    build_t5,
    canonical_name,
    count_parameters,
    get_shape,
    load_t5,
    load_tokenizer,
    t5_config,
)

# Published parameter counts of the T5 v1.1 checkpoints (untied input/output embeddings).
PUBLISHED = {"small": 76_961_152, "base": 247_577_856, "large": 783_150_080, "xl": 2_849_757_184}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_meta_build_matches_published_parameter_counts(name):
    model = build_t5(f"google/t5-{name}-lm-adapt")
    assert next(model.parameters()).device.type == "meta"
    assert count_parameters(model)["total"] == PUBLISHED[name]
    assert model.lm_head.weight is not model.shared.weight


def test_xl_shape_and_config_conventions():
    cfg = t5_config("google/t5-xl-lm-adapt")
    assert (cfg.d_model, cfg.d_ff, cfg.num_heads, cfg.d_kv, cfg.num_layers, cfg.num_decoder_layers) == (
        2048, 5120, 32, 64, 24, 24,
    )
    assert cfg.vocab_size == 32128 and cfg.is_gated_act and cfg.dense_act_fn == "gelu_new"
    assert cfg.relative_attention_num_buckets == 32 and cfg.relative_attention_max_distance == 128
    assert (cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id) == (0, 0, 1)
    assert cfg.scale_decoder_outputs is False  # v1.1: untied head, no d_model**-0.5 rescaling


def test_aliases_and_unknown_names():
    assert {canonical_name(n) for n in ("xl", "t5-xl", "google/t5-xl-lm-adapt", "T5-XL-LM-ADAPT")} == {"xl"}
    assert get_shape("xxl").d_model == 4096
    with pytest.raises(KeyError, match="known names"):
        get_shape("t5-gigantic")


def test_tiny_trains_and_reloads_from_a_local_checkpoint(tmp_path):
    model = build_t5("tiny", device="cpu", seed=0)
    tok = load_tokenizer("tiny")
    batch = tok(["hello world"], return_tensors="pt")
    labels = tok(["hi"], return_tensors="pt").input_ids
    loss = model(**batch, labels=labels).loss
    loss.backward()
    assert torch.isfinite(loss) and model.lm_head.weight.grad is not None

    model.save_pretrained(tmp_path / "ckpt")
    reloaded = load_t5(str(tmp_path / "ckpt"))
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch, labels=labels).logits, reloaded(**batch, labels=labels).logits)
    assert not torch.equal(reloaded.lm_head.weight, reloaded.shared.weight)


def test_tiny_random_weights_are_seeded():
    a, b = load_t5("tiny", seed=3), load_t5("tiny", seed=3)
    assert torch.equal(a.shared.weight, b.shared.weight)
    assert not torch.equal(a.shared.weight, load_t5("tiny", seed=4).shared.weight)
