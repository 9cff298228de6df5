"""Bad input is found early and named: config values, shards against their manifests, episodes in shards, names
from data that become paths, oversized text, credentials in printed URIs."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import time
from itertools import islice
from pathlib import Path

import pytest

from data_prep.shards import ShardError, read_manifest, write_json_atomic
from hypertrain.config import Config, ConfigError, load_config
from hypertrain.data.collate import EpisodeCollator
from hypertrain.data.stream import MixedStream, check_shards, load_source
from hypertrain.episode import Episode
from hypertrain.evaluation.data import load_eval_set
from hypertrain.names import safe_filename
from hypertrain.tracking import backfill_rows, redact

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=.inf", "train.lr: must be a finite number"),
        ("train.lr=.nan", "train.lr: must be a finite number"),
        ("train.weight_decay=-5", "train.weight_decay: must be >= 0"),
        ("train.grad_clip=-1", "train.grad_clip: must be >= 0"),
        ("hart.alpha=.inf", "hart.alpha: must be a finite number"),
        ("pha.loss_weight=-0.1", "pha.loss_weight: must be >= 0"),
        ("run.peak_flops=0", "run.peak_flops: must be > 0"),
        ("train.max_nonfinite_in_row=0", "train.max_nonfinite_in_row: must be >= 1"),
    ],
)
def test_config_values_that_would_fail_late_are_refused_up_front(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(Config, REPO / "configs" / "hart_tiny.yaml", [override])


@pytest.fixture()
def shards(sni_train_shards, tmp_path) -> Path:
    """A private copy of the prepared S-NI train shards (9 shards) to damage."""
    out = tmp_path / "data"
    shutil.copytree(sni_train_shards, out)
    return out


def test_shard_precheck_names_each_bad_shard(shards):
    manifest = read_manifest(shards)
    first, second = (shards / s["file"] for s in manifest["shards"][:2])
    assert check_shards([load_source(shards)], "sha256") == []
    first.write_bytes(first.read_bytes()[:-1024])  # truncated
    data = bytearray(second.read_bytes())
    data[700] ^= 1  # one flipped bit, same size
    second.write_bytes(bytes(data))
    source = load_source(shards)
    problems = check_shards([source], "sha256")
    assert len(problems) == 2
    assert f"{first}: " in problems[0] and "the manifest says" in problems[0]
    assert f"{second}: sha256 differs" in problems[1]
    assert check_shards([source], "size") == problems[:1]
    assert check_shards([source], "none") == []
    parts = [check_shards([source], "sha256", part=rank, parts=2) for rank in (0, 1)]
    assert sorted(parts[0] + parts[1]) == sorted(problems)  # ranks share the work without gaps


def rewrite_member(shard: Path, index: int, payload: bytes) -> str:
    """Replace the ``index``-th member of a shard with ``payload``; returns its name."""
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    members[index] = (members[index][0], payload)
    members[index][0].size = len(payload)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))
    shard.write_bytes(buffer.getvalue())
    return members[index][0].name


@pytest.mark.parametrize(
    ("payload", "message"),
    [(b"{not json", "not a valid episode"), (json.dumps({"id": "x", "task": "t"}).encode(), r"not a valid episode \(episode record lacks field")],
)
def test_a_bad_episode_names_its_shard_and_member(shards, payload, message):
    shard = shards / read_manifest(shards)["shards"][0]["file"]
    name = rewrite_member(shard, 3, payload)
    stream = MixedStream([load_source(shards)], slot=0, num_slots=1, seed=0, shuffle_buffer=1)
    with pytest.raises(ShardError, match=rf"{shard}: member {name}: {message}"):
        list(islice(stream.iterate(), 2000))


def test_a_truncated_shard_is_named_when_read(shards):
    shard = shards / read_manifest(shards)["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:5000])
    stream = MixedStream([load_source(shards)], slot=0, num_slots=1, seed=0, shuffle_buffer=1)
    with pytest.raises(ShardError, match=rf"{shard}: holds \d+ episodes, the manifest says 100 \(truncated"):
        list(islice(stream.iterate(), 2000))


def test_names_from_data_cannot_leave_the_output_directory(sni_train_shards, tmp_path):
    assert safe_filename("../../etc/passwd") == "_.._etc_passwd"
    assert safe_filename("..") == "unnamed" and safe_filename("sni") == "sni"
    data = tmp_path / "data"
    shutil.copytree(sni_train_shards, data)
    manifest = read_manifest(data)
    manifest["source"] = "../../../escape"
    write_json_atomic(data / "manifest.json", manifest)
    eval_set = load_eval_set(data, max_examples_per_task=1)
    assert "/" not in eval_set.name and not eval_set.name.startswith(".")
    assert (tmp_path / "out" / f"{eval_set.name}_predictions.jsonl").resolve().parent == (tmp_path / "out").resolve()


def test_oversized_text_is_cut_before_tokenizing_with_the_same_result():
    from hypertrain.models.registry import load_tokenizer

    collate = EpisodeCollator(load_tokenizer("byt5"), {"t": 0}, 64, 16, 128)
    huge = Episode(id="a", task="t", source="sni", categories=[], hyper_input="h" * 3_000_000,
                   input="word " * 1_000_000, targets=["y" * 2_000_000])
    small = Episode(id="b", task="t", source="sni", categories=[], hyper_input="h" * 500, input="word " * 100,
                    targets=["y" * 100])
    start = time.perf_counter()
    batch = collate([huge])
    assert time.perf_counter() - start < 5  # in full this tokenizes 10 MB (many seconds)
    expected = collate([small])  # the same first tokens: the cut never reaches the kept part
    for key in ("input_ids", "labels", "hyper_input_ids"):
        assert batch[key].tolist() == expected[key].tolist(), key


def test_credentials_are_masked_in_printed_uris():
    assert redact("http://alice:s3cret@mlflow.example:5000/") == "http://***@mlflow.example:5000/"
    assert redact("MLflow call to https://tok@host/api failed") == "MLflow call to https://***@host/api failed"
    assert redact("sqlite:////runs/x/mlflow.db") == "sqlite:////runs/x/mlflow.db"


def test_backfill_rebuilds_the_logged_windows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": float(s)}) + "\n" for s in range(1, 8)) + '{"step": 8, "lo')
    rows = backfill_rows(path, after=0, through=7, log_every=3, last_step=7)
    assert rows == [(3, {"loss": 2.0}), (6, {"loss": 5.0}), (7, {"loss": 7.0})]
    assert backfill_rows(path, after=3, through=6, log_every=3, last_step=100) == [(6, {"loss": 5.0})]
    assert backfill_rows(tmp_path / "absent", 0, 5, 1, 5) == []
