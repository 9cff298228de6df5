"""Checkpoints of a run: atomic, checksummed, pruned, resumable, without the frozen main model.

Layout under ``<run dir>/checkpoints``::

    step-00001000/            DeepSpeed's files (trainable weights, optimizer, scheduler; frozen weights excluded)
        hypertrain_state.json run state: step, data position, task list, MLflow run id, resolved config
        rank00000.safetensors per-rank tensors: RNG states, method state (e.g. HART's consistency reference)
        trainable.safetensors the trainable weights, gathered (what ``hypertrain export`` ships; no DeepSpeed needed)
        checksums.json        size and sha256 of every file above; written last
    nonfinite-step-00001234/  a state reached through non-finite losses, kept for inspection, never resumed
    latest                    the tag of the newest complete checkpoint

A checkpoint is written under ``step-XXXXXXXX.tmp`` by every rank and renamed by rank 0 only when all ranks have
finished and ``checksums.json`` is written, so a crash mid-save never touches the previous checkpoint, and
``latest`` only ever names complete ones. Resume, export and eval verify ``checksums.json`` first; a corrupt or
incomplete checkpoint is named, and resuming falls back to the newest one that verifies. Our own files are JSON
and safetensors; DeepSpeed's pickles are screened for unexpected globals before DeepSpeed unpickles them.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from data_prep.shards import sha256_file

STATE_FILE = "hypertrain_state.json"
TRAINABLE_FILE = "trainable.safetensors"
LATEST = "latest"
CHECKSUM_FILE = "checksums.json"
_TAG_RE = re.compile(r"step-(\d{8})")

# Globals beyond torch's weights-only set that DeepSpeed 0.19's ZeRO-2/3 checkpoints reference (loss scaler,
# stage enum, universal-checkpoint slice mappings). Anything else in a checkpoint pickle is refused.
ALLOWED_PICKLE_GLOBALS = frozenset(
    {
        "deepspeed.utils.tensor_fragment.fragment_address",
        "deepspeed.runtime.fp16.loss_scaler.LossScaler",
        "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
        "deepspeed.runtime.zero.config.ZeroStageEnum",
    }
)


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


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, corrupt or unsafe to load; the message names the file."""


def _step_of(path: Path) -> int:
    match = _TAG_RE.fullmatch(path.name)
    return int(match.group(1)) if match else -1


class Checkpoints:
    """Save, find, verify, load and prune the checkpoints of one run directory (all ranks call save/load)."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        rank: int,
        keep_last: int,
        barrier: Callable[[], None],
        verify: str = "sha256",
    ) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.rank = rank
        self.keep_last = keep_last
        self.barrier = barrier
        self.verify = verify

    def complete(self) -> list[Path]:
        """Every finished checkpoint directory (``step-XXXXXXXX``, not ``.tmp``), oldest step first."""
        if not self.root.is_dir():
            return []
        return sorted((p for p in self.root.iterdir() if p.is_dir() and _TAG_RE.fullmatch(p.name)), key=_step_of)

    def resume_point(self) -> tuple[Path | None, str | None]:
        """The checkpoint to resume from and, when it is not the one ``latest`` names, why (one line).

        ``latest`` naming a missing, incomplete or corrupt checkpoint, or a lost ``latest``, falls back to the
        newest checkpoint that verifies. Raises :class:`CheckpointError` when checkpoints exist but none verifies:
        starting over silently would throw their progress away.
        """
        candidates = self.complete()
        pointer = self.root / LATEST
        named = pointer.read_text().strip() if pointer.is_file() else None
        if named is not None:
            path = self.root / named
            problem = verify_checkpoint(path, self.verify)
            if problem is None:
                return path, None
            why = f"{pointer} names {named}, which {problem}"
        elif candidates:
            why = f"{pointer} is missing"
        else:
            return None, None
        rejected = []
        for path in reversed(candidates):
            if path.name == named:
                continue
            problem = verify_checkpoint(path, self.verify)
            if problem is None:
                return path, f"{why}; resuming from {path.name}, the newest checkpoint that verifies"
            rejected.append(f"{path.name} {problem}")
        raise CheckpointError(
            f"{why}, and no other checkpoint in {self.root} verifies"
            + (f" ({'; '.join(rejected[:3])})" if rejected else "")
            + ": set run.resume=restart to set them aside and start over, or choose another run.dir"
        )

    def save(
        self, engine, step: int, state: dict[str, Any], tensors: dict[str, torch.Tensor], promote: bool = True
    ) -> Path:
        """Write checkpoint ``step`` (collective: every rank must call it).

        With ``promote`` false (a state reached through non-finite losses) it is kept as ``nonfinite-step-X`` for
        inspection: ``latest`` keeps naming the last good checkpoint, pruning and resuming never pick it.
        """
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
        final = self.root / (tag if promote else f"nonfinite-{tag}")
        if self.rank == 0:
            _write_atomic(tmp / STATE_FILE, json.dumps(state, indent=2, sort_keys=True))
            write_checksums(tmp)  # last: a checkpoint without it is incomplete
            if final.exists():  # the same step saved again (e.g. a stop right after a periodic save)
                shutil.rmtree(final)
            os.replace(tmp, final)
            if promote:
                _write_atomic(self.root / LATEST, tag)
                self._prune(step)
        self.barrier()
        return final

    def load(self, engine, path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Load weights/optimizer into ``engine``; return the run state and this rank's tensors.

        DeepSpeed's own files are pickles that DeepSpeed unpickles without restriction: each is first checked
        to reference only the classes a DeepSpeed checkpoint holds (:func:`check_pickles`).
        """
        check_pickles(path)
        try:
            load_path, _ = engine.load_checkpoint(
                str(path.parent), tag=path.name, load_module_strict=False, load_optimizer_states=True
            )
        except Exception as err:
            raise CheckpointError(f"{path}: DeepSpeed could not load it ({type(err).__name__}: {err})") from err
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load the checkpoint {path}")
        state = read_state(path)
        rank_file = path / f"rank{self.rank:05d}.safetensors"
        if not rank_file.is_file():
            raise CheckpointError(f"{rank_file}: missing (every rank's RNG and method state is saved there)")
        try:
            tensors = load_file(str(rank_file))
        except Exception as err:
            raise CheckpointError(f"{rank_file}: unreadable ({err})") from err
        missing = {"rng.torch", "rng.python", "rng.numpy"} - set(tensors)
        if missing:
            raise CheckpointError(f"{rank_file}: lacks {sorted(missing)}")
        return state, tensors

    def _prune(self, step: int) -> None:
        """Keep the newest ``keep_last`` checkpoints up to ``step`` (the one just written is among them).

        Checkpoints of higher steps are not this run's progress (a run set aside by hand, a copy): never deleted.
        """
        mine = [p for p in self.complete() if _step_of(p) <= step]
        for old in mine[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's ``hypertrain_state.json``, with errors that name the file."""
    state_file = path / STATE_FILE
    try:
        return json.loads(state_file.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CheckpointError(f"{state_file}: missing (not a complete checkpoint)") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{state_file}: not valid JSON ({err})") from err


# checksums --------------------------------------------------------------------------------------------------


def _files_of(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name != CHECKSUM_FILE)


def _hash_all(files: list[Path]) -> list[str]:
    """sha256 of each file, several at once (hashlib releases the GIL on large blocks)."""
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(files)))) as pool:
        return list(pool.map(sha256_file, files))


def write_checksums(path: Path) -> None:
    """Write ``checksums.json`` (size and sha256 of every file of ``path``) atomically."""
    files = _files_of(path)
    entries = {
        f.relative_to(path).as_posix(): {"bytes": f.stat().st_size, "sha256": digest}
        for f, digest in zip(files, _hash_all(files), strict=True)
    }
    _write_atomic(path / CHECKSUM_FILE, json.dumps({"files": entries}, indent=1, sort_keys=True))


def verify_checkpoint(path: Path, mode: str = "sha256") -> str | None:
    """None if ``path`` is a complete checkpoint whose files match ``checksums.json``; else what is wrong.

    ``mode``: ``sha256`` re-hashes every file; ``size`` checks presence and sizes only (fast, misses flipped bytes).
    """
    if not path.is_dir():
        return "does not exist"
    listing = path / CHECKSUM_FILE
    try:
        entries = json.loads(listing.read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return f"is incomplete (no {CHECKSUM_FILE})"
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        return f"has an unreadable {CHECKSUM_FILE} ({err})"
    files = {f.relative_to(path).as_posix(): f for f in _files_of(path)}
    for name in sorted(entries):
        if name not in files:
            return f"lacks {name}"
        size = files[name].stat().st_size
        if size != entries[name]["bytes"]:
            return f"has {name} of {size} bytes, {CHECKSUM_FILE} says {entries[name]['bytes']}"
    extra = sorted(set(files) - set(entries))
    if extra:
        return f"holds {extra[0]}, which {CHECKSUM_FILE} does not list"
    if mode == "sha256":
        names = sorted(entries)
        for name, digest in zip(names, _hash_all([files[n] for n in names]), strict=True):
            if digest != entries[name]["sha256"]:
                return f"has {name} whose sha256 differs from {CHECKSUM_FILE} (corrupt or modified)"
    return None


def require_verified(path: Path, mode: str = "sha256") -> None:
    """Raise :class:`CheckpointError` naming the file unless ``path`` verifies."""
    problem = verify_checkpoint(path, mode)
    if problem is not None:
        raise CheckpointError(f"{path} {problem}")


# what DeepSpeed unpickles --------------------------------------------------------------------------------------


def check_pickles(path: Path) -> None:
    """Refuse a checkpoint whose DeepSpeed pickles reference anything but plain containers, tensors and the
    few DeepSpeed/bitsandbytes classes its state holds.

    DeepSpeed loads its files with ``torch.load(weights_only=False)``, which runs whatever a crafted pickle asks
    for. Listing a pickle's globals (``torch.serialization.get_unsafe_globals_in_checkpoint``) reads it without
    executing anything; a file naming ``os.system`` or any other unknown callable is refused before DeepSpeed
    opens it.
    """
    from torch.serialization import get_unsafe_globals_in_checkpoint

    for file in sorted(path.rglob("*.pt")):
        try:
            found = set(get_unsafe_globals_in_checkpoint(str(file)))
        except Exception as err:
            raise CheckpointError(f"{file}: not a readable torch checkpoint ({type(err).__name__}: {err})") from err
        unknown = sorted(found - ALLOWED_PICKLE_GLOBALS)
        if unknown:
            raise CheckpointError(
                f"{file}: references {', '.join(unknown[:5])}, which no DeepSpeed checkpoint holds; refusing to "
                "unpickle it (see docs/training.md, 'Checkpoint integrity')"
            )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
