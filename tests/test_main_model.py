"""The frozen main T5: per-example prefixes, fusion-in-decoder, adapters, generation (tiny shape, fp32, CPU)."""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutput

from hypertrain.models.registry import build_t5
from hypertrain.models.t5_main import FrozenT5, PeftParams

H, DKV, D, LAYERS = 4, 16, 64, 2  # the registry's tiny shape


def _plain(attn: str):
    return build_t5("tiny", device="cpu", seed=0, attn_implementation=attn).eval()


@pytest.fixture(scope="module")
def plain():
    return {attn: _plain(attn) for attn in ("eager", "sdpa")}


@pytest.fixture(scope="module")
def main():
    return {attn: FrozenT5(_plain(attn)).eval() for attn in ("eager", "sdpa")}


def _inputs(batch: int = 3, length: int = 9, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 300, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length - 3 :] = 0  # a padded example
    ids[1, length - 3 :] = 0
    labels = torch.randint(3, 300, (batch, 5), generator=g)
    return ids, mask, labels


def _prefixes(batch: int, p: int, g: torch.Generator, scale: float = 1.0):
    return [
        (
            scale * torch.randn(batch, H, p, DKV, generator=g),
            scale * torch.randn(batch, H, p, DKV, generator=g),
        )
        for _ in range(LAYERS)
    ]


def _peft(
    batch: int = 3, p: int = 3, seed: int = 1, fusion: bool = True, encoder=True, decoder=True
) -> PeftParams:
    g = torch.Generator().manual_seed(seed)
    peft = PeftParams(
        encoder_prefix=_prefixes(batch, p, g) if encoder else None,
        decoder_prefix=_prefixes(batch, p, g) if decoder else None,
    )
    if fusion:
        peft.fusion_states = torch.randn(batch, 6, D, generator=g)
        peft.fusion_mask = torch.ones(batch, 6, dtype=torch.long)
        peft.fusion_mask[0, 4:] = 0
    return peft


def _select(peft: PeftParams, i: int) -> PeftParams:
    def s(t):
        return None if t is None else t[i : i + 1]

    def sp(prefixes):
        return None if prefixes is None else [(s(k), s(v)) for k, v in prefixes]

    return PeftParams(
        sp(peft.encoder_prefix), sp(peft.decoder_prefix), s(peft.fusion_states), s(peft.fusion_mask)
    )


# --------------------------------------------------------------------------------------------------


def test_frozen_and_state_dict_unchanged(main, plain):
    model = main["sdpa"]
    assert all(not p.requires_grad for p in model.parameters())
    assert list(model.t5.state_dict()) == list(plain["sdpa"].state_dict())
    model.t5.load_state_dict(plain["sdpa"].state_dict(), strict=True)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_without_prefixes_is_exactly_plain_t5(main, plain, attn):
    ids, mask, labels = _inputs()
    with torch.no_grad():
        want = plain[attn](input_ids=ids, attention_mask=mask, labels=labels)
        for peft in (None, _peft(p=0, fusion=False)):
            got = main[attn](ids, mask, labels=labels, peft=peft)
            assert torch.equal(got.logits, want.logits)
            assert torch.equal(got.loss, want.loss)


def test_prefixes_change_the_output(main):
    model = main["sdpa"]
    ids, mask, labels = _inputs()
    with torch.no_grad():
        base_states = model.encode(ids, mask)
        base = model(ids, mask, labels=labels).logits
        enc_only = _peft(fusion=False, decoder=False)
        assert not torch.allclose(model.encode(ids, mask, enc_only), base_states, atol=1e-3)
        dec_only = _peft(fusion=False, encoder=False)
        assert torch.equal(
            model.encode(ids, mask, dec_only), base_states
        )  # the encoder ignores decoder prefixes
        assert not torch.allclose(model(ids, mask, labels=labels, peft=dec_only).logits, base, atol=1e-3)


def test_eager_and_sdpa_agree(main):
    ids, mask, labels = _inputs()
    peft = _peft()
    with torch.no_grad():
        eager = main["eager"](ids, mask, labels=labels, peft=peft)
        sdpa = main["sdpa"](ids, mask, labels=labels, peft=peft)
    assert torch.allclose(eager.logits, sdpa.logits, atol=1e-4, rtol=1e-4)
    assert torch.allclose(eager.loss, sdpa.loss, atol=1e-5)


def test_prefix_columns_have_no_bias_and_no_mask(main, plain):
    """Zero prefix keys score exactly 0: every prefix column gets the same weight, in every row, padded or not."""
    ids, mask, labels = _inputs()
    p = 3
    zeros = [(torch.zeros(3, H, p, DKV), torch.randn(3, H, p, DKV)) for _ in range(LAYERS)]
    peft = PeftParams(encoder_prefix=zeros, decoder_prefix=zeros)
    with torch.no_grad():
        enc = main["eager"].t5.encoder(ids, mask, hypertrain_peft=peft, output_attentions=True).attentions[0]
        ref = plain["eager"].encoder(ids, mask, output_attentions=True).attentions[0]
        dec_ids = torch.randint(3, 300, (3, 5))
        states = BaseModelOutput(last_hidden_state=torch.randn(3, 9, D))
        dec = (
            main["eager"]
            .t5(
                encoder_outputs=states,
                attention_mask=mask,
                decoder_input_ids=dec_ids,
                hypertrain_peft=peft,
                output_attentions=True,
            )
            .decoder_attentions[0]
        )
        dec_ref = plain["eager"](
            encoder_outputs=states, attention_mask=mask, decoder_input_ids=dec_ids, output_attentions=True
        ).decoder_attentions[0]
    for got, want in ((enc, ref), (dec, dec_ref)):
        w_prefix = got[..., :p]
        assert (w_prefix > 0).all()  # never masked, also in the padded example's rows
        assert torch.allclose(w_prefix, w_prefix[..., :1].expand_as(w_prefix))  # no relative-position bias
        # weights of real keys are plain T5's, renormalised with p extra exp(0) terms
        assert torch.allclose(got[..., p:], want * (1 - p * w_prefix[..., :1]), atol=1e-6)
    assert (enc[1, :, :, p + 6 :] == 0).all()  # the padded keys stay masked
    assert (dec[..., p:].triu(1) == 0).all()  # the decoder stays causal


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_padding_only_masks_padded_keys(main, attn):
    """A padded example gives the same states (real positions) as the unpadded one, with prefixes."""
    ids, mask, _ = _inputs()
    peft = _peft(fusion=False)
    with torch.no_grad():
        padded = main[attn].encode(ids, mask, peft)[1, :6]
        alone = main[attn].encode(ids[1:2, :6], mask[1:2, :6], _select(peft, 1))[0]
    assert torch.allclose(padded, alone, atol=1e-5)


def test_prefixes_are_per_example(main):
    ids, mask, labels = _inputs()
    peft = _peft()
    with torch.no_grad():
        together = main["sdpa"](ids, mask, labels=labels, peft=peft).logits
        for i in range(3):
            alone = main["sdpa"](
                ids[i : i + 1], mask[i : i + 1], labels=labels[i : i + 1], peft=_select(peft, i)
            ).logits
            assert torch.allclose(together[i : i + 1], alone, atol=1e-5)
        # a batch-1 PEFT set (one task) is shared by the whole batch
        shared = main["sdpa"](ids, mask, labels=labels, peft=_select(peft, 0)).logits
        assert torch.allclose(shared[0], together[0], atol=1e-5)
        assert not torch.allclose(shared[2], together[2], atol=1e-3)


def test_fusion_reads_hypernetwork_states_first(main, plain):
    ids, mask, labels = _inputs()
    peft = _peft(p=0)
    with torch.no_grad():
        got = main["sdpa"](ids, mask, labels=labels, peft=peft).logits
        states = plain["sdpa"].encoder(ids, mask).last_hidden_state
        fused = BaseModelOutput(last_hidden_state=torch.cat([peft.fusion_states, states], 1))
        want = plain["sdpa"](
            encoder_outputs=fused, attention_mask=torch.cat([peft.fusion_mask, mask], 1), labels=labels
        )
        assert torch.equal(got, want.logits)
        # masked fusion positions are ignored
        peft.fusion_states[0, 4:] = 100.0
        assert torch.allclose(main["sdpa"](ids, mask, labels=labels, peft=peft).logits, got, atol=1e-5)


def test_gradients_reach_the_peft_parameters_only(main):
    ids, mask, labels = _inputs()
    peft = _peft()
    leaves = [t for kv in (*peft.encoder_prefix, *peft.decoder_prefix) for t in kv] + [peft.fusion_states]
    for t in leaves:
        t.requires_grad_(True)
    main["sdpa"](ids, mask, labels=labels, peft=peft).loss.backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in leaves)
    assert all(p.grad is None for p in main["sdpa"].parameters())


def test_prefix_leaves_cut_the_parameters_off_their_graph(main):
    ids, mask, labels = _inputs()
    source = torch.ones((), requires_grad=True)
    peft = _peft()
    peft.encoder_prefix = [(k * source, v * source) for k, v in peft.encoder_prefix]  # made by a "hypernetwork"
    leaves = peft.prefix_leaves()
    tensors = [t for kv in (*leaves.encoder_prefix, *leaves.decoder_prefix) for t in kv] + [leaves.fusion_states]
    assert all(t.is_leaf and t.requires_grad for t in tensors)
    torch.testing.assert_close(leaves.encoder_prefix[0][0], peft.encoder_prefix[0][0], rtol=0, atol=0)
    assert leaves.fusion_mask is peft.fusion_mask
    main["sdpa"](ids, mask, labels=labels, peft=leaves).loss.backward()
    assert source.grad is None and all(t.grad is not None for t in tensors)
    with pytest.raises(ValueError, match="adapters"):
        PeftParams(encoder_adapters=[None]).prefix_leaves()


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_greedy_generation_equals_teacher_forced_argmax(main, attn):
    model = main[attn]
    ids, mask, _ = _inputs()
    peft = _peft()
    out = model.generate(ids, mask, peft=peft, max_new_tokens=7, min_new_tokens=7, do_sample=False)
    assert out.shape == (3, 8)
    with torch.no_grad():
        logits = model(ids, mask, decoder_input_ids=out[:, :-1], peft=peft).logits
    assert torch.equal(logits.argmax(-1), out[:, 1:])
    no_cache = model.generate(
        ids, mask, peft=peft, max_new_tokens=7, min_new_tokens=7, do_sample=False, use_cache=False
    )
    assert torch.equal(no_cache, out)
    no_prefix = model.generate(ids, mask, max_new_tokens=7, min_new_tokens=7, do_sample=False)
    assert not torch.equal(no_prefix, out)


def test_beam_search_keeps_each_example_with_its_prefixes(main):
    model = main["sdpa"]
    ids, mask, _ = _inputs()
    peft = _peft()
    kwargs = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
    together = model.generate(ids, mask, peft=peft, **kwargs)
    assert together.shape[0] == 6
    for i in range(3):
        alone = model.generate(ids[i : i + 1], mask[i : i + 1], peft=_select(peft, i), **kwargs)
        assert torch.equal(together[2 * i : 2 * i + 2, : alone.shape[1]], alone)


class _Adapter:
    """A per-example linear adapter (batch-first weights), like the ones PHA generates."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight, self.calls = weight, 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.einsum("btd,bde->bte", x, self.weight)


def test_adapter_hook(main, plain):
    model = main["sdpa"]
    ids, mask, labels = _inputs()
    with torch.no_grad():
        want = plain["sdpa"](input_ids=ids, attention_mask=mask, labels=labels).logits
        zero = [_Adapter(torch.zeros(3, D, D)) for _ in range(LAYERS)]
        got = model(
            ids, mask, labels=labels, peft=PeftParams(encoder_adapters=zero, decoder_adapters=zero)
        ).logits
        assert torch.equal(got, want)
        assert [a.calls for a in zero] == [2, 2]  # once per encoder and once per decoder layer

    # y = x + FFN(LN(x)) + adapter(LN(x)) in the FFN sublayer
    ff = model.t5.encoder.block[0].layer[-1]
    adapter = _Adapter(torch.randn(2, D, D))
    x = torch.randn(2, 4, D)
    ff.set_adapter(adapter)
    try:
        with torch.no_grad():
            assert torch.allclose(
                ff(x), x + ff.DenseReluDense(ff.layer_norm(x)) + adapter(ff.layer_norm(x)), atol=1e-6
            )
    finally:
        ff.set_adapter(None)

    weights = torch.randn(3, D, D, requires_grad=True)
    adapters = [_Adapter(weights * 0.1), None]
    out = model(ids, mask, labels=labels, peft=PeftParams(decoder_adapters=adapters))
    assert not torch.allclose(out.logits, want, atol=1e-3)
    out.loss.backward()
    assert weights.grad is not None and weights.grad.abs().sum() > 0

    # beams: each example's copies use that example's adapter
    adapters = [_Adapter(torch.randn(3, D, D) * 0.1) for _ in range(LAYERS)]
    peft = PeftParams(decoder_adapters=adapters)
    beams = model.generate(ids, mask, peft=peft, max_new_tokens=5, num_beams=2, do_sample=False)
    for i in range(3):
        one = PeftParams(decoder_adapters=[_Adapter(a.weight[i : i + 1]) for a in adapters])
        alone = model.generate(
            ids[i : i + 1], mask[i : i + 1], peft=one, max_new_tokens=5, num_beams=2, do_sample=False
        )
        assert torch.equal(beams[i, : alone.shape[1]], alone[0])


def test_builds_on_meta_at_t5_xl_shape():
    model = FrozenT5(build_t5("xl", device="meta"))
    assert model.num_encoder_layers == 24 and model.num_heads * model.d_kv == 2048
    assert model.t5.config._attn_implementation == "hypertrain_sdpa"


def test_activation_checkpointing_keeps_prefixes_and_adapters():
    """The recompute in backward sees the same PEFT parameters (they travel as forward arguments)."""

    def grads(checkpointing: bool):
        model = FrozenT5(build_t5("tiny", device="cpu", seed=0, dropout_rate=0.0)).train()
        if checkpointing:
            enable = (
                getattr(model.t5, "activation_checkpointing_enable", None)
                or model.t5.gradient_checkpointing_enable
            )
            enable()
            assert model.t5.encoder.block[0].gradient_checkpointing
        ids, mask, labels = _inputs()
        peft = _peft()
        weight = torch.randn(3, D, D, requires_grad=True)
        peft.decoder_adapters = [_Adapter(weight * 0.1), _Adapter(weight * 0.2)]
        leaves = [t for kv in (*peft.encoder_prefix, *peft.decoder_prefix) for t in kv] + [peft.fusion_states]
        for t in leaves:
            t.requires_grad_(True)
        model(ids, mask, labels=labels, peft=peft, use_cache=False).loss.backward()
        return [t.grad for t in (*leaves, weight)]

    for plain_grad, ckpt_grad in zip(grads(False), grads(True), strict=True):
        assert ckpt_grad is not None and torch.allclose(plain_grad, ckpt_grad, atol=1e-6)
