"""``hypertrain plan --config FILE --gpus N [--gpu-memory GIB]``: memory per GPU, micro batch, accumulation, run time.

Memory per GPU = model states (frozen bf16 weights; trainable bf16 weights, fp32 master weights, optimizer state
and gradients, each replicated or partitioned according to the ZeRO stage of ``--ds-config``) + activations at
the micro batch (with or without activation checkpointing) + a fixed reserve (CUDA context, NCCL, allocator
fragmentation). The activation model counts the tensors autograd keeps for the backward, layer by layer, from
the HF T5 code path (``docs/performance.md`` has the per-layer formulas); it is validated against the measured
peak of live tensor bytes on CPU (:mod:`hypertrain.memory_probe`, ``tests/test_plan.py``). The run time is
``flops_per_sample · global batch · steps / (N · peak · MFU)`` (:mod:`hypertrain.flops`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any, Literal

from hypertrain.config import Config, ConfigError, load_config
from hypertrain.flops import Lengths, T5Dims, breakdown, dims_for, flops_per_sample, lengths_for, peak_flops

GIB = 2**30
Attention = Literal["materialized", "fused"]
CHECKPOINTING = ("none", "main", "hypernetwork", "both")

# --------------------------------------------------------------------------------------------------
# Activation model: bytes autograd keeps for the backward, per layer
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ActivationSettings:
    """How the step runs, as far as activation memory is concerned."""

    dtype_bytes: int = 2
    """Activations' element size: 2 for bf16 (GPU), 4 for float32 (CPU)."""
    mask_bytes: float = 1.0
    """Dropout mask per element: 1 on CUDA (a bool mask), the dtype's size on CPU (a float mask)."""
    dropout: bool = True
    """T5's dropout (0.1) is active in training; with 0 nothing is masked or saved for it."""
    attention: Attention = "fused"
    """``fused``: SDPA kernels (CUDA memory-efficient, CPU flash) keep q, k, v, the output, the log-sum-exp and
    the additive bias; ``materialized``: eager (or SDPA's math fallback) keeps the probabilities and more."""
    fused_gelu: bool = False
    """T5's tanh-GELU as one op (``F.gelu(approximate="tanh")``): saves 1 tensor instead of 4."""
    padded: bool = True
    """Batches carry a padding mask, so SDPA's additive bias is materialised per example ([B, heads, q, k])."""

    @property
    def mask(self) -> float:
        return self.mask_bytes if self.dropout else 0.0

    @property
    def fp32_copy(self) -> int:
        """T5LayerNorm squares ``x.to(float32)``: a separate 4-byte copy is kept unless x is float32 already."""
        return 0 if self.dtype_bytes == 4 else 4


def _layer_norm(st: ActivationSettings, rows: float, d: int, *, x_grad: bool, trainable: bool) -> float:
    """T5LayerNorm: x and rsqrt (and the fp32 copy of x) if x needs a gradient; x·rsqrt and the output if its
    weight trains (the output is the next linear's saved input)."""
    out = 0.0
    if x_grad:
        out += rows * d * (st.dtype_bytes + st.fp32_copy) + rows * 4
    if trainable:
        out += 2 * rows * d * st.dtype_bytes
    return out


def _attention(
    st: ActivationSettings,
    dims: T5Dims,
    batch: int,
    queries: float,
    keys: float,
    *,
    q_grad: bool,
    kv_grad: bool,
    trainable: bool,
    kv_saved: bool = True,
    bias_heads: bool = True,
) -> float:
    """One attention (after the q/k/v projections) and its output projection.

    ``kv_saved=False``: k and v are already counted (a KV cache's tensors shared by every step).
    ``bias_heads=False``: the fused kernel gets the padding mask alone ([B, 1, q, k]), not a bias per head
    (the main model's cross-attention, whose zero bias ``t5_main`` drops).
    """
    s, h, inner = st.dtype_bytes, dims.num_heads, dims.inner
    grad = q_grad or kv_grad
    out = 0.0
    if grad:
        matrix = batch * h * queries * keys
        if st.attention == "materialized":
            out += s * batch * queries * inner if kv_grad else 0.0  # q (kept to get dK)
            if kv_saved:
                out += s * batch * keys * inner if q_grad else 0.0  # K (kept to get dQ)
                out += s * batch * keys * inner  # V (kept to get dP)
            out += matrix * (s + st.mask)  # softmax output, dropout mask
            out += matrix * s if (kv_grad and st.dropout) else 0.0  # dropped probabilities (kept to get dV)
        else:
            out += 2 * s * batch * queries * inner  # q and the output
            out += 2 * s * batch * keys * inner if kv_saved else 0.0  # k, v
            out += 4 * batch * h * queries  # log-sum-exp (fp32)
            if bias_heads:  # the bias folded with the padding mask: [B, heads, q, k] ([1, heads, q, k] unpadded)
                out += s * (matrix if st.padded else h * queries * keys)
            elif st.padded:
                out += s * batch * queries * keys  # the padding mask, made additive
    if trainable:
        out += s * batch * queries * inner  # o's input
    if grad or trainable:
        out += st.mask * batch * queries * dims.d_model  # dropout on the sublayer output
    return out


def _feed_forward(
    st: ActivationSettings,
    dims: T5Dims,
    rows: float,
    *,
    x_grad: bool,
    trainable: bool,
    adapter: int = 0,
    adapter_grad: bool = False,
    adapter_per_example: int = 0,
) -> tuple[float, bool]:
    """FFN sublayer (gated GELU) with an optional parallel adapter; returns (bytes, output needs a gradient).

    ``adapter_per_example``: batch size B when the adapter's weights are generated per example (PHA's decoder):
    their [B, d, b] and [B, b, d] copies are kept by the batched matmuls.
    """
    s, d, f = st.dtype_bytes, dims.d_model, dims.d_ff
    out = 0.0
    grad = x_grad or trainable
    if grad:
        if dims.gated:
            out += (1 if st.fused_gelu else 4) * rows * f * s  # GELU's saved tensors
            out += 2 * rows * f * s  # the gate product keeps both operands
        else:
            out += rows * f * s  # ReLU output
        out += st.mask * rows * f  # dropout before wo
        out += rows * f * s if trainable else 0.0  # wo's input
    if adapter:
        if adapter_grad:
            out += rows * d * s if not trainable else 0.0  # LN(x), the down projection's input
            out += rows * adapter * s  # ReLU output = up's input
            if adapter_per_example:
                out += 2 * adapter_per_example * d * adapter * s  # gathered Down/Up per example
        grad = grad or adapter_grad
    out += st.mask * rows * d if grad else 0.0  # dropout on the sublayer output
    return out, grad


def encoder_layer_bytes(
    st: ActivationSettings,
    dims: T5Dims,
    batch: int,
    tokens: float,
    *,
    prefix: int = 0,
    x_grad: bool,
    trainable: bool,
    prefix_grad: bool = False,
    adapter: int = 0,
) -> tuple[float, bool]:
    """Activation bytes one T5 encoder block keeps for the backward; returns (bytes, output needs a gradient)."""
    rows = batch * tokens
    qkv_grad = x_grad or trainable
    kv_grad = qkv_grad or (prefix_grad and prefix > 0)
    out = _layer_norm(st, rows, dims.d_model, x_grad=x_grad, trainable=trainable)
    out += _attention(
        st, dims, batch, tokens, tokens + prefix, q_grad=qkv_grad, kv_grad=kv_grad, trainable=trainable
    )
    h_grad = x_grad or kv_grad or trainable
    out += _layer_norm(st, rows, dims.d_model, x_grad=h_grad, trainable=trainable)
    ffn, grad = _feed_forward(
        st, dims, rows, x_grad=h_grad, trainable=trainable, adapter=adapter, adapter_grad=bool(adapter)
    )
    return out + ffn, grad


def decoder_layer_bytes(
    st: ActivationSettings,
    dims: T5Dims,
    batch: int,
    tokens: float,
    memory: float,
    *,
    prefix: int = 0,
    cached: int = 0,
    cross_kv_saved: bool = True,
    cross_bias: bool = True,
    x_grad: bool,
    memory_grad: bool,
    trainable: bool,
    prefix_grad: bool = False,
    adapter: int = 0,
) -> tuple[float, bool]:
    """Activation bytes of one T5 decoder block (``cached`` earlier self-attention keys, ``memory`` cross keys;
    ``cross_bias=False``: the cross-attention gets no zero bias, see :func:`_attention`)."""
    rows = batch * tokens
    d = dims.d_model
    qkv_grad = x_grad or trainable
    kv_grad = qkv_grad or (prefix_grad and prefix > 0)
    out = _layer_norm(st, rows, d, x_grad=x_grad, trainable=trainable)
    out += _attention(
        st, dims, batch, tokens, cached + tokens + prefix, q_grad=qkv_grad, kv_grad=kv_grad, trainable=trainable
    )
    h_grad = x_grad or kv_grad or trainable
    out += _layer_norm(st, rows, d, x_grad=h_grad, trainable=trainable)
    mem_grad = memory_grad or trainable
    out += _attention(
        st, dims, batch, tokens, memory, q_grad=h_grad, kv_grad=mem_grad, trainable=trainable,
        kv_saved=cross_kv_saved, bias_heads=cross_bias,
    )
    h_grad = h_grad or mem_grad
    out += _layer_norm(st, rows, d, x_grad=h_grad, trainable=trainable)
    ffn, grad = _feed_forward(
        st, dims, rows, x_grad=h_grad, trainable=trainable, adapter=adapter, adapter_grad=bool(adapter),
        adapter_per_example=batch if adapter else 0,
    )
    return out + ffn, grad


def fused_decode_bytes(
    st: ActivationSettings, dims: T5Dims, batch: int, memory: float, *, steps: int, layers: int
) -> float:
    """Activation bytes of HART's fused decode (``hart_decode.py``), trainable, over ``memory`` encoder states.

    Once per forward: the concatenated q/k/v, cross k/v and FFN input weights (new tensors the linears keep),
    the cross-attention keys/values of every layer, the 2L-row zero caches each layer starts from, the position
    buckets and the causal mask of the bias table. Per step: the input's dropout, the shared self-attention mask
    rows (fused kernels keep them), the final LayerNorm. Per block and step: three LayerNorms, the fused q/k/v
    output (q is a view of it), self-attention over the whole 2L-row cache (the out-of-place update makes a new
    [B, h, 2L, d_kv] pair each step), cross-attention over the shared keys/values, the FFN with its one-op GELU.

    ``materialized`` is SDPA's math path (the CPU's, with dropout on): it computes in float32 (copies of q, K
    and, from a reduced dtype, V per call) and keeps the probabilities, the dropout mask and the dropped ones.
    """
    s, d, inner, h = st.dtype_bytes, dims.d_model, dims.inner, dims.num_heads
    n, rows = 2 * steps, 2 * batch
    math = st.attention == "materialized"
    a = 4 if math else s  # element size inside the attention
    ffn_inputs = 2 if dims.gated else 1
    out = layers * (5 * inner * d + ffn_inputs * dims.d_ff * d) * s  # fused weights
    if not math or s == 4:  # the cross keys/values (the math path copies a reduced-precision V per call)
        out += layers * 2 * batch * memory * inner * s
    out += layers * 2 * batch * n * inner * s  # the zero caches (leaves of the graph)
    out += n * n * (8 + 1)  # position buckets (int64), causal mask (bool)
    out += 0.0 if math else batch * memory * s  # the cross-attention padding mask, additive
    per_step = st.mask * rows * d + 8 * 2 * 2  # input dropout, the positions (index_select, index_copy)
    per_step += _stack_end(st, rows, d, grad=True, trainable=True)
    per_step += 0.0 if math else h * 2 * n * s  # this step's mask rows, shared by the blocks
    ffn, _ = _feed_forward(dataclasses.replace(st, fused_gelu=True), dims, rows, x_grad=True, trainable=True)
    block = 3 * _layer_norm(st, rows, d, x_grad=True, trainable=True) + ffn
    block += 2 * (rows * inner * s + st.mask * rows * d)  # o's input and the dropout after it, twice
    block += 3 * rows * inner * s  # the fused q/k/v output
    block += 2 * batch * n * inner * a  # self-attention K and V (math path: float32 copies)
    if math:
        for keys in (n, memory):
            block += rows * inner * a + batch * h * 2 * keys * (3 * a)  # q, probabilities, dropout mask, dropped
        block += batch * memory * inner * a * (1 if s == 4 else 2)  # cross K (and V) copies
    else:
        block += rows * inner * s  # the cross-attention's q
        block += 2 * (rows * inner * s + 4 * batch * h * 2)  # outputs and log-sum-exps
    return out + steps * (per_step + layers * block)


def _stack_end(st: ActivationSettings, rows: float, d: int, *, grad: bool, trainable: bool) -> float:
    """Final LayerNorm (its output feeds no linear of the stack) and dropout of a stack."""
    out = rows * d * (st.dtype_bytes + st.fp32_copy) + rows * 4 + st.mask * rows * d if grad else 0.0
    return out + (rows * d * st.dtype_bytes if trainable else 0.0)


@dataclasses.dataclass(frozen=True)
class StackActivations:
    """A stack's activation bytes: every layer's saved tensors, or, checkpointed, the layer inputs.

    Checkpointed (HF's per-block, non-reentrant ``torch.utils.checkpoint``), a stack keeps each block's input
    hidden states (``boundary`` bytes each; one more when the stack's input needs no gradient, where the first
    block's output is a separate tensor) and the other tensors the blocks receive (``checkpoint_inputs``: the
    masks, the position bias, the decoder's memory), and recomputes one block at a time in the backward.
    """

    layers: list[float]
    boundary: float = 0.0
    end: float = 0.0
    checkpoint_inputs: float = 0.0
    input_grad: bool = True
    checkpointable: bool = True

    def kept(self, checkpointed: bool) -> float:
        """Bytes held at the end of the forward."""
        if checkpointed and self.checkpointable:
            blocks = len(self.layers) + (0 if self.input_grad else 1)
            return blocks * self.boundary + self.checkpoint_inputs + self.end
        return sum(self.layers) + self.end

    def recompute(self, checkpointed: bool) -> float:
        """Extra bytes while one checkpointed layer is recomputed in the backward."""
        return max(self.layers, default=0.0) if checkpointed and self.checkpointable else 0.0


def _checkpoint_inputs(
    st: ActivationSettings, dims: T5Dims, batch: int, queries: float, keys: float, *, causal: bool
) -> float:
    """What a checkpointed block receives besides its hidden states: the position bias [1, heads, q, k] and the
    mask (eager: float [B, 1, q, k], when padded or causal; SDPA: bool, when padded)."""
    out = st.dtype_bytes * dims.num_heads * queries * keys
    if st.attention == "materialized" and (st.padded or causal):
        out += st.dtype_bytes * batch * queries * keys
    elif st.attention == "fused" and st.padded:
        out += batch * queries * keys
    return out


def activation_stacks(
    cfg: Config,
    batch: int,
    settings: ActivationSettings,
    *,
    dims: T5Dims | None = None,
    lengths: Lengths | None = None,
) -> dict[str, StackActivations]:
    """Activation bytes of each component at micro batch ``batch`` (hypernetwork and main-model stacks)."""
    dims = dims or dims_for(cfg.model.name)
    lengths = lengths or lengths_for(cfg)
    s, d = settings.dtype_bytes, dims.d_model
    out: dict[str, StackActivations] = {}
    if cfg.method in ("hart", "hypertuning"):
        from hypertrain.models.build import hart_options

        generator = hart_options(cfg)["generator"]
        hart = cfg.hart
        lora = hart.peft == "lora"
        p = hart.lora_rank if lora else hart.prefix_length  # rows each head writes per layer
        groups = _groups(dims) * (len(hart.lora_targets) if lora else 1)  # LoRA: an A and a B head per target
        h_rows = batch * lengths.hyper
        # hypernetwork encoder (trainable, embeddings too: the embedding output needs a gradient)
        layers, grad = [], True
        for _ in range(dims.encoder_layers):
            b, grad = encoder_layer_bytes(settings, dims, batch, lengths.hyper, x_grad=grad, trainable=True)
            layers.append(b)
        layers[0] += 8 * lengths.hyper**2  # int64 relative-position buckets (the bias trains)
        out["hypernetwork encoder"] = StackActivations(
            layers,
            boundary=h_rows * d * s,
            # + the embedding's dropout mask and token ids
            end=_stack_end(settings, h_rows, d, grad=True, trainable=True) + settings.mask * h_rows * d + 8 * h_rows,
            checkpoint_inputs=_checkpoint_inputs(
                settings, dims, batch, lengths.hyper, lengths.hyper, causal=False
            ),
        )
        # hypernetwork decoder
        L = max(dims.encoder_layers, dims.decoder_layers)
        dec = s * h_rows * d  # the encoder output, kept by the (trainable) cross-attention k/v projections
        if generator == "autoregressive":
            if hart.decode == "fused":
                dec += fused_decode_bytes(
                    settings, dims, batch, lengths.hyper, steps=L, layers=hart.hyper_decoder_layers
                )
            else:  # HF's stack per step, with its growing KV cache
                for step in range(L):
                    for _ in range(hart.hyper_decoder_layers):
                        b, _ = decoder_layer_bytes(
                            settings, dims, batch, 2, lengths.hyper, cached=2 * step, cross_kv_saved=step == 0,
                            x_grad=True, memory_grad=True, trainable=True,
                        )
                        dec += b
                    # each step: dropout on its input rows, the final LayerNorm, the position buckets
                    dec += settings.mask * batch * 2 * d + 8 * 2 * 2 * (step + 1)
                    dec += _stack_end(settings, batch * 2, d, grad=True, trainable=True)
            # per group of n layers: LayerNorm output, its scaled copy (the shared Linear's input), the tanh
            # output [n, p, d] and the einsum's copy of it
            heads = sum(2 * n * d + 2 * n * p * d for n in groups) + L * 2 * d  # + the states
            stats = sum(groups)  # LayerNorm mean/rstd rows
        else:
            for _ in range(hart.hyper_decoder_layers):
                b, _ = decoder_layer_bytes(
                    settings, dims, batch, 2 * p, lengths.hyper, x_grad=True, memory_grad=True, trainable=True
                )
                dec += b
            dec += settings.mask * batch * 2 * p * d + 8 * (2 * p) ** 2
            dec += _stack_end(settings, batch * 2 * p, d, grad=True, trainable=True)
            # per group: LayerNorm output [p, d]; with per-layer LayerNorms the scaled rows, the tanh output and
            # the einsum's copy are [n, p, d] each; with a shared one the first two are [p, d]
            heads = sum(
                (3 * p * d + n * p * d) if hart.share_head_layernorm else (p * d + 3 * n * p * d)
                for n in groups
            ) + 2 * p * d  # + the states
            stats = 4 * p
        out["hypernetwork decoder"] = StackActivations([dec], checkpointable=False)
        heads = heads * batch * s + stats * batch * 8
        out["LoRA heads" if lora else "prefix heads"] = StackActivations([heads], checkpointable=False)
        # generated LoRA: each target's x → r → d per layer, kept like a bottleneck adapter of width r per target
        width = p * len(hart.lora_targets) if lora else 0
        out.update(
            _main_stacks(
                settings, dims, batch, lengths, prefix=0 if lora else p, fusion=lengths.hyper if hart.fusion else 0,
                encoder_adapter=width, decoder_adapter=width,
            )
        )
    elif cfg.method == "pha":
        out.update(
            _main_stacks(
                settings, dims, batch, lengths, prefix=0, fusion=0,
                encoder_adapter=cfg.pha.adapter_bottleneck if cfg.pha.encoder_adapters else 0,
                decoder_adapter=cfg.pha.adapter_bottleneck,
            )
        )
    elif cfg.method == "finetune":
        out.update(_main_stacks(settings, dims, batch, lengths, prefix=0, fusion=0, trainable=True))
    elif cfg.method == "prefix_tuning":
        out.update(_main_stacks(settings, dims, batch, lengths, prefix=cfg.prefix_tuning.prefix_length, fusion=0))
    elif cfg.method == "lora":
        from hypertrain.flops import lora_widths

        encoder, decoder = lora_widths(cfg)
        out.update(_main_stacks(settings, dims, batch, lengths, prefix=0, fusion=0, encoder_adapter=encoder,
                                decoder_adapter=decoder))
    else:
        raise ConfigError(f"method: no memory model for {cfg.method!r}")
    return out


def _main_stacks(
    st: ActivationSettings,
    dims: T5Dims,
    batch: int,
    lengths: Lengths,
    *,
    prefix: int,
    fusion: int,
    encoder_adapter: int = 0,
    decoder_adapter: int = 0,
    trainable: bool = False,
) -> dict[str, StackActivations]:
    """The main model's two stacks: frozen (PEFT methods), or every weight trainable (full fine-tuning: the
    embedding output needs a gradient, so each stack also keeps its embedding dropout's mask and the token ids)."""
    d = dims.d_model
    enc_rows, dec_rows = batch * lengths.input, batch * lengths.target
    embedding = (lambda rows: st.mask * rows * d + 8 * rows) if trainable else (lambda rows: 0.0)
    layers, grad = [], trainable
    for _ in range(dims.encoder_layers):
        b, grad = encoder_layer_bytes(
            st, dims, batch, lengths.input, prefix=prefix, x_grad=grad, trainable=trainable,
            prefix_grad=prefix > 0, adapter=encoder_adapter,
        )
        layers.append(b)
    if trainable:
        layers[0] += 8 * lengths.input**2  # int64 relative-position buckets (the bias trains)
    enc = StackActivations(
        layers,
        boundary=enc_rows * d * st.dtype_bytes,
        end=_stack_end(st, enc_rows, d, grad=grad, trainable=trainable) + embedding(enc_rows),
        checkpoint_inputs=_checkpoint_inputs(st, dims, batch, lengths.input, lengths.input, causal=False),
        input_grad=trainable,
    )
    memory_grad = grad or fusion > 0
    layers, dgrad = [], trainable
    for _ in range(dims.decoder_layers):
        b, dgrad = decoder_layer_bytes(
            st, dims, batch, lengths.target, fusion + lengths.input, prefix=prefix, cross_bias=False,
            x_grad=dgrad, memory_grad=memory_grad, trainable=trainable, prefix_grad=prefix > 0,
            adapter=decoder_adapter,
        )
        layers.append(b)
    if trainable:
        layers[0] += 8 * lengths.target**2
    # LM head: the logits (returned) and log-softmax's output (kept for the loss's backward)
    logits = 2 * dec_rows * dims.vocab_size * st.dtype_bytes
    memory = fusion + lengths.input
    dec = StackActivations(
        layers,
        boundary=dec_rows * d * st.dtype_bytes,
        end=_stack_end(st, dec_rows, d, grad=dgrad, trainable=trainable) + logits + embedding(dec_rows),
        # self-attention bias and mask, the memory [B, M, d], the cross-attention's zero bias and its mask
        checkpoint_inputs=_checkpoint_inputs(st, dims, batch, lengths.target, lengths.target, causal=True)
        + _checkpoint_inputs(st, dims, batch, lengths.target, memory, causal=False)
        + batch * memory * d * st.dtype_bytes,
        input_grad=trainable,
    )
    return {"main encoder": enc, "main decoder": dec}


def _groups(dims: T5Dims) -> tuple[int, int, int, int]:
    """Layers of the four head groups: encoder key/value, decoder key/value."""
    return (dims.encoder_layers, dims.encoder_layers, dims.decoder_layers, dims.decoder_layers)


RECOMPUTE_GRADIENT_ALLOWANCE = 0.25
"""Gradients formed while a recomputed block runs its backward, as a share of that block's activations (10-20%
measured on CPU, ``tests/test_plan.py``)."""

_CHECKPOINTED = {
    "none": (),
    "main": ("main encoder", "main decoder"),
    "hypernetwork": ("hypernetwork encoder",),
    "both": ("main encoder", "main decoder", "hypernetwork encoder"),
}


def activation_bytes(
    cfg: Config,
    batch: int,
    settings: ActivationSettings,
    checkpointing: str | None = None,
    *,
    dims: T5Dims | None = None,
    lengths: Lengths | None = None,
) -> dict[str, float]:
    """Activation bytes at micro batch ``batch``: kept per component, ``kept`` (end of the forward), ``peak``.

    The peak is the larger of the forward's end (everything kept, plus the largest transient: a
    materialised 4D mask and the logits' softmax) and each stage of the backward, which runs the components
    in reverse: the components before it still hold everything, a checkpointed stack holds its block inputs
    and one recomputed block (+ :data:`RECOMPUTE_GRADIENT_ALLOWANCE`), the components after it are freed.
    Gradient buffers are model states (:func:`state_bytes`), not activations.
    """
    which = checkpointing or cfg.train.activation_checkpointing
    dims = dims or dims_for(cfg.model.name)
    lengths = lengths or lengths_for(cfg)
    stacks = activation_stacks(cfg, batch, settings, dims=dims, lengths=lengths)
    ckpt = _CHECKPOINTED[which]
    kept = {name: stack.kept(name in ckpt) for name, stack in stacks.items()}
    total = sum(kept.values())
    s = settings.dtype_bytes
    longest = max(lengths.input, lengths.hyper if cfg.method != "pha" else 0)
    mask = s * batch * longest**2 if settings.attention == "materialized" else 0.0
    forward = total + mask + s * batch * lengths.target * dims.vocab_size
    backward, before = 0.0, 0.0
    for name, stack in stacks.items():
        recomputed = max(stack.layers, default=0.0) if name in ckpt and stack.checkpointable else 0.0
        here = kept[name] + (1 + RECOMPUTE_GRADIENT_ALLOWANCE) * recomputed
        backward = max(backward, before + here)
        before += kept[name]
    peak = max(forward, backward)
    return {**kept, "kept": total, "peak": peak}


# --------------------------------------------------------------------------------------------------
# Model states under ZeRO
# --------------------------------------------------------------------------------------------------

OPTIMIZER_BYTES = {
    "adamw8bit": 2 + 2 * 4 / 256,  # two uint8 states + an fp32 absmax per 256-element block each (bitsandbytes)
    "adamw": 8.0,  # two fp32 states
}


def state_bytes(
    trainable: int,
    frozen: int,
    *,
    stage: int,
    world: int,
    optimizer: str,
    weight_bytes: int = 2,
    bucket_elements: int = 0,
    live_parameters: int = 0,
) -> dict[str, float]:
    """Model-state bytes per GPU (bf16 weights; DeepSpeed's fp32 master weights and fp32 gradients).

    - stage 0/1 with bf16: DeepSpeed's BF16_Optimizer keeps bf16 gradients and a full fp32 gradient buffer per
      rank; stage 1 partitions the master weights and optimizer state;
    - stage 2: bf16 gradients are reduced into buckets and each rank keeps its partition (bf16, then fp32 at the
      step) with its master weights and optimizer state;
    - stage 3: also the weights (frozen ones included: they are partitioned at load) are partitioned, and up to
      ``live_parameters`` are gathered at a time.
    """
    n = world
    opt = OPTIMIZER_BYTES[optimizer]
    part = (lambda x: x / n) if stage >= 1 else (lambda x: x)
    out = {
        "frozen weights": frozen * weight_bytes / (n if stage == 3 else 1),
        "trainable weights": trainable * weight_bytes / (n if stage == 3 else 1),
        "fp32 master weights": part(trainable * 4),
        "optimizer state": part(trainable * opt),
        "gradients": trainable * (2 + 4) / (n if stage >= 2 else 1),
        "buckets / gathered weights": bucket_elements * 2 * 2 + live_parameters * weight_bytes,
    }
    return out


# --------------------------------------------------------------------------------------------------
# The plan
# --------------------------------------------------------------------------------------------------


def _largest_module_params(dims: T5Dims) -> int:
    """ZeRO-3 working set: the largest unit gathered at once (an embedding table or a decoder block)."""
    d, f, inner = dims.d_model, dims.d_ff, dims.inner
    block = 2 * 4 * d * inner + (3 if dims.gated else 2) * d * f
    return max(dims.vocab_size * d, block)


def make_plan(
    cfg: Config,
    gpus: int,
    *,
    gpu_memory_gib: float = 80.0,
    reserve_gib: float = 3.0,
    ds_config: dict[str, Any] | None = None,
    mfu: float = 0.45,
    device_name: str | None = "NVIDIA H100 80GB HBM3",
    peak_override: float | None = None,
    settings: ActivationSettings | None = None,
) -> dict[str, Any]:
    """Memory per GPU, the largest micro batch that fits, the accumulation and the run time (JSON-ready)."""
    from hypertrain.ds_config import zero_stage
    from hypertrain.params import count_method

    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    settings = settings or ActivationSettings(
        attention="fused" if cfg.model.attn_implementation == "sdpa" else "materialized"
    )
    dims = dims_for(cfg.model.name)
    counts = count_method(cfg)
    ds_config = ds_config or {"zero_optimization": {"stage": 2}}
    stage = zero_stage(ds_config)
    zero = ds_config.get("zero_optimization") or {}
    bucket = zero.get("reduce_bucket_size", "auto")
    bucket = dims.d_model**2 if not isinstance(bucket, int) else bucket
    live = _largest_module_params(dims) + int(0.9 * dims.d_model**2) if stage == 3 else 0
    states = state_bytes(
        counts["trainable"], counts["frozen"], stage=stage, world=gpus, optimizer=cfg.train.optimizer,
        bucket_elements=bucket * (2 if zero.get("overlap_comm") else 1), live_parameters=live,
    )
    states_total = sum(states.values())
    budget = gpu_memory_gib * GIB - reserve_gib * GIB

    micro = cfg.train.micro_batch_size
    per_ckpt: dict[str, Any] = {}
    has_hypernetwork = cfg.method in ("hart", "hypertuning")
    for which in CHECKPOINTING if has_hypernetwork else ("none", "main"):
        act = activation_bytes(cfg, micro, settings, which, dims=dims)
        best = 0
        for b in range(1, cfg.train.global_batch_size + 1):
            if states_total + activation_bytes(cfg, b, settings, which, dims=dims)["peak"] > budget:
                break
            best = b
        usable = [b for b in range(1, best + 1) if cfg.train.global_batch_size % (b * gpus) == 0]
        per_ckpt[which] = {
            "activations_gib": act["kept"] / GIB,
            "peak_activations_gib": act["peak"] / GIB,
            "total_gib": (states_total + act["peak"]) / GIB + reserve_gib,
            "fits": states_total + act["peak"] <= budget,
            "max_micro_batch": best,
            "max_micro_batch_dividing_global": max(usable, default=0),
            "by_component_gib": {k: v / GIB for k, v in act.items() if k not in ("kept", "peak")},
        }

    global_batch = cfg.train.global_batch_size
    accumulation = global_batch / (micro * gpus)
    fps = flops_per_sample(cfg)
    parts = breakdown(cfg, dims=dims)
    peak = peak_flops(device_name, peak_override)
    total_flops = fps * global_batch * cfg.train.total_steps
    hours = total_flops / (gpus * peak * mfu) / 3600 if peak else None
    which = cfg.train.activation_checkpointing
    recompute = flops_per_sample(cfg, recompute=True) / fps
    return {
        "method": cfg.method,
        "model": cfg.model.name,
        "gpus": gpus,
        "gpu_memory_gib": gpu_memory_gib,
        "reserve_gib": reserve_gib,
        "zero_stage": stage,
        "optimizer": cfg.train.optimizer,
        "attention": settings.attention,
        "parameters": {"trainable": counts["trainable"], "frozen": counts["frozen"]},
        "states_gib": {k: v / GIB for k, v in states.items()},
        "states_total_gib": states_total / GIB,
        "micro_batch": micro,
        "global_batch": global_batch,
        "accumulation": accumulation if accumulation != int(accumulation) else int(accumulation),
        "activation_checkpointing": which,
        "configured": per_ckpt[which],
        "checkpointing_options": per_ckpt,
        "flops_per_sample": fps,
        "flops_by_component": {k: v.total for k, v in parts.items()},
        "hardware_over_model_flops": recompute,
        "run_flops": total_flops,
        "device": device_name,
        "peak_flops_per_gpu": peak,
        "mfu": mfu,
        "run_hours": hours,
    }


def format_plan(plan: dict[str, Any]) -> str:
    gib = lambda x: f"{x:8.2f} GiB"  # noqa: E731
    lines = [
        f"method {plan['method']}, model {plan['model']}: {plan['parameters']['trainable']:,} trainable, "
        f"{plan['parameters']['frozen']:,} frozen parameters",
        f"{plan['gpus']} GPU(s) x {plan['gpu_memory_gib']:g} GiB, ZeRO stage {plan['zero_stage']}, "
        f"{plan['optimizer']}, {plan['attention']} attention, reserve {plan['reserve_gib']:g} GiB",
        "",
        "model states per GPU",
    ]
    for name, v in plan["states_gib"].items():
        lines.append(f"  {name:<28}{gib(v)}")
    lines.append(f"  {'total':<28}{gib(plan['states_total_gib'])}")
    lines.append("")
    lines.append(
        f"activations at micro batch {plan['micro_batch']} (end of forward / peak), total per GPU, "
        "largest micro batch that fits"
    )
    for which, row in plan["checkpointing_options"].items():
        mark = "*" if which == plan["activation_checkpointing"] else " "
        lines.append(
            f" {mark}checkpointing {which:<13}{gib(row['activations_gib'])} /{gib(row['peak_activations_gib'])}"
            f"   total {gib(row['total_gib'])} {'fits' if row['fits'] else 'DOES NOT FIT'}"
            f"   max micro batch {row['max_micro_batch']} ({row['max_micro_batch_dividing_global']} divides "
            f"the global batch)"
        )
    row = plan["configured"]
    lines.append("  configured (*) by component: " + ", ".join(
        f"{k} {v:.2f}" for k, v in row["by_component_gib"].items()
    ) + " GiB")
    lines.append("")
    lines.append(
        f"global batch {plan['global_batch']} = micro {plan['micro_batch']} x accumulation "
        f"{plan['accumulation']} x {plan['gpus']} GPU(s)"
    )
    lines.append(
        f"FLOPs: {plan['flops_per_sample'] / 1e12:.2f} TFLOP per example (model FLOPs; x"
        f"{plan['hardware_over_model_flops']:.2f} with the configured recomputation), "
        f"{plan['run_flops']:.3g} for the run"
    )
    if plan["run_hours"] is not None:
        lines.append(
            f"time: {plan['run_hours']:.1f} h on {plan['gpus']} x {plan['device']} "
            f"({plan['peak_flops_per_gpu'] / 1e12:.0f} TFLOP/s peak) at {plan['mfu']:.0%} MFU"
        )
    else:
        lines.append(f"time: unknown peak for device {plan['device']!r} (pass --peak-tflops)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from hypertrain.ds_config import DSConfigError, load_ds_config

    try:
        config = load_config(Config, args.config, args.overrides)
        ds = load_ds_config(args.ds_config) if args.ds_config else None
        settings = ActivationSettings(
            attention=args.attention
            or ("fused" if config.model.attn_implementation == "sdpa" else "materialized"),
            fused_gelu=args.fused_gelu,
        )
        plan = make_plan(
            config, args.gpus, gpu_memory_gib=args.gpu_memory, reserve_gib=args.reserve, ds_config=ds,
            mfu=args.mfu, device_name=args.gpu,
            peak_override=args.peak_tflops * 1e12 if args.peak_tflops else None, settings=settings,
        )
    except (ConfigError, DSConfigError) as err:
        print(f"error: {err}")
        return 2
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plan", help="memory per GPU, largest micro batch, accumulation and run time of a config (no GPU needed)",
        description="Estimate a config's memory per GPU (model states under its ZeRO stage + activations), the largest "
        "micro batch that fits, the gradient accumulation and the run time, without a GPU.",
    )
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--gpus", type=int, required=True, help="number of GPUs (data-parallel world size)")
    parser.add_argument("--gpu-memory", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    parser.add_argument("--reserve", type=float, default=3.0,
                        help="GiB per GPU kept for the CUDA context, NCCL and fragmentation (default 3)")
    parser.add_argument("--ds-config", default="ds_configs/zero2.json", help="DeepSpeed JSON (its ZeRO stage)")
    parser.add_argument("--gpu", default="NVIDIA H100 80GB HBM3", help="device name for the peak FLOP/s table")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the peak (dense bf16 TFLOP/s)")
    parser.add_argument("--mfu", type=float, default=0.45, help="model FLOPs utilisation for the time estimate")
    parser.add_argument("--attention", choices=["fused", "materialized"], default=None,
                        help="attention memory model (default: fused for sdpa, materialized for eager)")
    parser.add_argument("--fused-gelu", action="store_true", help="assume a one-op tanh-GELU (saves 3 tensors)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    parser.set_defaults(func=run)


__all__ = [
    "ActivationSettings",
    "activation_bytes",
    "activation_stacks",
    "make_plan",
    "state_bytes",
]
