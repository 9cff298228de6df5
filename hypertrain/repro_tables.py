"""HART's Tables 2-5 as data: rows (with their experiment files under ``configs/repro/``), columns (which run and
which metric), and the paper's numbers, for ``hypertrain repro`` (submission) and ``hypertrain compare --layout``.

A cell is one training run: the row's config in the column's folder, e.g. Table 2, row HART, column T5-XL is
``configs/repro/sni_t5xl/hart.yaml``, whose run is named ``sni_t5xl/hart``. Runs shared by several tables (Table 5
reuses Tables 2 and 3's T5-Large runs) are trained once. Rows without a config (Tk-Instruct, HINT, T0-3B) are
other papers' models, printed with the paper's numbers for reference.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG_ROOT = REPO / "configs" / "repro"
PRETRAIN = "pretrain_hypertuning"
"""The C4 pretraining run (``configs/repro/c4_<size>/pretrain_hypertuning.yaml``) that HyperTuning-PT starts from."""

Metrics = Mapping[str, float]
Score = Callable[[Metrics], "float | None"]


def metric(name: str) -> Score:
    return lambda metrics: metrics.get(name)


def mean_of(*scores: Score) -> Score:
    """The mean of several scores; None unless all are present."""

    def score(metrics: Metrics) -> float | None:
        values = [s(metrics) for s in scores]
        return None if any(v is None for v in values) else statistics.fmean(values)  # type: ignore[arg-type]

    return score


def p3_dataset(*datasets: str) -> Score:
    """T0's number for a held-out dataset: the median accuracy over its prompts; several datasets (ANLI's rounds)
    are averaged. HART's ANLI column is the mean of the R1-R3 medians: its T0-3B row (33.4) is T0's published R1,
    R2, R3 medians (33.84, 33.11, 33.33) averaged."""
    return mean_of(*(metric(f"eval/p3/median/{d}") for d in datasets))


SNI_ROUGE = metric("eval/sni/rougeL")
P3_COLUMNS: dict[str, Score] = {
    "ANLI": p3_dataset("anli_r1", "anli_r2", "anli_r3"),
    "HSwag": p3_dataset("hellaswag"),
    "CB": p3_dataset("super_glue_cb"),
    "COPA": p3_dataset("super_glue_copa"),
    "RTE": p3_dataset("super_glue_rte"),
    "WiC": p3_dataset("super_glue_wic"),
    "WSC": p3_dataset("super_glue_wsc.fixed"),
    "WGD": p3_dataset("winogrande_winogrande_xl"),
}
P3_AVERAGE = mean_of(*P3_COLUMNS.values())
"""HART's "Avg." over the eight P3 columns."""


@dataclasses.dataclass(frozen=True)
class Column:
    label: str
    folder: str
    """Where the row's run of this column lives: ``configs/repro/<folder>/<row config>.yaml``."""
    score: Score


@dataclasses.dataclass(frozen=True)
class Row:
    label: str
    config: str | None
    """File stem under each column's folder; None: another paper's model, shown for reference only."""
    paper: tuple[float | None, ...]
    """The paper's numbers, one per column (None where the paper has a dash)."""


@dataclasses.dataclass(frozen=True)
class Table:
    name: str
    title: str
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]

    def cells(self) -> list[tuple[Row, Column]]:
        return [(row, column) for row in self.rows if row.config for column in self.columns]


def _p3_columns(folder: str) -> tuple[Column, ...]:
    return (*(Column(label, folder, score) for label, score in P3_COLUMNS.items()), Column("Avg.", folder, P3_AVERAGE))


TABLES: dict[str, Table] = {
    "hart-table2": Table(
        "hart-table2", "Table 2: S-NI held-out test set, average ROUGE-L",
        (Column("T5-Large", "sni_t5large", SNI_ROUGE), Column("T5-XL", "sni_t5xl", SNI_ROUGE)),
        (
            Row("FT-Zero-Shot", "ft_zero_shot", (40.6, 46.6)),
            Row("FT-Few-Shot", "ft_few_shot", (47.6, 54.0)),
            Row("Tk-Instruct", None, (48.0, 54.3)),
            Row("HINT", None, (None, 53.2)),
            Row("Prefix-Tuning", "prefix_tuning", (42.6, 47.1)),
            Row("LoRA", "lora", (42.9, 47.7)),
            Row("HyperTuning-PT", "hypertuning_pt", (43.5, 48.6)),
            Row("HyperTuning", "hypertuning", (45.2, 48.8)),
            Row("HART", "hart", (46.8, 50.4)),
        ),
    ),
    "hart-table3": Table(
        "hart-table3", "Table 3: P3 held-out validation set, T5-Large (accuracy, median over prompts)",
        _p3_columns("p3_t5large"),
        (
            Row("FT-Zero-Shot", "ft_zero_shot", (33.4, 28.0, 63.0, 77.9, 71.1, 50.8, 61.0, 53.4, 54.8)),
            Row("FT-Few-Shot", "ft_few_shot", (35.3, 27.5, 68.6, 70.5, 75.2, 51.7, 62.1, 52.2, 55.4)),
            Row("Prefix-Tuning", "prefix_tuning", (33.1, 26.1, 53.9, 67.8, 60.5, 49.8, 54.7, 51.4, 49.7)),
            Row("LoRA", "lora", (31.8, 26.3, 48.6, 61.4, 71.3, 51.5, 63.0, 51.1, 50.6)),
            Row("HyperTuning-PT", "hypertuning_pt", (33.4, 32.3, 60.1, 73.9, 71.5, 51.1, 63.0, 51.1, 54.6)),
            Row("HyperTuning", "hypertuning", (33.4, 28.5, 59.4, 68.6, 67.9, 50.6, 62.8, 52.9, 53.0)),
            Row("HART", "hart", (33.6, 28.4, 70.2, 70.1, 72.2, 50.3, 62.3, 53.0, 55.0)),
        ),
    ),
    "hart-table4": Table(
        "hart-table4", "Table 4: P3 held-out validation set, T5-XL (accuracy, median over prompts)",
        _p3_columns("p3_t5xl"),
        (
            Row("T0-3B", None, (33.4, 27.3, 45.4, 72.8, 64.6, 50.6, 64.9, 50.9, 54.9)),
            Row("FT-Zero-Shot", "ft_zero_shot", (39.9, 29.4, 64.5, 88.0, 80.8, 51.7, 60.7, 57.9, 59.1)),
            Row("FT-Few-Shot", "ft_few_shot", (37.9, 30.9, 67.6, 90.5, 76.6, 51.2, 63.3, 61.1, 59.9)),
            Row("HINT", None, (41.6, 30.3, 76.0, 88.8, 84.2, 51.4, 59.5, 60.1, 65.4)),
            Row("Prefix-Tuning", "prefix_tuning", (38.3, 31.2, 61.4, 82.4, 78.6, 52.6, 57.0, 54.3, 57.0)),
            Row("LoRA", "lora", (38.5, 28.8, 57.6, 80.1, 78.2, 52.0, 59.3, 53.3, 56.0)),
            Row("HyperTuning-PT", "hypertuning_pt", (38.7, 33.6, 69.6, 88.4, 79.5, 53.1, 57.6, 56.6, 59.6)),
            Row("HyperTuning", "hypertuning", (36.8, 26.6, 54.6, 79.4, 76.8, 52.3, 54.8, 50.8, 54.0)),
            Row("HART", "hart", (37.8, 28.5, 66.7, 80.8, 79.4, 50.5, 59.5, 57.1, 57.6)),
        ),
    ),
    "hart-table5": Table(
        "hart-table5", "Table 5: ablation on T5-Large (S-NI average ROUGE-L, P3 average score)",
        (Column("S-NI Avg. ROUGE-L", "sni_t5large", SNI_ROUGE), Column("P3 Avg. Score", "p3_t5large", P3_AVERAGE)),
        (
            Row("HyperTuning-PT", "hypertuning_pt", (43.5, 54.6)),
            Row("- Continual Pre-training", "no_pretraining", (25.3, 50.9)),
            Row("+ Fusion-in-Decoder (HyperTuning)", "hypertuning", (45.2, 53.0)),
            Row("+ Autoregressive Parameter Generation", "autoregressive", (46.4, 54.3)),
            Row("+ Local Consistency Regularization (HART)", "hart", (46.8, 55.0)),
        ),
    ),
}

TK_INSTRUCT_EXACT_MATCH = (
    "Textual Entailment", "Cause Effect Classification", "Coreference Resolution", "Dialogue Act Recognition",
    "Answerability Classification", "Word Analogy",
)
"""S-NI test categories whose Tk-Instruct per-category results are exact match (short, classification-like
answers); the other six test categories are reported with ROUGE-L."""
TK_INSTRUCT_ROUGE = (
    "Overlap Extraction", "Keyword Tagging", "Question Rewriting", "Title Generation", "Data to Text",
    "Grammar Error Correction",
)


def run_name(folder: str, config: str) -> str:
    """The MLflow run name (and run directory below the runs root) of one cell."""
    return f"{folder}/{config}"


def config_path(folder: str, config: str) -> Path:
    return CONFIG_ROOT / folder / f"{config}.yaml"


def pretrain_folder(folder: str) -> str:
    """``sni_t5large`` → ``c4_t5large``: where the pretraining run of that model size lives."""
    return "c4_" + folder.split("_", 1)[1]


def table_names() -> Sequence[str]:
    return sorted(TABLES)


# --------------------------------------------------------------------------------------------------
# Layouts for `hypertrain compare --layout`
# --------------------------------------------------------------------------------------------------

LAYOUTS = (*sorted(TABLES), "sni-categories")


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table_layout(table: Table, metrics_by_run: Mapping[str, Metrics]) -> tuple[list[str], list[list[str]]]:
    """The paper's rows and columns, each column followed by the paper's number (``metrics_by_run``: run name →
    its metrics). A run that has not logged its score shows ``-``; another paper's model shows ``n/a``."""
    header = ["Method"]
    for column in table.columns:
        header += [column.label, "paper"]
    rows = []
    for row in table.rows:
        cells = [row.label]
        for column, paper in zip(table.columns, row.paper, strict=True):
            if row.config is None:
                measured = "n/a"
            else:
                measured = _cell(column.score(metrics_by_run.get(run_name(column.folder, row.config), {})))
            cells += [measured, _cell(paper)]
        rows.append(cells)
    return header, rows


def sni_categories_layout(metrics_by_run: Mapping[str, Metrics]) -> tuple[list[str], list[list[str]]]:
    """Tk-Instruct's per-category view of S-NI runs: exact match for its six classification-like test categories,
    ROUGE-L for the other six, and the overall ROUGE-L (runs without S-NI category metrics are left out)."""
    columns = [(c, "exact_match", "EM") for c in TK_INSTRUCT_EXACT_MATCH]
    columns += [(c, "rougeL", "ROUGE-L") for c in TK_INSTRUCT_ROUGE]
    header = ["run", *[f"{c} ({short})" for c, _, short in columns], "overall ROUGE-L"]
    rows = []
    for name, metrics in metrics_by_run.items():
        if not any(k.count("/") == 3 and k.startswith("eval/sni/") for k in metrics):
            continue
        cells = [_cell(metrics.get(f"eval/sni/{m}/{c.replace(' ', '_')}")) for c, m, _ in columns]
        rows.append([name, *cells, _cell(metrics.get("eval/sni/rougeL"))])
    return header, rows


def layout(name: str, metrics_by_run: Mapping[str, Metrics]) -> tuple[str, list[str], list[list[str]]]:
    """(title, header, rows) of a layout."""
    if name == "sni-categories":
        return ("S-NI per category, Tk-Instruct's metrics (EM: exact match)", *sni_categories_layout(metrics_by_run))
    if name not in TABLES:
        raise KeyError(f"unknown layout {name!r} (known: {', '.join(LAYOUTS)})")
    table = TABLES[name]
    return (table.title, *table_layout(table, metrics_by_run))
