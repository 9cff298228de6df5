"""``hypertrain stop RUN_DIR``: ask a running training job to checkpoint and exit 0, whatever launched it.

Writes ``RUN_DIR/stop-request``. Rank 0 looks for it at every micro-step and shares it with the other ranks (the
same all-reduce that shares signals), so every rank stops at the same step, writes a checkpoint and exits 0; the
file is removed with that checkpoint, and resuming is the same command as before. Unlike a signal, it reaches the
ranks whichever launcher runs them (``deepspeed``, ``torchrun``, Slurm) and whoever sends it, as long as the run
directory is on storage that rank 0 sees (``docs/training.md``, "Stopping a run").
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

STOP_FILE = "stop-request"


def request_stop(run_dir: str | Path) -> Path:
    """Write the stop request of ``run_dir`` (atomically); returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    path = run_dir / STOP_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()), encoding="utf-8")
    tmp.replace(path)
    return path


def stop_requested(run_dir: Path) -> bool:
    return (run_dir / STOP_FILE).exists()


def clear_stop(run_dir: Path) -> None:
    (run_dir / STOP_FILE).unlink(missing_ok=True)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "stop", help="ask a running training job to checkpoint and exit 0",
        description="Ask the training job writing RUN_DIR to finish its step, checkpoint and exit 0.",
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the job's run.dir")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        path = request_stop(args.run_dir)
    except FileNotFoundError as err:
        print(f"hypertrain stop: {err}")
        return 2
    print(f"wrote {path}: the job checkpoints at its next step and exits 0 (it removes the file)")
    return 0
