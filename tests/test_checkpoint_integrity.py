"""Checkpoints are checksummed, verified before use, screened before DeepSpeed unpickles them, and never pruned or
promoted wrongly. Unit tests on real files; the trainer paths run in tests/test_trainer_faults.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hypertrain.checkpoint import (
    CHECKSUM_FILE,
    LATEST,
    STATE_FILE,
    CheckpointError,
    Checkpoints,
    check_pickles,
    read_state,
    tag_for,
    verify_checkpoint,
    write_checksums,
)

REPO = Path(__file__).resolve().parents[1]


def fake_checkpoint(root: Path, step: int, *, checksums: bool = True) -> Path:
    """A checkpoint directory with the files a real one holds (DeepSpeed's replaced by a plain tensor pickle)."""
    path = root / tag_for(step)
    path.mkdir(parents=True)
    (path / STATE_FILE).write_text(json.dumps({"step": step}))
    save_file({"w": torch.full((4,), float(step))}, str(path / "trainable.safetensors"))
    save_file({"rng.torch": torch.get_rng_state()}, str(path / "rank00000.safetensors"))
    torch.save({"module": {"w": torch.zeros(3)}, "ds_version": "0.19.8"}, path / "mp_rank_00_model_states.pt")
    if checksums:
        write_checksums(path)
    return path


def checkpoints(run_dir: Path, keep_last: int = 3) -> Checkpoints:
    return Checkpoints(run_dir, rank=0, keep_last=keep_last, barrier=lambda: None)


def point_latest(root: Path, step: int) -> None:
    (root / LATEST).write_text(tag_for(step))


def test_a_good_checkpoint_verifies_and_every_damage_is_named(tmp_path):
    path = fake_checkpoint(tmp_path, 1)
    assert verify_checkpoint(path) is None
    trainable = path / "trainable.safetensors"
    data = bytearray(trainable.read_bytes())
    data[-1] ^= 1  # one flipped bit, same size
    trainable.write_bytes(bytes(data))
    assert verify_checkpoint(path, "size") is None  # the fast mode checks sizes only
    assert "trainable.safetensors whose sha256 differs" in verify_checkpoint(path)
    trainable.write_bytes(bytes(data[:-10]))
    assert "trainable.safetensors of" in verify_checkpoint(path, "size")
    (path / "rank00000.safetensors").unlink()
    assert verify_checkpoint(path) == "lacks rank00000.safetensors"
    (path / CHECKSUM_FILE).unlink()
    assert "incomplete (no checksums.json)" in verify_checkpoint(path)


def test_missing_latest_falls_back_to_the_newest_that_verifies(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (10, 20, 30):
        fake_checkpoint(root, step)
    store = checkpoints(tmp_path)
    path, note = store.resume_point()
    assert path.name == "step-00000030" and "latest is missing" in note

    point_latest(root, 30)
    assert store.resume_point() == (root / "step-00000030", None)

    (root / "step-00000030" / STATE_FILE).write_text("{ not json }")  # same size, other bytes
    path, note = store.resume_point()
    assert path.name == "step-00000020"
    assert "names step-00000030, which has hypertrain_state.json whose sha256 differs" in note

    point_latest(root, 40)  # names a checkpoint that does not exist
    path, note = store.resume_point()
    assert path.name == "step-00000020" and "names step-00000040, which does not exist" in note


def test_no_verifying_checkpoint_refuses_to_start_over(tmp_path):
    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 10, checksums=False)  # written by a save that never finished its checksums
    with pytest.raises(CheckpointError, match=r"latest is missing, and no other checkpoint .* verifies .*"
                                              r"step-00000010 is incomplete .*run.resume=restart"):
        checkpoints(tmp_path).resume_point()
    assert checkpoints(tmp_path / "fresh").resume_point() == (None, None)


def test_pruning_keeps_what_this_run_wrote(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (5000, 6000):  # an earlier run's higher steps
        fake_checkpoint(root, step)
    for step in (100, 200, 300):
        fake_checkpoint(root, step)
    checkpoints(tmp_path, keep_last=2)._prune(300)
    assert sorted(p.name for p in root.iterdir()) == [tag_for(s) for s in (200, 300, 5000, 6000)]


def test_state_file_errors_name_the_file(tmp_path):
    path = fake_checkpoint(tmp_path, 1)
    (path / STATE_FILE).write_text("{")
    with pytest.raises(CheckpointError, match=r"hypertrain_state.json: not valid JSON"):
        read_state(path)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_crafted_deepspeed_pickle_is_refused_before_it_runs(tmp_path):
    path = fake_checkpoint(tmp_path, 1)
    check_pickles(path)  # plain containers and tensors pass
    model_states = path / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "payload": _Exploit()}, model_states)
    write_checksums(path)  # whoever can write the directory can rewrite checksums.json too
    assert verify_checkpoint(path) is None
    with pytest.raises(CheckpointError, match=r"mp_rank_00_model_states.pt: references posix.system"):
        check_pickles(path)
    assert not (tmp_path / "pwned").exists()
    model_states.write_bytes(model_states.read_bytes()[:100])  # truncated: named, not a bare zip error
    with pytest.raises(CheckpointError, match="mp_rank_00_model_states.pt: not a readable torch checkpoint"):
        check_pickles(path)


NONFINITE_SCRIPT = r"""
import json, os, sys
from pathlib import Path
os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
import deepspeed, torch
deepspeed.init_distributed(dist_backend="gloo")
from hypertrain.checkpoint import Checkpoints, LATEST
model = torch.nn.Linear(4, 2)
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
    "train_batch_size": 1, "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True})
store = Checkpoints(sys.argv[1], rank=0, keep_last=1, barrier=lambda: None)
store.save(engine, 5, {"step": 5}, {})
store.save(engine, 6, {"step": 6}, {}, promote=False)
print(json.dumps({"latest": (store.root / LATEST).read_text(), "dirs": sorted(p.name for p in store.root.iterdir())}))
"""


def test_a_nonfinite_checkpoint_is_kept_aside_and_never_promoted(tmp_path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-c", NONFINITE_SCRIPT, str(tmp_path), str(port)], cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "DS_ACCELERATOR": "cpu"}, timeout=600, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["latest"] == "step-00000005"
    assert {"step-00000005", "nonfinite-step-00000006"} <= set(out["dirs"])
    root = tmp_path / "checkpoints"
    assert checkpoints(tmp_path).resume_point() == (root / "step-00000005", None)
    assert verify_checkpoint(root / "step-00000005") is None
    check_pickles(root / "step-00000005")  # DeepSpeed's own files pass the screen


def test_export_and_eval_resolve_only_checkpoints_that_verify(tmp_path):
    from hypertrain.export import resolve_checkpoint

    root = tmp_path / "checkpoints"
    fake_checkpoint(root, 10)
    newest = fake_checkpoint(root, 20)
    point_latest(root, 20)
    assert resolve_checkpoint(tmp_path) == newest
    trainable = newest / "trainable.safetensors"
    trainable.write_bytes(trainable.read_bytes()[:-8])  # truncated: export must not ship it
    with pytest.raises(CheckpointError, match=r"step-00000020 has trainable.safetensors of \d+ bytes"):
        resolve_checkpoint(newest)
    assert resolve_checkpoint(tmp_path) == root / "step-00000010"  # a run directory falls back, with a warning
