"""Every row of the GPU table in ``benchmarks/RESULTS.md``, in one command: runs, JSON files, the Markdown table.

    python benchmarks/gpu_suite.py --out gpu_results             # on one H100/A100 80GB: all rows
    python benchmarks/gpu_suite.py --out gpu_results --only t5-xl  # rows whose name contains "t5-xl"
    python benchmarks/gpu_suite.py --out smoke --smoke           # CPU, tiny shapes: checks the suite itself

Each row is one ``benchmarks/throughput.py`` process (a fresh CUDA context, so one row's out-of-memory error
cannot disturb the next), with a time limit. Its JSON goes to ``OUT/<row>.json``, a failure's output tail to
``OUT/<row>.err`` (an out-of-memory row reads "does not fit" in the table), and ``OUT/table.md`` gets the
table in the columns of ``RESULTS.md`` plus the HART / HyperTuning step ratio. Rows already in ``OUT`` are kept,
so an interrupted suite resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (row name, throughput.py arguments): the rows of RESULTS.md's GPU table
ROWS: list[tuple[str, list[str]]] = [
    ("t5-large_hart_sdpa_none_8", ["--model", "t5-large", "--micro-batch", "8", "--compare"]),
    ("t5-large_hart_eager_none_8", ["--model", "t5-large", "--micro-batch", "8", "--attention", "eager"]),
    ("t5-large_hart_sdpa_hypernetwork_8",
     ["--model", "t5-large", "--micro-batch", "8", "--activation-checkpointing", "hypernetwork"]),
    ("t5-xl_hart_sdpa_none_8", ["--model", "t5-xl", "--micro-batch", "8"]),  # no --compare: eager does not fit
    ("t5-xl_hart_eager_none_4", ["--model", "t5-xl", "--micro-batch", "4", "--attention", "eager"]),
    *[(f"t5-xl_hart_sdpa_hypernetwork_{b}",
       ["--model", "t5-xl", "--micro-batch", str(b), "--activation-checkpointing", "hypernetwork"]) for b in (8, 16, 24)],
    *[(f"t5-xl_hart_sdpa_both_{b}", ["--model", "t5-xl", "--micro-batch", str(b), "--activation-checkpointing", "both"])
      for b in (8, 32)],
    ("t5-xl_hart-hf-decode_sdpa_none_8", ["--model", "t5-xl", "--micro-batch", "8", "--decode", "hf"]),
    ("t5-xl_hart-cudagraph-decode_sdpa_none_8",
     ["--model", "t5-xl", "--micro-batch", "8", "--compile-decode", "reduce-overhead"]),
    ("t5-xl_hart-cudagraph-decode_sdpa_hypernetwork_24",
     ["--model", "t5-xl", "--micro-batch", "24", "--activation-checkpointing", "hypernetwork",
      "--compile-decode", "reduce-overhead"]),
    ("t5-xl_hypertuning_sdpa_none_8", ["--model", "t5-xl", "--micro-batch", "8", "--method", "hypertuning"]),
    ("t5-xl_hypertuning_sdpa_hypernetwork_24",
     ["--model", "t5-xl", "--micro-batch", "24", "--method", "hypertuning", "--activation-checkpointing",
      "hypernetwork"]),
    ("t5-xl_hart_sdpa-fused-gelu_none_8", ["--model", "t5-xl", "--micro-batch", "8", "--fused-gelu"]),
    ("t5-xl_hart_sdpa_none_8_adamw8bit", ["--model", "t5-xl", "--micro-batch", "8", "--optimizer", "adamw8bit"]),
]

# --smoke: the same machinery on CPU at tiny shapes
SMOKE_ROWS: list[tuple[str, list[str]]] = [
    ("tiny_hart_sdpa_none_4", ["--compare"]),
    ("tiny_hart-hf-decode_sdpa_none_4", ["--decode", "hf"]),
    ("tiny_hypertuning_sdpa_none_4", ["--method", "hypertuning"]),
    ("tiny_hart_broken", ["--model", "no-such-shape"]),  # fails: shows how a failed row is reported
]

COLUMNS = ("GPU", "model", "method", "attention", "checkpointing", "micro batch", "step s", "samples/s", "tokens/s",
           "TFLOP/s", "MFU", "peak GiB (measured / predicted)", "main / hyper-encoder / generator share")


def run_row(name: str, args: list[str], out: Path, device: str, timeout: float) -> dict | None:
    """One throughput.py process; its JSON (also written to ``out/name.json``), or None on failure."""
    done_file = out / f"{name}.json"
    if done_file.exists():
        return json.loads(done_file.read_text())
    command = [sys.executable, str(HERE / "throughput.py"), "--device", device, *args]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: {' '.join(args)}", flush=True)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        (out / f"{name}.err").write_text(f"timed out after {timeout:.0f} s\n")
        return None
    if done.returncode != 0:
        (out / f"{name}.err").write_text((done.stdout + done.stderr)[-20000:])
        return None
    done_file.write_text(done.stdout)
    (out / f"{name}.err").unlink(missing_ok=True)
    return json.loads(done.stdout)


def _failure(out: Path, name: str) -> str:
    err = (out / f"{name}.err").read_text() if (out / f"{name}.err").exists() else ""
    if "out of memory" in err.lower():
        return "does not fit"
    return "timed out" if err.startswith("timed out") else "failed (see .err)"


def table_row(name: str, result: dict | None, out: Path) -> list[str]:
    """The RESULTS.md columns of one row."""
    if result is None:
        model, method = name.split("_")[:2]
        return ["", model, method, "", "", "", _failure(out, name)] + [""] * (len(COLUMNS) - 7)
    method = result["method"]
    if result.get("decode") == "hf":
        method += ", `--decode hf`"
    if result.get("compile_decode") not in (None, "none"):
        method += f", `--compile-decode {result['compile_decode']}`"
    attention = result["attention"] + (" + fused GELU" if result["fused_gelu"] else "")
    share = result["split_share_of_step"]
    split = " / ".join(f"{share[k]:.2f}" for k in ("main", "hypernetwork_encoder", "generator") if k in share)
    mfu = result["mfu"]
    return [
        result["device"], result["model"], method, attention, result["activation_checkpointing"],
        str(result["micro_batch"]), f"{result['step_s']:.3f}", f"{result['samples_per_s']:.1f}",
        f"{result['tokens_per_s']:.0f}", f"{result['tflops_per_s']:.1f}", "—" if mfu is None else f"{mfu:.1%}",
        f"{result['peak_memory_gib']:.1f} / {result['predicted_peak_activations_gib']:.1f}", split or "—",
    ]


def markdown(rows: list[tuple[str, dict | None]], out: Path) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "| " + " | ".join("---" for _ in COLUMNS) + " |"]
    lines += ["| " + " | ".join(table_row(name, result, out)) + " |" for name, result in rows]
    results = dict(rows)
    for hart, tuning in (("t5-xl_hart-cudagraph-decode_sdpa_none_8", "t5-xl_hypertuning_sdpa_none_8"),
                         ("t5-xl_hart_sdpa_none_8", "t5-xl_hypertuning_sdpa_none_8"),
                         ("t5-xl_hart-cudagraph-decode_sdpa_hypernetwork_24", "t5-xl_hypertuning_sdpa_hypernetwork_24"),
                         ("tiny_hart_sdpa_none_4", "tiny_hypertuning_sdpa_none_4")):
        if results.get(hart) and results.get(tuning):
            ratio = results[hart]["step_s"] / results[tuning]["step_s"]
            lines.append(f"\nHART / HyperTuning step time, {hart} vs {tuning}: {ratio:.2f}x (target <= 1.15)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON files and table.md")
    parser.add_argument("--only", default="", help="run only the rows whose name contains this")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per row")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: test the suite, not the GPU")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, device = (SMOKE_ROWS, "cpu") if args.smoke else (ROWS, "cuda")
    extra = ["--threads", "1", "--warmup", "1", "--steps", "1"] if args.smoke else []
    results = [(name, run_row(name, [*row_args, *extra], args.out, device, args.timeout))
               for name, row_args in rows if args.only in name]
    table = markdown(results, args.out)
    (args.out / "table.md").write_text(table)
    print(table)
    failed = [name for name, result in results if result is None]
    print(f"{len(results) - len(failed)} of {len(results)} rows measured" + (f"; failed: {failed}" if failed else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
