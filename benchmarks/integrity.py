"""Benchmark: what the data-loss safeguards cost, measured side by side in one run.

1. S-NI prep of the real sample with and without the verification that runs before the staged output is swapped in
   (``--no-verify``), alternated over ``--repeats`` runs: the ratio of median wall times;
2. the training pre-check of shards against their manifests (``data.verify_shards``): sha256 and size-only, in MB/s,
   over the prepared shards copied ``--copies`` times;
3. checkpoint checksums: ``write_checksums`` and ``verify_checkpoint`` (sha256) over a synthetic checkpoint of
   ``--checkpoint-mib`` MiB in 4 files, in MB/s, against writing those files (``safetensors``) in the same run.

    python benchmarks/integrity.py [--repeats 3] [--copies 20] [--checkpoint-mib 256]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from data_prep.shards import read_manifest, write_json_atomic
from data_prep.sni import prepare
from hypertrain.checkpoint import verify_checkpoint, write_checksums
from hypertrain.config import SNIPrepConfig
from hypertrain.data.stream import check_shards, load_source

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "sni_sample"


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def prep_ratio(root: Path, repeats: int) -> dict[str, float]:
    times: dict[bool, list[float]] = {True: [], False: []}
    for index in range(repeats):
        for verify in (True, False):  # alternated, so machine load affects both alike
            out = root / f"prep-{verify}-{index}"
            cfg = SNIPrepConfig(src=str(SAMPLE), out=str(out), split="train", shard_max_samples=100, verify=verify)
            times[verify].append(timed(lambda cfg=cfg: prepare(cfg)))
    with_verify, without = statistics.median(times[True]), statistics.median(times[False])
    return {"prep_s_verified": with_verify, "prep_s_unverified": without, "verified_over_unverified": with_verify / without}


def precheck_rates(root: Path, copies: int) -> dict[str, float]:
    base = root / "prep-True-0"
    sources, total = [], 0
    for index in range(copies):
        copy = root / f"copy-{index}"
        shutil.copytree(base, copy)
        sources.append(load_source(copy))
        total += sum(s["bytes"] for s in read_manifest(copy)["shards"])
    sha = timed(lambda: check_shards(sources, "sha256"))
    size = timed(lambda: check_shards(sources, "size"))
    return {"shard_mb": total / 1e6, "precheck_sha256_mb_per_s": total / 1e6 / sha,
            "precheck_size_s": size, "precheck_sha256_s": sha}


def checkpoint_rates(root: Path, mib: int) -> dict[str, float]:
    path = root / "checkpoint"
    path.mkdir()
    per_file = mib * 2**20 // 4 // 4  # float32 elements per file
    tensors = [torch.randn(per_file) for _ in range(4)]
    write = timed(lambda: [save_file({"t": t}, str(path / f"part{i}.safetensors")) for i, t in enumerate(tensors)])
    checksum = timed(lambda: write_checksums(path))
    verify = timed(lambda: verify_checkpoint(path))
    size = mib * 2**20 / 1e6
    return {"checkpoint_mb": size, "write_mb_per_s": size / write, "checksum_mb_per_s": size / checksum,
            "verify_mb_per_s": size / verify, "checksum_over_write": checksum / write}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--checkpoint-mib", type=int, default=256)
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    if not SAMPLE.is_dir():
        raise SystemExit(f"the S-NI sample is not at {SAMPLE}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        results = {**prep_ratio(root, args.repeats), **precheck_rates(root, args.copies),
                   **checkpoint_rates(root, args.checkpoint_mib)}
    for key, value in results.items():
        print(f"{key:28s} {value:10.3f}")
    if args.out:
        write_json_atomic(args.out, results)


if __name__ == "__main__":
    main()
