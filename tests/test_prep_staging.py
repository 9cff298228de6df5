"""A prep job never damages what an earlier job wrote: output is staged and swapped in complete and verified;
skipped records are listed; oversized instances are counted."""

from __future__ import annotations

import json

import pytest

from data_prep import sni
from data_prep.runner import PrepError
from data_prep.shards import merge_manifests, read_manifest, sha256_file, verify
from data_prep.staging import staging_dir
from hypertrain.config import SNIPrepConfig
from tests.test_sni_prep import SAMPLE_TRAIN, make_checkout, task_json, write_task


def run(src, out, **options) -> dict:
    return sni.prepare(SNIPrepConfig(src=str(src), out=str(out), split="train", **options))


def snapshot(directory) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file()}


def test_failed_reprep_leaves_the_previous_output_intact(sni_sample, tmp_path):
    src = make_checkout(tmp_path / "src", sni_sample, train=SAMPLE_TRAIN)
    out = tmp_path / "out"
    first = run(src, out, shard_max_samples=40)
    assert len(first["shards"]) >= 5
    before = snapshot(out)

    write_task(src, "task999_bad", b"{")  # a bad task file: the job stops with an error
    (src / "splits/default/train_tasks.txt").write_text("\n".join([*SAMPLE_TRAIN, "task999_bad"]) + "\n")
    with pytest.raises(PrepError, match="task999_bad.json"):
        run(src, out, shard_max_samples=25)

    assert snapshot(out) == before
    assert verify(out)["num_samples"] == first["num_samples"]
    assert not list(tmp_path.glob(".out.staging*"))  # the failed job's staging is gone


def test_successful_reprep_replaces_the_output_and_keeps_other_files(sni_sample, tmp_path):
    out = tmp_path / "out"
    run(sni_sample, out, shard_max_samples=40)
    (out / "NOTES.md").write_text("mine")
    second = run(sni_sample, out, shard_max_samples=500, max_instances_per_task=10)
    assert [s["file"] for s in second["shards"]] == ["train-000000.tar"]
    assert sorted(p.name for p in out.iterdir()) == ["NOTES.md", "manifest.json", "train-000000.tar"]
    assert (out / "NOTES.md").read_text() == "mine"
    assert verify(out)["num_samples"] == second["num_samples"]
    assert second["shards"][0]["bytes"] == (out / "train-000000.tar").stat().st_size


def test_prep_into_a_symlink_replaces_its_target(sni_sample, tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    run(sni_sample, tmp_path / "link", max_instances_per_task=5)
    assert (tmp_path / "link").is_symlink()
    assert verify(tmp_path / "real")["num_samples"] > 0


def test_job_array_stages_until_merge_and_a_failed_merge_keeps_the_old_output(sni_sample, tmp_path):
    out = tmp_path / "out"
    run(sni_sample, out, max_instances_per_task=5)
    before = snapshot(out)
    for index in (0, 2):
        run(sni_sample, out, num_jobs=3, job_index=index)
    assert snapshot(out) == before  # pieces write into the shared staging directory
    with pytest.raises(Exception, match=r"pieces \[1\] of 3"):
        merge_manifests(out)
    assert snapshot(out) == before
    run(sni_sample, out, num_jobs=3, job_index=1)
    merged = merge_manifests(out)
    assert merged["merged_from"] == 3
    assert verify(out)["num_samples"] == merged["num_samples"]
    assert not staging_dir(out, shared=True).exists()
    assert "train-000000.tar" not in {p.name for p in out.iterdir()}  # the old single-run shards are gone


def test_merge_refuses_a_corrupt_piece_without_touching_the_output(sni_sample, tmp_path):
    out = tmp_path / "out"
    run(sni_sample, out, max_instances_per_task=5)
    before = snapshot(out)
    for index in range(2):
        run(sni_sample, out, num_jobs=2, job_index=index)
    staged = staging_dir(out, shared=True)
    shard = sorted(staged.glob("*.tar"))[0]
    shard.write_bytes(shard.read_bytes()[:-700])
    with pytest.raises(Exception, match=shard.name):
        merge_manifests(out)
    assert snapshot(out) == before


def test_skip_bad_lists_which_tasks_and_instances(sni_sample, tmp_path):
    task = task_json(sni_sample, "task1146_country_capital")
    bad_id = task["Instances"][3]["id"]
    task["Instances"][3]["output"] = []
    src = make_checkout(tmp_path / "src", sni_sample, train=["task1146_country_capital", "task999_bad"])
    write_task(src, "task1146_country_capital", task)
    write_task(src, "task999_bad", b"{")
    manifest = run(src, tmp_path / "out", skip_bad=True, max_instances_per_task=0)
    records = manifest["skipped_records"]["records"]
    assert {"reason": "instance:missing_output", "task": "task1146_country_capital", "index": 3, "id": bad_id} in records
    (task_record,) = [r for r in records if r["task"] == "task999_bad"]
    assert task_record["reason"] == "task:invalid_json"
    assert task_record["file"] == "tasks/task999_bad.json"
    assert str(src) not in json.dumps(records)  # manifests stay comparable across machines
    assert manifest["skipped_records"]["unlisted"] == 0
    assert read_manifest(tmp_path / "out")["skipped_records"] == manifest["skipped_records"]


def test_oversized_instances_are_counted(sni_sample, tmp_path):
    task = task_json(sni_sample, "task1146_country_capital")
    task["Instances"][0]["input"] = "x" * (sni.OVERSIZED_CHARS + 1)
    src = make_checkout(tmp_path / "src", sni_sample, train=["task1146_country_capital"])
    write_task(src, "task1146_country_capital", task)
    manifest = run(src, tmp_path / "out", max_instances_per_task=0)
    assert manifest["extra"]["oversized_instances"] == {"task1146_country_capital": 1}
