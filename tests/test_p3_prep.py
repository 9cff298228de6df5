"""P3 prep: TFRecord decoding, both layouts, T0 selection/filters/mixing, MetaICL episodes, score-eval regrouping,
bad input, determinism, job arrays, command line — on the real sample and on small fixtures."""

from __future__ import annotations

import dataclasses
import json
import struct
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from p3_fixtures import (
    choice_rows,
    generative_rows,
    sample_rows,
    score_eval_rows,
    write_parquet_subset,
    write_tfrecord_subset,
)

from data_prep import p3, tfrecord
from data_prep.p3_mixture import T0_EVAL, T0_TRAIN, match_dataset
from data_prep.runner import PrepError
from data_prep.shards import merge_manifests, read_episodes, sha256_file, verify
from data_prep.tfrecord import (
    TFRecordError,
    crc32c,
    crc32c_python,
    decode_features,
    encode_example,
    iter_records,
    masked_crc32c,
    parse_example,
)
from hypertrain.config import ConfigError, P3PrepConfig
from hypertrain.episode import Episode

ADV = "adversarial_qa_dbert_based_on"
OBQA = "openbookqa_main_choices"
HSWAG = "hellaswag_complete_first_then_score_eval"


def run(src: Path, out: Path, **options) -> dict:
    return p3.prepare(P3PrepConfig(src=str(src), out=str(out), **options))


def loader_episodes(out: Path, pass_index: int = 0, seed: int = 0) -> list[Episode]:
    """One pass of a prepared P3 training directory as the loader delivers it (demonstrations drawn)."""
    from hypertrain.data.stream import SlotStream, load_source

    stream = SlotStream(load_source(out), slot=0, num_slots=1, seed=seed, shuffle_buffer=1)
    return [payload for payload, _ in stream._pass_payloads(pass_index)]


def demo_blocks(hyper_input: str) -> list[tuple[str, str]]:
    """Invert :func:`p3.render_demonstrations` (the fixtures' texts hold no blank lines)."""
    pairs = []
    for block in hyper_input.split("\n\nInput: "):
        x, _, y = block.removeprefix("Input: ").partition("\nOutput: ")
        pairs.append((x, y))
    return pairs


def fingerprint(out: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(out.iterdir())}


# --------------------------------------------------------------------------------------------------
# TFRecord reader
# --------------------------------------------------------------------------------------------------


def test_crc32c_and_framing():
    assert crc32c(b"123456789") == crc32c_python(b"123456789") == 0xE3069283  # the CRC32C check value
    data = bytes(range(256)) * 3
    assert crc32c(data) == crc32c_python(data)
    assert masked_crc32c(b"") == 0xA282EAD8  # crc32c("") = 0, so the mask's constant


def test_feature_decoding_scalar_vs_list():
    record = encode_example(
        {
            "one_id": ("int64", [7]),
            "text": ("bytes", ["héllo"]),
            "choices": ("bytes", ["only one"]),
            "flag": ("int64", [1]),
            "weight": ("float", [0.5]),
            "neg": ("int64", [-3, 2**40]),
            "empty": ("int64", []),
            "undeclared": ("bytes", ["ignored"]),
        }
    )
    spec = {
        "one_id": {"dtype": "int32", "shape": [None]},
        "text": {"dtype": "string", "shape": []},
        "choices": {"dtype": "string", "shape": [None]},
        "flag": {"dtype": "bool", "shape": []},
        "weight": {"dtype": "float32", "shape": []},
        "neg": {"dtype": "int64", "shape": [None]},
        "empty": {"dtype": "int32", "shape": [None]},
    }
    row = decode_features(parse_example(record), spec, "here")
    assert row == {
        "one_id": [7],  # a one-element list stays a list when info.json says so
        "text": "héllo",
        "choices": ["only one"],
        "flag": True,
        "weight": 0.5,
        "neg": [-3, 2**40],
        "empty": [],
    }
    assert set(parse_example(record, {"text"})) == {"text"}  # only wanted features are decoded
    with pytest.raises(TFRecordError, match="here: scalar feature 'neg' holds 2 values"):
        decode_features(parse_example(record), {"neg": {"dtype": "int64", "shape": []}}, "here")
    with pytest.raises(TFRecordError, match="declared string but holds a int64_list"):
        decode_features(parse_example(record), {"one_id": {"dtype": "string", "shape": []}}, "here")


def test_parse_example_accepts_other_valid_encodings():
    """Protobuf allows unpacked numeric lists, value-before-key map entries, long keys and unknown fields."""
    ld, var = tfrecord._length_delimited, tfrecord._encode_varint
    unpacked_ints = ld(3, var(1 << 3 | 0) + var(5) + var(1 << 3 | 0) + var(300))
    unpacked_floats = ld(2, b"\x0d" + struct.pack("<f", 1.5) + b"\x0d" + struct.pack("<f", -2.0))
    two_strings = ld(1, ld(1, b"a") + ld(1, "é".encode()))
    long_key = "k" * 200
    entries = [
        ld(2, unpacked_ints) + ld(1, b"ints"),  # value before key
        ld(1, b"floats") + ld(2, unpacked_floats),
        ld(1, long_key.encode()) + ld(2, two_strings),
        ld(1, b"unset") + ld(2, b""),
        ld(1, b"with_unknown") + ld(2, var(9 << 3 | 0) + var(77) + ld(3, ld(1, var(8)))),
    ]
    record = (
        ld(1, b"".join(ld(1, e) for e in entries)) + var(2 << 3 | 0) + var(1)
    )  # an unknown top-level field
    assert parse_example(record) == {
        "ints": ("int64", [5, 300]),
        "floats": ("float", [1.5, -2.0]),
        long_key: ("bytes", [b"a", "é".encode()]),
        "unset": (None, []),
        "with_unknown": ("int64", [8]),
    }
    with pytest.raises(ValueError, match="not a valid tf.train.Example"):
        parse_example(record[:-9])


def test_real_sample_features_decode(p3_sample):
    choices = sample_rows(p3_sample, OBQA, "train")
    assert all(isinstance(r["answer_choices"], list) and len(r["answer_choices"]) > 1 for r in choices)
    score = sample_rows(p3_sample, HSWAG, "validation")
    first = score[0]
    assert isinstance(first["idx"], list) and len(first["idx"]) == 2
    assert isinstance(first["is_correct"], bool) and isinstance(first["weight"], float)
    assert isinstance(first["inputs_pretokenized"], str) and first["targets"][-1] == 1  # targets end with EOS
    stats = json.loads((p3_sample / "data" / ADV / "stats.train.json").read_text())
    adv = sample_rows(p3_sample, ADV, "train")
    assert len(adv) == stats["examples"] and sum(len(r["inputs"]) for r in adv) == stats["inputs_tokens"]


# --------------------------------------------------------------------------------------------------
# Real sample: train and eval
# --------------------------------------------------------------------------------------------------


def test_real_sample_train_episodes(p3_sample, tmp_path):
    manifest = run(p3_sample, tmp_path / "out", split="train", shots=5)
    # default selection: only the T0 training subset (openbookqa is not in T0's mixture, hellaswag is held out)
    assert manifest["tasks"] == {ADV: 28}
    assert manifest["categories"] == {ADV: ["adversarial_qa/dbert"]}
    assert manifest["filters"]["avg_input_tokens"] == {ADV: round(6717 / 28, 2)}
    assert manifest["extra"]["subsets"][ADV]["dataset"] == "adversarial_qa/dbert"
    rows = sample_rows(p3_sample, ADV, "train")
    episodes = read_episodes(tmp_path / "out")
    assert [e.id for e in episodes] == [f"{ADV}/train/{i}" for i in range(28)]
    inputs = {r["inputs_pretokenized"].strip() for r in rows}
    pairs = {(r["inputs_pretokenized"].strip(), r["targets_pretokenized"].strip()) for r in rows}
    for episode, row in zip(episodes, rows, strict=True):
        assert episode.source == "p3" and episode.task == ADV and episode.choices is None
        assert episode.input == row["inputs_pretokenized"] and episode.targets == [
            row["targets_pretokenized"]
        ]
        assert episode.extra == {} and episode.hyper_input == ""  # stored once: the loader draws the demos
    assert manifest["filters"]["demonstrations"] == {"drawn_by": "loader", "shots": 5}
    drawn = {e.id: e for e in loader_episodes(tmp_path / "out")}
    for row, episode in zip(rows, episodes, strict=True):
        demos = demo_blocks(drawn[episode.id].hyper_input)
        assert len(demos) == 5 and set(demos) <= pairs and len(set(demos)) == 5
        assert all(x in inputs and x != row["inputs_pretokenized"].strip() for x, _ in demos)
    assert verify(tmp_path / "out")["num_samples"] == 28
    with_ids = run(p3_sample, tmp_path / "ids", split="train", shots=5, token_ids=True)
    assert with_ids["num_samples"] == 28
    assert read_episodes(tmp_path / "ids")[0].extra == {"input_ids": rows[0]["inputs"], "target_ids": rows[0]["targets"]}


def test_real_sample_eval_regroups_score_eval(p3_sample, tmp_path):
    manifest = run(p3_sample, tmp_path / "out", split="eval", shots=3)
    assert manifest["tasks"] == {
        HSWAG: 7
    }  # held-out score-eval subsets only: 28 rows = 7 examples x 4 choices
    rows = sample_rows(p3_sample, HSWAG, "validation")
    episodes = read_episodes(tmp_path / "out")
    assert {e.hyper_input for e in episodes} == {episodes[0].hyper_input}  # one fixed demo set per subset
    facts = manifest["extra"]["subsets"][HSWAG]
    assert (
        facts["demo_split"] == "train" and len(facts["demo_examples"]) == 3 and facts["kind"] == "score_eval"
    )
    for episode in episodes:
        example = int(episode.id.rsplit("/", 1)[1])
        mine = sorted((r for r in rows if r["idx"][0] == example), key=lambda r: r["idx"][1])
        assert episode.choices == [r["targets_pretokenized"] for r in mine]
        assert mine[episode.label]["is_correct"] and episode.targets == [episode.choices[episode.label]]
        assert episode.input == mine[0]["inputs_pretokenized"]
        assert episode.extra["choice_ids"] == [r["targets"] for r in mine]
    assert [e.label for e in episodes] == [3, 3, 3, 3, 2, 3, 0]


# --------------------------------------------------------------------------------------------------
# Eval: regrouping, answer choices, bad examples
# --------------------------------------------------------------------------------------------------


def test_score_eval_rows_need_not_be_adjacent(tmp_path):
    rows, gold = score_eval_rows(12, num_choices=4, shuffle_seed=3)
    assert [r["idx"][0] for r in rows[:4]] != [rows[0]["idx"][0]] * 4  # really interleaved
    src = tmp_path / "src"
    write_tfrecord_subset(src, "super_glue_rte_x_score_eval", "validation", rows)
    write_tfrecord_subset(src, "super_glue_rte_x_score_eval", "train", score_eval_rows(20, 4, "t")[0])
    run(src, tmp_path / "out", split="eval", shots=4)
    episodes = read_episodes(tmp_path / "out")
    assert [e.id.rsplit("/", 1)[1] for e in episodes] == [str(i) for i in range(12)]
    assert [e.label for e in episodes] == gold
    for example, episode in enumerate(episodes):
        assert episode.choices == [f"s ending {example}.{c}" for c in range(4)]
        assert episode.categories == ["super_glue/rte"]
    demos = demo_blocks(episodes[0].hyper_input)
    assert len(demos) == 4 and all(x.startswith("t question") for x, _ in demos)
    # demonstrations show the gold choice of their example
    assert all(y == f"t ending {x.split()[2][:-1]}.{(int(x.split()[2][:-1]) * 7 + 1) % 4}" for x, y in demos)


BAD_EXAMPLES = {
    "inputs_disagree": (
        lambda r: r["idx"] == [2, 1],
        {"inputs_pretokenized": "another question"},
        "rows disagree on the input",
    ),
    "no_correct_choice": (
        lambda r: r["idx"][0] == 2 and r["is_correct"],
        {"is_correct": False},
        "no choice is marked",
    ),
    "several_correct_choices": (
        lambda r: r["idx"][0] == 2,
        {"is_correct": True},
        r"choices \[0, 1, 2\] are all marked",
    ),
    "missing_choice_index": (lambda r: r["idx"] == [2, 1], {"idx": [2, 5]}, "choice index 1 is missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_EXAMPLES))
def test_bad_score_eval_example_errors_or_is_skipped(tmp_path, case):
    select, change, message = BAD_EXAMPLES[case]
    rows, _ = score_eval_rows(6)
    rows = [dict(r, **change) if select(r) else r for r in rows]
    src = tmp_path / "src"
    subset = "super_glue_cb_x_score_eval"
    write_tfrecord_subset(src, subset, "validation", rows)
    write_tfrecord_subset(src, subset, "train", score_eval_rows(6, prefix="t")[0])
    with pytest.raises(
        PrepError, match=rf"{subset} \(validation split\): example 2 \(rows \[.*\]\): {message}"
    ):
        run(src, tmp_path / "out", split="eval", shots=2)
    manifest = run(src, tmp_path / "out2", split="eval", shots=2, skip_bad=True)
    assert manifest["skipped"] == {f"instance:{case}": 1}
    assert manifest["tasks"] == {subset: 5}
    assert manifest["extra"]["subsets"][subset]["skipped"] == {f"instance:{case}": 1}
    assert 2 not in [int(e.id.rsplit("/", 1)[1]) for e in read_episodes(tmp_path / "out2")]


def test_answer_choices_subset_becomes_multiple_choice_and_demo_split_falls_back(tmp_path):
    src = tmp_path / "src"
    rows = choice_rows(9)
    rows[4] = dict(rows[4], targets_pretokenized="not an option")
    write_parquet_subset(src, "piqa_pick", "validation", rows)
    write_parquet_subset(src, "piqa_pick", "test", generative_rows(5, "d"))  # no train split: demos from test
    with pytest.raises(
        PrepError, match=r"piqa_pick \(validation split\): row 4: target 'not an option' is not one of"
    ):
        run(src, tmp_path / "out", split="eval", subsets=["piqa_*"], shots=3)
    manifest = run(src, tmp_path / "out", split="eval", subsets=["piqa_*"], shots=3, skip_bad=True)
    assert manifest["skipped"] == {"instance:target_not_in_choices": 1}
    facts = manifest["extra"]["subsets"]["piqa_pick"]
    assert (
        facts["demo_split"] == "test" and facts["kind"] == "answer_choices" and len(facts["demo_rows"]) == 3
    )
    episodes = read_episodes(tmp_path / "out")
    assert len(episodes) == 8
    for episode in episodes:
        row = rows[int(episode.id.rsplit("/", 1)[1])]
        assert episode.choices == row["answer_choices"]
        assert episode.choices[episode.label] == row["targets_pretokenized"].strip() == episode.targets[0]
        assert all(x.startswith("d ") for x, _ in demo_blocks(episode.hyper_input))


# --------------------------------------------------------------------------------------------------
# Train: demonstrations, mixing cap, length filter, selection
# --------------------------------------------------------------------------------------------------


def test_demonstrations_never_contain_the_query(tmp_path):
    rows = generative_rows(12)
    for i in (
        3,
        7,
        9,
    ):  # rows with the very same input as row 0 (but other targets) are no demos for it either
        rows[i] = dict(rows[i], inputs_pretokenized=rows[0]["inputs_pretokenized"])
    src = tmp_path / "src"
    write_tfrecord_subset(src, "ag_news_classify", "train", rows)
    run(src, tmp_path / "out", split="train", shots=8)
    episodes = loader_episodes(tmp_path / "out")
    assert len(episodes) == 12
    for episode in episodes:
        demos = demo_blocks(episode.hyper_input)
        assert len(demos) == 8 and len(set(demos)) == 8
        assert episode.input.strip() not in [x for x, _ in demos]
        assert (episode.input.strip(), episode.targets[0].strip()) not in demos
    # shots close to the pool size: rows sharing row 0's input have only 12 - 4 = 8 candidates left
    with pytest.raises(PrepError, match="row 0: fewer than 9 other rows with a different input"):
        run(src, tmp_path / "out2", split="train", shots=9, shard_max_samples=100, rows_per_unit=100)
    manifest = run(src, tmp_path / "out3", split="train", shots=9, shard_max_samples=100, rows_per_unit=100,
                   skip_bad=True)
    # with --skip-bad the whole pool goes: once row 0's 4 rows leave, the other 8 have 7 candidates each
    assert manifest["skipped"] == {"instance:too_few_distinct_demonstrations": 12} and manifest["num_samples"] == 0


def test_mixing_cap_is_t0s_rule_and_seeded(tmp_path):
    src = tmp_path / "src"
    for template in ("a", "b", "c", "d"):  # 4 templates of dbpedia_14: cap = 100 // 4 = 25 rows each
        write_tfrecord_subset(
            src, f"dbpedia_14_{template}", "train", generative_rows(40, template), num_shards=2
        )
    write_tfrecord_subset(
        src, "trec_only", "train", generative_rows(30, "t")
    )  # 1 template: cap 100 > 30 rows
    manifest = run(src, tmp_path / "out", split="train", mixing_cap=100, shots=4)
    assert manifest["tasks"] == {
        "dbpedia_14_a": 25,
        "dbpedia_14_b": 25,
        "dbpedia_14_c": 25,
        "dbpedia_14_d": 25,
        "trec_only": 30,
    }
    assert manifest["filters"]["templates_per_dataset"] == {"dbpedia_14": 4, "trec": 1}
    facts = manifest["extra"]["subsets"]["dbpedia_14_a"]
    assert (facts["rows"], facts["kept_rows"], facts["cap"]) == (40, 25, 25)
    episodes = [e for e in read_episodes(tmp_path / "out") if e.task == "dbpedia_14_a"]
    kept = [int(e.id.rsplit("/", 1)[1]) for e in episodes]
    assert kept == sorted(kept) and kept != list(range(25)) and max(kept) >= 25  # a sample, kept in row order
    kept_inputs = {e.input.strip() for e in episodes}
    drawn = [e for e in loader_episodes(tmp_path / "out") if e.task == "dbpedia_14_a"]
    assert len(drawn) == 25 and all(
        x in kept_inputs for e in drawn for x, _ in demo_blocks(e.hyper_input)
    )  # demos from kept rows of the same subset
    run(src, tmp_path / "seed2", split="train", mixing_cap=100, shots=4, seed=2)
    other = [e.id for e in read_episodes(tmp_path / "seed2") if e.task == "dbpedia_14_a"]
    assert other != [e.id for e in episodes]
    manifest = run(src, tmp_path / "nocap", split="train", mixing_cap=0, shots=4)
    assert manifest["tasks"]["dbpedia_14_a"] == 40


def test_length_filter_drops_long_subsets_in_both_layouts(tmp_path):
    short, long = generative_rows(20, "s", input_words=5), generative_rows(20, "l", input_words=40)
    tf_src, pq_src = tmp_path / "tf", tmp_path / "pq"
    for name, rows in (("imdb_short", short), ("imdb_long", long)):
        write_tfrecord_subset(tf_src, name, "train", rows)
        write_parquet_subset(pq_src, name, "train", rows)
    for src in (tf_src, pq_src):
        manifest = run(src, tmp_path / f"out-{src.name}", split="train", max_avg_input_tokens=30, shots=2)
        assert manifest["tasks"] == {"imdb_short": 20}
        assert manifest["dropped_tasks"] == {"avg_input_tokens>30": ["imdb_long"]}
        averages = manifest["filters"]["avg_input_tokens"]
        assert averages["imdb_long"] > 30 >= averages["imdb_short"]
    assert run(tf_src, tmp_path / "all", split="train", max_avg_input_tokens=0, shots=2)["tasks"] == {
        "imdb_long": 20,
        "imdb_short": 20,
    }
    # the filter reads stats.train.json: its figures decide, not the data
    write_tfrecord_subset(
        tf_src, "imdb_short", "train", short, stats={"examples": 20, "inputs_tokens": 20 * 500}
    )
    assert run(tf_src, tmp_path / "stats", split="train", shots=2)["dropped_tasks"] == {
        "avg_input_tokens>320": ["imdb_short"]
    }


def test_default_selection_dataset_mapping_and_overrides(tmp_path):
    src = tmp_path / "src"
    names = [
        "cos_e_v1.11_explain_why",  # dots kept, as in the P3 repository
        "gigaword_summarize_",  # T0 leaves this template out
        "gigaword_TLDR",
        "wiki_qa_exercise",
        "super_glue_rte_GPT_3_style_score_eval",
        "anli_GPT_3_style_r2_score_eval",
        "super_glue_boolq_yes_no",  # a P3 dataset outside T0's mixture
        "my_own_task",  # no known dataset
    ]
    for name in names:
        rows = score_eval_rows(4)[0] if name.endswith("_score_eval") else generative_rows(6, name)
        write_tfrecord_subset(src, name, "train", rows)
        write_tfrecord_subset(src, name, "validation", rows)
    manifest = run(src, tmp_path / "train", split="train", shots=2)
    assert sorted(manifest["tasks"]) == ["cos_e_v1.11_explain_why", "gigaword_TLDR", "wiki_qa_exercise"]
    assert manifest["categories"]["cos_e_v1.11_explain_why"] == ["cos_e/v1.11"]
    assert manifest["filters"]["unmatched_subsets"] == ["my_own_task"]
    assert manifest["dropped_tasks"]["unknown_dataset"] == ["my_own_task"]
    assert manifest["filters"]["templates_per_dataset"]["gigaword"] == 2
    manifest = run(src, tmp_path / "eval", split="eval", shots=2)
    assert sorted(manifest["tasks"]) == [
        "anli_GPT_3_style_r2_score_eval",
        "super_glue_rte_GPT_3_style_score_eval",
    ]
    assert manifest["categories"]["anli_GPT_3_style_r2_score_eval"] == ["anli/r2"]

    manifest = run(
        src, tmp_path / "override", split="train", shots=2, subsets=["my_own_task", "super_glue_*"]
    )
    assert sorted(manifest["tasks"]) == [
        "my_own_task",
        "super_glue_boolq_yes_no",
    ]  # the glob leaves score-eval out
    assert manifest["categories"]["my_own_task"] == []
    with pytest.raises(PrepError, match="is a _score_eval subset"):
        run(src, tmp_path / "x", split="train", subsets=["super_glue_rte_GPT_3_style_score_eval"])
    with pytest.raises(PrepError, match=r"'nothing_\*' matches no subset folder"):
        run(src, tmp_path / "x", split="train", subsets=["nothing_*"])


def test_t0_tables():
    assert len(T0_TRAIN) == 38 and len(set(T0_TRAIN)) == 38
    assert len(T0_EVAL) == 9
    assert match_dataset("adversarial_qa_dbert_based_on").dataset == "adversarial_qa/dbert"
    assert match_dataset("adversarial_qa_dbidaf_based_on").dataset == "adversarial_qa/dbidaf"
    assert match_dataset("wiki_hop_original_choose_best_object").dataset == "wiki_hop/original"
    assert match_dataset("cos_e_v1_11_explain_why").dataset == "cos_e/v1.11"  # dots replaced too
    assert match_dataset("ai2_arc_ARC_Challenge_qa_options").dataset == "ai2_arc/ARC-Challenge"
    name = match_dataset("super_glue_wsc.fixed_GPT_3_Style_score_eval")
    assert (name.dataset, name.template, name.score_eval, name.t0_eval) == (
        "super_glue/wsc.fixed",
        "GPT_3_Style",
        True,
        True,
    )
    assert not match_dataset("winogrande_winogrande_debiased_Replace_score_eval").t0_eval
    assert match_dataset("glue_mrpcx_foo").dataset is None


# --------------------------------------------------------------------------------------------------
# Layouts
# --------------------------------------------------------------------------------------------------


def test_both_layouts_give_identical_episodes(p3_sample, tmp_path):
    pq_src = tmp_path / "parquet"
    for subset in (ADV, OBQA, HSWAG):
        for split in ("train", "validation"):
            rows = sample_rows(p3_sample, subset, split)
            write_parquet_subset(pq_src, subset, split, rows, num_files=2, row_group_size=5)
    for split, subsets in (("train", [ADV, OBQA]), ("eval", [OBQA, HSWAG])):
        tf_manifest = run(p3_sample, tmp_path / f"tf-{split}", split=split, subsets=subsets, shots=4)
        pq_manifest = run(pq_src, tmp_path / f"pq-{split}", split=split, subsets=subsets, shots=4)
        assert (
            tf_manifest["filters"].pop("layout") == "tfrecord"
            and pq_manifest["filters"].pop("layout") == "parquet"
        )
        assert tf_manifest["tasks"] == pq_manifest["tasks"] and tf_manifest["extra"] == pq_manifest["extra"]
        tf_eps = [e.to_json() for e in read_episodes(tmp_path / f"tf-{split}")]
        assert tf_eps == [e.to_json() for e in read_episodes(tmp_path / f"pq-{split}")] and tf_eps


def test_layouts_agree_on_capped_row_selection(tmp_path):
    rows = generative_rows(60)
    write_tfrecord_subset(tmp_path / "tf", "yelp_review_full_a", "train", rows, num_shards=3)
    write_parquet_subset(tmp_path / "pq", "yelp_review_full_a", "train", rows, num_files=2, row_group_size=7)
    for name in ("tf", "pq"):
        run(tmp_path / name, tmp_path / f"out-{name}", split="train", mixing_cap=17, shots=3)
    assert fingerprint(tmp_path / "out-tf") != {}
    tf_eps = [e.to_json() for e in read_episodes(tmp_path / "out-tf")]
    assert len(tf_eps) == 17 and tf_eps == [e.to_json() for e in read_episodes(tmp_path / "out-pq")]


def test_parquet_split_names_from_file_names(tmp_path):
    folder = tmp_path / "src" / "trec_q"
    folder.mkdir(parents=True)
    rows = generative_rows(6)
    pq.write_table(pa.Table.from_pylist(rows[:3]), folder / "p3-train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3:]), folder / "p3-train-00001-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(rows), folder / "validation.parquet")
    layout, subsets = p3.discover(tmp_path / "src")
    assert layout == "parquet" and sorted(subsets["trec_q"].splits) == ["train", "validation"]
    assert p3.count_rows(subsets["trec_q"].splits["train"]) == 6


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------


def _one_subset(tmp_path: Path, rows=None) -> tuple[Path, Path]:
    src = tmp_path / "src"
    folder = write_tfrecord_subset(src, "rotten_tomatoes_x", "train", rows or generative_rows(10))
    return src, folder


def test_missing_info_json(tmp_path):
    src, folder = _one_subset(tmp_path)
    (folder / "info.train.json").unlink()
    with pytest.raises(PrepError, match=r"rotten_tomatoes_x/info\.train\.json: missing"):
        run(src, tmp_path / "out", split="train", shots=2)
    manifest = run(src, tmp_path / "out2", split="train", shots=2, skip_bad=True)
    assert manifest["skipped"] == {"task:unreadable": 1} and manifest["tasks"] == {}
    assert "info.train.json: missing" in manifest["extra"]["subsets"]["rotten_tomatoes_x"]["error"]


def test_feature_declared_but_missing_from_a_record(tmp_path):
    rows = generative_rows(10)
    del rows[6]["targets"]
    src, folder = _one_subset(tmp_path, rows)
    info = json.loads((folder / "info.train.json").read_text())
    assert "targets" in info["features"]
    with pytest.raises(
        TFRecordError, match=r"train\.tfrecord-00000-of-00001: record 6: feature 'targets' is declared"
    ):
        run(src, tmp_path / "out", split="train", shots=2, token_ids=True)
    # the token ids are optional (and left out of training shards by default): without them the record is fine
    assert run(src, tmp_path / "out2", split="train", shots=2)["tasks"] == {
        "rotten_tomatoes_x": 10
    }


def test_null_value_in_parquet(tmp_path):
    rows = generative_rows(8)
    rows[3]["targets_pretokenized"] = None
    write_parquet_subset(tmp_path / "src", "samsum_x", "train", rows)
    with pytest.raises(PrepError, match=r"samsum_x \(train split\): row 3: targets_pretokenized is None"):
        run(tmp_path / "src", tmp_path / "out", split="train", shots=2)
    manifest = run(tmp_path / "src", tmp_path / "out2", split="train", shots=2, skip_bad=True)
    assert manifest["skipped"] == {"task:unreadable": 1}
    assert manifest["extra"]["subsets"]["samsum_x"]["error"].startswith("samsum_x (train split): row 3")


@pytest.mark.parametrize("damage", ["data_crc", "length_crc", "truncated"])
def test_corrupt_or_truncated_tfrecord(tmp_path, damage):
    src, folder = _one_subset(tmp_path)
    path = folder / "train.tfrecord-00000-of-00001"
    data = bytearray(path.read_bytes())
    first = int.from_bytes(data[:8], "little") + 16  # bytes of record 0
    if damage == "data_crc":
        data[first + 12 + 5] ^= 0x01  # a byte inside record 1's data
        expected = r"record 1 \(byte offset \d+\): CRC mismatch in the record data"
    elif damage == "length_crc":
        data[first + 8] ^= 0x01  # record 1's length CRC
        expected = r"record 1 \(byte offset \d+\): CRC mismatch in the length header"
    else:
        data = data[: len(data) - 7]
        expected = r"record 9 \(byte offset \d+\): truncated file"
    path.write_bytes(bytes(data))
    with pytest.raises(TFRecordError, match=rf"train\.tfrecord-00000-of-00001: {expected}"):
        list(iter_records(path))
    with pytest.raises(TFRecordError, match=expected):
        run(src, tmp_path / "out", split="train", shots=2)
    assert run(src, tmp_path / "out2", split="train", shots=2, skip_bad=True)["skipped"] == {
        "task:unreadable": 1
    }


def test_unknown_layout_and_missing_shard(tmp_path):
    (tmp_path / "empty" / "some_folder").mkdir(parents=True)
    (tmp_path / "empty" / "some_folder" / "train.jsonl").write_text("{}\n")
    with pytest.raises(PrepError, match="unknown layout"):
        run(tmp_path / "empty", tmp_path / "out", split="train")
    src = tmp_path / "src"
    write_tfrecord_subset(src, "imdb_x", "train", generative_rows(9), num_shards=3)
    (src / "data" / "imdb_x" / "train.tfrecord-00001-of-00003").unlink()
    with pytest.raises(PrepError, match=r"imdb_x: split 'train' has TFRecord shards \[0, 2\] of \[3\]"):
        run(src, tmp_path / "out", split="train")


# --------------------------------------------------------------------------------------------------
# Determinism, job arrays, command line, config
# --------------------------------------------------------------------------------------------------


def _mixture(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    for index, name in enumerate(["ag_news_a", "ag_news_b", "imdb_x", "trec_y", "xsum_z"]):
        write_tfrecord_subset(src, name, "train", generative_rows(15 + index, name))
    return src


def test_deterministic_across_runs_and_workers(tmp_path):
    src = _mixture(tmp_path)
    for name, workers in (("a", 1), ("b", 1), ("c", 2)):
        run(src, tmp_path / name, split="train", shots=4, shard_max_samples=20, workers=workers)
    assert fingerprint(tmp_path / "a") == fingerprint(tmp_path / "b") == fingerprint(tmp_path / "c")
    assert len(fingerprint(tmp_path / "a")) > 2  # several shards + manifest


def test_job_array_pieces_merge_to_the_single_run(tmp_path):
    src = _mixture(tmp_path)
    single = run(src, tmp_path / "single", split="train", shots=3, shard_max_samples=16)
    for index in range(3):
        run(
            src, tmp_path / "array", split="train", shots=3, shard_max_samples=16, num_jobs=3, job_index=index
        )
    merged = merge_manifests(tmp_path / "array")
    for key in (
        "num_samples",
        "tasks",
        "categories",
        "skipped",
        "dropped_tasks",
        "filters",
        "extra",
        "options",
    ):
        assert merged[key] == single[key], key
    assert [e.to_json() for e in read_episodes(tmp_path / "array")] == [
        e.to_json() for e in read_episodes(tmp_path / "single")
    ]
    assert verify(tmp_path / "array")["num_samples"] == single["num_samples"]


def test_command_line(p3_sample, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "data_prep.p3",
            "--src",
            str(p3_sample),
            "--out",
            str(out),
            "--split",
            "eval",
            "--subsets",
            "*",
            "--shots",
            "2",
            "--skip-bad",
            "--no-token-ids",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert (
        "wrote 35 episodes of 2 tasks" in done.stdout and "skipped 1: task:not_multiple_choice" in done.stdout
    )
    assert all("input_ids" not in e.extra for e in read_episodes(out))
    assert p3.main(["--src", str(tmp_path / "nowhere"), "--out", str(out), "--split", "train"]) == 2


def test_config_validation(tmp_path):
    cfg = P3PrepConfig(src=str(tmp_path), out=str(tmp_path / "o"))
    with pytest.raises(ConfigError, match="p3_prep.shots: must be >= 1"):
        dataclasses.replace(cfg, shots=0)
    with pytest.raises(ConfigError, match="p3_prep.demo_split: must differ from eval_split"):
        dataclasses.replace(cfg, demo_split="validation")
    with pytest.raises(ConfigError, match=r"p3_prep.job_index: must be in \[0, num_jobs=2\)"):
        dataclasses.replace(cfg, num_jobs=2, job_index=2)


def test_render_demonstrations_format():
    text = p3.render_demonstrations([("  first question\n", "\nyes\n"), ("second", "no")])
    assert text == "Input: first question\nOutput: yes\n\nInput: second\nOutput: no"
    assert Episode.from_json(Episode("i", "t", "p3", [], text, "x", ["y"]).to_json()).hyper_input == text


def test_hart_eval_set_leaves_story_cloze_out_by_name(tmp_path):
    src = tmp_path / "src"
    for subset in ("super_glue_rte_x_score_eval", "story_cloze_2016_Story_Continuation_score_eval"):
        write_tfrecord_subset(src, subset, "validation", score_eval_rows(3, 2)[0])
        write_tfrecord_subset(src, subset, "train", score_eval_rows(4, 2, "t")[0])
    hart = run(src, tmp_path / "hart", split="eval", shots=2)
    assert list(hart["tasks"]) == ["super_glue_rte_x_score_eval"]
    assert hart["dropped_tasks"]["not_in_eval_set:hart"] == ["story_cloze_2016_Story_Continuation_score_eval"]
    t0 = run(src, tmp_path / "t0", split="eval", shots=2, eval_set="t0")
    assert len(t0["tasks"]) == 2 and "not_in_eval_set:hart" not in t0["dropped_tasks"]
