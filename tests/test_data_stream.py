"""Training streams: every pass partitions the data over ranks x workers, resume is exact, mixing follows weights."""

from __future__ import annotations

import json
from itertools import islice

import pytest
import torch

from data_prep.shards import ShardError, read_episodes
from hypertrain.data.collate import IGNORE_INDEX, EpisodeCollator
from hypertrain.data.loader import EpisodeBatches, build_loader
from hypertrain.data.stream import MixedStream, SlotStream, batches_before, load_source, task_list
from hypertrain.models.registry import load_tokenizer


def ids_of(batches):
    return [batch["ids"] for batch in batches]


def id_collate(episodes):
    return {"ids": [e.id for e in episodes]}


@pytest.mark.parametrize("num_slots", [4, 3, 20])  # 9 shards: shard-level split for 4 and 3, sample-level for 20
def test_slots_partition_every_pass(sni_train_shards, num_slots):
    source = load_source(sni_train_shards)
    all_ids = sorted(e.id for e in read_episodes(sni_train_shards))
    for pass_start in (0, 1):  # the first and the second pass
        seen = []
        for slot in range(num_slots):
            stream = SlotStream(source, slot, num_slots, seed=7, shuffle_buffer=50)
            start = pass_start * stream.samples_per_pass
            seen.extend(json.loads(p)["id"] for p, _ in islice(stream.iterate(start), stream.samples_per_pass))
        assert sorted(seen) == all_ids
    assert SlotStream(source, 0, 4, 7, 50).shard_level and not SlotStream(source, 0, 20, 7, 50).shard_level


def test_passes_are_shuffled_differently_and_seeded(sni_train_shards):
    source = load_source(sni_train_shards)
    stream = SlotStream(source, 0, 1, seed=1, shuffle_buffer=200)
    n = stream.samples_per_pass
    first, second = list(islice(stream.iterate(0), n)), list(islice(stream.iterate(n), n))
    assert sorted(first) == sorted(second) and first != second
    assert list(islice(SlotStream(source, 0, 1, seed=1, shuffle_buffer=200).iterate(0), 50)) == first[:50]
    assert list(islice(SlotStream(source, 0, 1, seed=2, shuffle_buffer=200).iterate(0), 50)) != first[:50]
    tasks_in_first_batch = {json.loads(p)["task"] for p, _ in first[:32]}
    assert len(tasks_in_first_batch) > 2  # the buffer mixes tasks although shards are written task by task


@pytest.mark.parametrize("num_workers", [1, 2])
def test_resume_through_the_dataloader_is_exact(sni_train_shards, num_workers):
    source = load_source(sni_train_shards)

    def loader(start):
        dataset = EpisodeBatches([source], id_collate, rank=1, world_size=2, num_workers=num_workers,
                                 micro_batch_size=8, seed=3, shuffle_buffer=64, start_batch=start)
        return build_loader(dataset)

    uninterrupted = ids_of(islice(loader(0), 70))  # > one pass of this rank (408 episodes / 8 = 51 batches)
    for cut in (1, 5, 51, 52):
        assert ids_of(islice(loader(cut), 70 - cut)) == uninterrupted[cut:], cut


def test_ranks_see_disjoint_batches(sni_train_shards):
    source = load_source(sni_train_shards)
    per_rank = [
        {i for b in islice(EpisodeBatches([source], id_collate, rank=r, world_size=2, num_workers=1,
                                          micro_batch_size=4, seed=0).__iter__(), 50) for i in b["ids"]}
        for r in range(2)
    ]
    assert not per_rank[0] & per_rank[1]


def test_mixing_follows_weights_and_resumes(sni_sample, sni_train_shards, tmp_path):
    from data_prep.sni import prepare
    from hypertrain.config import SNIPrepConfig

    prepare(SNIPrepConfig(src=str(sni_sample), out=str(tmp_path / "test"), split="test"))
    train, test = load_source(sni_train_shards, weight=3.0), load_source(tmp_path / "test", weight=1.0)
    test_tasks = set(test.tasks)
    episodes = list(islice(MixedStream([train, test], slot=0, num_slots=1, seed=5, shuffle_buffer=10).iterate(0), 800))
    share = sum(e.task not in test_tasks for e in episodes) / len(episodes)
    assert 0.70 < share < 0.80  # 3:1 weights; 800 seeded draws
    replay = MixedStream([train, test], slot=0, num_slots=1, seed=5, shuffle_buffer=10)
    assert [e.id for e in islice(replay.iterate(300), 500)] == [e.id for e in episodes[300:]]
    assert task_list([train, test]) == sorted(set(train.tasks) | test_tasks)


def test_collator_pads_truncates_and_indexes_tasks(sni_train_shards):
    episodes = read_episodes(sni_train_shards)[:3]
    tasks = task_list([load_source(sni_train_shards)])
    collate = EpisodeCollator(load_tokenizer("byt5"), {t: i for i, t in enumerate(tasks)}, 16, 8, 64)
    batch = collate(episodes)
    assert batch["input_ids"].shape[0] == 3 and batch["input_ids"].shape[1] <= 16
    assert batch["hyper_input_ids"].shape[1] == 64  # Def+2Pos is longer than 64 bytes: truncated
    assert (batch["hyper_input_ids"][:, -1] == 1).all()  # EOS kept within the limit
    assert batch["task_ids"].tolist() == [tasks.index(e.task) for e in episodes]
    lengths = [len(e.targets[0].encode()) + 1 for e in episodes]
    for row, length in zip(batch["labels"], lengths, strict=True):
        kept = min(length, 8)
        assert (row[kept:] == IGNORE_INDEX).all() and (row[:kept] != IGNORE_INDEX).all()
    static = EpisodeCollator(load_tokenizer("byt5"), {}, 16, 8, 64, pad_to_max=True)(episodes)
    assert static["labels"].shape == (3, 8) and static["task_ids"].tolist() == [-1, -1, -1]
    assert batch["input_ids"].dtype == torch.long


def test_helpers_and_errors(sni_train_shards, tmp_path):
    assert [batches_before(c, 1, 3) for c in range(7)] == [0, 0, 1, 1, 1, 2, 2]
    source = load_source(sni_train_shards)
    with pytest.raises(ShardError, match="cannot feed"):
        SlotStream(source, source.num_samples, source.num_samples + 1, 0, 1)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text((sni_train_shards / "manifest.json").read_text())
    with pytest.raises(ShardError, match="train-000000.tar.*missing"):
        load_source(broken)
