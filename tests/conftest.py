"""Shared fixtures: where the real data samples live (``../shared/data`` beside the repository)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("HYPERTRAIN_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def _sample(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_dir():
        pytest.skip(f"real data sample {path} is absent (set HYPERTRAIN_SHARED_DATA to its parent directory)")
    return path


@pytest.fixture(scope="session")
def sni_sample() -> Path:
    """The S-NI sample in the repository's layout (tasks/, splits/default/)."""
    return _sample("sni_sample")


@pytest.fixture(scope="session")
def p3_sample() -> Path:
    """The P3 sample in the original repository layout (data/<subset>/...)."""
    return _sample("p3_sample")


@pytest.fixture(scope="session")
def c4_sample() -> Path:
    """The C4 sample in C4's released layout (en/c4-<split>.NNNNN-of-NNNNN.json.gz)."""
    return _sample("c4_sample")


@pytest.fixture(scope="session")
def sni_train_shards(sni_sample, tmp_path_factory) -> Path:
    """The real S-NI sample's train split, prepared into 100-episode shards (shared by the data/trainer tests)."""
    from data_prep.sni import prepare
    from hypertrain.config import SNIPrepConfig

    out = tmp_path_factory.mktemp("sni_train")
    prepare(SNIPrepConfig(src=str(sni_sample), out=str(out), split="train", shard_max_samples=100))
    return out


@pytest.fixture(scope="session")
def tiny_data(sni_sample, tmp_path_factory) -> Path:
    """8 real S-NI episodes (4 test tasks x 2): one global batch of 8, seen again every step (trainer tests)."""
    from data_prep.sni import prepare
    from hypertrain.config import SNIPrepConfig

    out = tmp_path_factory.mktemp("tiny_data")
    prepare(SNIPrepConfig(src=str(sni_sample), out=str(out), split="test", max_instances_per_task=2))
    return out
