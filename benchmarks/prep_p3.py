"""Benchmark: P3 training prep at scale — output size, rows/s per core, peak memory, and 2 workers against 1.

The real sample's generative rows (about 240-token inputs, with their token ids) are replicated, every input made
unique, into synthetic subsets in P3's repository layout (TFRecord + info/stats JSON). Each prep runs in a fresh
process that reports its own peak RSS (``VmHWM``) and its largest worker's:

- one subset of each size in ``--sizes`` (default 10k, 50k, 200k, 500k rows), 1 worker: wall time, rows/s, peak
  RSS, output bytes / input bytes;
- ``--parallel-subsets`` subsets of ``--parallel-rows`` rows, 1 worker and 2 workers side by side (alternating,
  best of ``--repeats``): the speedup, and whether both wrote identical manifests.

    python benchmarks/prep_p3.py [--sizes 10000 50000 200000 500000] [--json out.json]

Targets (issue 16): output at most 2x the input bytes; at least 5,000 rows/s per core; peak RSS flat across sizes;
2 workers at least 1.7x one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from p3_fixtures import sample_rows, write_tfrecord_subset  # noqa: E402

DEFAULT_SRC = Path(__file__).resolve().parents[2] / "shared" / "data" / "p3_sample"
GENERATIVE = "adversarial_qa_dbert_based_on"
RUN_ONE = """
import json, resource, sys, time
from data_prep import p3
from hypertrain.config import P3PrepConfig
options = json.loads(sys.argv[1])
start = time.perf_counter()
manifest = p3.prepare(P3PrepConfig(**options))
seconds = time.perf_counter() - start
# VmHWM: this process's own peak (ru_maxrss would carry the launching process's size across fork + exec);
# RUSAGE_CHILDREN: the largest worker
own = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
peak = max(own, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"seconds": seconds, "episodes": manifest["num_samples"], "peak_rss_mb": peak / 1024}))
"""


def write_subset(sample: Path, root: Path, name: str, count: int) -> int:
    """A training subset of ``count`` rows in TFRecord layout; returns its bytes on disk."""
    base = sample_rows(sample, GENERATIVE, "train")
    rows = [dict(base[i % len(base)], inputs_pretokenized=f"{base[i % len(base)]['inputs_pretokenized']} [{name}.{i}]")
            for i in range(count)]
    folder = write_tfrecord_subset(root, name, "train", rows)
    return sum(p.stat().st_size for p in Path(folder).iterdir() if ".tfrecord-" in p.name)


def run_prep(src: Path, out: Path, subsets: list[str], workers: int) -> dict:
    options = dict(src=str(src), out=str(out), split="train", subsets=subsets, shots=16, mixing_cap=0,
                   max_avg_input_tokens=0, workers=workers)
    repo = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", RUN_ONE, json.dumps(options)], cwd=repo, capture_output=True,
                            text=True, check=True)
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    manifest = json.loads((out / "manifest.json").read_text())
    measured["output_bytes"] = sum(s["bytes"] for s in manifest["shards"])
    measured["manifest"] = (out / "manifest.json").read_bytes()
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000, 500_000])
    parser.add_argument("--parallel-subsets", type=int, default=4)
    parser.add_argument("--parallel-rows", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    results: dict = {"sizes": [], "parallel": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"{'rows':>8} {'input MB':>9} {'output MB':>10} {'out/in':>7} {'seconds':>8} {'rows/s':>8} {'peak RSS MB':>12}")
        for size in args.sizes:
            src = root / f"size{size}"
            name = f"{GENERATIVE}_n{size}"
            started = time.perf_counter()
            input_bytes = write_subset(args.src, src, name, size)
            built = time.perf_counter() - started
            m = run_prep(src, root / f"out{size}", [name], workers=1)
            row = {"rows": size, "input_bytes": input_bytes, "output_bytes": m["output_bytes"],
                   "seconds": m["seconds"], "rows_per_s": size / m["seconds"], "peak_rss_mb": m["peak_rss_mb"],
                   "build_seconds": built}
            results["sizes"].append(row)
            print(f"{size:>8} {input_bytes / 1e6:>9.1f} {m['output_bytes'] / 1e6:>10.1f} "
                  f"{m['output_bytes'] / input_bytes:>7.2f} {m['seconds']:>8.1f} {row['rows_per_s']:>8.0f} "
                  f"{m['peak_rss_mb']:>12.0f}")
            (root / f"out{size}").exists() and subprocess.run(["rm", "-rf", str(root / f"out{size}"), str(src)])

        src = root / "parallel"
        names = [f"{GENERATIVE}_p{i}" for i in range(args.parallel_subsets)]
        for name in names:
            write_subset(args.src, src, name, args.parallel_rows)
        best: dict[int, float] = {}
        manifests: dict[int, bytes] = {}
        for repeat in range(args.repeats):
            for workers in (1, 2):
                m = run_prep(src, root / f"par-{workers}-{repeat}", names, workers)
                best[workers] = min(best.get(workers, float("inf")), m["seconds"])
                manifests[workers] = m["manifest"]
        total = args.parallel_subsets * args.parallel_rows
        results["parallel"] = {"rows": total, "seconds_1": best[1], "seconds_2": best[2],
                               "speedup": best[1] / best[2], "identical_manifests": manifests[1] == manifests[2]}
        print(f"\n{args.parallel_subsets} subsets x {args.parallel_rows} rows ({total} rows), best of {args.repeats}: "
              f"1 worker {best[1]:.1f} s ({total / best[1]:.0f} rows/s), 2 workers {best[2]:.1f} s "
              f"({total / best[2]:.0f} rows/s): {best[1] / best[2]:.2f}x; identical manifests: "
              f"{manifests[1] == manifests[2]}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
