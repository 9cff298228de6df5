"""HART's PEFT baselines on a tiny T5: Prefix-Tuning (own injection, both parametrisations) and LoRA (through
``peft``, round trip through PEFT's own format)."""

from __future__ import annotations

import pytest
import torch

from hypertrain.config import Config, from_dict
from hypertrain.models.build import build_method
from hypertrain.models.registry import load_t5


def _cfg(method: str, **sections) -> Config:
    return from_dict(Config, {"method": method, "model": {"attn_implementation": "eager"}, **sections})


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (3, 11), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(3, 250, (3, 5), generator=g)}


@pytest.mark.parametrize("reparam", [True, False])
def test_prefix_tuning_trains_only_its_prefixes_and_reaches_both_stacks(reparam):
    method = build_method(_cfg("prefix_tuning", prefix_tuning={"prefix_length": 3, "reparam": reparam}))
    main = method.main
    peft = method.peft()
    assert len(peft.encoder_prefix) == main.num_encoder_layers and len(peft.decoder_prefix) == main.num_decoder_layers
    assert peft.encoder_prefix[0][0].shape == (1, main.num_heads, 3, main.d_kv)
    batch = _batch()
    out = method(batch)
    out.loss.backward()
    trainable = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("prefixes.") for n, _ in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for _, p in trainable)
    assert all(p.grad is None for p in main.parameters())
    # the prefixes change the output, and each stack's do (the encoder's are what HF PEFT cannot reach)
    with torch.no_grad():
        plain = main(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).logits
        encoder_only = main(batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                            peft=type(peft)(encoder_prefix=peft.encoder_prefix)).logits
    assert not torch.allclose(plain, out.logits.detach(), atol=1e-4)
    assert not torch.allclose(plain, encoder_only, atol=1e-4)


def test_prefix_tuning_learns_a_batch():
    torch.manual_seed(0)
    method = build_method(_cfg("prefix_tuning", prefix_tuning={"prefix_length": 4, "reparam_hidden": 32}))
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=3e-3)
    batch = _batch(1)
    first = method(batch).loss.item()
    for _ in range(40):
        optimizer.zero_grad()
        method(batch).loss.backward()
        optimizer.step()
    assert method(batch).loss.item() < 0.8 * first


def test_lora_trains_only_lora_and_round_trips_through_peft(tmp_path):
    from peft import PeftModel

    cfg = _cfg("lora", lora={"rank": 4, "alpha": 8.0, "target_modules": ["q", "v", "wo"]})
    method = build_method(cfg).eval()  # no dropout: logits compare exactly
    trainable = [n for n, p in method.named_parameters() if p.requires_grad]
    layers = method.main.num_encoder_layers + 2 * method.main.num_decoder_layers  # q, v of self + cross attention
    assert len(trainable) == 2 * (2 * layers + method.main.num_encoder_layers + method.main.num_decoder_layers)
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    batch = _batch(2)
    plain = method(batch).logits.detach()  # B = 0: the plain model at step 0
    with torch.no_grad():
        for name, param in method.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.5)
    adapted = method(batch).logits.detach()
    assert not torch.allclose(plain, adapted, atol=1e-3)

    method.save_adapter(tmp_path)
    assert (tmp_path / "adapter_config.json").is_file() and (tmp_path / "adapter_model.safetensors").is_file()
    t5 = load_t5("tiny", seed=cfg.train.seed, attn_implementation="eager")
    loaded = PeftModel.from_pretrained(t5, str(tmp_path)).eval()
    with torch.no_grad():
        logits = loaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).logits
    torch.testing.assert_close(logits, adapted, atol=1e-5, rtol=1e-5)


def test_lora_names_a_missing_projection():
    with pytest.raises(ValueError, match="lora.target_modules"):
        build_method(_cfg("lora", lora={"target_modules": ["query_proj"]}))
