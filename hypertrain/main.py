"""Training entry point.

    deepspeed hypertrain/main.py --config configs/hart_t5xl.yaml --ds_config ds_configs/zero2.json [key=value ...]
    torchrun --nproc_per_node 8 hypertrain/main.py --config ... --ds_config ...
    python -m hypertrain.main --config configs/hart_tiny.yaml data.train=[runs/sni/train]     # one process

The configuration is loaded and validated (and the DeepSpeed batch settings checked against the world size)
before any model is built. Exit codes: 0 finished or stopped on SIGTERM/SIGUSR1 with a checkpoint (resume with
the same command), 2 bad configuration, data (a shard that does not match its manifest, a bad episode) or
checkpoint (corrupt, incomplete, unsafe), named in the message, 3 stopped by the non-finite-loss guard.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # started as a script (deepspeed hypertrain/main.py): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypertrain.config import Config, ConfigError, load_config  # noqa: E402

DEFAULT_DS_CONFIG = Path(__file__).resolve().parents[1] / "ds_configs" / "zero2.json"


def parse_args(argv: Sequence[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog or "hypertrain/main.py",
        description="Train a method (HART, HyperTuning, PHA, full fine-tuning) under DeepSpeed; one process, or one "
        "per GPU under the deepspeed/torchrun launcher.",
    )
    parser.add_argument("--config", help="experiment YAML (configs/*.yaml)")
    parser.add_argument("--ds_config", "--ds-config", dest="ds_config", default=str(DEFAULT_DS_CONFIG),
                        help="DeepSpeed JSON; 'auto' values are resolved by hypertrain (default: %(default)s)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> None:
    """Join the process group the launcher set up (deepspeed/torchrun), or form a group of one."""
    import deepspeed
    import torch

    if "RANK" not in os.environ:  # plain `python -m hypertrain.main`
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend)


def resolve_before_launch(cfg: Config, ds_config_path: str) -> dict:
    """The DeepSpeed config with every "auto" resolved for this job's world size; raises on inconsistent batch
    settings before any process group is formed or any model built."""
    import torch

    from hypertrain.ds_config import load_ds_config, resolve_ds_config
    from hypertrain.flops import dims_for

    return resolve_ds_config(
        load_ds_config(ds_config_path),
        global_batch_size=cfg.train.global_batch_size,
        micro_batch_size=cfg.train.micro_batch_size,
        world_size=int(os.environ.get("WORLD_SIZE", "1")),
        gradient_clipping=cfg.train.grad_clip,
        bf16=torch.cuda.is_available() and cfg.model.dtype != "float32",
        d_model=dims_for(cfg.model.name).d_model,
        source=ds_config_path,
    )


def configure_logging(rank: int) -> None:
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
    )


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    try:
        cfg = load_config(Config, args.config, args.overrides)
        from hypertrain.preflight import path_problems  # imports torch: not before --help is handled

        problems = path_problems(cfg)
        if problems:
            raise ConfigError("; ".join(problems))
        ds_config = resolve_before_launch(cfg, args.ds_config)
    except (ConfigError, ValueError) as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    init_distributed()
    import torch.distributed as dist

    configure_logging(dist.get_rank())
    from data_prep.shards import ShardError
    from hypertrain.checkpoint import CheckpointError
    from hypertrain.engine import Trainer

    try:
        return Trainer(cfg, ds_config).train()
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, ShardError) as err:  # bad input, named; nothing was damaged
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            rank = dist.get_rank()
            dist.destroy_process_group()
            remove_cpu_allreduce_buffer(rank)


def remove_cpu_allreduce_buffer(rank: int) -> None:
    """Remove this rank's ``/dev/shm`` buffer of DeepSpeed's CPU all-reduce (``shm_comm``: 69 MB per rank, named
    after the user, ``MASTER_ADDR``, ``MASTER_PORT`` and the rank), which DeepSpeed never removes: without this every
    CPU run (tests, the demo) leaves its buffers behind until ``/dev/shm`` fills. Peers that still map it keep it."""
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if addr and port:
        path = Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{addr}_{port}_{rank}"
        with contextlib.suppress(OSError):
            path.unlink()


def register(subparsers: argparse._SubParsersAction) -> None:
    """``hypertrain train ...``: the same as ``python -m hypertrain.main ...`` (one process, or under a launcher)."""
    parser = subparsers.add_parser("train", help="train a method (see hypertrain train --help)", add_help=False)
    parser.add_argument("args", nargs=argparse.REMAINDER)
    parser.set_defaults(func=lambda args: main(args.args))


if __name__ == "__main__":
    sys.exit(main())
