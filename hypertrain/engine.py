"""The training loop: DeepSpeed engine, 8-bit Adam, streamed episodes, checkpoints, signals, MLflow.

The engine knows nothing method-specific: ``build_method(config)`` gives an ``nn.Module`` whose forward maps a
batch to a :class:`~hypertrain.models.base.MethodOutput`; the engine backpropagates ``loss`` and logs ``parts``.
A method may expose ``checkpoint_tensors() -> dict`` and ``load_checkpoint_tensors(dict)`` for state that is not
a parameter but must survive a restart (HART's consistency reference).

Exactness: a resumed run sees exactly the batches an uninterrupted run would have seen (the data position is part
of the checkpoint, see :mod:`hypertrain.data.stream`), with the same RNG states and optimizer state, so on CPU its
per-step losses are bitwise those of the uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import resource
import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from data_prep.shards import ShardError
from hypertrain.checkpoint import (
    CheckpointError,
    Checkpoints,
    read_state,
    restore_rng_state,
    rng_state_tensors,
)
from hypertrain.config import Config, ConfigError, flatten
from hypertrain.data.collate import EpisodeCollator
from hypertrain.data.loader import EpisodeBatches, build_loader
from hypertrain.data.stream import check_shards, load_source, task_list
from hypertrain.ds_config import zero_stage
from hypertrain.evaluation.runner import evaluate_in_training
from hypertrain.flops import peak_flops
from hypertrain.metric_names import VERSION as METRIC_NAMES_VERSION
from hypertrain.metric_names import VERSION_TAG as METRIC_NAMES_TAG
from hypertrain.metric_names import sectioned, sectioned_row
from hypertrain.run_record import (
    EXPERIMENT_DESCRIPTION,
    dataset_inputs,
    run_description,
    runs_link_hint,
    source_tags,
    used_params,
)
from hypertrain.stop import STOP_FILE, clear_stop, stop_requested
from hypertrain.tracking import window_metrics

log = logging.getLogger("hypertrain")
METRICS_FILE = "metrics.jsonl"


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses in a row); a checkpoint was written first."""


class StopRequest:
    """Remembers SIGTERM/SIGUSR1 (Slurm's warning before preemption or the time limit) until the next step."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signal_name: str | None = None
        for sig in self.SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name


def device_for_rank(local_rank: int) -> torch.device:
    """This rank's GPU; on CPU, share the cores among the node's ranks (unless OMP_NUM_THREADS says otherwise),
    since oversubscribed intra-op threads spin and slow every rank down."""
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if "OMP_NUM_THREADS" not in os.environ:
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_ranks))
    return torch.device("cpu")


def linear_schedule(warmup: int, total: int, kind: str):
    """LR multiplier: linear warm-up, then linear decay to 0 at ``total`` (``constant``: flat after warm-up)."""

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        return max(0.0, (total - step) / max(1, total - warmup))

    return factor


def make_optimizer(name: str, params: list[torch.nn.Parameter], lr: float, weight_decay: float):
    """bitsandbytes 8-bit AdamW (default) or torch AdamW, over the trainable parameters only."""
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)


def enable_activation_checkpointing(method: torch.nn.Module, which: str) -> None:
    """Recompute activations in backward for the main model and/or the hypernetwork encoder."""
    if which == "none":
        return
    targets = {"main": ["main.t5"], "hypernetwork": ["hyper_encoder"], "both": ["main.t5", "hyper_encoder"]}[which]
    for dotted in targets:
        module: Any = method
        for part in dotted.split("."):
            module = getattr(module, part, None)
        if module is None or not hasattr(module, "gradient_checkpointing_enable"):
            raise ConfigError(f"train.activation_checkpointing: this method has no {dotted} to checkpoint")
        kwargs = {"use_reentrant": False}
        if hasattr(module, "activation_checkpointing_enable"):  # newer transformers 5.x; the old name warns
            module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def keep_metrics_through(path: Path, step: int) -> None:
    """Drop the rows after ``step`` from ``metrics.jsonl`` (written before a crash; the resumed run computes those
    steps again), so that every step appears once."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a crash mid-write
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Trainer:
    """One rank's training run (every rank of a job builds one)."""

    def __init__(self, cfg: Config, ds_config: dict[str, Any]) -> None:
        self.cfg = cfg
        self.ds_config = ds_config
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = device_for_rank(self.local_rank)
        self.run_dir = Path(cfg.run.dir)
        self.stop = StopRequest()

    # set-up -------------------------------------------------------------------------------------------
    def _sources(self):
        if not self.cfg.data.train:
            raise ConfigError("data.train: no training data (list prepared directories holding manifest.json)")
        weights = self.cfg.data.weights or [1.0] * len(self.cfg.data.train)
        return [load_source(path, weight) for path, weight in zip(self.cfg.data.train, weights, strict=True)]

    def _init_source(self):
        """``train.init_from`` resolved and verified by rank 0, shared with every rank (collective)."""
        from hypertrain.init_from import resolve_init_source

        decision: list[Any] = [None, None]  # source, error
        if self.rank == 0:
            try:
                decision[0] = resolve_init_source(self.cfg)
            except ConfigError as err:
                decision[1] = str(err)
        dist.broadcast_object_list(decision, src=0)
        if decision[1]:
            raise ConfigError(decision[1])
        return decision[0]

    def _build(self, tasks: list[str], init=None):
        import deepspeed

        from hypertrain.models.build import build_method
        from hypertrain.models.registry import load_tokenizer

        cfg = self.cfg
        ds_cfg = self.ds_config
        micro, accumulation = ds_cfg["train_micro_batch_size_per_gpu"], ds_cfg["gradient_accumulation_steps"]
        if micro * accumulation * self.world_size != ds_cfg["train_batch_size"]:
            raise ConfigError(
                f"the DeepSpeed config was resolved for another world size: train_batch_size "
                f"{ds_cfg['train_batch_size']} != micro {micro} x accumulation {accumulation} x world {self.world_size}"
            )
        if cfg.method == "pha" and not cfg.pha.tasks:
            cfg.pha.tasks = list(tasks)
        self._hf_ds_config = None
        if zero_stage(ds_cfg) == 3:
            # Partition the pretrained weights while they load (keep the reference alive for transformers).
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(ds_cfg)
        torch.manual_seed(cfg.train.seed)
        method = build_method(cfg, self.device)
        if init is not None:
            from hypertrain.init_from import load_initial_weights

            count = load_initial_weights(method, init, self.rank)
            if self.rank == 0:
                log.info("started %d trainable tensors from %s (%s); optimizer and step start fresh", count, init.path,
                         init.method)
        enable_activation_checkpointing(method, cfg.train.activation_checkpointing)
        params = [p for p in method.parameters() if p.requires_grad]
        optimizer = make_optimizer(cfg.train.optimizer, params, cfg.train.lr, cfg.train.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, linear_schedule(cfg.train.warmup_steps, cfg.train.total_steps, cfg.train.schedule)
        )
        engine, optimizer, _, schedule = deepspeed.initialize(
            model=method, optimizer=optimizer, lr_scheduler=schedule, model_parameters=params, config=ds_cfg
        )
        tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.name)
        self.trainable_parameters = sum(p.numel() for p in params)
        return engine, schedule, tokenizer

    def _tracker(self, run_id: str | None, start_step: int):
        from hypertrain.tracking import Tracker, backfill_rows, read_run_id

        run = self.cfg.run

        def backfill(after: int) -> list[tuple[int, dict[str, float]]]:
            rows = backfill_rows(self.run_dir / METRICS_FILE, after, start_step, run.log_every, self.cfg.train.total_steps)
            return [(at, sectioned_row(row)) for at, row in rows]

        return Tracker(
            self.run_dir,
            enabled=self.rank == 0,
            experiment=run.experiment,
            run_name=run.name or self.run_dir.name,
            run_id=run_id or (read_run_id(self.run_dir) if self.rank == 0 else None),
            backfill=backfill,
            experiment_description=EXPERIMENT_DESCRIPTION,
            progress_metric=sectioned("loss"),
        )

    def _check_shards(self, sources) -> None:
        """Every shard against its manifest before anything is built; the ranks share the work (collective)."""
        mode = self.cfg.data.verify_shards
        started = time.perf_counter()
        problems = check_shards(sources, mode, part=self.rank, parts=self.world_size)
        gathered: list[list[str] | None] = [None] * self.world_size
        dist.all_gather_object(gathered, problems)
        problems = sorted(p for part in gathered for p in part or [])
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise ShardError("; ".join(problems[:3]) + more + " — data.verify_shards=none skips this check")
        if self.rank == 0 and mode != "none":
            count = sum(len(s.shards) for s in sources)
            log.info("checked %d shards against their manifests (%s) in %.1f s", count, mode,
                     time.perf_counter() - started)

    def _resume_point(self, checkpoints: Checkpoints) -> tuple[Path | None, str | None]:
        """Where this run starts, decided by rank 0 and shared (collective): a checkpoint and, when it is not the one
        ``latest`` names, why; ``(None, None)`` for step 0. Applies ``run.resume``'s rules (``never`` refuses a run
        directory that holds checkpoints, ``restart`` sets them aside)."""
        decision: list[Any] = [None, None, None]  # path, note, error
        if self.rank == 0:
            try:
                decision[:2] = self._decide_resume(checkpoints)
            except (CheckpointError, ConfigError) as err:
                decision[2] = str(err)
        dist.broadcast_object_list(decision, src=0)
        path, note, error = decision
        if error:
            raise CheckpointError(error)
        return (Path(path) if path else None), note

    def _decide_resume(self, checkpoints: Checkpoints) -> tuple[str | None, str | None]:
        mode = self.cfg.run.resume
        existing = checkpoints.complete()
        if mode == "restart":
            self._set_aside()
            return None, None
        if mode == "never":
            if existing or (checkpoints.root / "latest").exists():
                newest = existing[-1].name if existing else "a latest pointer"
                raise ConfigError(
                    f"run.resume=never: {self.run_dir} already holds checkpoints (newest {newest}); continue them "
                    "with run.resume=auto, set them aside with run.resume=restart, or choose another run.dir"
                )
            return None, None
        path, note = checkpoints.resume_point()
        return (str(path) if path else None), note

    def _set_aside(self) -> None:
        """``run.resume=restart``: move the previous attempt's checkpoints, metrics and run id out of the way."""
        from hypertrain.tracking import RUN_ID_FILE

        moved = [self.run_dir / name for name in ("checkpoints", METRICS_FILE, RUN_ID_FILE)]
        moved = [path for path in moved if path.exists()]
        if not moved:
            return
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = self.run_dir / "previous" / stamp
        target.mkdir(parents=True, exist_ok=False)
        for path in moved:
            os.replace(path, target / path.name)
        log.info("run.resume=restart: moved %s to %s", ", ".join(p.name for p in moved), target)

    # the loop -------------------------------------------------------------------------------------------
    def train(self) -> int:
        cfg = self.cfg
        if self.rank == 0 and stop_requested(self.run_dir):  # a request made while this job was building counts
            log.warning("ignoring %s, left from before this job started", self.run_dir / STOP_FILE)
            clear_stop(self.run_dir)
        sources = self._sources()
        self._check_shards(sources)
        tasks = task_list(sources)
        checkpoints = Checkpoints(self.run_dir, rank=self.rank, keep_last=cfg.run.keep_last, barrier=dist.barrier,
                                  verify=cfg.run.checkpoint_verify)
        resume_from, fallback = self._resume_point(checkpoints)
        if resume_from is not None:
            if fallback and self.rank == 0:
                log.warning("%s", fallback)
            saved = read_state(resume_from)
            if saved["tasks"] != tasks:
                raise ConfigError(
                    f"{resume_from}: the checkpoint was trained on {len(saved['tasks'])} tasks, data.train now "
                    f"lists {len(tasks)}; a resumed run must read the same data (task ids index the task list)"
                )
            if saved["world_size"] != self.world_size:
                raise ConfigError(
                    f"{resume_from} was written by {saved['world_size']} ranks, this job has {self.world_size}: the "
                    "data position and the 8-bit optimizer state are per rank; resume on the same number of GPUs "
                    "or start a new run.dir"
                )
        init = self._init_source() if cfg.train.init_from and resume_from is None else None
        engine, schedule, tokenizer = self._build(tasks, init)
        ds_cfg = self.ds_config
        method = engine.module

        step, batches_done, run_id, nonfinite_total, train_time = 0, 0, None, 0, 0.0
        if resume_from is not None:
            state, tensors = checkpoints.load(engine, resume_from)
            step, batches_done, run_id = state["step"], state["batches_consumed"], state.get("mlflow_run_id")
            nonfinite_total = state.get("nonfinite_steps", 0)
            train_time = state.get("train_time_s", 0.0)
            if hasattr(method, "load_checkpoint_tensors"):
                prefix = "method."
                method.load_checkpoint_tensors({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
            if self.rank == 0:
                log.info("resumed from %s at step %d (%d batches consumed per rank)", resume_from, step, batches_done)

        metrics_file = self.run_dir / METRICS_FILE
        if self.rank == 0:
            keep_metrics_through(metrics_file, step)  # steps after the checkpoint are computed (and logged) again
        tracker = self._tracker(run_id, step)
        params = flatten(used_params(cfg))  # the common sections and the method's own
        params["model.trainable_parameters"] = self.trainable_parameters
        tags = self._tags(sources)
        tags.update(source_tags())
        tags[METRIC_NAMES_TAG] = METRIC_NAMES_VERSION
        tags["mlflow.note.content"] = run_description(cfg, [s.directory for s in sources])
        if init is not None:
            tags.update(init.tags())
        if fallback:
            tags["hypertrain.resume_fallback"] = f"step {step}: {fallback}"
        # On resume the tracker adds only missing params and records changed values as an artifact.
        tracker.start(params=params, tags=tags)
        system = None
        if self.rank == 0:
            log.info("%s", runs_link_hint(tracker.tracking_uri, tracker.experiment_id))
            if cfg.run.system_metrics_interval > 0:
                from hypertrain.system_metrics import SystemMetrics

                system = SystemMetrics(lambda values, at: tracker.log_metrics(values, step=at), lambda: step,
                                       cfg.run.system_metrics_interval).start()
        if self.rank == 0 and resume_from is None:
            tracker.log_dict(ds_cfg, "deepspeed_config.json")
            tracker.log_dict(dataclasses.asdict(cfg), "config.yaml")
            tracker.log_dict({"argv": sys.argv, "command": shlex.join(sys.argv), "cwd": os.getcwd()}, "command.json")
            for source in sources:
                tracker.log_artifact(source.directory / "manifest.json", f"manifests/{source.directory.name}")
            tracker.log_inputs(dataset_inputs([s.directory for s in sources], cfg.eval.data))

        collate = EpisodeCollator(
            tokenizer,
            {task: index for index, task in enumerate(tasks)},
            cfg.data.max_input_tokens,
            cfg.data.max_target_tokens,
            cfg.data.max_hyper_input_tokens,
            cfg.data.pad_to_max,
            main_input_mode=cfg.data.main_input,
            with_hyper=getattr(method, "needs_hyper_input", True),
        )
        dataset = EpisodeBatches(
            sources,
            collate,
            rank=self.rank,
            world_size=self.world_size,
            num_workers=cfg.data.num_workers,
            micro_batch_size=cfg.train.micro_batch_size,
            seed=cfg.train.seed,
            shuffle_buffer=cfg.data.shuffle_buffer,
            start_batch=batches_done,
        )
        batches = iter(build_loader(dataset, pin_memory=self.device.type == "cuda"))  # draws from torch's RNG
        if resume_from is not None:
            restore_rng_state(tensors)  # last: nothing may draw from the RNGs between here and the first step
        accumulation = ds_cfg["gradient_accumulation_steps"]

        def save(reason: str, promote: bool = True) -> Path:
            state = {
                "step": step,
                "batches_consumed": batches_done,
                "tasks": tasks,
                "mlflow_run_id": tracker.run_id,
                "world_size": self.world_size,
                "nonfinite_steps": nonfinite_total,
                "train_time_s": train_time,
                "reason": reason,
                "config": dataclasses.asdict(cfg),
            }
            tensors = rng_state_tensors()
            if hasattr(method, "checkpoint_tensors"):
                tensors.update({f"method.{k}": v for k, v in method.checkpoint_tensors().items()})
            path = checkpoints.save(engine, step, state, tensors, promote=promote)
            if self.rank == 0:
                log.info("checkpoint %s (%s)%s", path, reason, "" if promote else "; latest still names the last good one")
            return path

        sample_flops = SampleFlops(cfg)
        peak = peak_flops(torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None,
                          cfg.run.peak_flops)
        window: list[dict[str, float]] = []
        nonfinite_in_row = 0
        status, exit_code = "FINISHED", 0
        method.train()
        try:
            while step < cfg.train.total_steps:
                step_start = time.perf_counter()
                data_wait = 0.0
                totals = torch.zeros(4, dtype=torch.float64)  # loss sum, micro-batches, tokens, model FLOPs
                parts: dict[str, float] = {}
                good = 0
                while good < accumulation:
                    fetch_start = time.perf_counter()
                    batch = {k: v.to(self.device, non_blocking=True) for k, v in next(batches).items()}
                    data_wait += time.perf_counter() - fetch_start
                    batches_done += 1
                    out = engine(batch)
                    finite = bool(torch.isfinite(out.loss.detach()).item())
                    asked = self.stop.signal_name or (self.rank == 0 and stop_requested(self.run_dir))
                    flags = torch.tensor([0.0 if finite else 1.0, 1.0 if asked else 0.0])
                    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
                    if flags[0] > 0:  # some rank got NaN/inf: every rank skips this micro-batch
                        nonfinite_in_row += 1
                        nonfinite_total += 1
                        if nonfinite_in_row >= cfg.train.max_nonfinite_in_row:
                            save("non-finite losses", promote=False)
                            raise TrainingError(
                                f"{nonfinite_in_row} non-finite losses in a row at step {step}; stopped with a "
                                "checkpoint (lower train.lr, check the data, or use float32)"
                            )
                        continue
                    nonfinite_in_row = 0
                    engine.backward(out.loss)
                    engine.step()
                    good += 1
                    tokens = batch["attention_mask"].sum() + (batch["labels"] >= 0).sum() + batch["hyper_attention_mask"].sum()
                    totals += torch.tensor(
                        [float(out.loss.detach()), 1.0, float(tokens), sample_flops.of_batch(batch)],
                        dtype=torch.float64,
                    )
                    for name, value in out.parts.items():
                        parts[name] = parts.get(name, 0.0) + float(value)
                step += 1
                step_time = time.perf_counter() - step_start
                train_time += step_time
                summed = torch.cat([totals, torch.tensor([parts[k] for k in sorted(parts)], dtype=torch.float64)])
                dist.all_reduce(summed)
                micro = summed[1].item()
                row = {
                    "loss": summed[0].item() / micro,
                    **{f"loss/{k}": summed[4 + i].item() / micro for i, k in enumerate(sorted(parts))},
                    "lr": schedule.get_last_lr()[0],
                    "grad_norm": _grad_norm(engine),
                    "skipped_steps": float(engine.skipped_steps),
                    "nonfinite_steps": float(nonfinite_total),
                    "samples_per_s": cfg.train.global_batch_size / step_time,
                    "tokens_per_s": summed[2].item() / step_time,
                    "step_time_s": step_time,
                    "samples_total": float(step * cfg.train.global_batch_size),
                    "train_time_s": train_time,
                    "tflops_per_s": summed[3].item() / step_time / 1e12,
                    "data_wait_s": data_wait,
                    "memory_mb": peak_memory_mb(self.device),
                }
                if peak:
                    row["mfu"] = summed[3].item() / step_time / (self.world_size * peak)
                if self.rank == 0:
                    with open(metrics_file, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps({"step": step, **row}) + "\n")
                    window.append(row)
                    if step % cfg.run.log_every == 0 or step == cfg.train.total_steps:
                        logged = window_metrics(window)
                        tracker.log_metrics(sectioned_row(logged), step=step)
                        log.info("step %d loss %.4f (mean of the last %d steps) lr %.2e %.1f samples/s", step,
                                 logged["loss"], len(window), row["lr"], logged["samples_total"] / logged["train_time_s"])
                        window = []
                if self.stop.signal_name or flags[1] > 0:
                    requested = self.rank == 0 and stop_requested(self.run_dir)
                    if self.stop.signal_name:
                        reason = f"signal {self.stop.signal_name}"
                    else:  # rank 0 writes the state: its own view, or another rank's signal
                        reason = "stop request" if requested else "signal on another rank"
                    save(reason)
                    if requested:
                        clear_stop(self.run_dir)
                    status = "KILLED"
                    if self.rank == 0:
                        log.info("stopping at step %d on request; resume with the same command", step)
                    break
                if step % cfg.run.checkpoint_every == 0 and step < cfg.train.total_steps:
                    save("periodic")
                # collective, a no-op unless due (eval.every, last step); keeps RNG streams and train mode
                evaluate_in_training(method, cfg, tokenizer, step, tracker, self.rank, self.world_size, self.device)
            else:
                save("end of training")
        except TrainingError as err:
            status, exit_code = "FAILED", 3
            if self.rank == 0:
                log.error("%s", err)
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        except BaseException:  # a crash (bad shard, OOM, a bug): never reported as FINISHED
            status = "FAILED"
            raise
        finally:
            if system is not None:
                system.stop()
            tracker.close(status=status, timeout=cfg.run.tracking_flush_timeout)
        return exit_code

    def _tags(self, sources) -> dict[str, str]:
        from hypertrain.tracking import default_tags

        return default_tags(
            method=self.cfg.method,
            model=self.cfg.model.name,
            datasets=[str(s.directory) for s in sources],
            world_size=self.world_size,
        )


class SampleFlops:
    """Model FLOPs of a micro-batch at its padded lengths (what the hardware computes), cached per shape."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.cache: dict[tuple[int, int, int], float] = {}

    def of_batch(self, batch: dict[str, torch.Tensor]) -> float:
        from hypertrain.flops import flops_per_sample

        key = (batch["input_ids"].shape[1], batch["labels"].shape[1], batch["hyper_input_ids"].shape[1])
        if key not in self.cache:
            self.cache[key] = flops_per_sample(self.cfg, input_tokens=key[0], target_tokens=key[1], hyper_tokens=key[2])
        return self.cache[key] * batch["input_ids"].shape[0]


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    value = float(norm)
    return value if math.isfinite(value) else float("nan")
