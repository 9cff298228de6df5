"""What a training run tells MLflow about itself, beyond its metrics.

- a one-line **description** (``mlflow.note.content``: the method and what distinguishes it, model, steps, data),
  and one for the experiment;
- who ran it and how: ``mlflow.user``, ``mlflow.source.name`` (the command line), ``mlflow.source.type``;
- **params** of the sections the run uses only (no prep sections, no other method's section);
- **datasets** as MLflow inputs from the prepared directories' manifests (name, digest = the manifest's sha256,
  source, context ``training`` / ``eval``, episodes and tasks as the profile), so the UI's Datasets column and
  filter work;
- the link that opens the experiment's runs table directly (MLflow 3 otherwise lands on its GenAI overview).
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import json
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hypertrain.config import Config

log = logging.getLogger(__name__)

METHOD_SECTIONS = {"hart": "hart", "hypertuning": "hart", "pha": "pha", "prefix_tuning": "prefix_tuning",
                   "lora": "lora", "finetune": None}
"""Each method's own config section (logged as params besides the common ones)."""
COMMON_SECTIONS = ("model", "data", "train", "eval", "run")
EXPERIMENT_DESCRIPTION = (
    "hypertrain runs. `train/loss` is each method's whole objective (HART adds alpha x consistency, PHA lambda x (IR "
    "+ prototype)), so it compares runs of one method only; `train/loss/lm`, the main model's cross-entropy on the "
    "target, compares across methods. Eval scores (`eval/<set>/<metric>[/<family>]`) are fractions: 0.006 is 0.6%."
)


def _method_line(cfg: Config) -> str:
    from hypertrain.models.build import hart_options

    method = cfg.method
    if method in ("hart", "hypertuning"):
        options = hart_options(cfg)
        written = (f"LoRA pairs (r={cfg.hart.lora_rank}, {'/'.join(cfg.hart.lora_targets)})" if cfg.hart.peft == "lora"
                   else f"prefixes (p={cfg.hart.prefix_length})")
        how = ("HART: the hypernetwork decodes one state per main-model layer autoregressively" if method == "hart"
               else "HyperTuning: HART's code with generator=parallel (one bidirectional pass over learnable rows)")
        extras = [f"alpha={options['alpha']:g}", "fusion-in-decoder" if cfg.hart.fusion else "no fusion"]
        return f"{how} and writes {written}; {', '.join(extras)}"
    if method == "pha":
        return (f"PHA: retrieved task prototypes -> generated parallel adapters (bottleneck {cfg.pha.adapter_bottleneck}), "
                f"lambda={cfg.pha.loss_weight:g}")
    if method == "finetune":
        return ("full fine-tuning (FT-Few-Shot: Def+2Pos + query)" if cfg.data.main_input == "few_shot"
                else "full fine-tuning (FT-Zero-Shot: the query alone)")
    if method == "prefix_tuning":
        return f"Prefix-Tuning: one learned prefix for all tasks (p={cfg.prefix_tuning.prefix_length})"
    return f"LoRA: one adapter for all tasks (r={cfg.lora.rank}, {'/'.join(cfg.lora.target_modules)})"


def run_description(cfg: Config, train_dirs: Sequence[str | Path] = ()) -> str:
    """One line: the method and what distinguishes it, the model, the steps and the data."""
    data = ", ".join(Path(d).name if Path(d).name not in ("train", "test") else "/".join(Path(d).parts[-2:])
                     for d in (train_dirs or cfg.data.train)) or "none"
    return (f"{_method_line(cfg)}. Model {cfg.model.name}; {cfg.train.total_steps} steps, batch "
            f"{cfg.train.global_batch_size}; data {data}.")


def source_tags(command: Sequence[str] | None = None) -> dict[str, str]:
    """``mlflow.user``, ``mlflow.source.name`` (the program), ``mlflow.source.type`` (JOB under Slurm) and
    ``hypertrain.command`` (the whole command line).

    The UI shows the last ``/``-separated part of the source name, so a command line there reads as the tail of its
    last path argument (``hart run.experiment=...`` for ``run.dir=runs/hart ...``): the program goes there, relative
    to the working directory when it is under it, and the exact command into its own tag (and ``command.json``).
    """
    argv = list(sys.argv if command is None else command)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = os.environ.get("USER", "unknown")
    program = argv[0] if argv else "python"
    with contextlib.suppress(ValueError):  # outside the working directory: as given
        program = str(Path(program).resolve().relative_to(Path.cwd()))
    return {
        "mlflow.user": user,
        "mlflow.source.name": program,
        "mlflow.source.type": "JOB" if os.environ.get("SLURM_JOB_ID") else "LOCAL",
        "hypertrain.command": shlex.join(argv)[:8000],
    }


def used_params(cfg: Config) -> dict[str, Any]:
    """The config as a nested dict, with only the common sections and the method's own."""
    import dataclasses

    full = dataclasses.asdict(cfg)
    keep = {"method": full["method"], **{name: full[name] for name in COMMON_SECTIONS}}
    own = METHOD_SECTIONS.get(cfg.method)
    if own:
        keep[own] = full[own]
    return keep


def dataset_input(directory: str | Path, context: str) -> dict[str, Any]:
    """An MLflow dataset input for a prepared directory (see :meth:`hypertrain.tracking.Tracker.log_inputs`)."""
    directory = Path(directory)
    raw = (directory / "manifest.json").read_bytes()
    manifest = json.loads(raw)
    name = f"{manifest.get('source', 'data')}/{manifest.get('split', directory.name)}:{directory.name}"
    return {
        "name": name,
        "digest": hashlib.sha256(raw).hexdigest()[:16],
        "source": str(directory.resolve()),
        "context": context,
        "profile": {"episodes": manifest.get("num_samples"), "tasks": len(manifest.get("tasks", {})),
                    "source": manifest.get("source")},
    }


def dataset_inputs(train: Sequence[str | Path], evals: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The inputs of a run: its training directories and evaluation sets (an unreadable manifest is skipped with a
    warning: the run's own checks have read them already, and tracking never stops training)."""
    out = []
    for context, directories in (("training", train), ("eval", evals)):
        for directory in directories:
            path = Path(directory)
            path = path.parent if path.name == "manifest.json" else path
            try:
                out.append(dataset_input(path, context))
            except (OSError, ValueError) as err:
                log.warning("tracking: dataset %s not logged as an input: %s", path, err)
    return out


def runs_link(tracking_uri: str, experiment_id: str | None) -> str:
    """The URL of the experiment's runs table (for a local store, once ``mlflow ui`` serves it on port 5000)."""
    path = f"#/experiments/{experiment_id or '0'}/runs?workflowType=machine_learning"
    if tracking_uri.startswith(("http://", "https://")):
        from hypertrain.tracking import redact

        return f"{redact(tracking_uri).rstrip('/')}/{path}"
    return f"http://127.0.0.1:5000/{path}"


def compare_link(tracking_uri: str, experiment_ids: Sequence[str], run_ids: Sequence[str]) -> str:
    """The URL of MLflow's compare view for ``run_ids``."""
    from urllib.parse import quote

    base = runs_link(tracking_uri, None).split("#", 1)[0]
    return (f"{base}#/compare-runs?runs={quote(json.dumps(list(run_ids)), safe='')}"
            f"&experiments={quote(json.dumps(list(experiment_ids)), safe='')}")


def runs_link_hint(tracking_uri: str, experiment_id: str | None) -> str:
    """A line to print: the runs-table link, and for a local store the ``mlflow ui`` command that serves it."""
    link = runs_link(tracking_uri, experiment_id)
    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow runs: {link}"
    return f"MLflow runs: mlflow ui --backend-store-uri {tracking_uri}   then open {link}"
