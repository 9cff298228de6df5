"""``hypertrain compare``: training runs side by side, read from MLflow — a table and PNG plots.

    hypertrain compare --tracking-uri runs/demo/mlflow.db --experiment demo --out runs/demo/compare
    hypertrain compare --runs 3f2a... 9b1c... --metric 'eval/sni/rougeL' 'eval/sni/rougeL/*'
    hypertrain compare --layout hart-table2 --experiment hart-repro --tracking-uri runs/repro

Runs come from ``MlflowClient.search_runs`` (``--experiment``, newest first) or by id (``--runs``). The table has
one row per run: method, model, steps, the last logged training loss (the mean over the last ``run.log_every``
steps), the final value of every selected ``eval/...`` metric (whatever the evaluation logged: S-NI
``rougeL``/``exact_match`` overall and per category, P3 accuracy, ..., shown on a 0-100 scale whether the run logged
fractions or, before ``hypertrain.metric_names`` 2, percentages; see :mod:`hypertrain.metric_names`), samples/s (total
samples over total step time) and MFU (when the run logged one). ``--out`` receives ``comparison.md``,
``comparison.csv`` (the same columns as raw numbers, empty where missing) and three plots: ``loss.png`` (loss curves
overlaid), ``eval.png`` (eval metrics as grouped bars) and ``throughput.png`` (samples/s and MFU or tokens/s).

``--layout hart-table2`` (``-table3``, ``-table4``, ``-table5``) prints one of HART's tables filled from the runs
``hypertrain repro`` submitted (matched by run name, the newest finished run of each), each column beside the
paper's number; ``--layout sni-categories`` prints Tk-Instruct's per-category view (exact match or ROUGE-L by
category). Both are also written to ``--out`` as ``<layout>.md``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hypertrain.metric_names import readable_eval, training_key
from hypertrain.tracking import open_client, redact

DEFAULT_METRICS = ("eval/*/rougeL", "eval/*/exact_match", "eval/*/accuracy", "eval/*/dataset_median_average",
                   "eval/*/rougeL/*", "eval/*/median/*")
"""Eval metrics shown when ``--metric`` is not given (globs; those a run did not log are left out)."""
TRAIN_LOSS = "train loss (last window)"
"""The table's loss column: the mean over the last ``run.log_every`` steps (what the trainer logs), not one step."""
MFU_PATTERN = re.compile(r"(^|[/_])mfu$", re.IGNORECASE)


class CompareError(RuntimeError):
    """Nothing to compare (no tracking store, no experiment, no runs); the message says what was looked for."""


@dataclasses.dataclass
class RunSummary:
    """One run's row of the comparison, plus the histories the plots need."""

    run_id: str
    name: str
    method: str
    model: str
    status: str
    steps: int | None
    train_loss: float | None
    samples_per_s: float | None
    tokens_per_s: float | None
    mfu: float | None
    eval: dict[str, float]
    loss_history: list[tuple[int, float]]
    experiment_id: str = "0"


def resolve_tracking_uri(value: str | None) -> str:
    """``--tracking-uri``: a URI, an ``.db`` file or a directory holding ``mlflow.db`` (a run or demo directory);
    default ``$MLFLOW_TRACKING_URI``, else ``./mlflow.db``."""
    value = value or os.environ.get("MLFLOW_TRACKING_URI")
    if not value:
        value = "mlflow.db"
    if "://" in value:
        return value
    path = Path(value)
    if path.is_dir():
        path = path / "mlflow.db"
    if not path.is_file():
        raise CompareError(f"no MLflow store at {path} (pass --tracking-uri URI, a mlflow.db file or a directory holding one)")
    return f"sqlite:///{path.resolve()}"


def _history(client: Any, run_id: str, key: str) -> list[tuple[int, float]]:
    points = sorted(client.get_metric_history(run_id, key), key=lambda m: (m.step, m.timestamp))
    by_step: dict[int, float] = {}
    for m in points:  # a step logged twice (before a crash and after the resume) keeps the last value
        by_step[m.step] = m.value
    return sorted(by_step.items())


def _mean_steady(values: list[float]) -> float | None:
    """Mean over the logged points, leaving out the first (start-up and compilation) when there are several."""
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return None
    steady = values[1:] if len(values) > 1 else values
    return sum(steady) / len(steady)


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A metric-name glob: ``*`` matches within one ``/`` segment, ``**`` across segments, ``?`` one character."""
    parts = []
    for token in re.split(r"(\*\*|\*|\?)", pattern):
        parts.append({"**": ".*", "*": "[^/]*", "?": "[^/]"}.get(token, re.escape(token)))
    return re.compile("".join(parts) + r"\Z")


def select_metrics(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The metric names matching any of ``patterns`` (:func:`glob_regex`), in pattern order, then name order."""
    chosen: list[str] = []
    for pattern in patterns:
        regex = glob_regex(pattern)
        for name in sorted(names):
            if regex.match(name) and name not in chosen:
                chosen.append(name)
    return chosen


def summarize_run(client: Any, run: Any, metric_patterns: Sequence[str]) -> RunSummary:
    data = run.data
    params, tags, metrics = data.params, data.tags, data.metrics
    key = {short: training_key(short, tags) for short in ("loss", "samples_per_s", "tokens_per_s", "train_time_s",
                                                          "samples_total")}
    loss = _history(client, run.info.run_id, key["loss"]) if key["loss"] in metrics else []
    samples = [v for _, v in _history(client, run.info.run_id, key["samples_per_s"])] if key["samples_per_s"] in metrics else []
    throughput = _mean_steady(samples)  # runs logged before the totals existed
    if metrics.get(key["train_time_s"]) and key["samples_total"] in metrics:  # total samples / total step time
        throughput = metrics[key["samples_total"]] / metrics[key["train_time_s"]]
    tokens = [v for _, v in _history(client, run.info.run_id, key["tokens_per_s"])] if key["tokens_per_s"] in metrics else []
    mfu_keys = [k for k in metrics if MFU_PATTERN.search(k)]
    mfu = _mean_steady([v for _, v in _history(client, run.info.run_id, mfu_keys[0])]) if mfu_keys else None
    scores = readable_eval(metrics, tags)  # today's names, 0-100
    eval_names = select_metrics(list(scores), metric_patterns)
    return RunSummary(
        experiment_id=run.info.experiment_id,
        run_id=run.info.run_id,
        name=run.info.run_name or tags.get("mlflow.runName", run.info.run_id[:8]),
        method=tags.get("method") or params.get("method", "?"),
        model=tags.get("model") or params.get("model.name", "?"),
        status=run.info.status,
        steps=loss[-1][0] if loss else None,
        train_loss=loss[-1][1] if loss else metrics.get(key["loss"]),
        samples_per_s=throughput,
        tokens_per_s=_mean_steady(tokens),
        mfu=mfu,
        eval={name: scores[name] for name in eval_names},
        loss_history=loss,
    )


def load_runs(
    tracking_uri: str, experiment: str | None = None, run_ids: Sequence[str] = (), metric_patterns: Sequence[str] = DEFAULT_METRICS,
    max_runs: int = 50,
) -> list[RunSummary]:
    """Read the runs to compare: by id, else ``search_runs`` over the experiment (all experiments if None)."""
    from mlflow.exceptions import MlflowException
    client = open_client(tracking_uri)
    try:
        if run_ids:
            runs = [client.get_run(run_id) for run_id in run_ids]
        else:
            if experiment:
                found = client.get_experiment_by_name(experiment)
                if found is None:
                    names = sorted(e.name for e in client.search_experiments())
                    raise CompareError(
                        f"no experiment {experiment!r} in {redact(tracking_uri)} (experiments: {', '.join(names) or 'none'})"
                    )
                ids = [found.experiment_id]
            else:
                ids = [e.experiment_id for e in client.search_experiments()]
            runs = client.search_runs(ids, max_results=max_runs, order_by=["attributes.start_time DESC"]) if ids else []
    except MlflowException as err:
        raise CompareError(f"MLflow could not read {redact(tracking_uri)}: {redact(err.message)}") from err
    if not runs:
        raise CompareError(
            f"no runs found in {redact(tracking_uri)}" + (f" (experiment {experiment!r})" if experiment else "")
        )
    runs = sorted(runs, key=lambda r: r.info.start_time or 0)
    from tqdm import tqdm

    return [summarize_run(client, run, metric_patterns)
            for run in tqdm(runs, desc="reading runs", unit="run", disable=len(runs) < 5, file=sys.stderr)]


# --------------------------------------------------------------------------------------------------
# Table
# --------------------------------------------------------------------------------------------------


def metric_label(name: str) -> str:
    """``eval/sni/rougeL/String_Edits`` → ``sni String_Edits rougeL``; ``eval/sni/rougeL`` → ``sni rougeL``."""
    parts = name.split("/")[1:]
    if len(parts) == 3:
        return f"{parts[0]} {parts[2]} {parts[1]}"
    return " ".join(parts)


def _fmt(value: float | int | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, int):
        return str(value)
    return f"{value:.{digits}f}"


def table_rows(runs: Sequence[RunSummary]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows (eval columns: the union of the runs' selected metrics)."""
    eval_columns: list[str] = []
    for run in runs:
        eval_columns += [k for k in run.eval if k not in eval_columns]
    header = ["run", "method", "model", "steps", TRAIN_LOSS, *[metric_label(c) for c in eval_columns], "samples/s", "MFU"]
    rows = []
    for run in runs:
        rows.append([
            run.name, run.method, run.model, _fmt(run.steps), _fmt(run.train_loss, 3),
            *[_fmt(run.eval.get(c)) for c in eval_columns],
            _fmt(run.samples_per_s, 1), "-" if run.mfu is None else f"{100 * run.mfu:.1f}%",
        ])
    return header, rows


def raw_rows(runs: Sequence[RunSummary]) -> tuple[list[str], list[list[Any]]]:
    """:func:`table_rows` with unformatted numbers (empty where a run has none): the CSV's content."""
    eval_columns: list[str] = []
    for run in runs:
        eval_columns += [k for k in run.eval if k not in eval_columns]
    header = ["run_id", "run", "method", "model", "steps", "train_loss_last_window", *eval_columns, "samples_per_s", "mfu"]
    rows = [
        [run.run_id, run.name, run.method, run.model, run.steps, run.train_loss,
         *[run.eval.get(c) for c in eval_columns], run.samples_per_s, run.mfu]
        for run in runs
    ]
    return header, [["" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v for v in row]
                    for row in rows]


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool = False, left: int = 3) -> str:
    """Aligned text (or markdown) table; the first ``left`` columns are left-aligned, the others right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        padded = [c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return ("| " + " | ".join(padded) + " |") if markdown else "  ".join(padded)

    rule = ("| " + " | ".join(("-" * w if i < left else "-" * (w - 1) + ":") for i, w in enumerate(widths)) + " |"
            if markdown else "  ".join("-" * w for w in widths))
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _labels(runs: Sequence[RunSummary]) -> list[str]:
    labels = [f"{r.name} ({r.method})" if r.method not in r.name else r.name for r in runs]
    return labels


def _save(plt, fig, path: Path) -> Path:
    """Lay out, write and close a figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_loss(runs: Sequence[RunSummary], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for run, label in zip(runs, _labels(runs), strict=True):
        if run.loss_history:
            steps, values = zip(*run.loss_history, strict=True)
            ax.plot(steps, values, label=label, linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    if any(r.loss_history for r in runs):
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no loss logged", ha="center", va="center", transform=ax.transAxes)
    return _save(plt, fig, path)


def eval_axis_label(columns: Sequence[str]) -> str:
    """The eval plot's y axis: the metrics shown, on their 0-100 scale."""
    names = {"rougeL": "ROUGE-L", "exact_match": "exact match", "accuracy": "accuracy",
             "dataset_median_average": "dataset-median accuracy", "median": "median accuracy"}
    metric = [c.split("/")[2] if c.count("/") >= 2 else c for c in columns]  # eval/<set>/<metric>[/<family>]
    shown = list(dict.fromkeys(names.get(m, m) for m in metric))
    return f"{' / '.join(shown)} (0-100)"


def plot_eval(runs: Sequence[RunSummary], path: Path) -> Path:
    plt = _pyplot()
    columns: list[str] = []
    for run in runs:
        columns += [k for k in run.eval if k not in columns]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.1 * len(columns) * max(1, len(runs)) / 2 + 3), 4.5))
    if columns:
        width = 0.8 / max(1, len(runs))
        for i, (run, label) in enumerate(zip(runs, _labels(runs), strict=True)):
            xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(columns))]
            values = [run.eval.get(c, float("nan")) for c in columns]
            bars = ax.bar(xs, values, width=width, label=label)
            ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
        finite = [v for run in runs for v in run.eval.values() if math.isfinite(v)]
        ax.set_ylim(0, max(1.0, max(finite, default=0.0)) * 1.15)
        ax.set_xticks(range(len(columns)))
        ax.set_xticklabels([metric_label(c) for c in columns], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(eval_axis_label(columns))
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    else:
        ax.text(0.5, 0.5, "no eval/ metrics logged by these runs", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
    ax.set_title("Evaluation (final values)")
    return _save(plt, fig, path)


def plot_throughput(runs: Sequence[RunSummary], path: Path) -> Path:
    plt = _pyplot()
    labels = _labels(runs)
    use_mfu = any(r.mfu is not None for r in runs)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    left.bar(range(len(runs)), [r.samples_per_s or 0.0 for r in runs], color="tab:blue")
    left.set_ylabel("samples/s (mean)")
    left.set_title("Throughput")
    if use_mfu:
        right.bar(range(len(runs)), [100 * (r.mfu or 0.0) for r in runs], color="tab:green")
        right.set_ylabel("MFU (%)")
        right.set_title("Model FLOPs utilization")
    else:
        right.bar(range(len(runs)), [r.tokens_per_s or 0.0 for r in runs], color="tab:orange")
        right.set_ylabel("tokens/s (mean)")
        right.set_title("Tokens per second (no MFU logged)")
    for ax in (left, right):
        ax.set_xticks(range(len(runs)))
        ax.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    return _save(plt, fig, path)


def write_outputs(runs: Sequence[RunSummary], out: str | Path) -> dict[str, Path]:
    """``comparison.md``, ``comparison.csv``, ``loss.png``, ``eval.png``, ``throughput.png`` under ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = table_rows(runs)
    (out / "comparison.md").write_text(format_table(header, rows, markdown=True) + "\n", encoding="utf-8")
    raw_header, raw = raw_rows(runs)
    with open(out / "comparison.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(raw_header)
        writer.writerows(raw)
    return {
        "table": out / "comparison.md",
        "csv": out / "comparison.csv",
        "loss": plot_loss(runs, out / "loss.png"),
        "eval": plot_eval(runs, out / "eval.png"),
        "throughput": plot_throughput(runs, out / "throughput.png"),
    }


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def compare(
    tracking_uri: str | None = None, experiment: str | None = None, run_ids: Sequence[str] = (),
    metrics: Sequence[str] = (), out: str | Path = "runs/compare", max_runs: int = 50, exclude: Sequence[str] = (),
) -> tuple[str, dict[str, Path]]:
    """Read the runs (leaving out those named in ``exclude``), write the files; returns the printed table and the
    files written."""
    uri = resolve_tracking_uri(tracking_uri)
    runs = [r for r in load_runs(uri, experiment, run_ids, metrics or DEFAULT_METRICS, max_runs) if r.name not in exclude]
    if not runs:
        raise CompareError(f"no runs left to compare in {redact(uri)} after leaving out {', '.join(exclude)}")
    header, rows = table_rows(runs)
    files = write_outputs(runs, out)
    (Path(out) / "links.txt").write_text("\n".join(links_lines(uri, runs)) + "\n", encoding="utf-8")
    files["links"] = Path(out) / "links.txt"
    return format_table(header, rows), files


def links_lines(tracking_uri: str, runs: Sequence[RunSummary]) -> list[str]:
    """Where to see these runs in the MLflow UI: the runs table of their experiment(s) and the compare view."""
    from hypertrain.run_record import compare_link, runs_link_hint

    experiments = sorted({r.experiment_id for r in runs})
    lines = [runs_link_hint(tracking_uri, e) for e in experiments]
    lines.append(f"MLflow compare: {compare_link(tracking_uri, experiments, [r.run_id for r in runs])}")
    return lines


def newest_by_name(runs: Sequence[RunSummary]) -> dict[str, RunSummary]:
    """Run name → its newest finished run (else its newest run): a rerun of a table's cell replaces the earlier one."""
    chosen: dict[str, RunSummary] = {}
    for run in runs:  # oldest first
        previous = chosen.get(run.name)
        if previous is None or run.status == "FINISHED" or previous.status != "FINISHED":
            chosen[run.name] = run
    return chosen


def compare_layout(
    layout: str, tracking_uri: str | None = None, experiment: str | None = None, out: str | Path = "runs/compare",
    max_runs: int = 500,
) -> tuple[str, Path]:
    """A paper's table (``hypertrain.repro_tables.LAYOUTS``) filled from the experiment's runs; returns the printed
    table and the markdown file written to ``out``."""
    from hypertrain import repro_tables

    if layout not in repro_tables.LAYOUTS:
        raise CompareError(f"unknown layout {layout!r} (known: {', '.join(repro_tables.LAYOUTS)})")
    uri = resolve_tracking_uri(tracking_uri)
    runs = newest_by_name(load_runs(uri, experiment, (), ("eval/**",), max_runs))
    title, header, rows = repro_tables.layout(layout, {name: run.eval for name, run in runs.items()})
    if not rows:
        raise CompareError(f"no run in {redact(uri)} has the metrics of layout {layout!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{layout}.md"
    path.write_text(f"{title}\n\n{format_table(header, rows, markdown=True, left=1)}\n", encoding="utf-8")
    return f"{title}\n\n{format_table(header, rows, left=1)}", path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare", help="compare runs from MLflow: a table and PNG plots",
        description="Read runs from MLflow; print a comparison table and write it with PNG plots to --out.",
    )
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow URI, a mlflow.db file or a directory holding one (default: $MLFLOW_TRACKING_URI, "
                             "else ./mlflow.db)")
    parser.add_argument("--experiment", default=None, help="experiment name (default: all experiments)")
    parser.add_argument("--runs", nargs="+", default=[], metavar="ID", help="run ids (default: search the experiment)")
    parser.add_argument("--metric", nargs="+", default=[], metavar="GLOB",
                        help="eval metrics to show; * matches within a /-segment, ** across "
                             f"(default: {' '.join(DEFAULT_METRICS)})")
    parser.add_argument("--out", default="runs/compare", help="directory for the table and plots (default: %(default)s)")
    parser.add_argument("--max-runs", type=int, default=50, help="newest runs read from an experiment (default: %(default)s)")
    parser.add_argument("--layout", default=None, metavar="NAME",
                        help="print a paper's table instead: hart-table2, hart-table3, hart-table4, hart-table5 (runs "
                             "of hypertrain repro, with the paper's numbers beside) or sni-categories (Tk-Instruct's "
                             "per-category metrics)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.layout:
        try:
            table, path = compare_layout(args.layout, args.tracking_uri, args.experiment, args.out, max(args.max_runs, 500))
        except CompareError as err:
            print(f"compare: {err}", file=sys.stderr)
            return 1
        print(table)
        print(f"\ntable: {path}")
        return 0
    try:
        table, files = compare(args.tracking_uri, args.experiment, args.runs, args.metric, args.out, args.max_runs)
    except CompareError as err:
        print(f"compare: {err}", file=sys.stderr)
        return 1
    print(table)
    print()
    print(f"table: {files['table']} and {files['csv']}")
    print(f"plots: {files['loss']}, {files['eval']}, {files['throughput']}")
    print(files["links"].read_text(encoding="utf-8").rstrip())
    return 0
