"""``hypertrain repro TABLE``: submit every run of one of HART's tables to Slurm, one job per run.

    hypertrain repro hart-table2 --dry-run          # the jobs and their sbatch commands, nothing submitted
    hypertrain repro hart-table2                    # submit (from the repository root)
    hypertrain compare --layout hart-table2 --experiment hart-repro --tracking-uri runs/repro

Each run is one row's experiment file in one column's folder (``configs/repro/<folder>/<row>.yaml``, see
:mod:`hypertrain.repro_tables`), submitted as ``slurm/train.sh`` with ``CONFIG`` and ``RUN_DIR`` set. A run shared
by several rows or tables is submitted once. HyperTuning-PT's runs wait (``--dependency=afterok``) for the C4
pretraining run of their model size, which is submitted with them, and start from it (``train.init_from``). Every
run logs to one MLflow store: ``$MLFLOW_TRACKING_URI`` when set, else ``<runs root>/mlflow.db``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from hypertrain import repro_tables as tables
from hypertrain.config import ConfigError, check_override_keys, load_config
from hypertrain.tracking import open_client, redact

DATA_PREFIX = "data/"
"""The configs' data paths start here (``data/sni/train``, ...); ``--data-root`` replaces it."""


@dataclasses.dataclass
class Job:
    """One training run to submit."""

    name: str
    """``<folder>/<row config>``: the MLflow run name and the run directory under the runs root."""
    config: Path
    overrides: list[str]
    after: str | None = None
    """The name of the job this one waits for (HyperTuning-PT: its pretraining run)."""


def _data_path(value: str, data_root: str | None) -> str:
    if data_root and value.startswith(DATA_PREFIX):
        return str(Path(data_root) / value[len(DATA_PREFIX):])
    return value


def _job(folder: str, stem: str, runs_root: Path, data_root: str | None, experiment: str, extra: Sequence[str],
         after: str | None = None) -> Job:
    path = tables.config_path(folder, stem)
    if not path.is_file():
        raise ConfigError(f"{path}: missing (every row of a table needs its experiment file in each column's folder)")
    cfg = load_config(path=path)
    name = tables.run_name(folder, stem)
    overrides = [f"run.name={name}", f"run.experiment={experiment}"]  # run.dir: RUN_DIR (slurm/train.sh)
    overrides.append("data.train=[" + ",".join(_data_path(p, data_root) for p in cfg.data.train) + "]")
    if cfg.eval.data:
        overrides.append("eval.data=[" + ",".join(_data_path(p, data_root) for p in cfg.eval.data) + "]")
    if after:
        overrides.append(f"train.init_from={runs_root / after}")
    return Job(name, path, [*overrides, *extra], after)


def plan_jobs(table: tables.Table, runs_root: Path, data_root: str | None = None, experiment: str = "hart-repro",
              extra: Sequence[str] = ()) -> list[Job]:
    """The table's runs, each once, a pretraining run before the runs that start from it."""
    check_override_keys(type(load_config()), extra)
    jobs: dict[str, Job] = {}
    for row, column in table.cells():
        assert row.config is not None
        after = None
        if row.config == "hypertuning_pt":
            after = tables.run_name(tables.pretrain_folder(column.folder), tables.PRETRAIN)
            if after not in jobs:
                jobs[after] = _job(tables.pretrain_folder(column.folder), tables.PRETRAIN, runs_root, data_root,
                                   experiment, extra)
        name = tables.run_name(column.folder, row.config)
        if name not in jobs:
            jobs[name] = _job(column.folder, row.config, runs_root, data_root, experiment, extra, after)
    return list(jobs.values())


def sbatch_command(job: Job, sbatch_args: Sequence[str], after_id: str | None, one_at_a_time: bool) -> list[str]:
    """``sbatch`` for one run: waits for ``after_id``; with ``one_at_a_time`` all share one name and run in turn."""
    name = "hart-repro" if one_at_a_time else f"repro-{job.name.replace('/', '-')}"
    dependencies = [f"afterok:{after_id}"] if after_id else []
    if one_at_a_time:
        dependencies.append("singleton")
    command = ["sbatch", "--parsable", f"--job-name={name}"]
    if dependencies:
        command.append("--dependency=" + ",".join(dependencies))
    return [*command, *sbatch_args, "slurm/train.sh"]


def job_environment(job: Job, runs_root: Path, tracking_uri: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(CONFIG=str(job.config.relative_to(tables.REPO)), RUN_DIR=str(runs_root / job.name),
               OVERRIDES=" ".join(job.overrides), MLFLOW_TRACKING_URI=tracking_uri)
    return env


def submit(jobs: Sequence[Job], runs_root: Path, tracking_uri: str, sbatch_args: Sequence[str] = (),
           one_at_a_time: bool = False, dry_run: bool = False) -> dict[str, str]:
    """sbatch every job in order (a dependency before its dependents); returns run name → Slurm job id."""
    ids: dict[str, str] = {}
    for job in jobs:
        command = sbatch_command(job, sbatch_args, ids.get(job.after) if job.after else None, one_at_a_time)
        env = job_environment(job, runs_root, tracking_uri)
        shown = " ".join(f"{k}={shlex.quote(env[k])}" for k in ("CONFIG", "RUN_DIR", "OVERRIDES"))
        if dry_run:
            ids[job.name] = f"<{job.name}>"
            print(f"{job.name}\n  {shown} {shlex.join(command)}")
            continue
        result = subprocess.run(command, cwd=tables.REPO, env=env, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch for {job.name} failed ({result.returncode}): {result.stderr.strip()}")
        ids[job.name] = result.stdout.strip().split(";")[0]
        waits = f" after {ids[job.after]}" if job.after else ""
        print(f"submitted {job.name} as job {ids[job.name]}{waits}")
    return ids


def default_tracking_uri(runs_root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(runs_root / 'mlflow.db').resolve()}"


def _open_store(uri: str) -> None:
    """Create (or check) the MLflow store before any job starts, so no two jobs create it at once."""
    try:
        open_client(uri)
    except Exception as err:  # MLflow raises several types for an unusable URI
        raise RuntimeError(f"cannot open the MLflow store {redact(uri)}: {err}") from err


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "repro", help="submit every run of one of HART's tables to Slurm (then: compare --layout TABLE)",
        description="Submit one Slurm job per run of a HART table (configs/repro/), pretraining first where a row "
        "starts from it; print the jobs with --dry-run.",
    )
    parser.add_argument("table", choices=tables.table_names())
    parser.add_argument("--runs-root", default="runs/repro", help="run directories go under it (default: %(default)s)")
    parser.add_argument("--data-root", default=None,
                        help="where the prepared data lives: replaces the configs' leading data/ (default: data/)")
    parser.add_argument("--experiment", default="hart-repro", help="MLflow experiment (default: %(default)s)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="config overrides for every run (e.g. train.total_steps=100 model.name=tiny)")
    parser.add_argument("--sbatch-args", default="", help="extra sbatch options for every job, one quoted string")
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="run the jobs one after another (a shared job name and --dependency=singleton)")
    parser.add_argument("--dry-run", action="store_true", help="print the jobs and sbatch commands only")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    runs_root = Path(args.runs_root).resolve()
    try:
        jobs = plan_jobs(tables.TABLES[args.table], runs_root, args.data_root, args.experiment, args.overrides)
        uri = default_tracking_uri(runs_root)
        if not args.dry_run:
            runs_root.mkdir(parents=True, exist_ok=True)
            _open_store(uri)
        submit(jobs, runs_root, uri, shlex.split(args.sbatch_args), args.one_at_a_time, args.dry_run)
    except (ConfigError, RuntimeError, OSError) as err:
        print(f"repro: {err}", file=sys.stderr)
        return 2
    print(f"{len(jobs)} run(s) of {args.table}; when they finish:\n  hypertrain compare --layout {args.table} "
          f"--experiment {args.experiment} --tracking-uri {shlex.quote(uri)}")
    return 0
