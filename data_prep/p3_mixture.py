"""P3's datasets, T0's training mixture and held-out evaluation, and subset folder name → dataset.

A P3 subset folder is named after its promptsource task: dataset, subset (config) and template joined by ``_``
with non-word characters replaced by ``_`` (``cos_e_v1.11_explain_why_human`` kept the dots in the original
repository; other copies replace them too). :func:`match_dataset` normalises both the folder name and the
known ``dataset_subset`` prefixes the same way (every character outside ``[0-9A-Za-z]`` → ``_``, case folded)
and takes the longest known prefix followed by ``_``, so ``wiki_qa`` / ``wiki_hop_original`` or
``adversarial_qa_dbert`` / ``adversarial_qa_dbidaf`` never shadow each other. ANLI's round is part of the
folder name after the template (``anli_GPT_3_style_r1_score_eval``): its dataset is ``anli/r1``.
"""

from __future__ import annotations

import dataclasses
import re

SCORE_EVAL_SUFFIX = "_score_eval"

T0_TRAIN: tuple[tuple[str, str | None], ...] = (
    # multiple-choice QA
    ("cos_e", "v1.11"),
    ("cosmos_qa", None),
    ("dream", None),
    ("qasc", None),
    ("quail", None),
    ("quarel", None),
    ("quartz", None),
    ("sciq", None),
    ("social_i_qa", None),
    ("wiki_hop", "original"),
    ("wiqa", None),
    # extractive QA
    ("adversarial_qa", "dbidaf"),
    ("adversarial_qa", "dbert"),
    ("adversarial_qa", "droberta"),
    ("duorc", "SelfRC"),
    ("duorc", "ParaphraseRC"),
    ("ropes", None),
    ("quoref", None),
    # closed-book QA
    ("kilt_tasks", "hotpotqa"),
    ("wiki_qa", None),
    # paraphrase identification
    ("glue", "mrpc"),
    ("glue", "qqp"),
    ("paws", "labeled_final"),
    # sentiment
    ("amazon_polarity", None),
    ("app_reviews", None),
    ("imdb", None),
    ("rotten_tomatoes", None),
    ("yelp_review_full", None),
    # structure-to-text
    ("common_gen", None),
    ("wiki_bio", None),
    # summarization
    ("cnn_dailymail", "3.0.0"),
    ("gigaword", None),
    ("multi_news", None),
    ("samsum", None),
    ("xsum", None),
    # topic classification
    ("ag_news", None),
    ("dbpedia_14", None),
    ("trec", None),
)
"""The 38 datasets of T0's training mixture (every template but :data:`T0_EXCLUDED_SUBSETS`)."""

T0_EXCLUDED_SUBSETS = ("gigaword_summarize_",)
"""Prompted subsets of training datasets that T0 left out of its mixture."""

T0_EVAL: tuple[tuple[str, str | None], ...] = (
    ("super_glue", "rte"),
    ("super_glue", "cb"),
    ("anli", None),
    ("super_glue", "wsc.fixed"),
    ("winogrande", "winogrande_xl"),
    ("super_glue", "copa"),
    ("hellaswag", None),
    ("super_glue", "wic"),
    ("story_cloze", "2016"),
)
"""T0's held-out evaluation datasets (its ``_score_eval`` subsets; StoryCloze only where it was downloaded)."""

HART_EXCLUDED_EVAL = ("story_cloze/2016",)
"""Held-out datasets of T0 that HART's Tables 3-4 leave out: StoryCloze (its data needs a manual download). With
``--eval-set hart`` (the default) their subsets are dropped and listed in the manifest's ``dropped_tasks``."""

OTHER_P3: tuple[tuple[str, str | None], ...] = (
    ("ai2_arc", "ARC-Challenge"),
    ("ai2_arc", "ARC-Easy"),
    ("openbookqa", "main"),
    ("piqa", None),
    ("race", "high"),
    ("race", "middle"),
    ("squad_v2", None),
    ("drop", None),
    ("trivia_qa", "unfiltered"),
    ("web_questions", None),
    ("super_glue", "boolq"),
    ("super_glue", "multirc"),
    ("super_glue", "record"),
    ("winogrande", "winogrande_debiased"),
)
"""P3's other datasets (T0+ / T0++ training additions): known, so their subsets are not reported as unmatched."""

_ANLI_ROUND = re.compile(r"_(r[1-3])$")


def normalize(name: str) -> str:
    """Compare names the way P3 derived folder names: non-alphanumerics → ``_``, case folded (length kept)."""
    return re.sub(r"[^0-9A-Za-z]", "_", name).lower()


def dataset_id(dataset: str, subset: str | None) -> str:
    return f"{dataset}/{subset}" if subset else dataset


@dataclasses.dataclass(frozen=True)
class SubsetName:
    """What a subset folder name says."""

    folder: str
    dataset: str | None
    """``glue/mrpc``, ``anli/r1``, ... or None when no known dataset matches."""
    template: str
    """The template part of the name (without ANLI's round and the ``_score_eval`` suffix)."""
    score_eval: bool
    t0_train: bool
    """A subset of T0's training mixture (a training dataset's template, not excluded, not score-eval)."""
    t0_eval: bool
    """A ``_score_eval`` subset of a held-out evaluation dataset."""


_KNOWN: list[tuple[str, tuple[str, str | None]]] = sorted(
    ((normalize(dataset_id(d, s).replace("/", "_")), (d, s)) for d, s in (*T0_TRAIN, *T0_EVAL, *OTHER_P3)),
    key=lambda item: -len(item[0]),
)
_TRAIN_KEYS = set(T0_TRAIN)
_EVAL_KEYS = set(T0_EVAL)
_EXCLUDED = {normalize(name) for name in T0_EXCLUDED_SUBSETS}


def match_dataset(folder: str) -> SubsetName:
    """Map a subset folder name to its dataset (longest known ``dataset_subset`` prefix)."""
    norm = normalize(folder)
    score_eval = norm.endswith(SCORE_EVAL_SUFFIX)
    for key, (dataset, subset) in _KNOWN:
        if norm == key or norm.startswith(key + "_"):
            template = folder[len(key) + 1 :]
            if score_eval:
                template = template[: -len(SCORE_EVAL_SUFFIX)]
            name = dataset_id(dataset, subset)
            if dataset == "anli":
                match = _ANLI_ROUND.search(normalize(template))
                if match:
                    name = f"anli/{match.group(1)}"
                    template = template[: match.start()]
            return SubsetName(
                folder=folder,
                dataset=name,
                template=template,
                score_eval=score_eval,
                t0_train=(dataset, subset) in _TRAIN_KEYS and not score_eval and norm not in _EXCLUDED,
                t0_eval=(dataset, subset) in _EVAL_KEYS and score_eval,
            )
    return SubsetName(folder, None, "", score_eval, False, False)
