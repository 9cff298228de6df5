"""CPU benchmark: P3 rank classification with shared encoding vs naive per-choice scoring.

    python benchmarks/eval.py [--d-model 256] [--layers 4] [--input-len 256] [--choices 4] [--batch 8] [--json]

Both score the same batch of examples, each with ``--choices`` answer choices, through the frozen main model with
HART prefixes and fusion states (one task's PEFT parameters, made once and not timed):

- **shared** (``hypertrain.evaluation.p3.score_choices``): the B inputs are encoded once; the decoder reads those
  states for all B·C choices;
- **naive** (``score_choices_reencoding``): every (input, choice) pair is a row of a full forward pass, so the
  encoder runs over B·C rows (T0's original way).

The two are timed round-robin (machine load hits them alike); the report gives medians, examples/s and the
ratio shared / naive, and checks that the scores agree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hypertrain.evaluation.p3 import score_choices, score_choices_reencoding
from hypertrain.models.hart import HartMethod
from hypertrain.models.registry import T5_VOCAB_SIZE, build_t5
from hypertrain.models.t5_main import FrozenT5


def run(args: argparse.Namespace) -> dict[str, float]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t5 = build_t5("tiny", device="cpu", vocab_size=args.vocab, d_model=args.d_model, d_ff=2 * args.d_model,
                  num_heads=args.d_model // 32, d_kv=32, num_layers=args.layers, num_decoder_layers=args.layers)
    method = HartMethod(FrozenT5(t5), prefix_length=args.prefix, hyper_decoder_layers=min(2, args.layers)).eval()
    g = torch.Generator().manual_seed(0)
    b, c = args.batch, args.choices
    with torch.no_grad():
        hyper = torch.randint(3, args.vocab, (1, args.hyper_len), generator=g)
        peft = method.generate_peft(hyper, torch.ones_like(hyper))
    input_ids = torch.randint(3, args.vocab, (b, args.input_len), generator=g)
    mask = torch.ones_like(input_ids)
    mask[1::2, args.input_len // 2 :] = 0  # half the inputs padded
    labels = torch.randint(3, args.vocab, (b * c, args.choice_len), generator=g)
    labels[:, -1] = 1  # EOS
    labels[1::3, args.choice_len // 2 :] = -100  # choices of different lengths
    owner = torch.arange(b).repeat_interleave(c)
    variants = {
        "shared": lambda: score_choices(method.main, peft, input_ids, mask, labels, owner),
        "naive": lambda: score_choices_reencoding(method.main, peft, input_ids, mask, labels, owner),
    }
    scores = {name: fn() for name, fn in variants.items()}  # warm-up, and the agreement check
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(ts) for name, ts in times.items()}
    return {
        "shared_s": median["shared"],
        "naive_s": median["naive"],
        "shared_examples_per_s": b / median["shared"],
        "naive_examples_per_s": b / median["naive"],
        "speedup": median["naive"] / median["shared"],
        "max_score_difference": float((scores["shared"] - scores["naive"]).abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=T5_VOCAB_SIZE)
    parser.add_argument("--prefix", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8, help="examples per batch")
    parser.add_argument("--choices", type=int, default=4)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--choice-len", type=int, default=16)
    parser.add_argument("--hyper-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.batch} examples x {args.choices} choices, input {args.input_len} tokens, choices {args.choice_len} "
          f"tokens, d_model {args.d_model}, {args.layers}+{args.layers} layers, vocab {args.vocab}")
    print(f"  shared encoding: {result['shared_s'] * 1000:8.1f} ms  {result['shared_examples_per_s']:7.1f} examples/s")
    print(f"  naive per choice:{result['naive_s'] * 1000:8.1f} ms  {result['naive_examples_per_s']:7.1f} examples/s")
    print(f"  ratio shared / naive examples/s: {result['speedup']:.2f}x  (max score difference "
          f"{result['max_score_difference']:.1e})")


if __name__ == "__main__":
    main()
