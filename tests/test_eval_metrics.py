"""S-NI and P3 metric functions against hand-computed cases (the official S-NI evaluation's semantics)."""

from __future__ import annotations

import math

import pytest

from hypertrain.evaluation.metrics import (
    _rouge_scorer,
    aggregate_p3,
    aggregate_sni,
    category_key,
    exact_match,
    max_over_references,
    normalize_answer,
    rank_classify,
    rouge_l,
    sni_instance_scores,
)


def test_normalisation_lowercases_strips_punctuation_collapses_whitespace_keeps_articles():
    assert normalize_answer("  The Cat's   hat!\n") == "the cats hat"
    assert normalize_answer("A dog, an apple; the end.") == "a dog an apple the end"  # articles stay (not SQuAD)
    assert normalize_answer("e-mail (U.S.A.)") == "email usa"
    assert normalize_answer("") == "" and normalize_answer(" ?! ") == ""


def test_exact_match_after_normalisation():
    assert exact_match("Yes.", "yes") == 1.0
    assert exact_match("  positive  review ", "Positive review!") == 1.0
    assert exact_match("the answer", "answer") == 0.0  # the article is not dropped
    assert exact_match("", "") == 1.0 and exact_match("", "no") == 0.0


def test_rouge_l_hand_computed_lcs_f_measure():
    # LCS("the cat sat on the mat", "the cat lay on the mat") = 5 of 6 tokens each way
    assert rouge_l("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(5 / 6)
    # LCS 2, precision 2/4, recall 2/2: F = 2PR / (P + R) = 2/3
    assert rouge_l("a b c d", "a c") == pytest.approx(2 / 3)
    # case and punctuation are tokenizer business: non-alphanumerics split tokens
    assert rouge_l("Hello, World!", "hello world") == 1.0
    assert rouge_l("x", "y") == 0.0


def test_rouge_l_uses_the_porter_stemmer_on_tokens_longer_than_three_characters():
    assert rouge_l("running dogs", "run dog") == 1.0  # running → run, dogs → dog
    assert rouge_l("cats", "cat") == 1.0  # 4 characters: stemmed
    assert rouge_l("ran", "run") == 0.0  # no stemming rule joins these
    assert rouge_l("is", "be") == 0.0


def test_non_ascii_text_has_no_tokens_in_the_default_track():
    # why non-English tasks need S-NI's cross-lingual track: rouge-score's tokenizer keeps [a-z0-9] only
    assert rouge_l("日本語のテキスト", "日本語のテキスト") == 0.0
    assert rouge_l("straße", "strasse") == 0.0  # "stra", "e" vs "strass"


def test_several_references_take_the_maximum():
    refs = ["the cat lay on the mat", "sat on the mat", "Yes"]
    assert max_over_references(rouge_l, "the cat sat on the mat", refs) == pytest.approx(max(5 / 6, 2 * 1 * (4 / 6) / (1 + 4 / 6)))
    scores = sni_instance_scores("yes!", refs)
    assert scores == {"exact_match": 1.0, "rougeL": 1.0}
    with pytest.raises(ValueError, match="reference"):
        max_over_references(rouge_l, "x", [])


def test_empty_and_missing_predictions_score_zero():
    assert sni_instance_scores("", ["an answer"]) == {"exact_match": 0.0, "rougeL": 0.0}
    assert sni_instance_scores(None, ["an answer"]) == {"exact_match": 0.0, "rougeL": 0.0}
    assert sni_instance_scores(None, [""]) == {"exact_match": 1.0, "rougeL": 0.0}


def test_category_key_is_the_official_one():
    assert category_key("Cause Effect  Classification") == "cause_effect_classification"
    assert category_key("Misc.") == "misc."


def test_sni_aggregates_are_means_over_instances_not_of_task_means():
    rows = [
        {"task": "a", "category": "qa", "exact_match": 1.0, "rougeL": 1.0},
        {"task": "b", "category": "qa", "exact_match": 0.0, "rougeL": 0.5},
        {"task": "b", "category": "qa", "exact_match": 0.0, "rougeL": 0.0},
        {"task": "c", "category": "sum", "exact_match": 0.0, "rougeL": 0.25},
    ]
    result = aggregate_sni(rows)
    assert result["exact_match"] == 25.0  # a mean of task means would be 33.3
    assert result["rougeL"] == pytest.approx(100 * 1.75 / 4)
    assert result["num_examples"] == 4
    assert result["per_task"]["b"] == {"exact_match": 0.0, "rougeL": 25.0, "num_examples": 2}
    assert result["per_category"]["qa"]["rougeL"] == pytest.approx(50.0)  # (1 + .5 + 0) / 3, not (1 + .25) / 2
    assert result["per_category"]["sum"]["num_examples"] == 1
    assert math.isnan(aggregate_sni([])["rougeL"])


def test_rank_classify_takes_the_first_maximum():
    assert rank_classify([-3.0, -1.0, -2.0]) == 1
    assert rank_classify([-1.0, -1.0]) == 0
    with pytest.raises(ValueError):
        rank_classify([])


def test_p3_accuracy_per_subset_median_and_mean_per_dataset():
    def rows(task, dataset, correct, total):
        return [{"task": task, "dataset": dataset, "correct": i < correct} for i in range(total)]

    data = rows("rte_p1", "super_glue/rte", 1, 2) + rows("rte_p2", "super_glue/rte", 2, 2) + rows("rte_p3", "super_glue/rte", 0, 4)
    data += rows("copa_p1", "super_glue/copa", 3, 4) + rows("copa_p2", "super_glue/copa", 1, 4)
    result = aggregate_p3(data)
    assert result["per_subset"]["rte_p1"] == {"dataset": "super_glue/rte", "accuracy": 50.0, "num_examples": 2}
    rte = result["per_dataset"]["super_glue/rte"]
    assert rte == {"median": 50.0, "mean": 50.0, "num_prompts": 3}  # accuracies 50, 100, 0
    copa = result["per_dataset"]["super_glue/copa"]
    assert copa["median"] == 50.0 and copa["mean"] == 50.0 and copa["num_prompts"] == 2  # 75, 25: middle two
    assert result["accuracy"] == pytest.approx(100 * 7 / 16)
    assert result["dataset_median_average"] == 50.0
    skewed = aggregate_p3(rows("x1", "d", 1, 1) + rows("x2", "d", 1, 1) + rows("x3", "d", 0, 1))
    assert skewed["per_dataset"]["d"]["median"] == 100.0 and skewed["per_dataset"]["d"]["mean"] == pytest.approx(200 / 3)


def test_rouge_needs_no_download(monkeypatch):
    import nltk

    def refuse(*args, **kwargs):
        raise AssertionError("rouge-score must not download NLTK data")

    monkeypatch.setattr(nltk, "download", refuse)
    monkeypatch.setattr(nltk.data, "find", refuse)
    _rouge_scorer.cache_clear()  # build the scorer (and its stemmer) under the patch too
    assert rouge_l("the runners were running", "a runner runs") > 0
