"""Benchmark: can the data loader keep a training step fed?

Measured side by side in one run, on the real S-NI sample (prepared into a temporary directory):

1. samples/s one loader worker delivers (stream shards → shuffle → decode → tokenize → pad), in-process;
2. samples/s a tiny HART training step consumes (forward + backward + AdamW step, pre-collated batch);
3. a real loop: DataLoader with ``--workers`` processes feeding training steps; the share of wall time spent
   waiting for the next batch.

    python benchmarks/loader.py [--config configs/hart_tiny.yaml] [--micro-batch 8] [--steps 40] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from itertools import islice
from pathlib import Path

import torch

from data_prep.sni import prepare
from hypertrain.config import Config, SNIPrepConfig, load_config
from hypertrain.data.collate import EpisodeCollator
from hypertrain.data.loader import EpisodeBatches, build_loader
from hypertrain.data.stream import load_source, task_list
from hypertrain.models.build import build_method
from hypertrain.models.registry import load_tokenizer

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO.parent / "shared" / "data" / "sni_sample"


def make_dataset(cfg: Config, data: Path, micro: int, workers: int) -> EpisodeBatches:
    source = load_source(data)
    tasks = task_list([source])
    collate = EpisodeCollator(
        load_tokenizer(cfg.model.tokenizer or cfg.model.name),
        {t: i for i, t in enumerate(tasks)},
        cfg.data.max_input_tokens,
        cfg.data.max_target_tokens,
        cfg.data.max_hyper_input_tokens,
    )
    return EpisodeBatches([source], collate, rank=0, world_size=1, num_workers=workers, micro_batch_size=micro,
                          seed=0, shuffle_buffer=cfg.data.shuffle_buffer)


def loader_rate(cfg: Config, data: Path, micro: int, batches: int) -> float:
    """Samples/s of one worker (the stream and collator run in this process)."""
    stream = iter(make_dataset(cfg, data, micro, 1))
    next(stream)  # opens the first shard
    start = time.perf_counter()
    for _ in islice(stream, batches):
        pass
    return batches * micro / (time.perf_counter() - start)


def step_rate(cfg: Config, batch: dict[str, torch.Tensor], steps: int) -> tuple[float, torch.nn.Module, torch.optim.Optimizer]:
    method = build_method(cfg, "cpu")
    optimizer = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-4)
    method.train()
    for _ in range(3):  # warm-up
        train_step(method, optimizer, batch)
    start = time.perf_counter()
    for _ in range(steps):
        train_step(method, optimizer, batch)
    return steps * batch["input_ids"].shape[0] / (time.perf_counter() - start), method, optimizer


def train_step(method: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> None:
    method(batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def fed_loop(cfg, data, micro, workers, steps, method, optimizer) -> tuple[float, float]:
    """(share of wall time waiting for data, samples/s) of a loop fed by a real DataLoader."""
    batches = iter(build_loader(make_dataset(cfg, data, micro, workers)))
    next(batches)  # worker start-up is not steady state
    wait, start = 0.0, time.perf_counter()
    for _ in range(steps):
        fetch = time.perf_counter()
        batch = next(batches)
        wait += time.perf_counter() - fetch
        train_step(method, optimizer, batch)
    total = time.perf_counter() - start
    return wait / total, steps * micro / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "hart_tiny.yaml"))
    parser.add_argument("--sni", type=Path, default=SAMPLE, help="S-NI checkout (default: the shared sample)")
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config(Config, args.config)

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "sni"
        prepare(SNIPrepConfig(src=str(args.sni), out=str(data), split="train", shard_max_samples=100))
        per_worker = loader_rate(cfg, data, args.micro_batch, args.steps)
        batch = next(iter(make_dataset(cfg, data, args.micro_batch, 1)))
        consumed, method, optimizer = step_rate(cfg, batch, args.steps)
        wait_share, fed = fed_loop(cfg, data, args.micro_batch, args.workers, args.steps, method, optimizer)

    result = {
        "config": args.config,
        "micro_batch": args.micro_batch,
        "loader_samples_per_s_per_worker": round(per_worker, 1),
        "step_samples_per_s": round(consumed, 1),
        "loader_to_step_ratio": round(per_worker / consumed, 2),
        "workers": args.workers,
        "fed_loop_samples_per_s": round(fed, 1),
        "data_wait_share": round(wait_share, 4),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
