"""The frozen main T5: PEFT parameters enter per example, as activations, never as weight edits.

How the PEFT parameters get in (see ``docs/models.md``):

- **Prefixes** go through transformers' attention interface. :func:`install` switches the model to one of two
  registered implementations, ``hypertrain_eager`` / ``hypertrain_sdpa``, which wrap T5's own eager and SDPA
  functions. T5 forwards extra keyword arguments of its ``forward`` down to the attention function, so the
  :class:`PeftParams` travel as the keyword argument ``hypertrain_peft``; the wrapper prepends the prefix keys and
  values of the attention's layer, gives those columns a zero relative-position bias and never masks them. The
  KV cache stores only real tokens; the prefixes are prepended again at each step. Without prefixes (or with
  p = 0) the wrapped function is called with T5's own arguments, so the output is exactly plain T5's.
- **Adapters** need the FFN sublayer, which receives no keyword arguments: blocks and FFN sublayers become
  :class:`PeftT5Block` / :class:`AdapterT5LayerFF` (subclasses, same parameter objects, same state-dict keys).
  The block hands its layer's adapter to its FFN for the duration of its own ``forward`` (also during a
  gradient-checkpointing recompute, which re-runs that forward with the same arguments).
- **Generated LoRA** needs the projections' inputs: the self-attention projections become :class:`LoraLinear`
  (a subclass, same parameters); the block hands each its layer's low-rank pair for the duration of its
  ``forward``, as with adapters, and the projection adds ``scaling · (x Aᵀ) Bᵀ`` per example.
- **Fusion-in-decoder** is done here, above the HF model: the decoder's cross-attention reads
  ``[fusion_states ; encoder states]`` with the masks concatenated.

Only the classes of existing modules change (:func:`install`), so a checkpoint loaded by ``from_pretrained`` or
built by :func:`hypertrain.models.registry.build_t5` works as is, on any device including ``meta``.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import AttentionInterface, AttentionMaskInterface, T5ForConditionalGeneration
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import eager_mask, sdpa_mask
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput
from transformers.models.t5 import modeling_t5

__all__ = [
    "LORA_TARGETS", "PEFT_KWARG", "AdapterT5LayerFF", "FrozenT5", "LoraLinear", "PeftParams", "PeftT5Block", "install",
]

PEFT_KWARG = "hypertrain_peft"
"""Name of the keyword argument that carries :class:`PeftParams` through the HF model."""

Stack = Literal["encoder", "decoder"]
Prefix = tuple[Tensor, Tensor]
Adapter = Callable[[Tensor], Tensor]
LoraPair = tuple[Tensor, Tensor]
"""(A [B, r, d_in], B [B, d_out, r]) of one projection: ``y = W x + scaling · B (A x)`` per example."""
LORA_TARGETS = ("q", "k", "v", "o")
"""Self-attention projections a generated LoRA can reach (T5's names)."""


# --------------------------------------------------------------------------------------------------
# The contract: PEFT parameters of one batch
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class PeftParams:
    """PEFT parameters for one batch, one entry per main-model layer (``None`` = nothing at that place).

    Tensors have the batch first; a batch of 1 is broadcast to the whole batch (one task's parameters reused
    for all its queries). Adapters are position-wise callables ``f(LN(x)) -> delta`` ([B, T, d] → [B, T, d])
    added to the FFN output of their layer: ``y = x + dropout(FFN(LN(x)) + f(LN(x)))``.
    """

    encoder_prefix: Sequence[Prefix | None] | None = None
    """Per encoder layer: (key, value), each [B, heads, p, d_kv], prepended to self-attention."""
    decoder_prefix: Sequence[Prefix | None] | None = None
    """Per decoder layer: (key, value) for the decoder's self-attention."""
    fusion_states: Tensor | None = None
    """[B, H, d_model] states the decoder's cross-attention reads before the main encoder's (fusion-in-decoder)."""
    fusion_mask: Tensor | None = None
    """[B, H] mask of ``fusion_states`` (1 = attend); ``None`` = all ones."""
    encoder_adapters: Sequence[Adapter | None] | None = None
    """Per encoder layer: a callable added to the FFN sublayer's output."""
    decoder_adapters: Sequence[Adapter | None] | None = None
    """Per decoder layer: same."""
    encoder_lora: Sequence[dict[str, LoraPair] | None] | None = None
    """Per encoder layer: self-attention projection name (``q``, ``k``, ``v``, ``o``) → its low-rank pair."""
    decoder_lora: Sequence[dict[str, LoraPair] | None] | None = None
    """Per decoder layer: same."""
    lora_scaling: float = 1.0
    """LoRA's ``alpha / r``."""

    def prefix(self, stack: Stack, layer: int) -> Prefix | None:
        """The (key, value) prefix of one self-attention layer, or None (also for p = 0)."""
        prefixes = self.encoder_prefix if stack == "encoder" else self.decoder_prefix
        if prefixes is None:
            return None
        kv = prefixes[layer]
        if kv is None or kv[0].shape[-2] == 0:
            return None
        return kv

    def adapter(self, stack: Stack, layer: int) -> Adapter | None:
        adapters = self.encoder_adapters if stack == "encoder" else self.decoder_adapters
        return None if adapters is None else adapters[layer]

    def lora(self, stack: Stack, layer: int) -> dict[str, LoraPair] | None:
        pairs = self.encoder_lora if stack == "encoder" else self.decoder_lora
        return None if pairs is None else pairs[layer]

    @property
    def prefix_length(self) -> int:
        for prefixes in (self.encoder_prefix, self.decoder_prefix):
            for kv in prefixes or ():
                if kv is not None:
                    return kv[0].shape[-2]
        return 0

    def decoder_only(self) -> PeftParams:
        """The parts the decoder reads once the encoder has run (prefixes and adapters of the decoder)."""
        return PeftParams(decoder_prefix=self.decoder_prefix, decoder_adapters=self.decoder_adapters,
                          decoder_lora=self.decoder_lora, lora_scaling=self.lora_scaling)

    def prefix_leaves(self) -> PeftParams:
        """Prefixes and fusion states as new leaf tensors that need a gradient: the main model's part of a
        training step, cut off from the hypernetwork (benchmarks time it alone). Adapters are callables and
        cannot be cut off this way."""
        if any(x is not None for x in (self.encoder_adapters, self.decoder_adapters, self.encoder_lora, self.decoder_lora)):
            raise ValueError("prefix_leaves: these parameters hold adapters or LoRA pairs")

        def leaf(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().clone().requires_grad_(True)

        def leaves(prefixes: Sequence[Prefix | None] | None) -> list[Prefix | None] | None:
            if prefixes is None:
                return None
            return [None if kv is None else (leaf(kv[0]), leaf(kv[1])) for kv in prefixes]  # type: ignore[misc]

        return PeftParams(
            encoder_prefix=leaves(self.encoder_prefix),
            decoder_prefix=leaves(self.decoder_prefix),
            fusion_states=leaf(self.fusion_states),
            fusion_mask=self.fusion_mask,
        )

    def repeat_interleave(self, repeats: int) -> PeftParams:
        """Each example's parameters ``repeats`` times in a row, as HF generation lays out beams.

        Adapters are wrapped so they see each example's copies folded into one sequence ([B·n, T, d] →
        [B, n·T, d]), which is exact for position-wise adapters whose parameters have batch B.
        """
        if repeats == 1:
            return self

        def rep(t: Tensor | None) -> Tensor | None:
            return t if t is None or t.shape[0] == 1 else t.repeat_interleave(repeats, dim=0)

        def rep_prefixes(prefixes: Sequence[Prefix | None] | None) -> list[Prefix | None] | None:
            if prefixes is None:
                return None
            return [None if kv is None else (rep(kv[0]), rep(kv[1])) for kv in prefixes]  # type: ignore[misc]

        def rep_adapters(adapters: Sequence[Adapter | None] | None) -> list[Adapter | None] | None:
            if adapters is None:
                return None
            return [None if f is None else _FoldedAdapter(f, repeats) for f in adapters]

        def rep_lora(pairs: Sequence[dict[str, LoraPair] | None] | None) -> list[dict[str, LoraPair] | None] | None:
            if pairs is None:
                return None
            return [None if d is None else {k: (rep(a), rep(b)) for k, (a, b) in d.items()} for d in pairs]  # type: ignore[misc]

        return PeftParams(
            encoder_prefix=rep_prefixes(self.encoder_prefix),
            decoder_prefix=rep_prefixes(self.decoder_prefix),
            fusion_states=rep(self.fusion_states),
            fusion_mask=rep(self.fusion_mask),
            encoder_adapters=rep_adapters(self.encoder_adapters),
            decoder_adapters=rep_adapters(self.decoder_adapters),
            encoder_lora=rep_lora(self.encoder_lora),
            decoder_lora=rep_lora(self.decoder_lora),
            lora_scaling=self.lora_scaling,
        )


class _FoldedAdapter:
    """Applies a batch-B adapter to [B·n, T, d] by folding each example's n copies into its sequence."""

    def __init__(self, adapter: Adapter, repeats: int) -> None:
        self.adapter, self.repeats = adapter, repeats

    def __call__(self, x: Tensor) -> Tensor:
        bn, t, d = x.shape
        folded = x.reshape(bn // self.repeats, self.repeats * t, d)
        return self.adapter(folded).reshape(bn, t, d)


def _batched(t: Tensor, batch: int, what: str) -> Tensor:
    if t.shape[0] == batch:
        return t
    if t.shape[0] == 1:
        return t.expand(batch, *t.shape[1:])
    raise ValueError(f"{what} has batch {t.shape[0]}, the model's input has batch {batch}")


# --------------------------------------------------------------------------------------------------
# Prefix attention: registered attention functions wrapping T5's eager and SDPA paths
# --------------------------------------------------------------------------------------------------

_BASE_ATTENTION: dict[str, Callable[..., tuple[Tensor, Tensor | None]]] = {
    "eager": modeling_t5.eager_attention_forward,
    "sdpa": sdpa_attention_forward,
}
_MASKS: dict[str, Callable[..., Any]] = {"eager": eager_mask, "sdpa": sdpa_mask}
IMPLEMENTATIONS = {base: f"hypertrain_{base}" for base in _BASE_ATTENTION}
"""Plain implementation name → the registered prefix-aware one."""


def _prefix_mask(
    mask: Tensor | None, prefix_len: int, query: Tensor, key_len: int, causal: bool
) -> Tensor | None:
    """``mask`` with ``prefix_len`` always-open columns in front.

    A ``None`` mask means "no padding"; for causal self-attention over several queries (SDPA relies on
    ``is_causal`` then), the causal part is materialised, aligned to the last key, because the prefix columns
    shift the key positions.
    """
    q_len = query.shape[-2]
    if mask is None:
        if not causal or q_len == 1:
            return None
        rows = torch.arange(q_len, device=query.device)[:, None] + (key_len - q_len)
        allowed = torch.arange(key_len, device=query.device)[None, :] <= rows
        mask = torch.zeros(q_len, key_len, dtype=query.dtype, device=query.device)
        mask = mask.masked_fill(~allowed, torch.finfo(query.dtype).min)[None, None]
    if mask.shape[-1] != key_len:
        raise ValueError(f"attention mask covers {mask.shape[-1]} keys, attention has {key_len}")
    open_cols = (
        mask.new_ones(*mask.shape[:-1], prefix_len)
        if mask.dtype == torch.bool
        else mask.new_zeros(*mask.shape[:-1], prefix_len)
    )
    return torch.cat([open_cols, mask], dim=-1)


def _make_prefix_attention(base: Callable[..., tuple[Tensor, Tensor | None]]) -> Callable[..., Any]:
    def prefix_attention(
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        position_bias: Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[Tensor, Tensor | None]:
        peft: PeftParams | None = kwargs.pop(PEFT_KWARG, None)
        if getattr(module, "_hypertrain_cross", False):
            # T5's cross-attention has no relative bias: its position_bias is all zeros. Dropping it lets SDPA
            # take the padding mask as it is instead of a dense [B, heads, q, k] bias+mask built in every layer
            # (and kept for the backward); x + 0 = x, so outputs are unchanged.
            position_bias = None
        site = getattr(module, "_hypertrain_site", None)  # set on self-attention modules only
        kv = peft.prefix(*site) if peft is not None and site is not None else None
        if kv is None:
            return base(module, query, key, value, attention_mask, position_bias=position_bias, **kwargs)

        batch, heads, q_len, _ = query.shape
        key_len = key.shape[-2]
        p_key = _batched(kv[0], batch, f"{site[0]} prefix key {site[1]}").to(key.dtype)
        p_val = _batched(kv[1], batch, f"{site[0]} prefix value {site[1]}").to(value.dtype)
        if p_key.shape[1] != heads or p_key.shape[-1] != key.shape[-1]:
            raise ValueError(f"prefix shape {tuple(p_key.shape)} does not fit keys {tuple(key.shape)}")
        prefix_len = p_key.shape[-2]
        key = torch.cat([p_key, key], dim=-2)
        value = torch.cat([p_val, value], dim=-2)
        if position_bias is None:
            position_bias = query.new_zeros(1, heads, q_len, key_len)
        no_bias = position_bias.new_zeros(*position_bias.shape[:-1], prefix_len)
        position_bias = torch.cat([no_bias, position_bias], dim=-1)
        causal = site[0] == "decoder"
        mask = _prefix_mask(attention_mask, prefix_len, query, key_len, causal)
        return base(module, query, key, value, mask, position_bias=position_bias, **kwargs)

    return prefix_attention


for _base, _name in IMPLEMENTATIONS.items():
    AttentionInterface.register(_name, _make_prefix_attention(_BASE_ATTENTION[_base]))
    AttentionMaskInterface.register(_name, _MASKS[_base])


# --------------------------------------------------------------------------------------------------
# Adapter hook: FFN sublayer and block subclasses (same parameters, same state-dict keys)
# --------------------------------------------------------------------------------------------------


class AdapterT5LayerFF(modeling_t5.T5LayerFF):
    """T5's FFN sublayer with an optional per-call adapter: ``x + dropout(FFN(LN(x)) + adapter(LN(x)))``."""

    _adapter: Adapter | None = None

    def set_adapter(self, adapter: Adapter | None) -> None:
        object.__setattr__(self, "_adapter", adapter)  # a plain attribute: never a registered submodule

    def forward(self, hidden_states: Tensor) -> Tensor:
        if self._adapter is None:
            return super().forward(hidden_states)
        normed = self.layer_norm(hidden_states)
        delta = self.DenseReluDense(normed) + self._adapter(normed).to(hidden_states.dtype)
        return hidden_states + self.dropout(delta)


class LoraLinear(nn.Linear):
    """A frozen projection that adds a per-example low-rank update while one is set: ``W x + s · (x Aᵀ) Bᵀ``."""

    _lora: tuple[Tensor, Tensor, float] | None = None

    def set_lora(self, pair: LoraPair | None, scaling: float = 1.0) -> None:
        object.__setattr__(self, "_lora", None if pair is None else (pair[0], pair[1], scaling))

    def forward(self, x: Tensor) -> Tensor:
        out = super().forward(x)
        if self._lora is None:
            return out
        a, b, scaling = self._lora
        a = _batched(a, x.shape[0], "LoRA A").to(x.dtype)
        b = _batched(b, x.shape[0], "LoRA B").to(x.dtype)
        if a.shape[-1] != x.shape[-1] or b.shape[-2] != out.shape[-1]:
            raise ValueError(f"LoRA pair {tuple(a.shape)}, {tuple(b.shape)} does not fit a {tuple(self.weight.shape)} "
                             "projection")
        return out + scaling * torch.matmul(torch.matmul(x, a.transpose(-1, -2)), b.transpose(-1, -2))


class PeftT5Block(modeling_t5.T5Block):
    """T5 block that hands its layer's adapter (from ``hypertrain_peft``) to its FFN sublayer, and its LoRA pairs to
    its self-attention projections, while it runs."""

    _hypertrain_site: tuple[Stack, int]

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any):
        peft: PeftParams | None = kwargs.get(PEFT_KWARG)
        adapter = peft.adapter(*self._hypertrain_site) if peft is not None else None
        pairs = (peft.lora(*self._hypertrain_site) if peft is not None else None) or {}
        ff: AdapterT5LayerFF = self.layer[-1]  # type: ignore[assignment]
        attention = self.layer[0].SelfAttention
        ff.set_adapter(adapter)
        for name, pair in pairs.items():
            getattr(attention, name).set_lora(pair, peft.lora_scaling)  # type: ignore[union-attr]
        try:
            return super().forward(hidden_states, *args, **kwargs)
        finally:
            ff.set_adapter(None)
            for name in pairs:
                getattr(attention, name).set_lora(None)


class PeftT5ForConditionalGeneration(T5ForConditionalGeneration):
    """Declares ``hypertrain_peft`` in ``forward`` so that HF ``generate`` accepts and forwards it each step."""

    def forward(
        self, *args: Any, hypertrain_peft: PeftParams | None = None, **kwargs: Any
    ) -> Seq2SeqLMOutput:
        if hypertrain_peft is not None:
            kwargs[PEFT_KWARG] = hypertrain_peft
        return super().forward(*args, **kwargs)


def _with_peft_parameter(forward: Callable[..., Any], parent: Callable[..., Any]) -> None:
    """Give ``forward`` the parent's signature plus ``hypertrain_peft`` (``generate`` validates kwargs by it)."""
    params = list(inspect.signature(parent).parameters.values())
    extra = inspect.Parameter(PEFT_KWARG, inspect.Parameter.KEYWORD_ONLY, default=None)
    at = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_KEYWORD), len(params))
    forward.__signature__ = inspect.signature(parent).replace(parameters=[*params[:at], extra, *params[at:]])


_with_peft_parameter(PeftT5ForConditionalGeneration.forward, T5ForConditionalGeneration.forward)


def _swap_class(module: nn.Module, cls: type) -> None:
    base = cls.__mro__[1]
    if not isinstance(module, base):
        raise TypeError(f"expected a {base.__name__}, got {type(module).__name__}")
    module.__class__ = cls


def base_attn_implementation(model: T5ForConditionalGeneration) -> str:
    """``eager`` or ``sdpa``: the plain implementation under the model's current one."""
    name = model.config._attn_implementation or "sdpa"
    return name.removeprefix("hypertrain_")


def install(
    model: T5ForConditionalGeneration, attn_implementation: str | None = None
) -> T5ForConditionalGeneration:
    """Make ``model`` accept ``hypertrain_peft`` (in place; idempotent) and freeze all its parameters.

    ``attn_implementation``: ``eager`` or ``sdpa`` (default: the model's current one).
    """
    base = attn_implementation or base_attn_implementation(model)
    if base not in IMPLEMENTATIONS:
        raise ValueError(f"prefix injection supports {sorted(IMPLEMENTATIONS)} attention, not {base!r}")
    model.set_attn_implementation(IMPLEMENTATIONS[base])
    if not isinstance(model, PeftT5ForConditionalGeneration):
        _swap_class(model, PeftT5ForConditionalGeneration)
    for stack_name, stack in (("encoder", model.encoder), ("decoder", model.decoder)):
        for i, block in enumerate(stack.block):
            if not isinstance(block, PeftT5Block):
                _swap_class(block, PeftT5Block)
            if not isinstance(block.layer[-1], AdapterT5LayerFF):
                _swap_class(block.layer[-1], AdapterT5LayerFF)
            block._hypertrain_site = (stack_name, i)
            attention = block.layer[0].SelfAttention
            attention._hypertrain_site = (stack_name, i)
            for name in LORA_TARGETS:
                projection = getattr(attention, name)
                if not isinstance(projection, LoraLinear):
                    _swap_class(projection, LoraLinear)
            if stack_name == "decoder":
                cross = block.layer[1].EncDecAttention
                cross._hypertrain_cross = not cross.has_relative_attention_bias
    model.requires_grad_(False)
    return model


# --------------------------------------------------------------------------------------------------
# The wrapper the methods use
# --------------------------------------------------------------------------------------------------


class FrozenT5(nn.Module):
    """A frozen ``T5ForConditionalGeneration`` that takes :class:`PeftParams` per example.

    ``encode`` → encoder states (prefixes and adapters applied); ``forward`` → logits and loss;
    ``generate`` → HF generation (greedy, beam search, …) with the KV cache, prefixes on every step and
    the fusion states expanded with the beams.
    """

    def __init__(self, model: T5ForConditionalGeneration, attn_implementation: str | None = None) -> None:
        super().__init__()
        self.t5 = install(model, attn_implementation)

    # shapes -------------------------------------------------------------------------------------
    @property
    def config(self):
        return self.t5.config

    @property
    def d_model(self) -> int:
        return self.config.d_model

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    @property
    def d_kv(self) -> int:
        return self.config.d_kv

    @property
    def num_encoder_layers(self) -> int:
        return len(self.t5.encoder.block)

    @property
    def num_decoder_layers(self) -> int:
        return len(self.t5.decoder.block)

    # running ------------------------------------------------------------------------------------
    def encode(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, peft: PeftParams | None = None
    ) -> Tensor:
        """Main-encoder states [B, T, d] with the encoder prefixes and adapters of ``peft``."""
        out = self.t5.encoder(input_ids=input_ids, attention_mask=attention_mask, **{PEFT_KWARG: peft})
        return out.last_hidden_state

    def fuse(
        self, states: Tensor, attention_mask: Tensor | None, peft: PeftParams | None
    ) -> tuple[Tensor, Tensor | None]:
        """Fusion-in-decoder: ``[fusion_states ; states]`` and the two masks concatenated (no-op without)."""
        if peft is None or peft.fusion_states is None:
            return states, attention_mask
        batch = states.shape[0]
        extra = _batched(peft.fusion_states, batch, "fusion_states").to(states.dtype)
        if extra.shape[-1] != states.shape[-1]:
            raise ValueError(f"fusion states have width {extra.shape[-1]}, the main model {states.shape[-1]}")
        if attention_mask is None:
            attention_mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
        extra_mask = peft.fusion_mask
        if extra_mask is None:
            extra_mask = torch.ones(extra.shape[:2], dtype=attention_mask.dtype, device=states.device)
        extra_mask = _batched(extra_mask, batch, "fusion_mask").to(attention_mask.dtype)
        return torch.cat([extra, states], dim=1), torch.cat([extra_mask, attention_mask], dim=1)

    def forward(
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        decoder_input_ids: Tensor | None = None,
        peft: PeftParams | None = None,
        encoder_states: Tensor | None = None,
        decoder_attention_mask: Tensor | None = None,
        use_cache: bool | None = None,
    ) -> Seq2SeqLMOutput:
        """Logits (and the mean token cross-entropy when ``labels`` are given; -100 is ignored).

        Pass ``encoder_states`` (from :meth:`encode`) instead of ``input_ids`` to reuse one encoding, e.g. to
        score several answer choices; fusion is applied here either way. ``use_cache`` as in HF (its default
        keeps the output bit-identical to plain T5 in eager mode too).
        """
        if encoder_states is None:
            if input_ids is None:
                raise ValueError("give input_ids or encoder_states")
            encoder_states = self.encode(input_ids, attention_mask, peft)
        states, mask = self.fuse(encoder_states, attention_mask, peft)
        return self.t5(
            encoder_outputs=BaseModelOutput(last_hidden_state=states),
            attention_mask=mask,
            labels=labels,
            decoder_input_ids=decoder_input_ids,
            decoder_attention_mask=decoder_attention_mask,
            use_cache=use_cache,
            hypertrain_peft=peft,
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        peft: PeftParams | None = None,
        **kwargs: Any,
    ) -> Tensor:
        """HF ``generate`` (any of its options: ``max_new_tokens``, ``num_beams``, …) with PEFT parameters."""
        states, mask = self.fuse(self.encode(input_ids, attention_mask, peft), attention_mask, peft)
        if mask is None:
            mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
        config = kwargs.get("generation_config") or self.t5.generation_config
        num_beams = kwargs.get("num_beams", config.num_beams) or 1
        num_return = kwargs.get("num_return_sequences", config.num_return_sequences) or 1
        decoder_peft = (
            None if peft is None else peft.decoder_only().repeat_interleave(max(num_beams, num_return))
        )
        return self.t5.generate(
            encoder_outputs=BaseModelOutput(last_hidden_state=states),
            attention_mask=mask,
            hypertrain_peft=decoder_peft,
            **kwargs,
        )
