"""Generated LoRA (``hart.peft: lora``): per-example low-rank pairs on the self-attention projections.

The reference is an explicit weight edit: a plain Hugging Face T5 whose projections are W + (alpha / r) B A, one
copy per example; hypertrain's main model with the generated pairs must give the same logits and generations.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from transformers import T5ForConditionalGeneration

from hypertrain.config import Config, load_config
from hypertrain.flops import breakdown
from hypertrain.models.build import build_method
from hypertrain.models.hart import HartMethod
from hypertrain.models.registry import untie_lm_head
from hypertrain.models.t5_main import PeftParams

TINY = Path(__file__).resolve().parents[1] / "configs" / "hart_tiny.yaml"
LORA = ["hart.peft=lora", "hart.lora_rank=3", "hart.lora_alpha=6", "hart.fusion=false"]


def _method(*overrides: str) -> HartMethod:
    torch.manual_seed(0)
    method = build_method(load_config(Config, TINY, [*LORA, *overrides]), device="cpu")
    for name, head in method.heads.items():  # B heads start at zero (the main model unchanged): give them weights
        if name.endswith("_b"):
            torch.nn.init.normal_(head.weight, std=0.3)
    return method.double().eval()  # float64: the comparison below tests the algebra, not float32 rounding


def _inputs(batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "input_ids": torch.randint(3, 300, (batch, 7), generator=g),
        "hyper_input_ids": torch.randint(3, 300, (batch, 10), generator=g),
        "labels": torch.randint(3, 300, (batch, 4), generator=g),
    }


def edited_t5(method: HartMethod, peft: PeftParams, example: int) -> T5ForConditionalGeneration:
    """A plain HF T5 with the main model's weights and example ``example``'s pairs merged into them."""
    config = copy.deepcopy(method.main.t5.config)
    config._attn_implementation = "eager"
    plain = T5ForConditionalGeneration(config)
    untie_lm_head(plain)  # as the main model (T5 v1.1 has its own lm_head)
    plain.load_state_dict(method.main.t5.state_dict())
    plain.double()
    with torch.no_grad():
        for stack, pairs in (("encoder", peft.encoder_lora), ("decoder", peft.decoder_lora)):
            for layer, projections in enumerate(pairs):
                attention = getattr(plain, stack).block[layer].layer[0].SelfAttention
                for name, (a, b) in projections.items():
                    getattr(attention, name).weight += peft.lora_scaling * b[example] @ a[example]
    return plain.eval()


@pytest.mark.parametrize("generator", ["autoregressive", "parallel"])
def test_generated_lora_equals_an_explicit_weight_edit(generator):
    method = _method(f"hart.generator={generator}", "hart.lora_targets=[q,v,o]")
    batch = _inputs()
    with torch.no_grad():
        peft = method.generate_peft(batch["hyper_input_ids"], None)
        assert peft.encoder_prefix is None and len(peft.encoder_lora) == len(peft.decoder_lora) == 2
        a, b = peft.encoder_lora[0]["q"]
        assert a.shape == (2, 3, 64) and b.shape == (2, 64, 3) and peft.lora_scaling == 2.0
        ours = method.main(batch["input_ids"], labels=batch["labels"], peft=peft).logits
        for i in range(2):
            theirs = edited_t5(method, peft, i)(input_ids=batch["input_ids"][i : i + 1],
                                                labels=batch["labels"][i : i + 1]).logits
            assert torch.allclose(ours[i], theirs[0], atol=1e-9), (ours[i] - theirs[0]).abs().max()
        assert not torch.allclose(ours[0], ours[1], atol=1e-3)  # two tasks, two adapters in one batch

        beams = method.main.generate(batch["input_ids"], peft=peft, num_beams=2, max_new_tokens=5, do_sample=False)
        for i in range(2):
            plain = edited_t5(method, peft, i).generate(input_ids=batch["input_ids"][i : i + 1], num_beams=2,
                                                        max_new_tokens=5, do_sample=False)
            assert beams[i, : plain.shape[1]].tolist() == plain[0].tolist()


def test_a_new_hypernetwork_leaves_the_main_model_unchanged_and_every_head_learns():
    torch.manual_seed(0)
    method = build_method(load_config(Config, TINY, LORA), device="cpu").eval()
    batch = _inputs()
    with torch.no_grad():
        peft = method.generate_peft(batch["hyper_input_ids"], None)
        assert torch.equal(method.main(batch["input_ids"], labels=batch["labels"], peft=peft).logits,
                           method.main(batch["input_ids"], labels=batch["labels"]).logits)  # B = 0 at the start
    method.train()
    optimizer = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):  # the first step moves the B heads off zero, the second reaches the A heads too
        optimizer.zero_grad(set_to_none=True)
        method(batch).loss.backward()
        optimizer.step()
    main_ids = {id(p) for p in method.main.parameters()}
    assert all(not p.requires_grad and p.grad is None for p in method.main.parameters())
    silent = [n for n, p in method.named_parameters() if id(p) not in main_ids and (p.grad is None or not p.grad.any())]
    assert silent == []


def test_flops_and_the_planner_count_the_lora_heads():
    from hypertrain.plan import ActivationSettings, activation_stacks

    cfg = load_config(Config, TINY, [*LORA, "hart.lora_targets=[q,k,v]"])
    parts = breakdown(cfg)
    assert "LoRA heads" in parts and "prefix heads" not in parts
    wider = breakdown(load_config(Config, TINY, [*LORA, "hart.lora_targets=[q,k,v]", "hart.lora_rank=6"]))
    for name in ("LoRA heads", "main encoder", "main decoder"):
        assert wider[name].total > parts[name].total, name
    assert "LoRA heads" in activation_stacks(cfg, 2, ActivationSettings())


def test_config_rejects_unknown_lora_targets():
    from hypertrain.config import ConfigError

    with pytest.raises(ConfigError, match="hart.lora_targets"):
        load_config(Config, TINY, ["hart.lora_targets=[q,wi]"])
