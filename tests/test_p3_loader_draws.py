"""P3 training rows are stored once and the loader draws each query's demonstrations from its shard's pool:
seeded, new every pass, never the query, within its subset; resume stays exact; big subsets are prepared in blocks
(pure, balanced pools per shard; the job array gives the single run's output)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
from p3_fixtures import generative_rows, write_tfrecord_subset
from test_p3_prep import demo_blocks

from data_prep import p3
from data_prep.merge import main as merge_main
from data_prep.shards import read_episodes
from hypertrain.config import P3PrepConfig
from hypertrain.data.stream import MixedStream, SlotStream, load_source

SHOTS = 4


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """Two subsets: one of 130 rows (blocks of 50 → 3 units; shards of at most 30 rows) and one of 20."""
    root = tmp_path_factory.mktemp("p3_draws")
    src = root / "src"
    write_tfrecord_subset(src, "ag_news_classify", "train", generative_rows(130, "a"))
    write_tfrecord_subset(src, "trec_question", "train", generative_rows(20, "t"))
    p3.prepare(P3PrepConfig(src=str(src), out=str(root / "out"), split="train", shots=SHOTS, rows_per_unit=50,
                            shard_max_samples=30, mixing_cap=0, max_avg_input_tokens=0))
    return root


def _pass(out: Path, pass_index: int, seed: int = 7) -> list:
    stream = SlotStream(load_source(out), slot=0, num_slots=1, seed=seed, shuffle_buffer=1)
    return [episode for episode, _ in stream._pass_payloads(pass_index)]


def test_blocks_write_pure_balanced_pools(prepared):
    out = prepared / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tasks"] == {"ag_news_classify": 130, "trec_question": 20}
    facts = manifest["extra"]["subsets"]["ag_news_classify"]
    assert (facts["rows"], facts["kept_rows"], facts["blocks"], facts["episodes"]) == (130, 130, 3, 130)
    sizes = []
    for shard in manifest["shards"]:
        from data_prep.shards import iter_shard_episodes

        tasks = {e.task for e in iter_shard_episodes(out / shard["file"])}
        assert len(tasks) == 1  # a pool never mixes subsets
        sizes.append(shard["num_samples"])
    # 130 rows → blocks of 43/43/44 → pools of 22+21 / 22+21 / 22+22; 20 rows → one pool
    assert sorted(sizes) == sorted([22, 21, 22, 21, 22, 22, 20])
    assert all(e.hyper_input == "" and e.extra == {} for e in read_episodes(out))


def test_draws_are_seeded_new_each_pass_never_the_query_and_within_the_pool(prepared):
    out = prepared / "out"
    first, again, second = _pass(out, 0), _pass(out, 0), _pass(out, 1)
    assert [e.hyper_input for e in first] == [e.hyper_input for e in again]  # a function of seed, pass, position
    assert sum(a.hyper_input != b.hyper_input for a, b in zip(first, second, strict=True)) > 0.9 * len(first)
    assert [e.hyper_input for e in _pass(out, 0, seed=8)] != [e.hyper_input for e in first]
    manifest = json.loads((out / "manifest.json").read_text())
    pools = {}
    from data_prep.shards import iter_shard_episodes

    for shard in manifest["shards"]:
        stored = list(iter_shard_episodes(out / shard["file"]))
        pools.update({e.id: {(x.input.strip(), x.targets[0].strip()) for x in stored} for e in stored})
    for episode in itertools.chain(first, second):
        demos = demo_blocks(episode.hyper_input)
        assert len(demos) == SHOTS == len(set(demos))
        assert episode.input.strip() not in [x for x, _ in demos]
        assert set(demos) <= pools[episode.id]  # its own shard's pool: same subset


def test_resume_mid_pass_replays_the_same_episodes(prepared):
    source = load_source(prepared / "out")
    stream = MixedStream([source], slot=0, num_slots=1, seed=3, shuffle_buffer=16)
    whole = [e.to_json() for e in itertools.islice(stream.iterate(), 200)]  # past the end of pass 0 (150)
    resumed = [e.to_json() for e in itertools.islice(stream.iterate(start=137), 63)]
    assert resumed == whole[137:]


def test_job_array_pieces_merge_to_the_single_run(prepared, tmp_path):
    src = prepared / "src"
    options = dict(src=str(src), split="train", shots=SHOTS, rows_per_unit=50, shard_max_samples=30, mixing_cap=0,
                   max_avg_input_tokens=0)
    for piece in range(3):  # 4 units (3 blocks + 1) over 3 pieces: a subset's blocks land in different pieces
        p3.prepare(P3PrepConfig(**options, out=str(tmp_path / "array"), num_jobs=3, job_index=piece))
    assert merge_main([str(tmp_path / "array")]) == 0
    single, merged = read_episodes(prepared / "out"), read_episodes(tmp_path / "array")
    assert [e.to_json() for e in merged] == [e.to_json() for e in single]
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (prepared / "out", tmp_path / "array")]
    assert manifests[0]["tasks"] == manifests[1]["tasks"] and manifests[0]["extra"] == manifests[1]["extra"]
    assert [s["num_samples"] for s in manifests[0]["shards"]] == [s["num_samples"] for s in manifests[1]["shards"]]


def test_training_rows_are_refused_as_an_eval_set(prepared):
    from hypertrain.evaluation.data import EvalError, load_eval_set

    with pytest.raises(EvalError, match="demonstrations the training loader draws"):
        load_eval_set(prepared / "out")
