"""Training-step throughput of HART / HyperTuning / PHA with random weights: samples/s, tokens/s, TFLOP/s, MFU.

    python benchmarks/throughput.py --model t5-xl --method hart --micro-batch 8 --device cuda \\
        [--attention sdpa|eager] [--activation-checkpointing none|main|hypernetwork|both] [--fused-gelu] \\
        [--decode fused|hf] [--compile-decode none|default|reduce-overhead]
    python benchmarks/throughput.py --device cpu              # tiny shapes (CI, tests), a few seconds
    python benchmarks/throughput.py --kernels --device cuda   # attention kernels alone: eager, SDPA, FlexAttention

Nothing is downloaded: the models are built from their registered shapes (``hypertrain.models.registry``) with
random weights, on the device, in bf16 on CUDA (float32 on CPU). A step is the forward and backward of one micro
batch (``--optimizer`` adds an optimizer step, without ZeRO). After ``--warmup`` steps, ``--steps`` steps are
timed; the step is split by timing its parts alone, round-robin with the full step: the frozen main model
(fixed prefixes and fusion states as leaves), the hypernetwork encoder, the generator (HART: the L decoding
steps; HyperTuning: one pass). Prints one JSON object: step time, samples/s, tokens/s (main input + target +
hypernetwork input), model TFLOP/s and MFU (``hypertrain.flops``; MFU needs a known GPU or ``--peak-tflops``),
peak memory (CUDA: ``max_memory_allocated``; CPU: live tensor bytes, ``hypertrain.memory_probe.LiveTensorBytes``) and
the memory plan's prediction for the same step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hypertrain.config import Config
from hypertrain.flops import Lengths, T5Dims, breakdown, peak_flops
from hypertrain.models.hart import COMPILE_MODES
from hypertrain.models.registry import build_t5, get_shape
from hypertrain.models.t5_main import FrozenT5

CPU_DEFAULTS = dict(model="tiny", input_len=64, target_len=16, hyper_len=128, prefix=4, hyper_layers=2)
GPU_DEFAULTS = dict(model="t5-xl", input_len=384, target_len=128, hyper_len=1024, prefix=32, hyper_layers=8)


# --------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------


def set_attention(method: nn.Module, attention: str) -> None:
    """Switch every T5 stack of ``method`` (main model and hypernetwork) to ``eager`` or ``sdpa``."""
    from hypertrain.models.t5_main import IMPLEMENTATIONS

    method.main.t5.set_attn_implementation(IMPLEMENTATIONS[attention])
    for name in ("hyper_encoder", "hyper_decoder"):
        stack = getattr(method, name, None)
        if stack is not None:
            stack.config._attn_implementation = attention


def set_gelu(method: nn.Module, fused: bool) -> None:
    """Fused one-op tanh-GELU, or T5's own Python one, in every FFN of ``method``."""
    from transformers.activations import NewGELUActivation
    from transformers.models.t5.modeling_t5 import T5DenseGatedActDense

    act = nn.GELU(approximate="tanh") if fused else NewGELUActivation()
    for module in method.modules():
        if isinstance(module, T5DenseGatedActDense):
            module.act = act


def compare(args: argparse.Namespace, method: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Step times of variants of the same model, timed round-robin in one process: attention x GELU, and for
    HART the decode paths (``hf`` reference, ``fused``, and ``fused`` compiled when ``--compile-decode`` is set)."""
    variants = [(a, g, args.decode) for a in ("eager", "sdpa") for g in (False, True)]
    if getattr(method, "generator", None) == "autoregressive":
        decodes = ["hf", "fused"] + ([f"fused+{args.compile_decode}"] if args.compile_decode != "none" else [])
        variants += [("sdpa", False, d) for d in decodes if d != args.decode]
    times: dict[str, list[float]] = {}
    for i in range(args.warmup + args.steps):
        for attention, gelu, decode in variants:
            set_attention(method, attention)
            set_gelu(method, gelu)
            if hasattr(method, "set_decode"):
                method.set_decode(*decode.split("+"))  # "fused+MODE": compiled once, then reused
            method.zero_grad(set_to_none=True)
            elapsed = _timed(lambda: method(batch).loss.backward(), args.device)
            if i >= args.warmup:
                name = f"{attention}{'+fused_gelu' if gelu else ''}"
                if decode != args.decode:
                    name += f"+{decode}_decode"
                times.setdefault(name, []).append(elapsed)
    set_attention(method, args.attention)
    set_gelu(method, args.fused_gelu)
    set_decode(method, args)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"step_s": med, "relative_to_sdpa": {k: v / med["sdpa"] for k, v in med.items()}}


def set_decode(method: nn.Module, args: argparse.Namespace) -> None:
    """HART's decode path and compile mode as asked (``--decode``, ``--compile-decode``)."""
    if hasattr(method, "set_decode"):
        method.set_decode(args.decode, args.compile_decode if args.decode == "fused" else "none")


def build(args: argparse.Namespace) -> tuple[nn.Module, Config, T5Dims]:
    """The method over a random-weight main T5 of the requested shape, on the device, in train mode."""
    from hypertrain.flops import dims_for
    from hypertrain.models.build import hart_options

    overrides: dict[str, Any] = {}
    if args.d_model:
        heads = args.heads or max(1, args.d_model // 64)
        overrides.update(d_model=args.d_model, num_heads=heads, d_kv=args.d_model // heads,
                         d_ff=args.d_ff or int(2.5 * args.d_model))
    if args.layers:
        overrides.update(num_layers=args.layers, num_decoder_layers=args.layers)
    cfg = Config()
    cfg.method = args.method
    cfg.model.name = args.model
    cfg.model.attn_implementation = args.attention
    cfg.data.max_input_tokens, cfg.data.max_target_tokens = args.input_len, args.target_len
    cfg.data.max_hyper_input_tokens = args.hyper_len
    cfg.hart.prefix_length, cfg.hart.hyper_decoder_layers = args.prefix, args.hyper_layers
    cfg.train.micro_batch_size = cfg.train.global_batch_size = args.micro_batch
    cfg.train.activation_checkpointing = args.activation_checkpointing
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    t5 = build_t5(args.model, device=args.device, dtype=dtype, seed=0, attn_implementation=args.attention,
                  **overrides)
    dims = T5Dims.from_hf_config(t5.config) if overrides else dims_for(args.model)
    main = FrozenT5(t5, args.attention)
    if args.method in ("hart", "hypertuning"):
        from hypertrain.models.hart import HartMethod

        cfg.hart.hyper_decoder_layers = min(args.hyper_layers, dims.decoder_layers)
        method: nn.Module = HartMethod(main, **hart_options(cfg))
    else:
        from hypertrain.models.pha import build_pha_method

        cfg.pha.tasks = [f"task_{i}" for i in range(max(2, args.micro_batch))]
        method = build_pha_method(cfg, main, args.device)
    set_gelu(method, args.fused_gelu)
    set_decode(method, args)
    from hypertrain.engine import enable_activation_checkpointing

    enable_activation_checkpointing(method, args.activation_checkpointing)
    return method.train(), cfg, dims


def make_batch(args: argparse.Namespace, vocab: int) -> dict[str, torch.Tensor]:
    """Random token ids at the full lengths; one example padded by a quarter (masks are exercised)."""
    g = torch.Generator().manual_seed(0)
    b, dev = args.micro_batch, args.device

    def ids(n: int) -> torch.Tensor:
        return torch.randint(3, vocab, (b, n), generator=g).to(dev)

    def mask(n: int) -> torch.Tensor:
        m = torch.ones(b, n, dtype=torch.long)
        m[0, n - n // 4 :] = 0
        return m.to(dev)

    return {
        "input_ids": ids(args.input_len),
        "attention_mask": mask(args.input_len),
        "labels": ids(args.target_len),
        "hyper_input_ids": ids(args.hyper_len),
        "hyper_attention_mask": mask(args.hyper_len),
        "task_ids": (torch.arange(b) % max(2, b)).to(dev),
    }


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Callable[[], None], device: str) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def parts(method: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, Callable[[], None]]:
    """The full step and its parts alone (each a forward + backward)."""
    variants: dict[str, Callable[[], None]] = {"step": lambda: method(batch).loss.backward()}
    main: FrozenT5 = method.main  # type: ignore[assignment]
    if hasattr(method, "peft_and_states"):  # HART / HyperTuning
        with torch.no_grad():
            fixed, _ = method.peft_and_states(batch["hyper_input_ids"], batch["hyper_attention_mask"])
            demos = method.hyper_encoder(batch["hyper_input_ids"], batch["hyper_attention_mask"]).last_hidden_state

        def main_alone() -> None:
            peft = fixed.prefix_leaves()
            main(batch["input_ids"], batch["attention_mask"], labels=batch["labels"], peft=peft).loss.backward()

        def hyper_encoder() -> None:
            out = method.hyper_encoder(batch["hyper_input_ids"], batch["hyper_attention_mask"]).last_hidden_state
            out.backward(torch.ones_like(out))

        def generator() -> None:
            leaf = demos.detach().clone().requires_grad_(True)
            if method.generator == "autoregressive":
                states = method.autoregressive_states(leaf, batch["hyper_attention_mask"])
            else:
                states = method.parallel_states(leaf, batch["hyper_attention_mask"])
            states.backward(torch.ones_like(states))

        variants.update(main=main_alone, hypernetwork_encoder=hyper_encoder, generator=generator)
    return variants


def measure_memory(method: nn.Module, batch: dict[str, torch.Tensor], device: str) -> float:
    """Peak bytes of one step above the weights (gradient buffers allocated beforehand, so activations only)."""
    if device == "cuda":
        for p in method.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        method(batch).loss.backward()
        torch.cuda.synchronize()
        return float(torch.cuda.max_memory_allocated() - base)
    from hypertrain.memory_probe import measure_step

    return measure_step(method, batch)["peak"]


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    method, cfg, dims = build(args)
    batch = make_batch(args, dims.vocab_size)
    lengths = Lengths(args.input_len, args.target_len, args.hyper_len)
    flops = breakdown(cfg, lengths, dims=dims)
    flops_per_sample = sum(f.total for f in flops.values())
    optimizer = None
    if args.optimizer != "none":
        from hypertrain.engine import make_optimizer

        optimizer = make_optimizer(args.optimizer, [p for p in method.parameters() if p.requires_grad], 1e-5, 0.0)
    variants = parts(method, batch)
    if optimizer is not None:
        step = variants["step"]

        def step_with_optimizer() -> None:
            step()
            optimizer.step()

        variants["step"] = step_with_optimizer
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.warmup + args.steps):
        for name, fn in variants.items():
            method.zero_grad(set_to_none=True)
            elapsed = _timed(fn, args.device)
            if i >= args.warmup:
                times[name].append(elapsed)
    method.zero_grad(set_to_none=True)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    step_s = med["step"]
    b = args.micro_batch
    tokens = float(
        (batch["attention_mask"].sum() + (batch["labels"] >= 0).sum() + batch["hyper_attention_mask"].sum()).item()
    )
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else None
    peak = peak_flops(device_name, args.peak_tflops * 1e12 if args.peak_tflops else None)
    achieved = flops_per_sample * b / step_s
    peak_mem = measure_memory(method, batch, args.device)
    predicted = _predicted_memory(cfg, args, dims, lengths)
    split = {k: v for k, v in med.items() if k != "step"}
    variants = compare(args, method, batch) if args.compare else None
    result: dict[str, Any] = {
        "model": args.model,
        "shape": dict(d_model=dims.d_model, d_ff=dims.d_ff, heads=dims.num_heads, layers=dims.encoder_layers),
        "method": args.method,
        "device": device_name or "cpu",
        "dtype": "bfloat16" if args.device == "cuda" else "float32",
        "attention": args.attention,
        "activation_checkpointing": args.activation_checkpointing,
        "fused_gelu": args.fused_gelu,
        "decode": args.decode if args.method == "hart" else None,
        "compile_decode": args.compile_decode if args.method == "hart" else None,
        "micro_batch": b,
        "lengths": {"input": args.input_len, "target": args.target_len, "hyper": args.hyper_len},
        "step_s": step_s,
        "samples_per_s": b / step_s,
        "tokens_per_s": tokens / step_s,
        "model_flops_per_sample": flops_per_sample,
        "tflops_per_s": achieved / 1e12,
        "mfu": achieved / peak if peak else None,
        "peak_memory_gib": peak_mem / 2**30,
        "predicted_peak_activations_gib": predicted / 2**30,
        "split_s": split,
        "split_share_of_step": {k: v / step_s for k, v in split.items()},
        "flops_share": {k: f.total / flops_per_sample for k, f in flops.items()},
        "variants": variants,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
    }
    return result


def _predicted_memory(cfg: Config, args: argparse.Namespace, dims: T5Dims, lengths: Lengths) -> float:
    from hypertrain.plan import ActivationSettings, activation_bytes

    cuda = args.device == "cuda"
    fused = args.attention == "sdpa" and cuda  # CPU SDPA with dropout falls back to the math path
    settings = ActivationSettings(
        dtype_bytes=2 if cuda else 4,
        mask_bytes=1 if cuda else 4,
        attention="fused" if fused else "materialized",
        fused_gelu=args.fused_gelu,
    )
    return activation_bytes(cfg, args.micro_batch, settings, dims=dims, lengths=lengths)["peak"]


# --------------------------------------------------------------------------------------------------
# Attention kernels alone: T5 relative-position bias + zero-bias prefix columns + padding
# --------------------------------------------------------------------------------------------------


def _no_grad(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return fn()


def _with_backward(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    o = fn()
    o.backward(torch.ones_like(o))
    return o


def kernels(args: argparse.Namespace) -> dict[str, Any]:
    """Time one attention (forward + backward where supported) at the main encoder's shape, per implementation.

    - ``eager``: Q Kᵀ + bias + mask, softmax, P V (T5's eager path);
    - ``sdpa_dense_bias``: SDPA with the bias and mask folded into one [B, heads, q, k] float mask (what
      transformers' T5 SDPA path builds);
    - ``sdpa_broadcast_bias``: SDPA with a [1, heads, q, k] bias (no padding mask folded in: no per-example copy;
      a lower bound, compared with eager without padding);
    - ``sdpa_dense_bias_dropout_0.1``: the dense path with T5's attention dropout (its difference is the dropout);
    - ``flex``: FlexAttention, the bias looked up in a [heads, q, k] table (zero for the prefix columns) in a
      score modifier and padding as a block mask, compiled (CUDA: forward + backward; CPU: forward only, as
      FlexAttention has no CPU backward). FlexAttention has no attention dropout.

    The others run without dropout, like FlexAttention, so that the kernels compare like for like.
    """
    dev, b = args.device, args.micro_batch
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    shape = get_shape(args.model)
    heads, dk = args.heads or shape.num_heads, shape.d_kv
    q_len, p = args.input_len, args.prefix
    k_len = q_len + p
    g = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g).to(dev, dtype)

    q, k, v = rnd(b, heads, q_len, dk), rnd(b, heads, k_len, dk), rnd(b, heads, k_len, dk)
    bias = torch.cat([torch.zeros(1, heads, q_len, p, device=dev, dtype=dtype), rnd(1, heads, q_len, q_len)], -1)
    keep = torch.ones(b, k_len, dtype=torch.bool, device=dev)
    keep[0, k_len - q_len // 4 :] = False
    neg = torch.finfo(dtype).min
    padding = torch.zeros(b, 1, 1, k_len, device=dev, dtype=dtype).masked_fill(~keep[:, None, None, :], neg)
    out: dict[str, Any] = {"shape": dict(batch=b, heads=heads, q=q_len, k=k_len, d_kv=dk), "device": dev}
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def eager() -> torch.Tensor:
        scores = q @ k.transpose(-1, -2) + bias + padding
        return torch.softmax(scores.float(), -1).to(dtype) @ v

    def sdpa_dense(dropout: float = 0.0) -> torch.Tensor:  # the mask is rebuilt per call, as in every layer
        return sdpa(q, k, v, attn_mask=torch.where(keep[:, None, None, :], bias, neg), dropout_p=dropout, scale=1.0)

    def sdpa_broadcast() -> torch.Tensor:
        return sdpa(q, k, v, attn_mask=bias, scale=1.0)

    def bias_only() -> torch.Tensor:  # the reference for the broadcast variant (no padding mask)
        return torch.softmax((q @ k.transpose(-1, -2) + bias).float(), -1).to(dtype) @ v

    impls: dict[str, tuple[Callable[[], torch.Tensor], Callable[[], torch.Tensor]]] = {
        "eager": (eager, eager),
        "sdpa_dense_bias": (sdpa_dense, eager),
        "sdpa_broadcast_bias": (sdpa_broadcast, bias_only),
        "sdpa_dense_bias_dropout_0.1": (lambda: sdpa_dense(0.1), eager),
    }
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        table = bias[0]

        def score_mod(score, batch_idx, head, q_idx, kv_idx):
            return score + table[head, q_idx, kv_idx]

        def mask_mod(batch_idx, head, q_idx, kv_idx):
            return keep[batch_idx, kv_idx]

        block = create_block_mask(mask_mod, b, None, q_len, k_len, device=dev)
        compiled = torch.compile(flex_attention)
        def flex() -> torch.Tensor:  # inputs that need a gradient are refused on CPU even under no_grad
            qkv = (q, k, v) if torch.is_grad_enabled() else (q.detach(), k.detach(), v.detach())
            return compiled(*qkv, score_mod=score_mod, block_mask=block, scale=1.0)

        impls["flex"] = (flex, eager)
    except Exception as err:  # pragma: no cover - depends on the torch build
        out["flex_error"] = f"{type(err).__name__}: {err}"[:300]
    q.requires_grad_(True)
    k.requires_grad_(True)
    v.requires_grad_(True)
    runs: dict[tuple[str, str], Callable[[], torch.Tensor]] = {}
    for name, (fn, _) in impls.items():
        runs[(name, "forward")] = lambda fn=fn: _no_grad(fn)
        if name == "flex" and dev != "cuda":
            out.setdefault(name, {})["forward_backward"] = "not supported (FlexAttention has no CPU backward)"
        else:
            runs[(name, "forward_backward")] = lambda fn=fn: _with_backward(fn)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in runs}
    for key, fn in list(runs.items()):  # warm-up (and compilation), dropping what fails here
        try:
            for _ in range(max(1, args.warmup)):
                fn()
        except Exception as exc:
            out.setdefault(key[0], {})[key[1]] = f"{type(exc).__name__}: {exc}"[:300]
            del runs[key], times[key]
    for _ in range(args.steps):  # round-robin, so machine load hits every variant alike
        for key, fn in runs.items():
            times[key].append(_timed(fn, dev))
    for (name, mode), ts in times.items():
        out.setdefault(name, {})[mode] = 1e3 * statistics.median(ts)
    with torch.no_grad():
        for name, (fn, ref) in impls.items():
            if (name, "forward") in runs:
                out[name]["max_abs_diff"] = (fn().float() - ref().float()).abs().max().item()
    out["unit"] = "ms per call (median)"
    return out


# --------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda if available")
    parser.add_argument("--model", default=None, help="registered T5 shape (default: t5-xl on CUDA, tiny on CPU)")
    parser.add_argument("--method", choices=["hart", "hypertuning", "pha"], default="hart")
    parser.add_argument("--micro-batch", type=int, default=None, help="default: 8 on CUDA, 4 on CPU")
    parser.add_argument("--attention", choices=["eager", "sdpa"], default="sdpa")
    parser.add_argument("--activation-checkpointing", choices=["none", "main", "hypernetwork", "both"],
                        default="none")
    parser.add_argument("--fused-gelu", action="store_true", help="one-op tanh-GELU in every T5 FFN")
    parser.add_argument("--decode", choices=["fused", "hf"], default="fused", help="HART's decode path")
    parser.add_argument("--compile-decode", default="none", choices=COMPILE_MODES,
                        help="torch.compile mode of the fused decode (reduce-overhead: CUDA graphs on GPU)")
    parser.add_argument("--optimizer", choices=["none", "adamw", "adamw8bit"], default="none",
                        help="add an optimizer step (no ZeRO: every parameter on this device)")
    parser.add_argument("--input-len", type=int, default=None)
    parser.add_argument("--target-len", type=int, default=None)
    parser.add_argument("--hyper-len", type=int, default=None)
    parser.add_argument("--prefix", type=int, default=None, help="prefix length p")
    parser.add_argument("--hyper-layers", type=int, default=None, help="hypernetwork decoder layers")
    parser.add_argument("--d-model", type=int, default=None, help="override the shape's width (CPU studies)")
    parser.add_argument("--d-ff", type=int, default=None)
    parser.add_argument("--heads", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None, help="override encoder and decoder depth")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override the device's peak for MFU")
    parser.add_argument("--kernels", action="store_true", help="time the attention implementations alone")
    parser.add_argument("--compare", action="store_true",
                        help="also time eager/SDPA x Python/fused GELU steps of the same model, round-robin")
    args = parser.parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    defaults = GPU_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.micro_batch = args.micro_batch or (8 if args.device == "cuda" else 4)
    args.warmup = 2 if args.warmup is None else args.warmup
    args.steps = (10 if args.device == "cuda" else 3) if args.steps is None else args.steps
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.micro_batch < 1:
        parser.error("--micro-batch must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    print(json.dumps(kernels(args) if args.kernels else run(args), indent=2))


if __name__ == "__main__":
    main()
