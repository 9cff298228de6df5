"""HART and HyperTuning on the tiny shape: freezing, gradients, the generators, consistency, mixed batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hypertrain.config import Config, load_config
from hypertrain.models.build import build_method
from hypertrain.models.hart import ConsistencyLoss, HartMethod
from hypertrain.models.registry import build_t5
from hypertrain.models.t5_main import FrozenT5

TINY = Path(__file__).resolve().parents[1] / "configs" / "hart_tiny.yaml"


def _method(*overrides: str) -> HartMethod:
    torch.manual_seed(0)
    return build_method(load_config(Config, TINY, list(overrides)), device="cpu")


def _batch(batch: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    hyper_mask = torch.ones(batch, 12, dtype=torch.long)
    hyper_mask[1, 8:] = 0
    labels = torch.randint(3, 300, (batch, 5), generator=g)
    labels[2, 3:] = -100
    return {
        "input_ids": torch.randint(3, 300, (batch, 9), generator=g),
        "attention_mask": torch.ones(batch, 9, dtype=torch.long),
        "labels": labels,
        "hyper_input_ids": torch.randint(3, 300, (batch, 12), generator=g),
        "hyper_attention_mask": hyper_mask,
        "task_ids": torch.arange(batch),
    }


@pytest.fixture(scope="module", params=["autoregressive", "parallel"])
def method(request) -> HartMethod:
    return _method(f"hart.generator={request.param}", "hart.alpha=1.0")


def test_config_builds_the_paper_architecture(method):
    assert isinstance(method.main, FrozenT5)
    assert len(method.hyper_decoder.block) == 2 and method.hyper_decoder.embed_tokens is None
    rows = 2 if method.generator == "autoregressive" else 2 * 4
    assert method.latent.weight.shape == (rows, 64)
    # the hypernetwork is a separate copy of the same checkpoint
    main_q = method.main.t5.encoder.block[0].layer[0].SelfAttention.q.weight
    hyper_q = method.hyper_encoder.block[0].layer[0].SelfAttention.q.weight
    assert torch.equal(main_q, hyper_q) and main_q.data_ptr() != hyper_q.data_ptr()
    assert torch.equal(
        method.hyper_decoder.block[1].layer[2].DenseReluDense.wo.weight,
        method.main.t5.decoder.block[1].layer[2].DenseReluDense.wo.weight,
    )


def test_main_is_frozen_and_every_hypernetwork_parameter_learns(method):
    method.train()
    method.consistency.reset()
    method.zero_grad(set_to_none=True)
    for step in range(2):  # the second step includes the consistency term
        out = method(_batch(seed=step))
        out.loss.backward()
    main_ids = {id(p) for p in method.main.parameters()}
    assert all(not p.requires_grad and p.grad is None for p in method.main.parameters())
    hyper = [(n, p) for n, p in method.named_parameters() if id(p) not in main_ids]
    assert hyper and all(p.requires_grad for _, p in hyper)
    no_grad = [n for n, p in hyper if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []
    method.zero_grad(set_to_none=True)


def test_prefix_and_fusion_shapes(method):
    method.eval()
    batch = _batch()
    with torch.no_grad():
        peft = method.generate_peft(batch["hyper_input_ids"], batch["hyper_attention_mask"])
    assert len(peft.encoder_prefix) == len(peft.decoder_prefix) == 2
    for key, value in (*peft.encoder_prefix, *peft.decoder_prefix):
        assert key.shape == value.shape == (3, 4, 4, 16)  # [B, heads, p, d_kv]
    assert peft.fusion_states.shape == (3, 12, 64) and torch.equal(
        peft.fusion_mask, batch["hyper_attention_mask"]
    )


def test_mixed_batch_gets_prefixes_per_example(method):
    method.eval()
    batch = _batch()
    batch["hyper_input_ids"][2] = batch["hyper_input_ids"][0]  # examples 0 and 2 share a task
    with torch.no_grad():
        peft = method.generate_peft(batch["hyper_input_ids"], batch["hyper_attention_mask"])
    for key, _ in (*peft.encoder_prefix, *peft.decoder_prefix):
        assert torch.allclose(key[0], key[2], atol=1e-6)
        assert not torch.allclose(key[0], key[1], atol=1e-4)


def _count_calls(module: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls: list[int] = []
    return calls, module.register_forward_hook(lambda *_: calls.append(1))


def test_autoregressive_step_depends_on_the_previous_step():
    # hooks on the HF stack see each step; the fused decode equals this path (tests/test_hart_decode.py)
    method = _method("hart.generator=autoregressive", "hart.decode=hf").eval()
    batch = _batch()
    with torch.no_grad():
        demos = method.hyper_encoder(
            batch["hyper_input_ids"], batch["hyper_attention_mask"]
        ).last_hidden_state
        calls, handle = _count_calls(method.hyper_decoder)
        base = method.autoregressive_states(demos, batch["hyper_attention_mask"], steps=4)
        handle.remove()
        assert len(calls) == 4 and base.shape == (3, 4, 2, 64)

        def perturb_step_2(module, args, kwargs, out):  # h_2 += 1, before step 3 reads it
            step = len(seen)
            seen.append(step)
            if step == 1:
                out.last_hidden_state = out.last_hidden_state + 1.0
            return out

        seen: list[int] = []
        handle = method.hyper_decoder.register_forward_hook(perturb_step_2, with_kwargs=True)
        moved = method.autoregressive_states(demos, batch["hyper_attention_mask"], steps=4)
        handle.remove()
    assert torch.equal(moved[:, 0], base[:, 0])  # h_1 untouched
    assert not torch.allclose(moved[:, 2], base[:, 2], atol=1e-4)  # h_3 reads the perturbed h_2
    assert not torch.allclose(moved[:, 3], base[:, 3], atol=1e-4)  # and the change carries on


def test_parallel_is_one_bidirectional_pass_without_a_chain():
    method = _method("hart.generator=parallel").eval()
    batch = _batch()
    with torch.no_grad():
        demos = method.hyper_encoder(
            batch["hyper_input_ids"], batch["hyper_attention_mask"]
        ).last_hidden_state
        calls, handle = _count_calls(method.hyper_decoder)
        base = method.parallel_states(demos, batch["hyper_attention_mask"])
        handle.remove()
        assert len(calls) == 1 and base.shape == (3, 8, 64)
        method.latent.weight[-1] += 1.0  # the last input row reaches the first output row: bidirectional
        moved = method.parallel_states(demos, batch["hyper_attention_mask"])
        method.latent.weight[-1] -= 1.0
    assert not torch.allclose(moved[:, 0], base[:, 0], atol=1e-4)
    # every layer's prefixes come from the same state h, not from the previous layer's
    with torch.no_grad():
        head = method.heads["encoder_key"]
        head.weight[0] += 1.0
        peft = method.generate_peft(batch["hyper_input_ids"], batch["hyper_attention_mask"])
        head.weight[0] -= 1.0
        ref = method.generate_peft(batch["hyper_input_ids"], batch["hyper_attention_mask"])
    assert torch.equal(peft.encoder_prefix[1][0], ref.encoder_prefix[1][0])
    assert not torch.allclose(peft.encoder_prefix[0][0], ref.encoder_prefix[0][0])


def test_consistency_loss_is_zero_first_then_positive_and_weighted():
    method = _method("hart.alpha=10.0", "train.seed=1").train()
    method.consistency.reset()
    first = method(_batch(seed=0))
    assert first.parts["consistency"] == 0
    assert torch.allclose(first.loss, first.parts["lm"])
    stored = method.consistency.previous[1].clone()
    second = method(_batch(seed=1))
    assert second.parts["consistency"] > 0
    assert torch.allclose(second.loss, second.parts["lm"] + 10.0 * second.parts["consistency"])
    assert not torch.equal(method.consistency.previous[1], stored)
    assert not method.consistency.previous[1].requires_grad
    # evaluation neither adds the term nor moves the stored states
    method.eval()
    held = method.consistency.previous[1].clone()
    with torch.no_grad():
        out = method(_batch(seed=2))
    assert out.parts["consistency"] == 0 and torch.equal(method.consistency.previous[1], held)
    assert "consistency" not in dict(method.named_buffers()) and not any(
        "consistency" in k for k in method.state_dict()
    )


def test_consistency_reference_survives_a_checkpoint():
    a, b = _method().train(), _method().train()
    a.consistency.reset()
    assert a.checkpoint_tensors() == {}
    a(_batch(seed=0))
    b.load_checkpoint_tensors({k: v.clone() for k, v in a.checkpoint_tensors().items()})
    torch.manual_seed(5)
    want = a(_batch(seed=1)).parts["consistency"]
    torch.manual_seed(5)
    got = b(_batch(seed=1)).parts["consistency"]
    assert want > 0 and torch.equal(got, want)
    per_task = ConsistencyLoss("per_task")
    per_task(torch.randn(3, 4), torch.tensor([2, 0, 2]))
    restored = ConsistencyLoss("per_task")
    restored.load_state_tensors(per_task.state_tensors())
    x = torch.randn(2, 4)
    assert torch.equal(restored(x, torch.tensor([2, 5])), per_task(x, torch.tensor([2, 5])))


def test_consistency_modes():
    a, b = torch.randn(4, 3, 2, 5), torch.randn(4, 3, 2, 5)
    mean = ConsistencyLoss("batch_mean")
    assert mean(a) == 0
    assert torch.allclose(mean(b), ((b.mean(0) - a.mean(0)) ** 2).mean())
    per = ConsistencyLoss("per_example")
    per(a)
    assert torch.allclose(per(b), ((b - a) ** 2).mean())
    assert per(b[:3]) == 0  # the batch size changed: nothing to compare row by row
    task = ConsistencyLoss("per_task")
    task(a, torch.tensor([7, 7, 3, 5]))
    got = task(b, torch.tensor([9, 7, 7, 1]))  # only task 7 is in both steps
    assert torch.allclose(got, ((b[1:3].mean(0) - a[:2].mean(0)) ** 2).mean())
    assert task(a, torch.tensor([0, 2, 4, 6])) == 0


def test_hypertuning_method_and_defaults():
    method = _method("method=hypertuning", "hart.generator=null", "hart.alpha=null")
    assert method.generator == "parallel" and method.alpha == 0.0
    assert _method("hart.alpha=null").alpha == 1.0


def test_generation_with_generated_prefixes_matches_teacher_forcing():
    method = _method().eval()
    batch = _batch()
    with torch.no_grad():
        peft = method.generate_peft(batch["hyper_input_ids"], batch["hyper_attention_mask"])
        out = method.main.generate(
            batch["input_ids"], batch["attention_mask"], peft=peft, max_new_tokens=5, min_new_tokens=5
        )
        logits = method.main(
            batch["input_ids"], batch["attention_mask"], decoder_input_ids=out[:, :-1], peft=peft
        ).logits
    assert torch.equal(logits.argmax(-1), out[:, 1:])
    beams = method.main.generate(
        batch["input_ids"], batch["attention_mask"], peft=peft, max_new_tokens=5, num_beams=2
    )
    assert beams.shape[0] == 3


def test_hypernetwork_of_another_width_is_projected_for_fusion():
    main = FrozenT5(build_t5("tiny", device="cpu", seed=0))
    narrow = build_t5("tiny", device="cpu", seed=1, d_model=32, d_ff=64, num_heads=2)
    method = HartMethod(main, narrow, prefix_length=2, hyper_decoder_layers=1, alpha=0.0)
    batch = _batch()
    out = method(batch)
    out.loss.backward()
    assert (
        isinstance(method.fusion_projection, torch.nn.Linear)
        and method.fusion_projection.weight.grad is not None
    )
    assert method.heads["decoder_value"].weight.shape == (2, 32, 64)
