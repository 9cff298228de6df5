"""``hypertrain eval --checkpoint DIR --data DIR... [--out DIR]``: evaluate a trained method on its own.

Loads an export, a checkpoint or a run directory's latest checkpoint (:func:`hypertrain.export.load_trained_method`,
no DeepSpeed), or a Hugging Face T5 directory evaluated as it is (no PEFT: the floor a method must beat), evaluates
it on prepared S-NI / P3 evaluation directories and writes ``metrics.json``, ``<set>_predictions.jsonl`` and
``<set>_tasks.csv`` to ``--out``; with ``--tracking-uri`` (or ``$MLFLOW_TRACKING_URI``) the metrics and files also
go to MLflow at the checkpoint's step. Under ``torchrun``
(``WORLD_SIZE`` > 1) the ranks share the work exactly as in training.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from hypertrain.config import ConfigError
from hypertrain.metric_names import VERSION as METRIC_NAMES_VERSION
from hypertrain.metric_names import VERSION_TAG as METRIC_NAMES_TAG

if TYPE_CHECKING:
    import torch

OPTIONS = ("batch_size", "max_new_tokens", "num_beams", "max_examples_per_task", "retrieval_instances")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval", help="evaluate a checkpoint: S-NI exact match / ROUGE-L, P3 rank-classification accuracy",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    parser.add_argument("--checkpoint", required=True,
                        help="export, checkpoint or run directory; or a Hugging Face T5 directory or a registered T5 "
                        "name such as small (evaluated as it is, without PEFT: the no-PEFT floor)")
    parser.add_argument("--data", nargs="+", metavar="DIR",
                        help="prepared evaluation directories or their manifest.json (default: the run's eval.data)")
    parser.add_argument("--out", help="output directory (default: eval/<checkpoint name>)")
    parser.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda when available")
    for name in OPTIONS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, dest=name, help=f"eval.{name} (default: the run's)")
    parser.add_argument("--main-input", choices=["query", "few_shot"],
                        help="data.main_input: what the main model reads (default: the run's; query on a fine-tuned "
                        "model without PEFT is the no-PEFT floor)")
    parser.add_argument("--step", type=int, help="step to log the metrics at (default: the checkpoint's)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI; none: no MLflow)")
    parser.add_argument("--experiment", help="MLflow experiment (default: the run's)")
    parser.add_argument("--run-id", help="log into this MLflow run (e.g. the training run) instead of a new one")
    parser.add_argument("--run-name", help="name of the new MLflow run (default: eval-<checkpoint name>)")
    parser.set_defaults(func=_run)


def _setup_distributed(kind: str) -> tuple[int, int, torch.device, bool]:
    """Join torchrun's process group when there is one; this rank's device."""
    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    created = False
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if kind == "cuda" else "gloo")
        created = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
        return rank, world_size, torch.device("cuda", local_rank), created
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
    return rank, world_size, torch.device("cpu"), created


def _checkpoint_step(path: Path) -> int:
    from hypertrain.checkpoint import STATE_FILE

    state = path / STATE_FILE
    return int(json.loads(state.read_text(encoding="utf-8"))["step"]) if state.is_file() else 0


def _run(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from hypertrain.checkpoint import STATE_FILE, CheckpointError
    from hypertrain.config import Config, ModelConfig
    from hypertrain.evaluation.data import EvalError
    from hypertrain.evaluation.runner import cached_eval_sets, evaluate, report
    from hypertrain.export import load_trained_method, resolve_checkpoint
    from hypertrain.models.build import build_method
    from hypertrain.models.registry import canonical_name, is_local_checkpoint, load_tokenizer

    kind = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rank, world_size, device, created = _setup_distributed(kind)
    tracker = None
    status = "FINISHED"
    try:
        plain_directory = is_local_checkpoint(args.checkpoint) and not (Path(args.checkpoint) / STATE_FILE).is_file()
        if plain_directory or (canonical_name(args.checkpoint) and not Path(args.checkpoint).exists()):
            source = Path(args.checkpoint)  # a Hugging Face directory or a registered T5: as it is, no PEFT
            cfg = Config(method="finetune", model=ModelConfig(name=str(source)))
            method = build_method(cfg, device).eval()
        else:
            source = resolve_checkpoint(args.checkpoint)
            method, cfg, _tasks = load_trained_method(source, device, verify="none")  # resolve_checkpoint verified it
        overrides = {name: getattr(args, name) for name in OPTIONS if getattr(args, name) is not None}
        if args.data:
            overrides["data"] = list(args.data)
        cfg.eval = dataclasses.replace(cfg.eval, **overrides)
        if args.main_input:
            cfg.data = dataclasses.replace(cfg.data, main_input=args.main_input)
        if not cfg.eval.data:
            raise EvalError("nothing to evaluate: give --data (the checkpoint's run has no eval.data)")
        sets = cached_eval_sets(cfg.eval.data, cfg.eval.max_examples_per_task)
        tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name)
        step = args.step if args.step is not None else _checkpoint_step(source)
        results = evaluate(method, cfg, tokenizer, device, rank, world_size, sets)
        if rank == 0:
            uri = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            out = Path(args.out or Path("eval") / source.name)
            if uri:
                from hypertrain.tracking import Tracker

                tracker = Tracker(out, tracking_uri=uri, experiment=args.experiment or cfg.run.experiment,
                                  run_name=args.run_name or f"eval-{source.name}", run_id=args.run_id)
                params = {} if args.run_id else {
                    "checkpoint": str(source), "method": cfg.method, "model.name": cfg.model.name,
                    "data.main_input": cfg.data.main_input,
                    **{f"eval.{k}": v for k, v in dataclasses.asdict(cfg.eval).items()},
                }
                tracker.start(params=params, tags={"hypertrain.kind": "eval", "method": cfg.method,
                                                   METRIC_NAMES_TAG: METRIC_NAMES_VERSION})
            report(results, tracker, step, out, f"eval/step-{step:08d}")
            for result in results:
                m = result.metrics
                headline = (f"rougeL {m['rougeL']:.2f}  exact_match {m['exact_match']:.2f}" if result.kind == "generation"
                            else f"accuracy {m['accuracy']:.2f}  dataset-median average {m['dataset_median_average']:.2f}")
                print(f"{result.name}: {headline}  ({m['num_examples']} examples)")
            print(f"wrote {out}")
        return 0
    except (ConfigError, EvalError, FileNotFoundError, CheckpointError) as err:
        status = "FAILED"
        print(f"hypertrain eval: {err}", file=sys.stderr)
        return 2
    except BaseException:
        status = "FAILED"
        raise
    finally:
        if tracker is not None:
            tracker.close(status=status)
        if created:
            dist.destroy_process_group()
