"""``hypertrain demo``: a small, real experiment on a laptop: tasks, prep, a trained main model, hypernetworks, scores.

    hypertrain demo                                   # the CPU demo: 7 min 37 s on a quiet 2-core machine
    hypertrain demo --steps 20 --main-steps 40 --methods hart,pha --train-tasks 8 --test-tasks 2   # the smoke test
    hypertrain demo --device cuda --size small --steps 2000                      # pretrained T5-small on a GPU

1. generates the demonstration tasks (:mod:`data_prep.demo`: string edits, arithmetic, classification by rule,
   word lists; 34 training and 8 held-out tasks) in the S-NI layout and runs the real S-NI prep: ``OUT/data/train``,
   ``OUT/data/test`` (the held-out tasks) and ``OUT/data/seen_tasks`` (new instances of the training tasks, inputs
   that no training instance has);
2. trains the main model: the random-weight ``tiny`` T5 is fully fine-tuned (``method: finetune``, FT-Zero-Shot)
   on the **training** tasks' bare queries for ``--main-steps`` and saved as a Hugging Face directory. The held-out
   tasks never enter this stage (nor any other training). The directory is cached under ``--cache`` by the options
   that made it, so a second demo with the same options skips this stage. Pretrained sizes (``--size small`` ...)
   have no such stage;
3. evaluates the main model alone on the bare queries: the **floor** every method must beat (``hypertrain eval`` of
   the directory);
4. trains FT-Few-Shot (all weights, from the main model, on Def+2Pos + query), HART, HyperTuning and PHA (over the
   frozen main model, their hypernetworks initialised from it) with ``python -m hypertrain.main`` (one process each;
   ``OUT/runs/<name>``, log in ``OUT/logs/<name>.log``), each evaluated on both sets (S-NI ROUGE-L / exact match,
   overall and per task family);
5. prints the comparison table from the MLflow store ``OUT/mlflow.db`` (experiment ``demo``) and writes its plots.

Measured on a quiet 2-core machine with the defaults: 457 s (7 min 37 s) in all, of which the main model's training
took 121 s (a second demo with the same options skips it). The table it printed is in the README.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from data_prep.demo import DemoTasksConfig

REPO = Path(__file__).resolve().parents[1]
METHODS = ("ft_few_shot", "hart", "hypertuning", "pha")
EXPERIMENT = "demo"
MAIN_STAGE_VERSION = 1
"""Part of the main-model cache key: bump it when the stage's recipe changes."""
FLOOR_RUN, FEW_SHOT_RUN = "floor (no PEFT)", "ft_few_shot"
STAGES = 6
TABLE_METRICS = ("eval/sni_test/rougeL", "eval/sni_test/exact_match", "eval/sni_seen_tasks/rougeL",
                 "eval/sni_test/rougeL/*")
"""The printed table's eval columns (MLflow has every metric: ``hypertrain compare --metric`` shows others)."""


class DemoError(RuntimeError):
    """A demo stage failed; the message names the stage and the log to read."""


def default_cache() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "hypertrain" / "demo-main-models")


@dataclasses.dataclass
class DemoOptions:
    """``hypertrain demo``'s options (defaults: the CPU demo, 7.6 minutes on 2 cores)."""

    out: str = "runs/demo"
    steps: int = 200
    """Training steps of every method (FT-Few-Shot, HART, HyperTuning, PHA)."""
    main_steps: int = 1000
    """Steps of the main model's FT-Zero-Shot training (``tiny`` only)."""
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
    """Methods' learning rate; ``None``: 1e-3 for ``tiny``, 1e-4 for pretrained sizes."""
    main_lr: float = 3e-3
    main_batch_size: int = 32
    seed: int = 0
    cache: str | None = dataclasses.field(default_factory=default_cache)
    """Where trained main models are kept (keyed by the options that made them); ``None``: no cache."""

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise DemoError(f"--methods: expected a comma-separated subset of {','.join(METHODS)}, got {','.join(self.methods)}")
        if self.device not in ("cpu", "cuda"):
            raise DemoError(f"--device: expected cpu or cuda, got {self.device!r}")
        for name in ("steps", "main_steps", "instances", "eval_examples", "batch_size", "main_batch_size"):
            if getattr(self, name) < 1:
                raise DemoError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        from hypertrain.models.registry import canonical_name

        if canonical_name(self.size) is None:
            raise DemoError(f"--size: unknown model {self.size!r} (tiny, small, base, large, xl, xxl)")
        if self.lr is None:
            self.lr = 1e-3 if self.size == "tiny" else 1e-4

    @property
    def trains_main_model(self) -> bool:
        """``tiny`` has no pretrained weights: the demo trains it; other sizes are pretrained T5s."""
        return self.size == "tiny"

    def main_model_key(self) -> str:
        """What the main model depends on: tasks, data, recipe (not ``out``, methods, ``steps`` or eval options)."""
        fields = {name: getattr(self, name) for name in ("main_steps", "size", "train_tasks", "test_tasks", "instances",
                                                          "main_lr", "main_batch_size", "seed")}
        text = json.dumps({"version": MAIN_STAGE_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _print(message: str) -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------


def make_data(opts: DemoOptions, out: Path) -> tuple[Path, list[Path]]:
    """Generate the tasks and run the S-NI prep; returns the training directory and the evaluation directories:
    the held-out tasks (``test``) and new instances of the training tasks (``seen_tasks``)."""
    from data_prep.demo import DemoTasksConfig, generate
    from data_prep.runner import PrepError
    from data_prep.sni import prepare
    from hypertrain.config import SNIPrepConfig

    src = out / "tasks"
    config = DemoTasksConfig(out=str(src), seed=opts.seed, instances_per_task=opts.instances,
                             num_train_tasks=opts.train_tasks, num_test_tasks=opts.test_tasks)
    train, test = generate(config)
    seen_src = new_instances_of(config, train, out / "seen_tasks", opts.eval_examples)
    jobs = [(src, "train", out / "data" / "train"), (src, "test", out / "data" / "test"),
            (seen_src, "test", out / "data" / "seen_tasks")]
    for source, split, directory in jobs:
        try:
            prepare(SNIPrepConfig(src=str(source), out=str(directory), split=split,
                                  max_instances_per_task=opts.instances, seed=opts.seed))
        except PrepError as err:
            raise DemoError(f"S-NI prep of the demo tasks ({directory.name}) failed: {err}") from err
    _print(f"[1/{STAGES}] {len(train)} training and {len(test)} held-out tasks ({opts.instances} instances each) in "
           f"{src} (S-NI layout), prepared into {out / 'data'}; evaluation: the held-out tasks (test) and new "
           "instances of the training tasks (seen_tasks)")
    return jobs[0][2], [jobs[1][2], jobs[2][2]]


def new_instances_of(config: DemoTasksConfig, tasks: Sequence[str], out: Path, count: int) -> Path:
    """The training tasks again, in the S-NI layout as test tasks, with ``count`` instances each drawn with another
    seed whose input no training instance of that task has: what a method learnt about telling the training tasks
    apart, on inputs it has not seen."""
    from data_prep.demo import DemoTasksConfig, generate

    short = tuple(name.removeprefix("demo_") for name in tasks)
    generate(DemoTasksConfig(out=str(out), seed=config.seed + 1, instances_per_task=max(4, 3 * count),
                             test_names=short))
    for name in tasks:
        trained = json.loads((Path(config.out) / "tasks" / f"{name}.json").read_text(encoding="utf-8"))
        seen = {instance["input"] for instance in trained["Instances"]}
        path = out / "tasks" / f"{name}.json"
        record = json.loads(path.read_text(encoding="utf-8"))
        record["Instances"] = [i for i in record["Instances"] if i["input"] not in seen][:count]
        path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return out


def config_for(method: str, size: str) -> tuple[str, list[str]]:
    """The experiment file and overrides that make ``method`` at ``size``."""
    if method in ("finetune", "ft_few_shot"):
        overrides = ["method=finetune", f"data.main_input={'few_shot' if method == 'ft_few_shot' else 'query'}"]
        return "configs/hart_tiny.yaml" if size == "tiny" else "configs/ft_few_shot_t5xl.yaml", overrides
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


@dataclasses.dataclass
class Job:
    """One training run of the demo: its name, method, model and steps."""

    name: str
    method: str
    model: str
    steps: int
    lr: float
    batch_size: int
    evaluate: bool = True


def training_command(opts: DemoOptions, job: Job, train: Path, evals: list[Path], run_dir: Path,
                     ds_config: Path) -> list[str]:
    config, overrides = config_for(job.method, opts.size)
    micro = min(job.batch_size, 16)
    few_shot = "data.main_input=few_shot" in overrides
    return [
        sys.executable, "-m", "hypertrain.main", "--config", config, "--ds_config", str(ds_config),
        *overrides, f"model.name={job.model}",
        f"data.train=[{train}]", f"eval.data=[{','.join(map(str, evals))}]" if job.evaluate else "eval.data=[]",
        f"run.dir={run_dir}",
        f"run.experiment={EXPERIMENT}", f"run.name={job.name}", "run.resume=never", f"run.checkpoint_every={job.steps}",
        "run.keep_last=1", f"run.log_every={max(1, min(10, job.steps // 20))}",
        f"train.total_steps={job.steps}", f"train.warmup_steps={min(job.steps // 10, 30)}",
        f"train.global_batch_size={job.batch_size}",
        f"train.micro_batch_size={micro if job.batch_size % micro == 0 else job.batch_size}",
        f"train.lr={job.lr}", "train.optimizer=adamw", f"train.seed={opts.seed}",
        f"data.max_input_tokens={400 if few_shot else 64}", "data.max_target_tokens=48", "data.max_hyper_input_tokens=320",
        "data.num_workers=1", "data.shuffle_buffer=500",
        f"eval.max_examples_per_task={opts.eval_examples}", "eval.max_new_tokens=48", "eval.batch_size=32",
        f"eval.every={max(1, job.steps // 2)}",  # half-way and at the end: MLflow draws each eval metric as a curve
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


def _child_env(opts: DemoOptions, tracking_uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if opts.device == "cpu":
        env.update(DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    return env


def run_child(command: list[str], log_path: Path, env: dict[str, str], label: str, total: int,
              progress: Path | None) -> float:
    """Run one stage in a child process with a progress bar (steps read from ``progress``, a metrics.jsonl);
    returns the seconds it took. The child is stopped with the demo (Ctrl-C, SIGTERM)."""
    from tqdm import tqdm

    log_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log_path, "w", encoding="utf-8") as log, tqdm(total=total, desc=f"{label:>11}", unit="step",
                                                            file=sys.stderr, dynamic_ncols=True) as bar:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        phase = "starting"
        bar.set_postfix_str(phase)
        try:
            while process.poll() is None:
                done = _steps_done(progress) if progress else 0
                if done > bar.n:
                    bar.update(done - bar.n)
                new_phase = "training" if 0 < done < total else ("evaluating" if done >= total else "starting")
                if new_phase != phase:
                    phase = new_phase
                    bar.set_postfix_str(phase)
                time.sleep(0.5)
        except BaseException:  # Ctrl-C or SIGTERM: stop the child too (a trainer checkpoints on SIGTERM)
            process.terminate()
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
        if progress is None and process.returncode == 0:
            bar.update(total - bar.n)
        elif progress is not None:
            bar.update(_steps_done(progress) - bar.n)
        bar.set_postfix_str("done" if process.returncode == 0 else f"failed ({process.returncode})")
    if process.returncode != 0:
        raise DemoError(f"{label} failed with exit code {process.returncode}; log {log_path}:\n{_tail(log_path)}")
    return time.monotonic() - start


def train_job(opts: DemoOptions, job: Job, train: Path, evals: list[Path], out: Path, tracking_uri: str) -> float:
    """Train (and evaluate) one run in a child process with a progress bar; returns the seconds it took."""
    run_dir = out / "runs" / job.name
    command = training_command(opts, job, train, evals, run_dir, out / "ds_config.json")
    return run_child(command, out / "logs" / f"{job.name}.log", _child_env(opts, tracking_uri), job.name, job.steps,
                     run_dir / "metrics.jsonl")


def evaluate_model(opts: DemoOptions, model: str, name: str, main_input: str, evals: list[Path], out: Path,
                   tracking_uri: str) -> float:
    """``hypertrain eval`` of a plain T5 directory (no PEFT) on the evaluation sets, logged as MLflow run ``name``."""
    command = [
        sys.executable, "-m", "hypertrain.cli", "eval", "--checkpoint", model, "--data", *map(str, evals),
        "--main-input", main_input, "--out", str(out / "eval" / name.split()[0]), "--device", opts.device,
        "--max-examples-per-task", str(opts.eval_examples), "--max-new-tokens", "48", "--batch-size", "32",
        "--tracking-uri", tracking_uri, "--experiment", EXPERIMENT, "--run-name", name,
    ]
    label = name.split()[0]
    return run_child(command, out / "logs" / f"{label}.log", _child_env(opts, tracking_uri), label, 1, None)


def main_model(opts: DemoOptions, train: Path, evals: list[Path], out: Path, tracking_uri: str) -> tuple[str, str]:
    """The main model every method uses (a directory, or a pretrained name) and a line saying where it came from.

    ``tiny``: FT-Zero-Shot on the training tasks (``--main-steps``), exported as a Hugging Face directory into the
    cache (written beside its final name, then renamed: an interrupted demo leaves no half model behind)."""
    if not opts.trains_main_model:
        return opts.size, f"pretrained T5 v1.1 LM-adapted {opts.size} (downloaded)"
    key = opts.main_model_key()
    cache = Path(opts.cache) if opts.cache else out / "main-model-cache"
    final = cache / key
    if (final / "config.json").is_file() and (final / "demo_stage.json").is_file():
        return str(final), f"reused from the cache {final} (same options; --no-cache retrains it)"
    job = Job("main model", "finetune", opts.size, opts.main_steps, opts.main_lr, opts.main_batch_size, evaluate=False)
    seconds = train_job(opts, job, train, evals, out, tracking_uri)
    staging = cache / f".{key}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    try:
        export = [sys.executable, "-m", "hypertrain.cli", "export", str(out / "runs" / job.name), str(staging), "--hf"]
        run_child(export, out / "logs" / "main model export.log", _child_env(opts, tracking_uri), "export", 1, None)
        record = {"options": dataclasses.asdict(opts), "key": key, "run": str(out / "runs" / job.name),
                  "trained_on": "the demo's training tasks only (query -> target)", "seconds": round(seconds, 1)}
        (staging / "demo_stage.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        if final.exists():  # another demo finished the same stage meanwhile: keep its copy
            shutil.rmtree(staging)
        else:
            os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return str(final), f"trained in {seconds:.0f} s (FT-Zero-Shot, {opts.main_steps} steps), cached in {final}"


def adapter_stage(opts: DemoOptions, out: Path, evals: list[Path], tracking_uri: str) -> None:
    """The loop a user runs on their own task: the first trained hypernetwork writes the adapter of a held-out task
    from its task file (``hypertrain generate``), which then answers two of the task's inputs (``predict``)."""
    method = next((m for m in opts.methods if m in ("hart", "hypertuning", "pha")), None)
    if method is None:
        _print(f"[6/{STAGES}] adapters: none of --methods has a hypernetwork (hart, hypertuning, pha); skipped")
        return
    task = sorted(json.loads((evals[0] / "manifest.json").read_text(encoding="utf-8"))["tasks"])[0]
    task_file = out / "tasks" / "tasks" / f"{task}.json"
    adapter_dir = out / "adapters" / task
    instances = json.loads(task_file.read_text(encoding="utf-8"))["Instances"][:2]
    inputs = out / "adapters" / f"{task}.inputs.jsonl"
    inputs.parent.mkdir(parents=True, exist_ok=True)
    inputs.write_text("".join(json.dumps({"input": i["input"], "output": i["output"][0]}) + "\n" for i in instances),
                      encoding="utf-8")
    env = _child_env(opts, tracking_uri)
    steps = [
        ["generate", "--checkpoint", str(out / "runs" / method), "--task", str(task_file), "--out", str(adapter_dir),
         "--device", opts.device],
        ["predict", "--adapter", str(adapter_dir), "--inputs", str(inputs), "--device", opts.device],
    ]
    _print(f"[6/{STAGES}] your own task: the {method} hypernetwork writes an adapter for the held-out task {task} "
           "from its task file, then answers two of its inputs")
    answers = []
    for args in steps:
        result = subprocess.run([sys.executable, "-m", "hypertrain.cli", *args], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=600)
        if result.returncode != 0:
            raise DemoError(f"hypertrain {args[0]} failed ({result.returncode}): {result.stderr.strip()[-2000:]}")
        _print(f"      $ hypertrain {shlex.join(args)}")
        answers = result.stdout.splitlines()
        if args[0] == "generate":
            _print(f"      {answers[0]}")
    for line in answers:
        row = json.loads(line)
        _print(f"      {row['input']!r} -> {row['prediction']!r} (reference {row['output']!r})")
    _print(f"      adapter: {adapter_dir} (README.md says what it holds)")


def method_jobs(opts: DemoOptions, model: str) -> list[Job]:
    assert opts.lr is not None  # DemoOptions sets it
    return [Job(method, method, model, opts.steps, opts.lr, opts.batch_size) for method in opts.methods]


def run_demo(opts: DemoOptions) -> int:
    from hypertrain.compare import compare

    out = Path(opts.out).resolve()
    if (out / "runs").exists() or (out / "mlflow.db").exists():
        raise DemoError(f"{out} already holds a demo (runs/ or mlflow.db); pass another --out or remove it")
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    train, evals = make_data(opts, out)
    tracking_uri = f"sqlite:///{out / 'mlflow.db'}"
    write_ds_config(out)
    model, origin = main_model(opts, train, evals, out, tracking_uri)
    _print(f"[2/{STAGES}] main model {model}: {origin}")
    floor_seconds = evaluate_model(opts, model, FLOOR_RUN, "query", evals, out, tracking_uri)
    _print(f"[3/{STAGES}] floor: the main model alone on the bare queries of both evaluation sets ({floor_seconds:.0f} s)")
    hyper = [m for m in opts.methods if m != "ft_few_shot"]
    what = ([f"{', '.join(hyper)} over the frozen main model"] if hyper else []) + (
        ["ft_few_shot (all weights, from the main model)"] if "ft_few_shot" in opts.methods else [])
    _print(f"[4/{STAGES}] training {' and '.join(what)}: {opts.steps} steps, batch {opts.batch_size}, {opts.device}; "
           f"logs in {out / 'logs'}")
    for job in method_jobs(opts, model):
        seconds = train_job(opts, job, train, evals, out, tracking_uri)
        _print(f"      {job.name}: trained and evaluated in {seconds:.0f} s")
    _print(f"[5/{STAGES}] comparison (from MLflow)")
    table, files = compare(tracking_uri, EXPERIMENT, metrics=TABLE_METRICS, out=out / "compare", exclude=("main model",))
    _print("")
    _print(table)
    _print("")
    held_out = len(json.loads((evals[0] / "manifest.json").read_text(encoding="utf-8"))["tasks"])
    seen = len(json.loads((evals[1] / "manifest.json").read_text(encoding="utf-8"))["tasks"])
    _print(f"eval columns: S-NI ROUGE-L / exact match (0-100); sni_test: the {held_out} held-out tasks (first "
           f"{opts.eval_examples} examples each, overall and per task family); sni_seen_tasks: up to {opts.eval_examples} "
           f"new instances of each of {seen} training tasks. The floor is the main model alone, on the bare query.")
    _print(f"plots:     {files['loss']}\n           {files['eval']}\n           {files['throughput']}")
    _print(f"table:     {files['table']}")
    _print(files["links"].read_text(encoding="utf-8").rstrip())
    _print(f"compare again: hypertrain compare --tracking-uri {out / 'mlflow.db'} --experiment {EXPERIMENT} --out DIR")
    adapter_stage(opts, out, evals, tracking_uri)
    _print(f"demo finished in {time.monotonic() - started:.0f} s")
    return 0


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def register(subparsers: argparse._SubParsersAction) -> None:
    d = {f.name: f.default for f in dataclasses.fields(DemoOptions)}  # no instance: --help stays fast
    parser = subparsers.add_parser(
        "demo", help="tasks → prep → main model → FT-Few-Shot/HART/HyperTuning/PHA → eval → comparison, on CPU",
        description="Generate demonstration tasks, prep them, train a small main model on the training tasks, train "
        "FT-Few-Shot, HART, HyperTuning and PHA over it, evaluate on held-out tasks against the no-PEFT floor and "
        "compare the runs.")
    add = parser.add_argument
    add("--out", default=d["out"], help="demo directory (must not hold a demo yet; default: %(default)s)")
    add("--steps", type=int, default=d["steps"], help="training steps per method (default: %(default)s)")
    add("--main-steps", type=int, default=d["main_steps"],
        help="FT-Zero-Shot steps of the tiny main model (default: %(default)s)")
    add("--size", default=d["size"], help="model: tiny (trained by the demo) or a pretrained T5 size such as small, "
        "base (downloaded; use with --device cuda) (default: %(default)s)")
    add("--device", choices=["cpu", "cuda"], default=d["device"], help="default: %(default)s")
    add("--methods", default=",".join(d["methods"]), help="comma-separated methods (default: %(default)s)")
    add("--train-tasks", type=int, default=0, help="training tasks (default: all 34)")
    add("--test-tasks", type=int, default=0, help="held-out tasks (default: all 8)")
    add("--instances", type=int, default=d["instances"], help="instances per task (default: %(default)s)")
    add("--eval-examples", type=int, default=d["eval_examples"],
        help="evaluated examples per held-out task (default: %(default)s)")
    add("--batch-size", type=int, default=d["batch_size"], help="global batch size of the methods (default: %(default)s)")
    add("--lr", type=float, default=None, help="methods' learning rate (default: 1e-3 for tiny, 1e-4 for pretrained sizes)")
    add("--seed", type=int, default=d["seed"], help="task generator and training seed (default: %(default)s)")
    add("--cache", default=None, help=f"trained main models, by options (default: {default_cache()})")
    add("--no-cache", action="store_true", help="train the main model again (and keep it in OUT only)")
    parser.set_defaults(func=_run)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def _run(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # so that the running trainer is stopped as well
    try:
        opts = DemoOptions(
            out=args.out, steps=args.steps, main_steps=args.main_steps, size=args.size, device=args.device,
            methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
            train_tasks=args.train_tasks, test_tasks=args.test_tasks, instances=args.instances,
            eval_examples=args.eval_examples, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
            cache=None if args.no_cache else (args.cache or default_cache()),
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
