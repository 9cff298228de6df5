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
