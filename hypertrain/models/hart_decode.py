"""HART's autoregressive decode, written for speed: L small steps through the hypernetwork decoder's weights.

The reference path runs the HF ``T5Stack`` once per step with a ``DynamicCache``: each step rebuilds its masks
and position bias, walks the cache objects and launches three projections per attention. The steps are tiny
(2 rows per example), so on a GPU that overhead, not arithmetic, sets the time. :func:`decode_step` does the
same computation with the work that does not depend on the step done once per forward:

- the self-attention q/k/v weights, the cross-attention k/v weights and the gated FFN's two input weights are
  concatenated once, so each step launches one matmul where HF launches two or three;
- the cross-attention keys and values of the demonstrations are projected once for all L steps (HF does this
  too, at step 1), and stored contiguous;
- the decoder's relative-position bias and the causal mask for all 2L positions form one additive table;
- T5's Python tanh-GELU becomes the one-op ``F.gelu(approximate="tanh")`` (the same formula).

Every step has the same shapes (the KV cache is a [B, heads, 2L, d_kv] buffer per layer, updated out of place),
so ``torch.compile`` of :func:`decode_step` gives one graph for all L steps (``hart.compile_decode``; on CUDA,
``reduce-overhead`` also replays it as a CUDA graph). It reads the stack's own parameters (no copies: state
dict, optimizer and ZeRO-1/2 are unaffected) and keeps every dropout HF applies, at the same places; outputs and
gradients equal the reference to float rounding (``tests/test_hart_decode.py``).

Not usable under ZeRO-3, whose hooks gather a module's weights only when that module's ``forward`` runs:
:class:`~hypertrain.models.hart.HartMethod` falls back to the reference path there.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.activations import NewGELUActivation
from transformers.models.t5.modeling_t5 import T5LayerNorm, T5Stack


def rms_norm(x: Tensor, norm: T5LayerNorm) -> Tensor:
    """T5's LayerNorm (no mean, no bias) as HF computes it: in float32, cast to the weight's dtype, scaled."""
    x = F.rms_norm(x.float(), (x.shape[-1],), eps=norm.variance_epsilon)
    if norm.weight.dtype in (torch.float16, torch.bfloat16):
        x = x.to(norm.weight.dtype)
    return norm.weight * x


def activation(ff: nn.Module) -> Callable[[Tensor], Tensor]:
    """The FFN's activation; T5 v1.1's Python tanh-GELU (seven element-wise ops) as the one-op equivalent."""
    if isinstance(ff.act, NewGELUActivation):
        return functools.partial(F.gelu, approximate="tanh")
    return ff.act


@dataclasses.dataclass
class _Block:
    """One decoder block's fused weights and its cross-attention keys/values for this batch."""

    self_qkv: Tensor  # [3·inner, d]
    self_out: Tensor  # [d, inner]
    cross_q: Tensor  # [inner, d]
    cross_out: Tensor  # [d, inner]
    cross_k: Tensor  # [B, heads, S, d_kv]
    cross_v: Tensor
    ff_in: Tensor  # [2·d_ff, d] gated, [d_ff, d] plain
    ff_out: Tensor  # [d, d_ff]


def _prepare_blocks(stack: T5Stack, demos: Tensor) -> list[_Block]:
    heads, d_kv = stack.config.num_heads, stack.config.d_kv
    batch, length, _ = demos.shape
    blocks = []
    for block in stack.block:
        attn, cross = block.layer[0].SelfAttention, block.layer[1].EncDecAttention
        ff = block.layer[2].DenseReluDense
        kv = F.linear(demos, torch.cat([cross.k.weight, cross.v.weight]))
        kv = kv.view(batch, length, 2, heads, d_kv).permute(2, 0, 3, 1, 4).contiguous()  # once, not per step
        gated = hasattr(ff, "wi_0")
        blocks.append(
            _Block(
                self_qkv=torch.cat([attn.q.weight, attn.k.weight, attn.v.weight]),
                self_out=attn.o.weight,
                cross_q=cross.q.weight,
                cross_out=cross.o.weight,
                cross_k=kv[0],
                cross_v=kv[1],
                ff_in=torch.cat([ff.wi_0.weight, ff.wi_1.weight]) if gated else ff.wi.weight,
                ff_out=ff.wo.weight,
            )
        )
    return blocks


def _self_attention_table(stack: T5Stack, positions: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[1, heads, n, n]: the decoder's relative-position bias plus the causal mask, for n = 2L positions."""
    bias = stack.block[0].layer[0].SelfAttention.compute_bias(positions, positions, device=device).to(dtype)
    future = torch.ones(positions, positions, dtype=torch.bool, device=device).triu(1)
    return bias.masked_fill(future, torch.finfo(dtype).min)


def _cross_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """[B, 1, 1, S] additive mask of the demonstrations (``None``: no padding)."""
    if mask is None:
        return None
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


Caches = tuple[Tensor, ...]


def decode_step(
    stack: T5Stack,
    blocks: list[_Block],
    x: Tensor,
    keys: Caches,
    values: Caches,
    positions: Tensor,
    table: Tensor,
    cross_mask: Tensor | None,
) -> tuple[Tensor, Caches, Caches]:
    """One decoding step through every block: x [B, rows, d] at cache ``positions`` → the step's states.

    Shapes do not depend on the step: each layer's keys/values live in a [B, heads, 2L, d_kv] buffer that is
    updated out of place (autograd keeps every version) and attended in full, the causal rows of ``table``
    hiding the positions not written yet. So one compiled graph serves all L steps.
    """
    config = stack.config
    heads, d_kv = config.num_heads, config.d_kv
    p_drop = stack.dropout.p if stack.training else 0.0  # the stack's own dropout module, as HF's path reads
    batch, rows, _ = x.shape

    def split_heads(t: Tensor) -> Tensor:  # [B, rows, heads·d_kv] → [B, heads, rows, d_kv]
        return t.view(batch, rows, heads, d_kv).transpose(1, 2)

    def merge_heads(t: Tensor) -> Tensor:
        return t.transpose(1, 2).reshape(batch, rows, heads * d_kv)

    self_mask = table.index_select(2, positions)
    h = F.dropout(x, p_drop, stack.training)
    new_keys, new_values = [], []
    for block, weights, k_cache, v_cache in zip(stack.block, blocks, keys, values, strict=True):
        # self-attention over all rows so far (earlier steps' keys/values kept, as a KV cache does)
        q, k, v = F.linear(rms_norm(h, block.layer[0].layer_norm), weights.self_qkv).chunk(3, dim=-1)
        k_cache = k_cache.index_copy(2, positions, split_heads(k))
        v_cache = v_cache.index_copy(2, positions, split_heads(v))
        new_keys.append(k_cache)
        new_values.append(v_cache)
        attn = F.scaled_dot_product_attention(
            split_heads(q), k_cache, v_cache, attn_mask=self_mask, dropout_p=p_drop, scale=1.0
        )
        h = h + F.dropout(F.linear(merge_heads(attn), weights.self_out), p_drop, stack.training)
        # cross-attention over the demonstrations (keys/values projected once per forward)
        q = F.linear(rms_norm(h, block.layer[1].layer_norm), weights.cross_q)
        attn = F.scaled_dot_product_attention(
            split_heads(q), weights.cross_k, weights.cross_v, attn_mask=cross_mask, dropout_p=p_drop,
            scale=1.0,
        )
        h = h + F.dropout(F.linear(merge_heads(attn), weights.cross_out), p_drop, stack.training)
        # feed-forward
        ff = block.layer[2].DenseReluDense
        hidden = F.linear(rms_norm(h, block.layer[2].layer_norm), weights.ff_in)
        if hasattr(ff, "wi_0"):
            gate, linear = hidden.chunk(2, dim=-1)
            hidden = activation(ff)(gate) * linear
        else:
            hidden = activation(ff)(hidden)
        hidden = F.dropout(hidden, p_drop, stack.training).to(weights.ff_out.dtype)
        h = h + F.dropout(F.linear(hidden, weights.ff_out), p_drop, stack.training)
    out = F.dropout(rms_norm(h, stack.final_layer_norm), p_drop, stack.training)
    return out, tuple(new_keys), tuple(new_values)


StepFunction = Callable[..., tuple[Tensor, Caches, Caches]]


def fused_autoregressive_states(
    stack: T5Stack,
    start: Tensor,
    demos: Tensor,
    demos_mask: Tensor | None,
    steps: int,
    step_function: StepFunction = decode_step,
) -> Tensor:
    """h_1..h_L [B, L, 2, d] from the start rows z [B, 2, d]; the same function as the HF reference path.

    ``step_function`` is :func:`decode_step` or a compiled version of it. Dropout follows ``stack.training``,
    as in HF: embeddings, attention probabilities, each sublayer's output, inside the FFN and after the final
    LayerNorm.
    """
    config = stack.config
    batch, rows, _ = start.shape
    blocks = _prepare_blocks(stack, demos)
    table = _self_attention_table(stack, rows * steps, start.dtype, start.device)
    cross_mask = _cross_mask(demos_mask, start.dtype)

    def empty() -> tuple[Tensor, ...]:
        # Distinct buffers that require a gradient whenever later steps' caches will: a compiled step is
        # guarded on aliasing and on requires_grad, and would otherwise compile a second graph for step 1.
        shape = (batch, config.num_heads, rows * steps, config.d_kv)
        return tuple(start.new_zeros(shape).requires_grad_(start.requires_grad) for _ in blocks)

    keys, values = empty(), empty()
    positions = torch.arange(rows, device=start.device)
    x, states = start.contiguous(), []  # the latent is expanded over the batch; steps 2..L get dense x
    for step in range(steps):
        x, keys, values = step_function(stack, blocks, x, keys, values, positions + rows * step, table, cross_mask)
        states.append(x)
    return torch.stack(states, dim=1)
