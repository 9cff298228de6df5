"""HART's fused decode against the HF reference path: values, gradients, dropout, compile, the ZeRO-3 switch."""

from __future__ import annotations

import pytest
import torch
from test_hart import _batch, _method

from hypertrain.models.hart import HartMethod


def _inputs(method: HartMethod, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoder states as a leaf (so their gradient is compared too) and the padded demonstrations mask."""
    mask = batch["hyper_attention_mask"]
    with torch.no_grad():
        demos = method.hyper_encoder(batch["hyper_input_ids"], mask).last_hidden_state
    return demos.clone().requires_grad_(True), mask


def _states_and_grads(method: HartMethod, decode: str, demos: torch.Tensor, mask: torch.Tensor, steps: int):
    method.set_decode(decode)
    states = method.autoregressive_states(demos, mask, steps=steps)
    weights = torch.randn(states.shape, generator=torch.Generator().manual_seed(1))
    params = [demos, method.latent.weight, *method.hyper_decoder.parameters()]
    grads = torch.autograd.grad((states * weights).sum(), params)
    method.set_decode("fused")
    return states.detach(), grads


def _no_dropout(method: HartMethod) -> None:
    """Dropout off everywhere: the ``nn.Dropout`` modules (the fused decode reads the stack's) and T5 attention's
    float ``dropout`` attribute."""
    for module in method.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "dropout", None), float):
            module.dropout = 0.0


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["eval", "train without dropout"])
def test_fused_decode_equals_the_hf_reference(attention, mode):
    method = _method(f"model.attn_implementation={attention}")
    if mode == "eval":
        method.eval()
    else:
        method.train()
        _no_dropout(method)
    demos, mask = _inputs(method, _batch())
    assert not mask.all()  # one example is padded: the cross-attention mask matters
    steps = 7  # more steps than the tiny model's L, so the relative-position buckets past the exact range are hit
    ref, ref_grads = _states_and_grads(method, "hf", demos, mask, steps)
    got, got_grads = _states_and_grads(method, "fused", demos, mask, steps)
    assert got.shape == (3, steps, 2, 64)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    names = ["demos", "latent", *(n for n, _ in method.hyper_decoder.named_parameters())]
    for name, g_ref, g_got in zip(names, ref_grads, got_grads, strict=True):
        scale = g_ref.abs().max()
        assert scale > 0, name  # every input and weight really takes part
        assert (g_got - g_ref).abs().max() <= 1e-4 * scale, name  # fp32 rounding, relative to the largest entry


def test_fused_is_hart_default_and_trains_end_to_end():
    method = _method().train()
    assert method.decode == "fused"
    calls = []
    handle = method.hyper_decoder.register_forward_hook(lambda *_: calls.append(1))
    out = method(_batch())
    out.loss.backward()
    handle.remove()
    assert calls == []  # the HF stack's forward is not used
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in method.hyper_decoder.parameters())


def test_fused_decode_applies_dropout_in_training_only():
    method = _method()
    assert method.hyper_decoder.dropout.p > 0
    demos, mask = _inputs(method.eval(), _batch())
    with torch.no_grad():
        a = method.autoregressive_states(demos, mask)
        b = method.autoregressive_states(demos, mask)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        method.train()
        torch.manual_seed(3)
        c = method.autoregressive_states(demos, mask)
        d = method.autoregressive_states(demos, mask)
        torch.manual_seed(3)
        c_again = method.autoregressive_states(demos, mask)
    assert not torch.allclose(c, d)
    torch.testing.assert_close(c, c_again, rtol=0, atol=0)  # dropout draws from torch's RNG (exact resume)


def test_zero3_partitioned_weights_use_the_hf_path():
    # Under ZeRO-3 each weight is whole only inside its own module's forward; the fused path reads the weights
    # directly, so it must not run. (tests/test_trainer.py trains HART under real ZeRO-3 on this fallback.)
    method = _method().eval()
    param = next(method.hyper_decoder.parameters())
    calls = []
    handle = method.hyper_decoder.register_forward_hook(lambda *_: calls.append(1))
    try:
        param.ds_id = 0  # the attribute DeepSpeed's ZeRO-3 partitioning gives each parameter
        with torch.no_grad():
            method.generate_peft(_batch()["hyper_input_ids"])
    finally:
        del param.ds_id
        handle.remove()
    assert len(calls) == method.num_steps


def test_unknown_decode_settings_are_refused():
    method = _method()
    with pytest.raises(ValueError, match="unknown decode path 'fast'"):
        method.set_decode("fast")
    with pytest.raises(ValueError, match="unknown compile mode 'turbo'"):
        method.set_decode("fused", "turbo")


def test_compiled_fused_decode_matches_eager_in_training():
    """``hart.compile_decode`` (inductor on CPU here; CUDA graphs need a GPU): same loss and gradients, and one
    graph for every step (a recompile per step would multiply the compile time by L)."""
    from torch._dynamo.utils import counters

    compiled, eager = _method("hart.compile_decode=default").train(), _method().train()
    for m in (compiled, eager):
        _no_dropout(m)
    batch = _batch()
    torch._dynamo.reset()
    counters.clear()
    for m in (compiled, eager):
        m(batch).loss.backward()
    assert counters["stats"]["unique_graphs"] == 1
    for (name, a), b in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        if a.requires_grad:
            assert (a.grad - b.grad).abs().max() <= 1e-4 * b.grad.abs().max(), name
