"""HART and HyperTuning: a T5 hypernetwork that writes per-layer prefixes for the frozen main T5.

Both share everything but the generator (``docs/models.md`` has the shapes and the choices made):

- hypernetwork = a trainable copy of the main checkpoint's encoder and of its first ``hyper_decoder_layers``
  decoder layers; the encoder reads the demonstrations, the decoder cross-attends to them;
- ``autoregressive`` (HART): a learnable z [2, d] is decoded for L steps; step l reads the two states of step
  l-1 (the KV cache carries earlier steps); row 0 of h_l makes layer l's encoder prefixes, row 1 its decoder
  prefixes; plus the local consistency loss between consecutive training steps;
- ``parallel`` (HyperTuning): a learnable input [2p, d] in one bidirectional pass; rows [:p] make the encoder
  prefixes, rows [p:] the decoder prefixes, for every layer;
- four heads (encoder key / value, decoder key / value): per-layer LayerNorm → Linear shared by the group's
  layers → tanh → per-layer Linear → heads;
- or, with ``peft="lora"``, one head per stack, projection and factor (``encoder_q_a``, ``encoder_q_b``, ...) of
  the same form, writing r rows per layer: the rows of A [r, d_in] and of Bᵀ [r, d_out] (B's heads start at zero,
  so a new hypernetwork leaves the main model as it is, as LoRA's B = 0 does);
- fusion-in-decoder: the main decoder also attends to the hypernetwork encoder's output.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import T5ForConditionalGeneration
from transformers.models.t5.modeling_t5 import T5Stack

from hypertrain.models.base import Batch, MethodOutput
from hypertrain.models.hart_decode import decode_step, fused_autoregressive_states
from hypertrain.models.t5_main import LORA_TARGETS, FrozenT5, LoraPair, PeftParams, base_attn_implementation

Generator = Literal["autoregressive", "parallel"]
PeftType = Literal["prefix", "lora"]
ConsistencyMode = Literal["batch_mean", "per_example", "per_task"]
DecodePath = Literal["fused", "hf"]
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
GROUPS = ("encoder_key", "encoder_value", "decoder_key", "decoder_value")


# --------------------------------------------------------------------------------------------------
# Heads
# --------------------------------------------------------------------------------------------------


class PrefixHead(nn.Module):
    """One group's MLPs (e.g. all encoder-key prefixes): LN_l → shared Linear → tanh → Linear_l → heads.

    ``expand`` is how many prefix rows one input row becomes: p for HART (Linear d → p·d, reshaped to
    [p, d]), 1 for HyperTuning (Linear d → d on each of the p input rows). The per-layer Linear maps d_in
    (hypernetwork width) to heads·d_kv (main model). The per-layer linears are stored as one [L, d_in, out]
    tensor and applied with one einsum.
    """

    def __init__(
        self, layers: int, d_in: int, heads: int, d_kv: int, expand: int, share_layernorm: bool = False,
        zero: bool = False,
    ) -> None:
        super().__init__()
        self.zero = zero
        self.layers, self.heads, self.d_kv, self.expand = layers, heads, d_kv, expand
        norms = 1 if share_layernorm else layers
        self.norm_weight = nn.Parameter(torch.ones(norms, d_in))
        self.norm_bias = nn.Parameter(torch.zeros(norms, d_in))
        self.shared = nn.Linear(d_in, expand * d_in)
        self.weight = nn.Parameter(torch.empty(layers, d_in, heads * d_kv))
        self.bias = nn.Parameter(torch.empty(layers, heads * d_kv))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Linear``'s default init for the per-layer projections (zeros for a LoRA B head)."""
        if self.zero:
            nn.init.zeros_(self.weight)
            nn.init.zeros_(self.bias)
            return
        bound = 1.0 / math.sqrt(self.weight.shape[1])
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor, flat: bool = False) -> Tensor:
        """[B, L or 1, n, d_in] → prefixes [B, L, heads, n·expand, d_kv], or with ``flat`` the rows
        [B, L, n·expand, heads·d_kv] (a LoRA factor's). Always called as the module (ZeRO-3 gathers then)."""
        batch, _, rows, d_in = x.shape
        x = F.layer_norm(x, (d_in,)) * self.norm_weight[:, None] + self.norm_bias[:, None]
        x = torch.tanh(self.shared(x)).reshape(batch, -1, rows * self.expand, d_in)
        x = x.expand(batch, self.layers, -1, -1)
        out = torch.einsum("blpd,ldo->blpo", x, self.weight) + self.bias[:, None]
        return out if flat else out.reshape(*out.shape[:3], self.heads, self.d_kv).transpose(2, 3)


def _split_layers(prefix_key: Tensor, prefix_value: Tensor) -> list[tuple[Tensor, Tensor]]:
    return list(zip(prefix_key.unbind(1), prefix_value.unbind(1), strict=True))


def lora_head_names(targets: tuple[str, ...]) -> list[str]:
    """The heads of a generated LoRA: ``<stack>_<projection>_a`` and ``..._b`` for each target."""
    return [f"{stack}_{t}_{factor}" for stack in ("encoder", "decoder") for t in targets for factor in ("a", "b")]


# --------------------------------------------------------------------------------------------------
# Local consistency
# --------------------------------------------------------------------------------------------------


class ConsistencyLoss:
    """L_cst = MSE(states of this training step, states of the previous one); 0 at the first step.

    Batches mix tasks, so "the states of a step" needs a choice (``mode``):

    - ``batch_mean``: the batch mean of the states [L, 2, d] is compared with the previous step's mean;
      smooths the generator's average output, independent of batch composition and size (default);
    - ``per_example``: row i is compared with row i of the previous batch (the paper's formula applied to
      each position; rows of different tasks meet, which also pulls tasks together); 0 when the batch size
      changes;
    - ``per_task``: per-task means are compared for the tasks (``task_ids``) present in both steps; 0 when
      no task repeats.

    "Previous step" is the previous training forward on this rank: with gradient accumulation, the previous
    micro-batch. The previous states are a detached plain attribute, kept per rank: not a parameter or buffer,
    so DeepSpeed never sees it and it is not in the ``state_dict``; the trainer saves and restores it through
    :meth:`state_tensors` / :meth:`load_state_tensors` (``HartMethod.checkpoint_tensors``).
    """

    def __init__(self, mode: ConsistencyMode = "batch_mean") -> None:
        if mode not in ("batch_mean", "per_example", "per_task"):
            raise ValueError(f"unknown consistency mode {mode!r}")
        self.mode = mode
        self.previous: tuple[Tensor | None, Tensor] | None = None

    def reset(self) -> None:
        self.previous = None

    def state_tensors(self) -> dict[str, Tensor]:
        """The stored states (and task ids) as CPU tensors; empty before the first step."""
        if self.previous is None:
            return {}
        keys, prev = self.previous
        out = {"previous": prev.cpu()}
        if keys is not None:
            out["task_ids"] = keys.cpu()
        return out

    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Restore :meth:`state_tensors` (an empty dict means "first step")."""
        prev = tensors.get("previous")
        self.previous = None if prev is None else (tensors.get("task_ids"), prev)

    def __call__(self, states: Tensor, task_ids: Tensor | None = None) -> Tensor:
        """MSE against the stored states (float32), then store these states (detached)."""
        states = states.float()
        keys: Tensor | None = None
        if self.mode == "batch_mean":
            current = states.mean(0)
        elif self.mode == "per_example":
            current = states
        else:
            if task_ids is None:
                raise ValueError("consistency mode per_task needs the batch's task_ids")
            keys, inverse = torch.unique(task_ids, return_inverse=True)
            sums = states.new_zeros(len(keys), *states.shape[1:]).index_add_(0, inverse, states)
            counts = torch.bincount(inverse, minlength=len(keys)).to(states.dtype)
            current = sums / counts.view(-1, *([1] * (states.dim() - 1)))
        loss = self._compare(current, keys)
        self.previous = (keys, current.detach().clone())  # a copy: a CUDA-graphed decode reuses its output memory
        return loss

    def _compare(self, current: Tensor, keys: Tensor | None) -> Tensor:
        zero = current.new_zeros(())
        if self.previous is None:
            return zero
        prev_keys, prev = self.previous
        prev = prev.to(current.device)
        if keys is None:
            return F.mse_loss(current, prev) if prev.shape == current.shape else zero
        if prev_keys is None:
            return zero
        prev_keys = prev_keys.to(keys.device)
        pos = torch.searchsorted(prev_keys, keys).clamp(max=len(prev_keys) - 1)
        common = prev_keys[pos] == keys
        if not bool(common.any()):
            return zero
        return F.mse_loss(current[common], prev[pos[common]])


# --------------------------------------------------------------------------------------------------
# The method
# --------------------------------------------------------------------------------------------------


def copy_stack(source: T5Stack, num_layers: int | None = None, embeddings: bool = True) -> T5Stack:
    """A trainable copy of ``source`` (its first ``num_layers`` blocks), built without a second init.

    On the meta device only the shapes are made (parameter counts); otherwise the weights are cloned.
    """
    config = copy.deepcopy(source.config)
    if num_layers is not None:
        if num_layers > len(source.block):
            raise ValueError(f"asked for {num_layers} layers, the source stack has {len(source.block)}")
        config.num_layers = num_layers
    config._attn_implementation = base_attn_implementation(source)
    with torch.device("meta"):
        stack = T5Stack(config)
    if not embeddings:
        stack.embed_tokens = None
    source_param = next(source.parameters())
    if source_param.device.type == "meta":
        stack.to(dtype=source_param.dtype)
    else:
        keep = set(stack.state_dict())
        with gathered(source):
            state = {k: v.detach().clone() for k, v in source.state_dict().items() if k in keep}
        stack.load_state_dict(state, strict=True, assign=True)
    return stack.requires_grad_(True)


def is_partitioned(module: nn.Module) -> bool:
    """Whether ZeRO-3 partitions ``module``'s weights (each then lives whole only inside its own forward)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def gathered(module: nn.Module):
    """Context in which ``module``'s weights are whole: under ZeRO-3 (``HfDeepSpeedConfig`` before
    ``from_pretrained``) the main model is partitioned at load, and a copy must gather it first."""
    partitioned = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


class LearnableInput(nn.Module):
    """The hypernetwork decoder's learnable input rows (z, or HyperTuning's 2p rows).

    A module rather than a bare parameter of the method, so that ZeRO-3's module hooks gather it for the
    forward and again for the backward (they only see module outputs, and the method returns a dataclass).
    """

    def __init__(self, rows: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(rows)

    def forward(self, batch_size: int) -> Tensor:
        return self.weight.expand(batch_size, -1, -1)


class HartMethod(nn.Module):
    """HART (``generator="autoregressive"``) or HyperTuning (``"parallel"``) over a frozen :class:`FrozenT5`.

    ``forward(batch) -> MethodOutput`` with ``parts = {"lm", "consistency"}``; ``generate_peft`` gives the
    prefixes (and fusion states) for a hypernetwork input, e.g. once per task at evaluation.
    """

    def __init__(
        self,
        main: FrozenT5,
        hyper_source: T5ForConditionalGeneration | None = None,
        *,
        generator: Generator = "autoregressive",
        peft: PeftType = "prefix",
        prefix_length: int = 32,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_targets: tuple[str, ...] = ("q", "v"),
        hyper_decoder_layers: int = 8,
        alpha: float = 1.0,
        consistency: ConsistencyMode = "batch_mean",
        fusion: bool = True,
        share_head_layernorm: bool = False,
        decode: DecodePath = "fused",
        compile_decode: str = "none",
        seed: int = 0,
    ) -> None:
        super().__init__()
        if generator not in ("autoregressive", "parallel"):
            raise ValueError(f"unknown generator {generator!r}")
        if peft not in ("prefix", "lora"):
            raise ValueError(f"unknown generated PEFT type {peft!r} (prefix or lora)")
        unknown = sorted(set(lora_targets) - set(LORA_TARGETS))
        if peft == "lora" and (unknown or not lora_targets):
            raise ValueError(f"LoRA targets must be among {LORA_TARGETS}, got {list(lora_targets)}")
        self._compiled_steps: dict[str, Callable[..., Any]] = {}  # compile mode → compiled decode step
        self.set_decode(decode, compile_decode)
        self.main = main
        self.generator = generator
        self.peft_type = peft
        self.prefix_length = prefix_length
        self.lora_rank, self.lora_targets = lora_rank, tuple(lora_targets)
        self.lora_scaling = lora_alpha / lora_rank
        rows_per_layer = prefix_length if peft == "prefix" else lora_rank
        self.rows_per_layer = rows_per_layer
        self.alpha = alpha
        self.fusion = fusion
        source = hyper_source if hyper_source is not None else main.t5
        self.hyper_encoder = copy_stack(source.encoder)
        self.hyper_decoder = copy_stack(source.decoder, hyper_decoder_layers, embeddings=False)
        d_hyper = source.config.d_model

        rows = 2 if generator == "autoregressive" else 2 * rows_per_layer
        self.latent = LearnableInput(self._init_latent(self.hyper_encoder.embed_tokens.weight, rows, seed))
        expand = rows_per_layer if generator == "autoregressive" else 1
        layers = {"encoder": main.num_encoder_layers, "decoder": main.num_decoder_layers}
        self.fusion_projection: nn.Module = nn.Identity()
        with torch.device(self.latent.weight.device):  # meta stays meta: no memory for T5-XL's heads
            if peft == "prefix":
                heads = {
                    group: PrefixHead(layers[group.split("_")[0]], d_hyper, main.num_heads, main.d_kv, expand,
                                      share_head_layernorm)
                    for group in GROUPS
                }
            else:
                inner = main.num_heads * main.d_kv
                sizes = {t: (main.d_model, inner) if t != "o" else (inner, main.d_model) for t in LORA_TARGETS}
                heads = {
                    name: PrefixHead(layers[name.split("_")[0]], d_hyper, 1,
                                     sizes[name.split("_")[1]][0 if name.endswith("_a") else 1], expand,
                                     share_head_layernorm, zero=name.endswith("_b"))
                    for name in lora_head_names(self.lora_targets)
                }
            self.heads = nn.ModuleDict(heads)
            if fusion and d_hyper != main.d_model:
                self.fusion_projection = nn.Linear(d_hyper, main.d_model)
        self.heads.to(dtype=self.latent.weight.dtype)
        self.fusion_projection.to(dtype=self.latent.weight.dtype)
        self.consistency = ConsistencyLoss(consistency)

    @staticmethod
    def _init_latent(embedding: Tensor, rows: int, seed: int) -> Tensor:
        """The learnable decoder input starts as randomly chosen token embeddings (the decoder's input scale)."""
        if embedding.device.type == "meta":
            return torch.empty(rows, embedding.shape[1], device="meta", dtype=embedding.dtype)
        generator = torch.Generator().manual_seed(seed)
        idx = torch.randint(0, embedding.shape[0], (rows,), generator=generator)
        return embedding.detach()[idx.to(embedding.device)].clone()

    @property
    def num_steps(self) -> int:
        """L: decoding steps of the autoregressive generator (one per main-model layer)."""
        return max(self.main.num_encoder_layers, self.main.num_decoder_layers)

    # generators ---------------------------------------------------------------------------------
    def set_decode(self, decode: DecodePath, compile_mode: str = "none") -> None:
        """Choose HART's decode path (``fused`` or the ``hf`` reference) and the fused path's compile mode.

        A compile mode's function is made once and kept, so switching back and forth never recompiles.
        """
        if decode not in ("fused", "hf"):
            raise ValueError(f"unknown decode path {decode!r}")
        if compile_mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {compile_mode!r} (known: {', '.join(COMPILE_MODES)})")
        self.decode, self.compile_decode = decode, compile_mode
        if compile_mode != "none" and compile_mode not in self._compiled_steps:
            self._compiled_steps[compile_mode] = torch.compile(decode_step, mode=compile_mode)
        self._decode_step = self._compiled_steps.get(compile_mode, decode_step)

    def autoregressive_states(
        self, demos: Tensor, demos_mask: Tensor | None, steps: int | None = None
    ) -> Tensor:
        """h_1..h_L [B, L, 2, d]: step 1 reads z, step l reads h_{l-1}; the KV cache holds earlier steps.

        ``decode="fused"`` runs :func:`~hypertrain.models.hart_decode.fused_autoregressive_states` (optionally
        compiled), except under ZeRO-3, where only the HF stack's own forward gathers its weights.
        """
        x = self.latent(demos.shape[0])
        steps = steps or self.num_steps
        if self.decode == "fused" and not is_partitioned(self.hyper_decoder):
            if self.compile_decode in CUDA_GRAPH_MODES:
                torch.compiler.cudagraph_mark_step_begin()  # each forward is a new iteration for the graph
            return fused_autoregressive_states(self.hyper_decoder, x, demos, demos_mask, steps, self._decode_step)
        cache = None
        states = []
        for _ in range(steps):
            out = self.hyper_decoder(
                inputs_embeds=x,
                encoder_hidden_states=demos,
                encoder_attention_mask=demos_mask,
                past_key_values=cache,
                use_cache=True,
            )
            x, cache = out.last_hidden_state, out.past_key_values
            states.append(x)
        return torch.stack(states, dim=1)

    def parallel_states(self, demos: Tensor, demos_mask: Tensor | None) -> Tensor:
        """h [B, 2p, d] from one pass where every input row attends to every other (bidirectional)."""
        x = self.latent(demos.shape[0])
        rows = x.shape[1]
        bidirectional = x.new_zeros(x.shape[0], 1, rows, rows)  # a 4D additive mask is used as given
        out = self.hyper_decoder(
            inputs_embeds=x,
            attention_mask=bidirectional,
            encoder_hidden_states=demos,
            encoder_attention_mask=demos_mask,
            use_cache=False,
        )
        return out.last_hidden_state

    # PEFT parameters ----------------------------------------------------------------------------
    def peft_and_states(
        self, hyper_input_ids: Tensor, hyper_attention_mask: Tensor | None
    ) -> tuple[PeftParams, Tensor]:
        """The prefixes (and fusion states) for a hypernetwork input, and the generator states behind them."""
        demos = self.hyper_encoder(
            input_ids=hyper_input_ids, attention_mask=hyper_attention_mask
        ).last_hidden_state
        n_enc, n_dec = self.main.num_encoder_layers, self.main.num_decoder_layers
        if self.generator == "autoregressive":
            states = self.autoregressive_states(demos, hyper_attention_mask)  # [B, L, 2, d]
            enc_in, dec_in = states[:, :n_enc, 0:1], states[:, :n_dec, 1:2]
        else:
            states = self.parallel_states(demos, hyper_attention_mask)  # [B, 2p, d] (2r for LoRA)
            p = self.rows_per_layer
            enc_in, dec_in = states[:, None, :p], states[:, None, p:]
        h = self.heads
        if self.peft_type == "prefix":
            peft = PeftParams(
                encoder_prefix=_split_layers(h["encoder_key"](enc_in), h["encoder_value"](enc_in)),
                decoder_prefix=_split_layers(h["decoder_key"](dec_in), h["decoder_value"](dec_in)),
            )
        else:
            peft = PeftParams(encoder_lora=self._lora_pairs("encoder", enc_in),
                              decoder_lora=self._lora_pairs("decoder", dec_in), lora_scaling=self.lora_scaling)
        if self.fusion:
            peft.fusion_states = self.fusion_projection(demos)
            peft.fusion_mask = hyper_attention_mask
        return peft, states

    def _lora_pairs(self, stack: str, x: Tensor) -> list[dict[str, LoraPair]]:
        """Per layer of ``stack``: projection → (A [B, r, d_in], B [B, d_out, r]) from the heads' rows."""
        factors = {t: (self.heads[f"{stack}_{t}_a"](x, flat=True), self.heads[f"{stack}_{t}_b"](x, flat=True))
                   for t in self.lora_targets}  # each [B, L, r, width]
        layers = next(iter(factors.values()))[0].shape[1]
        return [{t: (a[:, layer], b[:, layer].transpose(-1, -2)) for t, (a, b) in factors.items()}
                for layer in range(layers)]

    def generate_peft(
        self, hyper_input_ids: Tensor, hyper_attention_mask: Tensor | None = None
    ) -> PeftParams:
        """PEFT parameters for the main model (e.g. once per task at evaluation, then reused)."""
        return self.peft_and_states(hyper_input_ids, hyper_attention_mask)[0]

    # training -----------------------------------------------------------------------------------
    def forward(self, batch: Batch) -> MethodOutput:
        """Main-model cross-entropy on the target + alpha · L_cst (training mode only; 0 in eval mode)."""
        peft, states = self.peft_and_states(batch["hyper_input_ids"], batch.get("hyper_attention_mask"))
        out = self.main(batch["input_ids"], batch.get("attention_mask"), labels=batch["labels"], peft=peft)
        lm = out.loss
        if self.training:
            cst = self.consistency(states, batch.get("task_ids")).to(lm.dtype)
        else:
            cst = lm.new_zeros(())
        loss = lm + self.alpha * cst if self.alpha else lm
        return MethodOutput(
            loss=loss, parts={"lm": lm.detach(), "consistency": cst.detach()}, logits=out.logits
        )

    def checkpoint_tensors(self) -> dict[str, Tensor]:
        """Non-parameter state the trainer checkpoints: the consistency reference of this rank."""
        return {f"consistency.{k}": v for k, v in self.consistency.state_tensors().items()}

    def load_checkpoint_tensors(self, tensors: dict[str, Tensor]) -> None:
        prefix = "consistency."
        self.consistency.load_state_tensors(
            {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        )

    # accounting ---------------------------------------------------------------------------------
    def components(self) -> dict[str, list[nn.Parameter]]:
        """Parameters by component, for ``hypertrain params`` (each parameter in exactly one)."""
        embed = list(self.hyper_encoder.embed_tokens.parameters())
        embed_ids = {id(p) for p in embed}
        parts = {
            "hypernetwork encoder": [p for p in self.hyper_encoder.parameters() if id(p) not in embed_ids],
            "hypernetwork decoder": list(self.hyper_decoder.parameters()),
            "hypernetwork embeddings": embed,
            "learnable input": [self.latent.weight],
        }
        for group, head in self.heads.items():
            parts[f"heads: {group.replace('_', ' ')}"] = list(head.parameters())
        parts["fusion projection"] = list(self.fusion_projection.parameters())
        parts["main model"] = list(self.main.parameters())
        return parts
