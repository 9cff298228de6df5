"""C4 prep on the real C4-layout sample (``../shared/data/c4_sample``): chunking, skips counted, bad gzip / JSON,
job array + merge."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from data_prep import c4
from data_prep.merge import main as merge_main
from data_prep.shards import read_episodes, verify
from hypertrain.config import C4PrepConfig

TRAIN_FILE = "c4-train.00000-of-01024.json.gz"


def _documents(path: Path) -> list[str]:
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle]


def _episodes(out: Path) -> list:
    return read_episodes(out)


def _write_c4(folder: Path, name: str, lines: list[bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with gzip.open(path, "wb") as handle:
        handle.writelines(lines)
    return path


def test_every_long_enough_document_becomes_four_consecutive_chunks(c4_sample, tmp_path):
    lengths = [40, 30, 20, 40]
    out = tmp_path / "train"
    assert c4.main(["--src", str(c4_sample), "--out", str(out), "--split", "train",
                    "--chunk-words", *map(str, lengths)]) == 0
    verify(out)
    documents = _documents(c4_sample / "en" / TRAIN_FILE)
    long_enough = [text for text in documents if len(text.split()) >= sum(lengths)]
    episodes = _episodes(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert 0 < len(episodes) == len(long_enough) < len(documents)
    assert manifest["skipped"] == {"record:too_short": len(documents) - len(long_enough)}
    assert manifest["extra"]["documents_read"] == {TRAIN_FILE.removesuffix(".json.gz"): len(documents)}
    for episode, text in zip(episodes, long_enough, strict=True):
        words = text.split()
        first, fourth = episode.hyper_input.split(c4.HYPER_SEPARATOR)
        cuts = [0, 40, 70, 90, 130]
        for chunk, start, stop in zip([first, episode.input, episode.targets[0], fourth], cuts[:-1], cuts[1:], strict=True):
            assert chunk.split() == words[start:stop]
        assert episode.source == "c4" and episode.choices is None


def test_validation_split_and_file_limits(c4_sample, tmp_path):
    manifest = c4.prepare(C4PrepConfig(src=str(c4_sample / "en"), out=str(tmp_path / "v"), split="validation",
                                       chunk_words=[5, 5, 5, 5], max_documents_per_file=7))
    assert manifest["num_samples"] == 7 and list(manifest["tasks"]) == ["c4-validation.00000-of-00008"]


def test_damaged_gzip_stops_or_keeps_what_came_before(c4_sample, tmp_path):
    data = (c4_sample / "en" / TRAIN_FILE).read_bytes()
    broken = tmp_path / "c4" / "en"
    broken.mkdir(parents=True)
    (broken / TRAIN_FILE).write_bytes(data[: len(data) // 2])  # truncated mid-stream
    args = ["--src", str(tmp_path / "c4"), "--split", "train", "--chunk-words", "5", "5", "5", "5"]
    with pytest.raises(c4.PrepError, match=f"{TRAIN_FILE}: damaged gzip stream after line"):
        c4.prepare(C4PrepConfig(src=str(tmp_path / "c4"), out=str(tmp_path / "a"), chunk_words=[5, 5, 5, 5]))
    assert not (tmp_path / "a").exists()
    assert c4.main([*args, "--out", str(tmp_path / "b"), "--skip-bad"]) == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["skipped"]["file:bad_gzip"] == 1
    assert 0 < manifest["num_samples"] < len(_documents(c4_sample / "en" / TRAIN_FILE))


def test_bad_records_name_file_and_line_or_are_counted(tmp_path):
    good = json.dumps({"text": "one two three four five six seven eight", "timestamp": "t", "url": "u"})
    lines = [good.encode() + b"\n", b'{"text": "cut\n', b'{"url": "no text"}\n', b"\xff\xfe\n", good.encode() + b"\n"]
    _write_c4(tmp_path / "c4" / "en", "c4-train.00003-of-01024.json.gz", lines)
    cfg = dict(src=str(tmp_path / "c4"), split="train", chunk_words=[2, 2, 2, 2])
    with pytest.raises(c4.PrepError, match=r"c4-train.00003-of-01024.json.gz: line 2 is not JSON"):
        c4.prepare(C4PrepConfig(**cfg, out=str(tmp_path / "a")))
    manifest = c4.prepare(C4PrepConfig(**cfg, out=str(tmp_path / "b"), skip_bad=True))
    assert manifest["num_samples"] == 2
    assert manifest["skipped"] == {"record:bad_json": 1, "record:no_text": 1, "record:bad_utf8": 1}
    assert {(r["reason"], r["line"]) for r in manifest["skipped_records"]["records"]} == {
        ("record:bad_json", 2), ("record:no_text", 3), ("record:bad_utf8", 4)}


def test_missing_files_are_named(tmp_path):
    (tmp_path / "en").mkdir()
    with pytest.raises(c4.PrepError, match="no c4-train.NNNNN-of-NNNNN.json.gz files"):
        c4.prepare(C4PrepConfig(src=str(tmp_path), out=str(tmp_path / "o")))


def test_job_array_pieces_merge_to_the_single_run(c4_sample, tmp_path):
    raw = gzip.decompress((c4_sample / "en" / TRAIN_FILE).read_bytes()).splitlines(keepends=True)
    folder = tmp_path / "c4" / "en"
    for index in range(3):  # three files of C4's naming, a third of the sample each
        _write_c4(folder, f"c4-train.{index:05d}-of-01024.json.gz", raw[index::3])
    common = ["--src", str(tmp_path / "c4"), "--split", "train", "--chunk-words", "20", "20", "10", "20"]
    assert c4.main([*common, "--out", str(tmp_path / "single")]) == 0
    for piece in range(2):
        assert c4.main([*common, "--out", str(tmp_path / "array"), "--num-jobs", "2", "--job-index", str(piece)]) == 0
    assert merge_main([str(tmp_path / "array")]) == 0
    single, merged = _episodes(tmp_path / "single"), _episodes(tmp_path / "array")
    assert [e.to_json() for e in merged] == [e.to_json() for e in single] and len(single) > 0
    manifests = [json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("single", "array")]
    assert manifests[0]["skipped"] == manifests[1]["skipped"]
    assert manifests[0]["extra"] == manifests[1]["extra"]
