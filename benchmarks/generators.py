"""CPU benchmark: one training step (forward + backward) of HART vs HyperTuning vs PHA vs the frozen main model alone.

    python benchmarks/generators.py [--layers 8] [--d-model 128] [--batch 4] [--repeats 5] [--threads 1] \\
        [--compile-decode default] [--json]

All variants are timed in one run, round-robin (so machine load hits them alike), and reported as medians and
ratios. "Main alone" is the frozen main model's forward + backward with fixed prefixes of the same size as
leaf tensors (the part of a HART step spent in the main model). "HART decoding" is the forward + backward of
the L sequential hypernetwork decoding steps alone (encoder output fixed), reported as a share of the HART step;
it runs the fused decode (``hart.decode: fused``, what HART uses), "HART decoding (HF)" the HF reference path,
and with ``--compile-decode MODE`` "HART decoding (compiled)" the fused decode compiled (compile time reported).
"PHA" is a full PHA step (L_PLM + λ(L_IR + L_Pro), paper dims d'=128, d_h=32, b=``--pha-bottleneck``, two tasks
in the batch); "main + adapters" is the frozen main model's forward + backward with fixed PHA adapters (encoder
and per-example decoder adapters, as leaf tensors): the part of a PHA step spent in the main model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

from hypertrain.config import PhaConfig
from hypertrain.models.hart import HartMethod
from hypertrain.models.pha import AdapterParams, BatchedAdapter, PhaMethod
from hypertrain.models.registry import build_t5
from hypertrain.models.t5_main import FrozenT5, PeftParams


def _batch(args: argparse.Namespace, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b = args.batch
    return {
        "input_ids": torch.randint(3, vocab, (b, args.input_len), generator=g),
        "attention_mask": torch.ones(b, args.input_len, dtype=torch.long),
        "labels": torch.randint(3, vocab, (b, args.target_len), generator=g),
        "hyper_input_ids": torch.randint(3, vocab, (b, args.hyper_len), generator=g),
        "hyper_attention_mask": torch.ones(b, args.hyper_len, dtype=torch.long),
        "task_ids": torch.arange(b) % 2,  # two tasks: every example has a positive for L_IR
    }


def _timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(args: argparse.Namespace) -> dict[str, float]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t5 = build_t5(
        "tiny",
        device="cpu",
        d_model=args.d_model,
        d_ff=2 * args.d_model,
        num_heads=args.d_model // 32,
        d_kv=32,
        num_layers=args.layers,
        num_decoder_layers=args.layers,
    )
    main = FrozenT5(t5).train()
    common = dict(prefix_length=args.prefix, hyper_decoder_layers=args.hyper_layers, fusion=True)
    hart = HartMethod(main, generator="autoregressive", alpha=1.0, **common).train()
    hypertuning = HartMethod(main, generator="parallel", alpha=0.0, **common).train()
    pha = PhaMethod(main, ["task_0", "task_1"], PhaConfig(adapter_bottleneck=args.pha_bottleneck)).train()
    batch = _batch(args, t5.config.vocab_size)

    with torch.no_grad():
        fixed, _ = hart.peft_and_states(batch["hyper_input_ids"], batch["hyper_attention_mask"])
        demos = hart.hyper_encoder(batch["hyper_input_ids"], batch["hyper_attention_mask"]).last_hidden_state

    def leaf(t: torch.Tensor) -> torch.Tensor:
        return t.detach().clone().requires_grad_(True)

    def main_alone() -> None:
        peft = fixed.prefix_leaves()
        main(batch["input_ids"], batch["attention_mask"], labels=batch["labels"], peft=peft).loss.backward()

    with torch.no_grad():
        pha_fixed = pha.peft_for(batch)

    def main_adapters() -> None:
        enc = [
            BatchedAdapter(
                AdapterParams(
                    *(leaf(t[None]) for t in (a.down.weight.T, a.down.bias, a.up.weight.T, a.up.bias))
                )
            )
            for a in pha.encoder_adapters
        ]
        dec = [
            BatchedAdapter(AdapterParams(*(leaf(t) for t in f.params.tensors())))
            for f in pha_fixed.decoder_adapters
        ]
        peft = PeftParams(encoder_adapters=enc, decoder_adapters=dec)
        main(batch["input_ids"], batch["attention_mask"], labels=batch["labels"], peft=peft).loss.backward()

    def decoding(path: str) -> Callable[[], None]:
        def run_decode() -> None:
            if path == "compiled":
                hart.set_decode("fused", args.compile_decode)  # compiled at the first call, then reused
            else:
                hart.set_decode(path)
            states = hart.autoregressive_states(demos, batch["hyper_attention_mask"])
            states.backward(torch.ones_like(states))
            hart.set_decode("fused")

        return run_decode

    variants: dict[str, Callable[[], None]] = {
        "main_alone": main_alone,
        "hart": lambda: hart(batch).loss.backward(),
        "hypertuning": lambda: hypertuning(batch).loss.backward(),
        "hart_decoding": decoding("fused"),
        "hart_decoding_hf": decoding("hf"),
        "pha": lambda: pha(batch).loss.backward(),
        "main_adapters": main_adapters,
    }
    compile_s = 0.0
    if args.compile_decode != "none":
        variants["hart_decoding_compiled"] = decoding("compiled")
        compile_s = _timed(variants["hart_decoding_compiled"])  # the first call compiles
    times: dict[str, list[float]] = {name: [] for name in variants}
    for i in range(args.warmup + args.repeats):
        for name, fn in variants.items():
            hart.zero_grad(set_to_none=True)
            hypertuning.zero_grad(set_to_none=True)
            pha.zero_grad(set_to_none=True)
            elapsed = _timed(fn)
            if i >= args.warmup:
                times[name].append(elapsed)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    compiled = {}
    if args.compile_decode != "none":
        compiled = {
            "decode_compile_s": compile_s,
            "compiled_over_hf_decoding": med["hart_decoding_compiled"] / med["hart_decoding_hf"],
        }
    return {
        **{f"{name}_s": t for name, t in med.items()},
        **compiled,
        "hart_over_main": med["hart"] / med["main_alone"],
        "hypertuning_over_main": med["hypertuning"] / med["main_alone"],
        "hart_over_hypertuning": med["hart"] / med["hypertuning"],
        "hart_decoding_share": med["hart_decoding"] / med["hart"],
        "decoding_steps": hart.num_steps,
        "fused_over_hf_decoding": med["hart_decoding"] / med["hart_decoding_hf"],
        "pha_over_main": med["pha"] / med["main_alone"],
        "pha_over_main_adapters": med["pha"] / med["main_adapters"],
        "pha_over_hart": med["pha"] / med["hart"],
        "pha_over_hypertuning": med["pha"] / med["hypertuning"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8, help="main-model encoder and decoder layers (= L)")
    parser.add_argument("--hyper-layers", type=int, default=4, help="hypernetwork decoder layers")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--prefix", type=int, default=8)
    parser.add_argument("--pha-bottleneck", type=int, default=64, help="PHA adapter bottleneck b")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--target-len", type=int, default=16)
    parser.add_argument("--hyper-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steadier on a shared machine)"
    )
    parser.add_argument("--compile-decode", default="none", choices=["none", "default", "max-autotune-no-cudagraphs"],
                        help="also time the fused decode compiled with this torch.compile mode")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"CPU, {torch.get_num_threads()} threads; main {args.layers}+{args.layers} layers, d_model {args.d_model}, "
        f"hypernetwork decoder {args.hyper_layers} layers, p {args.prefix}, batch {args.batch}, "
        f"input/target/hyper {args.input_len}/{args.target_len}/{args.hyper_len} tokens"
    )
    for name in ("main_alone", "hypertuning", "hart", "hart_decoding", "hart_decoding_hf", "main_adapters", "pha"):
        print(f"  {name:<14} {result[name + '_s'] * 1000:8.1f} ms / step (median of {args.repeats})")
    print(f"  HART / main alone        {result['hart_over_main']:.2f}x")
    print(f"  HyperTuning / main alone {result['hypertuning_over_main']:.2f}x")
    print(f"  HART / HyperTuning       {result['hart_over_hypertuning']:.2f}x")
    print(
        f"  HART step share in the {result['decoding_steps']} sequential decoding steps: {result['hart_decoding_share']:.0%}"
    )
    print(f"  fused / HF decode        {result['fused_over_hf_decoding']:.2f}x")
    if "compiled_over_hf_decoding" in result:
        print(f"  compiled / HF decode     {result['compiled_over_hf_decoding']:.2f}x"
              f" (compiled in {result['decode_compile_s']:.0f} s)")
    print(f"  PHA / main alone         {result['pha_over_main']:.2f}x")
    print(f"  PHA / main + adapters    {result['pha_over_main_adapters']:.2f}x")
    print(f"  PHA / HART               {result['pha_over_hart']:.2f}x")
    print(f"  PHA / HyperTuning        {result['pha_over_hypertuning']:.2f}x")


if __name__ == "__main__":
    main()
