"""S-NI prep on the real sample: filters, caps, Def+2Pos, manifest, determinism, job arrays, bad input, verify."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from data_prep import sni
from data_prep.runner import PrepError
from data_prep.shards import ShardError, merge_manifests, read_episodes, read_manifest, sha256_file, verify
from hypertrain.config import ConfigError, SNIPrepConfig

SAMPLE_TRAIN = [
    "task087_new_operator_addsub_arithmetic",
    "task1087_two_number_sum",
    "task1146_country_capital",
    "task1412_web_questions_question_answering",
]
NON_ENGLISH = ["task171_spl_translation_en_es", "task896_miam_language_classification"]


def make_checkout(root: Path, sample: Path, train: list[str], test: list[str] = (), excluded: list[str] = ()) -> Path:
    """An S-NI checkout in ``root`` whose task files link to the real sample and whose split files we choose."""
    (root / "tasks").mkdir(parents=True)
    for task_file in (sample / "tasks").iterdir():
        (root / "tasks" / task_file.name).symlink_to(task_file)
    splits = root / "splits" / "default"
    splits.mkdir(parents=True)
    (splits / "train_tasks.txt").write_text("\n".join(train) + "\n")
    (splits / "test_tasks.txt").write_text("\n".join(test) + "\n")
    (splits / "excluded_tasks.txt").write_text("\n".join(excluded) + "\n")
    return root


def write_task(root: Path, name: str, content: bytes | dict) -> None:
    path = root / "tasks" / f"{name}.json"
    path.unlink(missing_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())


def run(src: Path, out: Path, **options) -> dict:
    return sni.prepare(SNIPrepConfig(src=str(src), out=str(out), **options))


def task_json(sample: Path, name: str) -> dict:
    return json.loads((sample / "tasks" / f"{name}.json").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------------


def test_real_sample_train_split_filters_and_counts(sni_sample, tmp_path):
    manifest = run(sni_sample, tmp_path / "out", split="train")
    listed = set(sni.read_task_list(sni_sample / "splits/default/train_tasks.txt"))
    on_disk = {p.stem for p in (sni_sample / "tasks").glob("*.json")}
    assert set(manifest["tasks"]) == listed & on_disk
    assert len(manifest["dropped_tasks"]["missing_task_file"]) == len(listed - on_disk)
    assert manifest["num_samples"] == sum(manifest["tasks"].values())
    assert manifest["categories"]["task1146_country_capital"] == ["Misc."]
    # the sample's tasks all hold fewer than 100 instances: every instance is kept
    for task, count in manifest["tasks"].items():
        assert count == len(task_json(sni_sample, task)["Instances"])


def test_english_filter_and_excluded_tasks(sni_sample, tmp_path):
    src = make_checkout(
        tmp_path / "src", sni_sample, train=[*SAMPLE_TRAIN, *NON_ENGLISH], excluded=["task1146_country_capital"]
    )
    manifest = run(src, tmp_path / "out", split="train")
    assert sorted(manifest["dropped_tasks"]["non_english"]) == NON_ENGLISH
    assert manifest["dropped_tasks"]["excluded"] == ["task1146_country_capital"]
    assert sorted(manifest["tasks"]) == sorted(set(SAMPLE_TRAIN) - {"task1146_country_capital"})
    assert {e.task for e in read_episodes(tmp_path / "out")} == set(manifest["tasks"])


def test_instance_caps_test_keeps_file_order_train_samples_with_seed(sni_sample, tmp_path):
    task = "task039_qasc_find_overlapping_words"
    file_ids = [inst["id"] for inst in task_json(sni_sample, task)["Instances"]]
    src = make_checkout(tmp_path / "src", sni_sample, train=[task], test=[task])

    run(src, tmp_path / "test", split="test", max_instances_per_task=10)
    assert [e.id for e in read_episodes(tmp_path / "test")] == file_ids[:10]

    run(src, tmp_path / "train_a", split="train", max_instances_per_task=10, seed=1)
    run(src, tmp_path / "train_b", split="train", max_instances_per_task=10, seed=2)
    ids_a = [e.id for e in read_episodes(tmp_path / "train_a")]
    ids_b = [e.id for e in read_episodes(tmp_path / "train_b")]
    assert len(ids_a) == len(ids_b) == 10
    assert ids_a != ids_b  # the seed chooses the sample ...
    assert ids_a == sorted(ids_a, key=file_ids.index)  # ... which is kept in file order
    assert ids_a != file_ids[:10]


def test_def_pos_hyper_input_and_episode_fields(sni_sample, tmp_path):
    task = "task087_new_operator_addsub_arithmetic"
    src = make_checkout(tmp_path / "src", sni_sample, train=[task])
    run(src, tmp_path / "out", split="train")
    episodes = read_episodes(tmp_path / "out")
    raw = task_json(sni_sample, task)
    positives = raw["Positive Examples"]
    expected = (
        f"Definition: {raw['Definition'][0].strip()}.\n\n"
        f"Positive Example 1 -\nInput: {positives[0]['input']}.\nOutput: {positives[0]['output']}.\n\n"
        f"Positive Example 2 -\nInput: {positives[1]['input']}.\nOutput: {positives[1]['output']}."
    )
    assert raw["Definition"][0].strip()[-1] not in ".?!"  # Tk-Instruct's rule adds the period
    assert episodes[0].hyper_input == expected
    assert "Negative Example" not in expected
    by_id = {inst["id"]: inst for inst in raw["Instances"]}
    for episode in episodes:
        assert episode.source == "sni" and episode.task == task
        assert episode.input == by_id[episode.id]["input"]
        assert episode.targets == by_id[episode.id]["output"]
        assert episode.choices is None and episode.label is None


def test_multiple_references_kept_in_order(sni_sample, tmp_path):
    task = "task1087_two_number_sum"
    src = make_checkout(tmp_path / "src", sni_sample, train=[task])
    run(src, tmp_path / "out", split="train")
    raw = {i["id"]: i["output"] for i in task_json(sni_sample, task)["Instances"]}
    multi = [e for e in read_episodes(tmp_path / "out") if len(e.targets) > 1]
    assert multi and all(e.targets == raw[e.id] for e in multi)


def test_manifest_counts_equal_tar_contents(sni_sample, tmp_path):
    manifest = run(sni_sample, tmp_path / "out", split="train", shard_max_samples=100)
    assert len(manifest["shards"]) > 1
    for shard in manifest["shards"]:
        with tarfile.open(tmp_path / "out" / shard["file"]) as tar:
            names = tar.getnames()
        assert len(names) == shard["num_samples"]
        assert all(name.endswith(".json") for name in names)
        assert sha256_file(tmp_path / "out" / shard["file"]) == shard["sha256"]
    assert verify(tmp_path / "out")["num_samples"] == manifest["num_samples"]


def _fingerprint(out: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(out.iterdir())}


def test_deterministic_and_independent_of_workers(sni_sample, tmp_path):
    run(sni_sample, tmp_path / "a", split="train", shard_max_samples=200)
    run(sni_sample, tmp_path / "b", split="train", shard_max_samples=200)
    run(sni_sample, tmp_path / "c", split="train", shard_max_samples=200, workers=2)
    assert _fingerprint(tmp_path / "a") == _fingerprint(tmp_path / "b") == _fingerprint(tmp_path / "c")


def test_job_array_pieces_merge_to_the_single_run(sni_sample, tmp_path):
    single = run(sni_sample, tmp_path / "single", split="train", shard_max_samples=150)
    for index in range(3):
        run(sni_sample, tmp_path / "array", split="train", shard_max_samples=150, num_jobs=3, job_index=index)
    with pytest.raises(ShardError, match="no job-array output to merge"):
        merge_manifests(tmp_path / "single")
    merged = merge_manifests(tmp_path / "array")
    for key in ("num_samples", "tasks", "categories", "skipped", "dropped_tasks", "split", "source", "options"):
        assert merged[key] == single[key], key
    single_eps = [e.to_json() for e in read_episodes(tmp_path / "single")]
    merged_eps = [e.to_json() for e in read_episodes(tmp_path / "array")]
    assert merged_eps == single_eps
    assert verify(tmp_path / "array")["num_samples"] == single["num_samples"]
    assert not list((tmp_path / "array").glob("manifest.part-*"))


def test_merge_refuses_while_a_piece_is_missing(sni_sample, tmp_path):
    run(sni_sample, tmp_path / "array", split="train", num_jobs=3, job_index=0)
    run(sni_sample, tmp_path / "array", split="train", num_jobs=3, job_index=2)
    with pytest.raises(ShardError, match=r"pieces \[1\] of 3"):
        merge_manifests(tmp_path / "array")


BAD_CASES = {
    "not_utf8": (b'{"Definition": ["caf\xe9"]}', "not valid UTF-8 at byte", "task:not_utf8"),
    "invalid_json": (b'{"Definition": ["x"], "Instances": [', "invalid JSON at line 1", "task:invalid_json"),
    "no_definition": ({"Instances": []}, "field 'Definition'", "task:missing_definition"),
    "no_instances": ({"Definition": ["Do it."]}, "field 'Instances'", "task:missing_instances"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_task_file_errors_name_file_and_field_or_is_skipped_and_counted(sni_sample, tmp_path, case):
    content, message, reason = BAD_CASES[case]
    good = task_json(sni_sample, "task1146_country_capital")
    if isinstance(content, dict):
        base = {k: v for k, v in good.items() if k not in ("Definition", "Instances")}
        content = {**base, **content}
    src = make_checkout(tmp_path / "src", sni_sample, train=["task1146_country_capital", "task999_bad"])
    write_task(src, "task999_bad", content)

    with pytest.raises(PrepError, match=message) as info:
        run(src, tmp_path / "out", split="train")
    assert "task999_bad.json" in str(info.value)

    manifest = run(src, tmp_path / "out2", split="train", skip_bad=True)
    assert manifest["skipped"] == {reason: 1}
    assert list(manifest["tasks"]) == ["task1146_country_capital"]


def test_instance_without_output_errors_or_is_counted(sni_sample, tmp_path):
    task = task_json(sni_sample, "task1146_country_capital")
    task["Instances"][3]["output"] = []
    del task["Instances"][5]["output"]
    src = make_checkout(tmp_path / "src", sni_sample, train=["task1146_country_capital"])
    write_task(src, "task1146_country_capital", task)
    bad_id = task["Instances"][3]["id"]
    with pytest.raises(PrepError, match=rf"task1146_country_capital\.json: Instances\[3\] \(id '{bad_id}'\): field 'output'"):
        run(src, tmp_path / "out", split="train")
    manifest = run(src, tmp_path / "out2", split="train", skip_bad=True)
    assert manifest["skipped"] == {"instance:missing_output": 2}
    assert manifest["tasks"]["task1146_country_capital"] == len(task["Instances"]) - 2


def test_failed_job_leaves_no_partial_shard(sni_sample, tmp_path):
    # the bad task sorts last, so complete shards were already written when the job stops
    src = make_checkout(tmp_path / "src", sni_sample, train=[*SAMPLE_TRAIN, "task999_bad"])
    write_task(src, "task999_bad", b"{")
    out = tmp_path / "out"
    with pytest.raises(PrepError):
        run(src, out, split="train", shard_max_samples=64)
    assert not list(out.glob("*.tmp"))
    assert not (out / "manifest.json").exists()
    for shard in out.glob("*.tar"):  # whatever has a final name is a complete tar
        with tarfile.open(shard) as tar:
            assert len(tar.getnames()) == 64


def test_verify_catches_corrupt_truncated_and_missing_shards(sni_sample, tmp_path):
    out = tmp_path / "out"
    run(sni_sample, out, split="train", shard_max_samples=300)
    manifest = read_manifest(out)
    first = out / manifest["shards"][0]["file"]
    pristine = first.read_bytes()

    corrupted = bytearray(pristine)
    corrupted[1000] ^= 0xFF
    first.write_bytes(bytes(corrupted))
    with pytest.raises(ShardError, match="sha256"):
        verify(out)

    # truncated, with the manifest's hash updated so that only the tar check can notice
    first.write_bytes(pristine[: len(pristine) // 2])
    patched = dict(manifest, shards=[dict(manifest["shards"][0], sha256=sha256_file(first)), *manifest["shards"][1:]])
    (out / "manifest.json").write_text(json.dumps(patched))
    with pytest.raises(ShardError, match="truncated|holds"):
        verify(out)

    first.unlink()
    with pytest.raises(ShardError, match="missing"):
        verify(out)


def test_verify_and_prep_command_line(sni_sample, tmp_path):
    out = tmp_path / "out"
    prep = subprocess.run(
        [sys.executable, "-m", "data_prep.sni", "--src", str(sni_sample), "--out", str(out), "--split", "test",
         "--max-instances-per-task", "5"],
        capture_output=True, text=True, check=False,
    )
    assert prep.returncode == 0, prep.stderr
    assert "wrote 20 episodes of 4 tasks" in prep.stdout
    ok = subprocess.run([sys.executable, "-m", "data_prep.verify", str(out)], capture_output=True, text=True)
    assert ok.returncode == 0 and "ok" in ok.stdout
    (out / read_manifest(out)["shards"][0]["file"]).write_bytes(b"garbage")
    bad = subprocess.run([sys.executable, "-m", "data_prep.verify", str(out)], capture_output=True, text=True)
    assert bad.returncode == 1 and "FAILED" in bad.stderr and "the manifest says 40960" in bad.stderr


def test_bad_options_are_rejected(sni_sample, tmp_path):
    cfg = SNIPrepConfig(src=str(sni_sample), out=str(tmp_path / "o"), split="train")
    with pytest.raises(ConfigError, match=r"sni_prep.job_index: must be in \[0, num_jobs=2\)"):
        dataclasses.replace(cfg, num_jobs=2, job_index=2)
    with pytest.raises(ConfigError, match="sni_prep.workers: must be >= 1"):
        dataclasses.replace(cfg, workers=0)
    with pytest.raises(PrepError, match="not an S-NI checkout"):
        sni.prepare(dataclasses.replace(cfg, src=str(tmp_path)))
    assert sni.main(["--src", str(tmp_path), "--out", str(tmp_path / "o"), "--split", "train"]) == 2
