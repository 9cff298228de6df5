"""``train.init_from``: start a run's trainable parameters from an earlier run's (HyperTuning-PT: the hypernetwork
pretrained on C4, then fine-tuned multi-task).

The source is a run directory (its latest verified checkpoint), a checkpoint directory or a ``hypertrain export``
directory, verified against its checksums before it is read. Only the weights come over: the optimizer, the
schedule, the data position and the step start fresh. The source must be the same method family on the same main
model, with every trainable parameter present at the same shape; a mismatch stops the run before any step, naming
the parameters. A resumed run ignores ``init_from`` (its checkpoint already holds the weights).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from hypertrain.config import Config, ConfigError

FAMILIES = {"hart": "hart", "hypertuning": "hart"}
"""Methods whose trainable parameters have the same names (HART and HyperTuning differ in settings only)."""


@dataclasses.dataclass
class InitSource:
    """Where a run's weights start: the verified directory, its method and model, and what to record in MLflow."""

    path: Path
    method: str
    model: str
    mlflow_run_id: str | None
    trainable_sha256: str | None

    def tags(self) -> dict[str, str]:
        tags = {"hypertrain.init_from": str(self.path), "hypertrain.init_from_method": self.method}
        if self.mlflow_run_id:
            tags["hypertrain.init_from_run_id"] = self.mlflow_run_id
        if self.trainable_sha256:
            tags["hypertrain.init_from_sha256"] = self.trainable_sha256
        return tags


def resolve_init_source(cfg: Config) -> InitSource:
    """The verified source of ``train.init_from``, checked against ``cfg`` (method family and main model)."""
    from hypertrain.checkpoint import CHECKSUM_FILE, STATE_FILE, TRAINABLE_FILE, CheckpointError, read_state
    from hypertrain.export import read_run_info, resolve_checkpoint

    value = cfg.train.init_from
    try:
        path = resolve_checkpoint(value)
    except (CheckpointError, FileNotFoundError) as err:
        raise ConfigError(f"train.init_from: {err}") from err
    source_cfg, _tasks = read_run_info(path)
    family = FAMILIES.get(cfg.method, cfg.method)
    if FAMILIES.get(source_cfg.method, source_cfg.method) != family:
        raise ConfigError(
            f"train.init_from: {path} holds a {source_cfg.method} model, this run trains {cfg.method}; the trainable "
            "parameters must be the same kind"
        )
    if source_cfg.model.name != cfg.model.name:
        raise ConfigError(
            f"train.init_from: {path} was trained with model.name {source_cfg.model.name!r}, this run uses "
            f"{cfg.model.name!r}"
        )
    run_id = read_state(path).get("mlflow_run_id") if (path / STATE_FILE).is_file() else None
    digest = None
    if (path / CHECKSUM_FILE).is_file():
        entries = json.loads((path / CHECKSUM_FILE).read_text(encoding="utf-8"))["files"]
        digest = entries.get(TRAINABLE_FILE, {}).get("sha256")
    return InitSource(path, source_cfg.method, source_cfg.model.name, run_id, digest)


def load_initial_weights(method: torch.nn.Module, source: InitSource, rank: int = 0) -> int:
    """Copy the source's trained parameters into ``method``'s trainable ones (every rank calls it; ZeRO-3
    partitioned parameters are gathered, written on rank 0 and partitioned again). Returns the number of tensors."""
    from safetensors.torch import load_file

    from hypertrain.checkpoint import TRAINABLE_FILE

    weights = load_file(str(source.path / TRAINABLE_FILE), device="cpu")
    trainable = {name: p for name, p in method.named_parameters() if p.requires_grad}
    problems = _mismatches(trainable, weights)
    if problems:
        raise ConfigError(f"train.init_from: {source.path / TRAINABLE_FILE} does not fit this model: {problems}")
    for name, param in trainable.items():
        _copy(param, weights[name], rank)
    return len(trainable)


def _shape(param: torch.nn.Parameter) -> tuple[int, ...]:
    return tuple(getattr(param, "ds_shape", param.shape))  # ZeRO-3 keeps the full shape in ds_shape


def _mismatches(trainable: dict[str, torch.nn.Parameter], weights: dict[str, torch.Tensor]) -> str:
    missing = sorted(set(trainable) - set(weights))
    unexpected = sorted(set(weights) - set(trainable))
    shapes = [f"{n} {tuple(weights[n].shape)} vs {_shape(p)}" for n, p in trainable.items()
              if n in weights and tuple(weights[n].shape) != _shape(p)]
    parts = []
    for label, names in (("missing", missing), ("unexpected", unexpected), ("other shape", shapes)):
        if names:
            parts.append(f"{label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''} ({len(names)})")
    return "; ".join(parts)


def _copy(param: torch.nn.Parameter, value: torch.Tensor, rank: int) -> None:
    if hasattr(param, "ds_id"):  # partitioned by ZeRO-3
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            if rank == 0:
                with torch.no_grad():
                    param.copy_(value.to(param.dtype))
        return
    with torch.no_grad():
        param.copy_(value.to(device=param.device, dtype=param.dtype))

