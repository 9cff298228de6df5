"""Training FLOPs per example for HART, HyperTuning and PHA, from the model shapes and sequence lengths.

Conventions (``docs/performance.md`` derives every formula):

- a multiply-add is 2 FLOPs; only matrix products are counted (projections, attention scores and context, FFN,
  LM head, heads, adapters). Norms, softmax, GELU, dropout, the relative-position bias and the loss are not
  (well under 1% at T5 shapes), as in the usual MFU accounting;
- the backward of a product ``A @ B`` costs one product per operand that needs a gradient: a trainable layer
  costs 2× its forward, a frozen layer 1× (activation gradient only, no weight gradient), an attention product
  (both operands activations) 2×. Whether an operand needs a gradient is propagated through the model exactly
  as autograd does (e.g. the main encoder's first layer has no gradient for its queries: only the prefix keys
  and values need one), so the count matches ``torch.utils.flop_counter`` on the eager path;
- attention over a causal mask is counted in full (the kernels compute the full score matrix with an additive
  bias); prefix columns count as keys;
- "model FLOPs": activation-checkpointing recomputation is excluded (pass ``recompute=True`` for the hardware
  count), so MFU stays comparable across memory settings.

The trainer uses :func:`flops_per_sample` and :func:`peak_flops`; MFU is then
``flops_per_sample · samples/s / (world size · peak)`` (:func:`hypertrain.tracking.model_flops_utilization`).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any

from hypertrain.config import Config, ConfigError

__all__ = [
    "PEAK_BF16_FLOPS",
    "Flops",
    "Lengths",
    "T5Dims",
    "breakdown",
    "decoder_layer",
    "dims_for",
    "encoder_layer",
    "flops_per_sample",
    "lengths_for",
    "peak_flops",
]

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity), matched in order against the CUDA device name.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    (r"gh200", 989e12),
    (r"h200", 989e12),
    (r"h100.*pcie", 756e12),
    (r"h100.*nvl", 835e12),
    (r"h100|h800", 989e12),
    (r"b200", 2250e12),
    (r"a100|a800", 312e12),
    (r"l40s", 362e12),
    (r"a10g", 70e12),
    (r"\ba10\b", 125e12),
    (r"l4\b", 121e12),
)


def peak_flops(device_name: str | None, override: float | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of one device: ``override`` if given, else looked up by name (``None`` if unknown).

    Names are what ``torch.cuda.get_device_name()`` returns, e.g. ``"NVIDIA A100-SXM4-80GB"`` → 312e12,
    ``"NVIDIA H100 80GB HBM3"`` → 989e12, ``"NVIDIA H200"`` → 989e12. CPUs have no entry.
    """
    if override is not None:
        if override <= 0:
            raise ValueError(f"peak FLOP/s override must be > 0, got {override}")
        return float(override)
    if not device_name:
        return None
    name = device_name.lower()
    for pattern, peak in PEAK_BF16_FLOPS:
        if re.search(pattern, name):
            return peak
    return None


# --------------------------------------------------------------------------------------------------
# Ledger
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Flops:
    """Forward and backward FLOPs of some part of a training step."""

    forward: float = 0.0
    backward: float = 0.0

    @property
    def total(self) -> float:
        return self.forward + self.backward

    def __add__(self, other: Flops) -> Flops:
        return Flops(self.forward + other.forward, self.backward + other.backward)

    def __mul__(self, k: float) -> Flops:
        return Flops(self.forward * k, self.backward * k)

    __rmul__ = __mul__


def matmul(m: float, k: float, n: float, *, grad_a: bool, grad_b: bool, count: float = 1) -> Flops:
    """``count`` products [m, k] @ [k, n]: 2mkn forward, 2mkn per operand that needs a gradient backward."""
    f = 2.0 * m * k * n * count
    return Flops(f, f * (int(grad_a) + int(grad_b)))


@dataclasses.dataclass(frozen=True)
class T5Dims:
    """The shapes that fix a T5's FLOPs (``inner = num_heads · d_kv``)."""

    d_model: int
    d_ff: int
    num_heads: int
    d_kv: int
    encoder_layers: int
    decoder_layers: int
    vocab_size: int
    gated: bool = True
    """T5 v1.1 gated-GELU FFN (3 matrices) rather than T5 v1.0 ReLU (2)."""

    @property
    def inner(self) -> int:
        return self.num_heads * self.d_kv

    @classmethod
    def from_hf_config(cls, config: Any) -> T5Dims:
        return cls(
            d_model=config.d_model,
            d_ff=config.d_ff,
            num_heads=config.num_heads,
            d_kv=config.d_kv,
            encoder_layers=config.num_layers,
            decoder_layers=config.num_decoder_layers,
            vocab_size=config.vocab_size,
            gated=bool(getattr(config, "is_gated_act", "gated" in str(getattr(config, "feed_forward_proj", "")))),
        )


@functools.lru_cache(maxsize=16)
def dims_for(model_name: str) -> T5Dims:
    """Shapes of ``model.name``: a registered T5 (``xl``, ``google/t5-xl-lm-adapt``; no download), else the
    ``config.json`` of a local checkpoint or another hub model (as loading its weights would need anyway)."""
    from hypertrain.models import registry

    if registry.canonical_name(model_name) is not None:
        return T5Dims.from_hf_config(registry.t5_config(model_name))
    from transformers import AutoConfig

    try:
        return T5Dims.from_hf_config(AutoConfig.from_pretrained(model_name))
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"model.name: {model_name!r} is not a registered T5 shape and its config.json cannot be read ({err})"
        ) from err


# --------------------------------------------------------------------------------------------------
# Layers. Each returns (FLOPs, whether its output needs a gradient); `x_grad` says whether its input does.
# --------------------------------------------------------------------------------------------------


def _attention(
    dims: T5Dims, queries: float, keys: float, *, q_grad: bool, kv_grad: bool
) -> Flops:
    """Scores Q Kᵀ and context P V over all heads (the score matrix is counted in full)."""
    h, dk = dims.num_heads, dims.d_kv
    scores = matmul(queries, dk, keys, grad_a=q_grad, grad_b=kv_grad, count=h)
    context = matmul(queries, keys, dk, grad_a=q_grad or kv_grad, grad_b=kv_grad, count=h)
    return scores + context


def _feed_forward(
    dims: T5Dims, tokens: float, *, x_grad: bool, trainable: bool, adapter: int = 0, adapter_grad: bool = False
) -> tuple[Flops, bool]:
    """FFN sublayer (+ a parallel adapter of bottleneck ``adapter`` whose weights need gradients if ``adapter_grad``)."""
    d, f = dims.d_model, dims.d_ff
    inputs = 2 if dims.gated else 1
    flops = matmul(tokens, d, f, grad_a=x_grad, grad_b=trainable, count=inputs)
    flops += matmul(tokens, f, d, grad_a=x_grad or trainable, grad_b=trainable)
    out_grad = x_grad or trainable
    if adapter:
        flops += matmul(tokens, d, adapter, grad_a=x_grad, grad_b=adapter_grad)
        flops += matmul(tokens, adapter, d, grad_a=x_grad or adapter_grad, grad_b=adapter_grad)
        out_grad = out_grad or adapter_grad
    return flops, out_grad


def encoder_layer(
    dims: T5Dims,
    tokens: float,
    *,
    prefix: int = 0,
    x_grad: bool,
    trainable: bool,
    prefix_grad: bool = False,
    adapter: int = 0,
    adapter_grad: bool = False,
) -> tuple[Flops, bool]:
    """One T5 encoder block over ``tokens`` tokens, self-attention over ``prefix`` extra key/value columns.

    Forward: ``2T(4·d·inner + 3·d·d_ff) + 4T(T + p)·inner`` (gated FFN), plus ``4T·d·b`` for an adapter.
    """
    d, inner = dims.d_model, dims.inner
    flops = matmul(tokens, d, inner, grad_a=x_grad, grad_b=trainable, count=3)  # q, k, v
    qkv_grad = x_grad or trainable
    kv_grad = qkv_grad or (prefix_grad and prefix > 0)
    flops += _attention(dims, tokens, tokens + prefix, q_grad=qkv_grad, kv_grad=kv_grad)
    ctx_grad = qkv_grad or kv_grad
    flops += matmul(tokens, inner, d, grad_a=ctx_grad, grad_b=trainable)  # o
    h_grad = x_grad or ctx_grad or trainable
    ffn, out_grad = _feed_forward(
        dims, tokens, x_grad=h_grad, trainable=trainable, adapter=adapter, adapter_grad=adapter_grad
    )
    return flops + ffn, out_grad


def decoder_layer(
    dims: T5Dims,
    tokens: float,
    memory: float,
    *,
    prefix: int = 0,
    cached: int = 0,
    cross_kv: bool = True,
    x_grad: bool,
    memory_grad: bool,
    trainable: bool,
    prefix_grad: bool = False,
    adapter: int = 0,
    adapter_grad: bool = False,
) -> tuple[Flops, bool]:
    """One T5 decoder block: ``tokens`` new queries; self-attention over ``cached + tokens`` keys plus ``prefix``
    columns; cross-attention over ``memory`` states whose key/value projections are computed here only when
    ``cross_kv`` (a KV cache reuses them afterwards).

    Forward: ``2T(6·d·inner + 3·d·d_ff) + 4T(cached + T + p)·inner + 4T·M·inner`` + ``4M·d·inner`` if ``cross_kv``.
    """
    d, inner = dims.d_model, dims.inner
    # self-attention (cached keys come from earlier steps: they need a gradient iff the layer's weights or
    # inputs do, like the new ones)
    flops = matmul(tokens, d, inner, grad_a=x_grad, grad_b=trainable, count=3)
    qkv_grad = x_grad or trainable
    kv_grad = qkv_grad or (prefix_grad and prefix > 0)
    flops += _attention(dims, tokens, cached + tokens + prefix, q_grad=qkv_grad, kv_grad=kv_grad)
    ctx_grad = qkv_grad or kv_grad
    flops += matmul(tokens, inner, d, grad_a=ctx_grad, grad_b=trainable)
    h_grad = x_grad or ctx_grad or trainable
    # cross-attention
    flops += matmul(tokens, d, inner, grad_a=h_grad, grad_b=trainable)  # q
    if cross_kv:
        flops += matmul(memory, d, inner, grad_a=memory_grad, grad_b=trainable, count=2)
    mem_kv_grad = memory_grad or trainable
    q_grad = h_grad or trainable
    flops += _attention(dims, tokens, memory, q_grad=q_grad, kv_grad=mem_kv_grad)
    cross_ctx_grad = q_grad or mem_kv_grad
    flops += matmul(tokens, inner, d, grad_a=cross_ctx_grad, grad_b=trainable)
    h_grad = h_grad or cross_ctx_grad or trainable
    ffn, out_grad = _feed_forward(
        dims, tokens, x_grad=h_grad, trainable=trainable, adapter=adapter, adapter_grad=adapter_grad
    )
    return flops + ffn, out_grad


def encoder_stack(
    dims: T5Dims,
    tokens: float,
    *,
    layers: int,
    input_grad: bool,
    trainable: bool,
    prefix: int = 0,
    prefix_grad: bool = False,
    adapter: int = 0,
    adapter_grad: bool = False,
) -> tuple[Flops, bool]:
    total, grad = Flops(), input_grad
    for _ in range(layers):
        f, grad = encoder_layer(
            dims, tokens, prefix=prefix, x_grad=grad, trainable=trainable, prefix_grad=prefix_grad,
            adapter=adapter, adapter_grad=adapter_grad,
        )
        total += f
    return total, grad


def decoder_stack(
    dims: T5Dims,
    tokens: float,
    memory: float,
    *,
    layers: int,
    input_grad: bool,
    memory_grad: bool,
    trainable: bool,
    prefix: int = 0,
    prefix_grad: bool = False,
    cached: int = 0,
    cross_kv: bool = True,
    adapter: int = 0,
    adapter_grad: bool = False,
) -> tuple[Flops, bool]:
    total, grad = Flops(), input_grad
    for _ in range(layers):
        f, grad = decoder_layer(
            dims, tokens, memory, prefix=prefix, cached=cached, cross_kv=cross_kv, x_grad=grad,
            memory_grad=memory_grad, trainable=trainable, prefix_grad=prefix_grad, adapter=adapter,
            adapter_grad=adapter_grad,
        )
        total += f
    return total, grad


# --------------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Lengths:
    """Tokens per example: main input, target, hypernetwork input (the configured maxima by default)."""

    input: int
    target: int
    hyper: int


def lengths_for(
    cfg: Config, input_tokens: int | None = None, target_tokens: int | None = None, hyper_tokens: int | None = None
) -> Lengths:
    data = cfg.data
    return Lengths(
        input_tokens if input_tokens is not None else data.max_input_tokens,
        target_tokens if target_tokens is not None else data.max_target_tokens,
        hyper_tokens if hyper_tokens is not None else data.max_hyper_input_tokens,
    )


def _main_model(
    dims: T5Dims,
    lengths: Lengths,
    *,
    prefix: int,
    fusion: int,
    fusion_grad: bool,
    encoder_adapter: int = 0,
    decoder_adapter: int = 0,
    trainable: bool = False,
) -> dict[str, Flops]:
    """The main T5: encoder (+prefixes/adapters), decoder over [fusion ; encoder states], LM head; frozen, or with
    every weight trainable (full fine-tuning: the embedding lookups need no matmul of their own)."""
    prefix_grad = prefix > 0
    enc, enc_grad = encoder_stack(
        dims, lengths.input, layers=dims.encoder_layers, input_grad=trainable, trainable=trainable,
        prefix=prefix, prefix_grad=prefix_grad, adapter=encoder_adapter, adapter_grad=True,
    )
    dec, dec_grad = decoder_stack(
        dims, lengths.target, fusion + lengths.input, layers=dims.decoder_layers, input_grad=trainable,
        memory_grad=enc_grad or fusion_grad, trainable=trainable, prefix=prefix, prefix_grad=prefix_grad,
        adapter=decoder_adapter, adapter_grad=True,
    )
    head = matmul(lengths.target, dims.d_model, dims.vocab_size, grad_a=dec_grad, grad_b=trainable)
    return {"main encoder": enc, "main decoder": dec, "main lm head": head}


LORA_PER_LAYER = {"encoder": {"q": 1, "k": 1, "v": 1, "o": 1, "wi": 1, "wi_0": 1, "wi_1": 1, "wo": 1},
                  "decoder": {"q": 2, "k": 2, "v": 2, "o": 2, "wi": 1, "wi_0": 1, "wi_1": 1, "wo": 1}}
"""How many projections of each name one layer holds (the decoder's q/k/v/o: self- and cross-attention)."""


def lora_widths(cfg: Config) -> tuple[int, int]:
    """LoRA's low-rank products per layer, as the width of one bottleneck adapter with the same FLOPs (encoder,
    decoder): each targeted projection adds d→r→d (exact for d_model-wide projections; T5's d_kv·heads and d_ff
    widths differ, which changes a term that is < 1% of a step at rank 8)."""
    rank, targets = cfg.lora.rank, cfg.lora.target_modules
    return tuple(rank * sum(LORA_PER_LAYER[stack].get(name, 0) for name in targets)  # type: ignore[return-value]
                 for stack in ("encoder", "decoder"))


def _hart(cfg: Config, dims: T5Dims, lengths: Lengths, generator: str) -> dict[str, Flops]:
    hart = cfg.hart
    lora = hart.peft == "lora"
    p = hart.lora_rank if lora else hart.prefix_length  # rows each head writes per layer
    d, layers = dims.d_model, max(dims.encoder_layers, dims.decoder_layers)
    parts: dict[str, Flops] = {}
    parts["hypernetwork encoder"], _ = encoder_stack(
        dims, lengths.hyper, layers=dims.encoder_layers, input_grad=True, trainable=True
    )
    common = dict(input_grad=True, memory_grad=True, trainable=True, layers=hart.hyper_decoder_layers)
    if generator == "autoregressive":
        # L steps of 2 rows; cross K/V computed once. Step l attends to the 2l rows so far (``hf``: a growing
        # KV cache) or to the whole 2L-row cache with the rows not yet written masked (``fused``: fixed shapes)
        decode = Flops()
        for step in range(layers):
            cached = 2 * (layers - 1) if hart.decode == "fused" else 2 * step
            f, _ = decoder_stack(dims, 2, lengths.hyper, cached=cached, cross_kv=step == 0, **common)
            decode += f
        parts["hypernetwork decoder"] = decode
        # heads: shared Linear d → p·d on one row per layer, then a per-layer Linear d → inner on p rows
        head = lambda n: matmul(n, d, p * d, grad_a=True, grad_b=True) + matmul(  # noqa: E731
            n * p, d, dims.inner, grad_a=True, grad_b=True
        )
    else:
        parts["hypernetwork decoder"], _ = decoder_stack(dims, 2 * p, lengths.hyper, **common)
        # heads: per-layer LayerNorm (so the shared Linear d → d runs on the p rows of every layer, unless the
        # LayerNorm is shared), then each layer's Linear d → inner
        head = lambda n: matmul(  # noqa: E731
            p * (1 if hart.share_head_layernorm else n), d, d, grad_a=True, grad_b=True
        ) + matmul(n * p, d, dims.inner, grad_a=True, grad_b=True)
    fusion = lengths.hyper if hart.fusion else 0
    if not lora:
        parts["prefix heads"] = head(dims.encoder_layers) * 2 + head(dims.decoder_layers) * 2
        parts.update(_main_model(dims, lengths, prefix=p, fusion=fusion, fusion_grad=hart.fusion))
        return parts
    # generated LoRA: an A and a B head per target and stack; in the main model each target adds x → r → d on the
    # self-attention of every layer, the FLOPs of a bottleneck adapter of width r per target
    groups = 2 * len(hart.lora_targets)
    parts["LoRA heads"] = head(dims.encoder_layers) * groups + head(dims.decoder_layers) * groups
    width = p * len(hart.lora_targets)
    parts.update(_main_model(dims, lengths, prefix=0, fusion=fusion, fusion_grad=hart.fusion, encoder_adapter=width,
                             decoder_adapter=width))
    return parts


def _pha(cfg: Config, dims: T5Dims, lengths: Lengths, rows_per_example: float) -> dict[str, Flops]:
    pha = cfg.pha
    b, d, layers = pha.adapter_bottleneck, dims.d_model, dims.decoder_layers
    parts = _main_model(
        dims, lengths, prefix=0, fusion=0, fusion_grad=False,
        encoder_adapter=b if pha.encoder_adapters else 0, decoder_adapter=b,
    )
    enc_grad = pha.encoder_adapters
    batch = cfg.train.micro_batch_size
    # retriever on the pooled encoder state, then the contrastive losses (batch × batch, batch × tasks)
    retr = matmul(1, d, pha.retriever_hidden, grad_a=enc_grad, grad_b=True)
    retr += matmul(1, pha.retriever_hidden, pha.retrieval_dim, grad_a=True, grad_b=True)
    tasks = len(pha.tasks) or max(pha.num_tasks, 1)
    retr += matmul(1, pha.retrieval_dim, batch, grad_a=True, grad_b=True)
    retr += matmul(1, pha.retrieval_dim, tasks, grad_a=True, grad_b=True)
    parts["retriever + losses"] = retr
    # generator, once per embedding row (one per task in the batch): project network C, then the heads H
    e = pha.retrieval_dim
    if pha.project_network == "linear":
        gen = matmul(layers, 2 * e, pha.mixed_dim, grad_a=True, grad_b=True)
    else:
        gen = matmul(layers, 2 * e, pha.project_hidden, grad_a=True, grad_b=True)
        gen += matmul(layers, pha.project_hidden, pha.mixed_dim, grad_a=True, grad_b=True)
    gen += matmul(layers, pha.mixed_dim, 2 * d * b + b + d, grad_a=True, grad_b=True)
    parts["adapter generator"] = gen * rows_per_example
    return parts


def breakdown(
    cfg: Config,
    lengths: Lengths | None = None,
    *,
    dims: T5Dims | None = None,
    rows_per_example: float = 1.0,
) -> dict[str, Flops]:
    """Training FLOPs of one example by component (forward and backward), at ``lengths`` (default: the maxima).

    ``rows_per_example`` (PHA only): generator rows per example, i.e. distinct tasks per batch / batch size
    (1.0, the default, is the upper bound; the generator is < 0.1% of a PHA step either way).
    """
    dims = dims or dims_for(cfg.model.name)
    lengths = lengths or lengths_for(cfg)
    if cfg.method in ("hart", "hypertuning"):
        from hypertrain.models.build import hart_options

        return _hart(cfg, dims, lengths, hart_options(cfg)["generator"])
    if cfg.method == "pha":
        return _pha(cfg, dims, lengths, rows_per_example)
    if cfg.method == "finetune":
        return _main_model(dims, lengths, prefix=0, fusion=0, fusion_grad=False, trainable=True)
    if cfg.method == "prefix_tuning":
        return _main_model(dims, lengths, prefix=cfg.prefix_tuning.prefix_length, fusion=0, fusion_grad=False)
    if cfg.method == "lora":
        encoder, decoder = lora_widths(cfg)
        return _main_model(dims, lengths, prefix=0, fusion=0, fusion_grad=False, encoder_adapter=encoder,
                           decoder_adapter=decoder)
    raise ConfigError(f"method: no FLOP model for {cfg.method!r}")


_CHECKPOINTED = {
    "none": (),
    "main": ("main encoder", "main decoder"),
    "hypernetwork": ("hypernetwork encoder",),
    "both": ("main encoder", "main decoder", "hypernetwork encoder"),
}


def flops_per_sample(
    cfg: Config,
    *,
    input_tokens: int | None = None,
    target_tokens: int | None = None,
    hyper_tokens: int | None = None,
    recompute: bool = False,
) -> float:
    """Training FLOPs (forward + backward) of one example at the configured lengths (or the given ones).

    Model FLOPs by default; ``recompute=True`` adds the forward recomputation of the stacks that
    ``train.activation_checkpointing`` checkpoints (hardware FLOPs).
    """
    parts = breakdown(cfg, lengths_for(cfg, input_tokens, target_tokens, hyper_tokens))
    total = sum(f.total for f in parts.values())
    if recompute:
        total += sum(parts[k].forward for k in _CHECKPOINTED[cfg.train.activation_checkpointing] if k in parts)
    return total


def format_breakdown(parts: dict[str, Flops]) -> str:
    """A table of forward/backward/total TFLOP per example."""
    total = sum((f for f in parts.values()), Flops())
    lines = [f"{'component':<24}{'forward':>10}{'backward':>10}{'total':>10}{'share':>8}  (TFLOP / example)"]
    for name, f in [*parts.items(), ("total", total)]:
        lines.append(
            f"{name:<24}{f.forward / 1e12:>10.3f}{f.backward / 1e12:>10.3f}{f.total / 1e12:>10.3f}"
            f"{f.total / total.total:>8.1%}"
        )
    return "\n".join(lines)
