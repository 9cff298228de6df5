"""``hypertrain demo``: the whole pipeline on a laptop in minutes — tasks, prep, training, evaluation, comparison.

    hypertrain demo                                   # tiny HART, HyperTuning and PHA on CPU, ~300 steps each
    hypertrain demo --steps 20 --methods hart,pha --train-tasks 8 --test-tasks 2   # the smoke test's size
    hypertrain demo --device cuda --size small --steps 2000                      # pretrained T5-small on a GPU

1. generates the demonstration tasks (:mod:`data_prep.demo`: string edits, arithmetic, classification by rule,
   word lists; held-out test tasks) in the S-NI layout under ``OUT/tasks``;
2. runs the real S-NI prep on them (``OUT/data/train``, ``OUT/data/test``);
3. trains each method with ``python -m hypertrain.main`` (one process; ``OUT/runs/<method>``, log in
   ``OUT/logs/<method>.log``), evaluating on the held-out tasks at the last step (S-NI ROUGE-L / exact match,
   overall and per task family), all logged to one MLflow store ``OUT/mlflow.db`` (experiment ``demo``);
4. prints the comparison table (:mod:`hypertrain.compare`) and writes its plots to ``OUT/compare``.

``tiny`` is the registry's random-weight T5 (d_model 64, byte vocabulary): it shows the machinery, not good
scores. Other sizes (``small``, ``base``, ...) load the pretrained T5 v1.1 LM-adapted weights from the hub.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("hart", "hypertuning", "pha")
EXPERIMENT = "demo"


class DemoError(RuntimeError):
    """A demo stage failed; the message names the stage and the log to read."""


@dataclasses.dataclass
class DemoOptions:
    """``hypertrain demo``'s options (defaults: the CPU demo, about 10 minutes on 2 cores)."""

    out: str = "runs/demo"
    steps: int = 300
    size: str = "tiny"
    device: str = "cpu"
    methods: tuple[str, ...] = METHODS
    train_tasks: int = 0
    """Training tasks (0: all 34 of :mod:`data_prep.demo`)."""
    test_tasks: int = 0
    """Held-out evaluation tasks (0: all 8)."""
    instances: int = 100
    """Instances per task."""
    eval_examples: int = 20
    """Evaluated examples per held-out task."""
    batch_size: int = 16
    lr: float | None = None
    """``None``: 1e-3 for the random-weight ``tiny``, 1e-4 for pretrained sizes."""
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise DemoError(f"--methods: expected a comma-separated subset of {','.join(METHODS)}, got {','.join(self.methods)}")
        if self.device not in ("cpu", "cuda"):
            raise DemoError(f"--device: expected cpu or cuda, got {self.device!r}")
        for name in ("steps", "instances", "eval_examples", "batch_size"):
            if getattr(self, name) < 1:
                raise DemoError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        from hypertrain.models.registry import canonical_name

        if canonical_name(self.size) is None:
            raise DemoError(f"--size: unknown model {self.size!r} (tiny, small, base, large, xl, xxl)")
        if self.lr is None:
            self.lr = 1e-3 if self.size == "tiny" else 1e-4


def _print(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


def make_data(opts: DemoOptions, out: Path) -> tuple[Path, Path]:
    """Generate the tasks and run the S-NI prep on both splits; returns (train dir, test dir)."""
    from data_prep.demo import DemoTasksConfig, generate
    from data_prep.runner import PrepError
    from data_prep.sni import prepare
    from hypertrain.config import SNIPrepConfig

    src = out / "tasks"
    train, test = generate(DemoTasksConfig(out=str(src), seed=opts.seed, instances_per_task=opts.instances,
                                           num_train_tasks=opts.train_tasks, num_test_tasks=opts.test_tasks))
    _print(f"[1/4] {len(train)} training and {len(test)} held-out tasks written to {src} (S-NI layout)")
    dirs = (out / "data" / "train", out / "data" / "test")
    for split, directory in zip(("train", "test"), dirs, strict=True):
        try:
            manifest = prepare(SNIPrepConfig(src=str(src), out=str(directory), split=split,
                                             max_instances_per_task=opts.instances, seed=opts.seed))
        except PrepError as err:
            raise DemoError(f"S-NI prep of the demo tasks ({split}) failed: {err}") from err
        _print(f"[2/4] S-NI prep ({split}): {manifest['num_samples']} episodes of {len(manifest['tasks'])} tasks in {directory}")
    return dirs


def config_for(method: str, size: str) -> tuple[str, list[str]]:
    """The experiment file and overrides that make ``method`` at ``size``."""
    if size == "tiny":
        base = "configs/pha_tiny.yaml" if method == "pha" else "configs/hart_tiny.yaml"
        overrides = []
    else:
        base = f"configs/{method}_t5xl.yaml"
        overrides = [f"model.name={size}"]
    if method == "hypertuning":
        overrides += ["method=hypertuning", "hart.generator=parallel", "hart.alpha=0.0"]
    return base, overrides


def write_ds_config(out: Path) -> Path:
    """ZeRO-2 with fixed 50M-element buckets: the ``auto`` size (d_model², 4096 for ``tiny``) would flush a bucket
    every few thousand gradients, which makes a tiny HART step on CPU about 20x slower."""
    config = json.loads((REPO / "ds_configs" / "zero2.json").read_text(encoding="utf-8"))
    config["zero_optimization"].update(reduce_bucket_size=50_000_000, allgather_bucket_size=50_000_000)
    path = out / "ds_config.json"
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return path


def training_command(opts: DemoOptions, method: str, train: Path, test: Path, run_dir: Path, ds_config: Path) -> list[str]:
    config, overrides = config_for(method, opts.size)
    micro = min(opts.batch_size, 16)
    return [
        sys.executable, "-m", "hypertrain.main", "--config", config, "--ds_config", str(ds_config),
        *overrides,
        f"data.train=[{train}]", f"eval.data=[{test}]", f"run.dir={run_dir}", f"run.experiment={EXPERIMENT}",
        f"run.name={method}", "run.resume=never", f"run.checkpoint_every={opts.steps}", "run.keep_last=1",
        f"run.log_every={max(1, min(10, opts.steps // 20))}",
        f"train.total_steps={opts.steps}", f"train.warmup_steps={min(opts.steps // 10, 30)}",
        f"train.global_batch_size={opts.batch_size}", f"train.micro_batch_size={micro if opts.batch_size % micro == 0 else opts.batch_size}",
        f"train.lr={opts.lr}", "train.optimizer=adamw", f"train.seed={opts.seed}",
        "data.max_input_tokens=64", "data.max_target_tokens=48", "data.max_hyper_input_tokens=256",
        "data.num_workers=1", "data.shuffle_buffer=500",
        f"eval.max_examples_per_task={opts.eval_examples}", "eval.max_new_tokens=48", "eval.batch_size=32",
    ]


def _steps_done(metrics_file: Path) -> int:
    try:
        lines = metrics_file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError):
            continue  # a line being written
    return 0


def _tail(path: Path, lines: int = 25) -> str:
    text = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []
    return "\n".join(line for line in text[-lines:])


def train_method(opts: DemoOptions, method: str, train: Path, test: Path, out: Path, tracking_uri: str) -> float:
    """Train and evaluate one method in a child process with a progress bar; returns the seconds it took."""
    from tqdm import tqdm

    run_dir, log_path = out / "runs" / method, out / "logs" / f"{method}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if opts.device == "cpu":
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    command = training_command(opts, method, train, test, run_dir, out / "ds_config.json")
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log, tqdm(total=opts.steps, desc=f"{method:>11}", unit="step",
                                                            file=sys.stderr, dynamic_ncols=True) as bar:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        phase = "starting"
        bar.set_postfix_str(phase)
        try:
            while process.poll() is None:
                done = _steps_done(run_dir / "metrics.jsonl")
                if done > bar.n:
                    bar.update(done - bar.n)
                new_phase = "training" if 0 < done < opts.steps else ("evaluating" if done >= opts.steps else "starting")
                if new_phase != phase:
                    phase = new_phase
                    bar.set_postfix_str(phase)
                time.sleep(0.5)
        except BaseException:  # Ctrl-C or SIGTERM: stop the trainer too (it checkpoints on SIGTERM)
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
        bar.update(_steps_done(run_dir / "metrics.jsonl") - bar.n)
        bar.set_postfix_str("done" if process.returncode == 0 else f"failed ({process.returncode})")
    if process.returncode != 0:
        raise DemoError(f"training {method} failed with exit code {process.returncode}; log {log_path}:\n{_tail(log_path)}")
    return time.monotonic() - start


def run_demo(opts: DemoOptions) -> int:
    from hypertrain.compare import compare

    out = Path(opts.out).resolve()
    if (out / "runs").exists() or (out / "mlflow.db").exists():
        raise DemoError(f"{out} already holds a demo (runs/ or mlflow.db); pass another --out or remove it")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    train, test = make_data(opts, out)
    tracking_uri = f"sqlite:///{out / 'mlflow.db'}"
    write_ds_config(out)
    _print(f"[3/4] training {', '.join(opts.methods)} ({opts.size}, {opts.steps} steps, batch {opts.batch_size}, "
           f"{opts.device}); logs in {out / 'logs'}")
    for method in opts.methods:
        seconds = train_method(opts, method, train, test, out, tracking_uri)
        _print(f"      {method}: trained and evaluated in {seconds:.0f} s")
    _print("[4/4] comparison (from MLflow)")
    table, files = compare(tracking_uri, EXPERIMENT, out=out / "compare")
    _print("")
    _print(table)
    _print("")
    held_out = len(json.loads((test / "manifest.json").read_text(encoding="utf-8"))["tasks"])
    _print(f"eval columns: S-NI ROUGE-L / exact match on the {held_out} held-out tasks (first {opts.eval_examples} "
           "examples each), overall and per task family")
    _print(f"plots:     {files['loss']}\n           {files['eval']}\n           {files['throughput']}")
    _print(f"table:     {files['table']}")
    _print(f"MLflow UI: mlflow ui --backend-store-uri {tracking_uri}   (then open http://127.0.0.1:5000)")
    _print(f"compare again: hypertrain compare --tracking-uri {out / 'mlflow.db'} --experiment {EXPERIMENT} --out DIR")
    _print(f"demo finished in {time.monotonic() - started:.0f} s")
    return 0


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    defaults = DemoOptions()
    parser = subparsers.add_parser("demo", help="tasks → prep → train HART/HyperTuning/PHA → eval → comparison, on CPU",
                                   description="Generate demonstration tasks, prep them, train HART/HyperTuning/PHA, evaluate on held-out tasks and compare the runs.")
    add = parser.add_argument
    add("--out", default=defaults.out, help="demo directory (must not hold a demo yet; default: %(default)s)")
    add("--steps", type=int, default=defaults.steps, help="training steps per method (default: %(default)s)")
    add("--size", default=defaults.size, help="model: tiny (random weights) or a registry name such as small, base "
        "(pretrained, downloaded; use with --device cuda) (default: %(default)s)")
    add("--device", choices=["cpu", "cuda"], default=defaults.device, help="default: %(default)s")
    add("--methods", default=",".join(defaults.methods), help="comma-separated methods (default: %(default)s)")
    add("--train-tasks", type=int, default=0, help="training tasks (default: all 34)")
    add("--test-tasks", type=int, default=0, help="held-out tasks (default: all 8)")
    add("--instances", type=int, default=defaults.instances, help="instances per task (default: %(default)s)")
    add("--eval-examples", type=int, default=defaults.eval_examples,
        help="evaluated examples per held-out task (default: %(default)s)")
    add("--batch-size", type=int, default=defaults.batch_size, help="global batch size (default: %(default)s)")
    add("--lr", type=float, default=None, help="learning rate (default: 1e-3 for tiny, 1e-4 for pretrained sizes)")
    add("--seed", type=int, default=defaults.seed, help="task generator and training seed (default: %(default)s)")
    parser.set_defaults(func=_run)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so that the running trainer is stopped as well
    try:
        opts = DemoOptions(
            out=args.out, steps=args.steps, size=args.size, device=args.device,
            methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
            train_tasks=args.train_tasks, test_tasks=args.test_tasks, instances=args.instances,
            eval_examples=args.eval_examples, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
        )
        return run_demo(opts)
    except DemoError as err:
        print(f"demo: {err}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hypertrain")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["demo", *(argv if argv is not None else sys.argv[1:])])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
