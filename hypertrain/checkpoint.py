"""Checkpoints of a run: atomic, pruned, resumable, without the frozen main model and without our own pickles.

Layout under ``<run dir>/checkpoints``::

    step-00001000/            DeepSpeed's files (trainable weights, optimizer, scheduler; frozen weights excluded)
        hypertrain_state.json run state: step, data position, task list, MLflow run id, resolved config
        rank00000.safetensors per-rank tensors: RNG states, method state (e.g. HART's consistency reference)
    trainable.safetensors     the trainable weights, gathered (what ``hypertrain export`` ships; no DeepSpeed needed)
    latest                    the tag of the newest complete checkpoint

A checkpoint is written under ``step-XXXXXXXX.tmp`` by every rank and renamed by rank 0 only when all ranks have
finished, so a crash mid-save never touches the previous checkpoint, and ``latest`` only ever names complete ones.
Our own files are JSON and safetensors; nothing of ours is unpickled (DeepSpeed's own files are loaded by
DeepSpeed, from the run's own directory).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_FILE = "hypertrain_state.json"
TRAINABLE_FILE = "trainable.safetensors"
LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def rng_state_tensors() -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors (torch CPU/CUDA, numpy, Python)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    py_state = json.dumps(random.getstate()).encode()
    tensors["rng.python"] = torch.frombuffer(bytearray(py_state), dtype=torch.uint8)
    np_state = json.dumps([v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()]).encode()
    tensors["rng.numpy"] = torch.frombuffer(bytearray(np_state), dtype=torch.uint8)
    return tensors


def restore_rng_state(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    py = json.loads(bytes(tensors["rng.python"].tolist()).decode())
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, gauss = json.loads(bytes(tensors["rng.numpy"].tolist()).decode())
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))


def trainable_state_dict(engine) -> dict[str, torch.Tensor]:
    """The trainable parameters by name, full (gathered under ZeRO-3), on CPU; every rank must call it."""
    module = engine.module
    names = {name for name, param in module.named_parameters() if param.requires_grad}
    if engine.zero_optimization_partition_weights():
        full = engine._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=True)
        full = full or {}  # only rank 0 receives the weights
    else:
        full = module.state_dict()
    return {name: tensor.detach().cpu().contiguous() for name, tensor in full.items() if name in names}


class Checkpoints:
    """Save, find, load and prune the checkpoints of one run directory (all ranks call save/load)."""

    def __init__(self, run_dir: str | Path, *, rank: int, keep_last: int, barrier: Callable[[], None]) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.rank = rank
        self.keep_last = keep_last
        self.barrier = barrier

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None."""
        pointer = self.root / LATEST
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"{pointer} names {path.name}, which is not a complete checkpoint")
        return path

    def save(self, engine, step: int, state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Path:
        """Write checkpoint ``step`` (collective: every rank must call it)."""
        tag = tag_for(step)
        tmp = self.root / f"{tag}.tmp"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a save that crashed
        self.barrier()
        engine.save_checkpoint(str(self.root), tag=tmp.name, save_latest=False, exclude_frozen_parameters=True)
        weights = trainable_state_dict(engine)  # collective under ZeRO-3
        if self.rank == 0:
            save_file(weights, str(tmp / TRAINABLE_FILE))
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / f"rank{self.rank:05d}.safetensors"))
        self.barrier()
        final = self.root / tag
        if self.rank == 0:
            _write_atomic(tmp / STATE_FILE, json.dumps(state, indent=2, sort_keys=True))
            if final.exists():  # the same step saved again (e.g. a stop right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic(self.root / LATEST, tag)
            self._prune()
        self.barrier()
        return final

    def load(self, engine, path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Load weights/optimizer into ``engine``; return the run state and this rank's tensors."""
        load_path, _ = engine.load_checkpoint(
            str(path.parent), tag=path.name, load_module_strict=False, load_optimizer_states=True
        )
        if load_path is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint {path}")
        state = json.loads((path / STATE_FILE).read_text())
        rank_file = path / f"rank{self.rank:05d}.safetensors"
        tensors = load_file(str(rank_file)) if rank_file.is_file() else {}
        return state, tensors

    def _prune(self) -> None:
        complete = sorted(p for p in self.root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in complete[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
