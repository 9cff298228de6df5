"""The benchmarks run at tiny CPU shapes and report what they promise (their numbers are not asserted: timing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / script), *args],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def test_throughput_hart_reports_split_memory_and_decode_variants():
    r = _run("throughput.py", "--device", "cpu", "--threads", "1", "--warmup", "1", "--steps", "1", "--compare")
    assert r["method"] == "hart" and r["decode"] == "fused" and r["device"] == "cpu"
    assert r["mfu"] is None  # no peak is known for a CPU
    assert r["step_s"] > 0 and r["samples_per_s"] == pytest.approx(4 / r["step_s"])
    assert set(r["split_s"]) == {"main", "hypernetwork_encoder", "generator"}
    assert r["model_flops_per_sample"] > 0 and r["tflops_per_s"] > 0
    assert r["peak_memory_gib"] > 0 and r["predicted_peak_activations_gib"] > 0
    assert {"eager", "sdpa", "sdpa+fused_gelu", "sdpa+hf_decode"} <= set(r["variants"]["step_s"])
    assert r["variants"]["relative_to_sdpa"]["sdpa"] == 1.0


def test_throughput_pha_has_no_decode():
    r = _run("throughput.py", "--device", "cpu", "--threads", "1", "--warmup", "1", "--steps", "1",
             "--method", "pha")
    assert r["method"] == "pha" and r["decode"] is None and r["split_s"] == {}


def test_generators_benchmark_times_every_decode_path():
    r = _run("generators.py", "--layers", "2", "--hyper-layers", "1", "--d-model", "64", "--batch", "2",
             "--warmup", "1", "--repeats", "1", "--compile-decode", "default", "--json")
    assert r["decoding_steps"] == 2
    assert r["hart_decoding_s"] > 0 and r["hart_decoding_hf_s"] > 0 and r["hart_decoding_compiled_s"] > 0
    assert r["fused_over_hf_decoding"] == pytest.approx(r["hart_decoding_s"] / r["hart_decoding_hf_s"])
    assert r["compiled_over_hf_decoding"] == pytest.approx(r["hart_decoding_compiled_s"] / r["hart_decoding_hf_s"])
    assert r["decode_compile_s"] > r["hart_decoding_compiled_s"]  # the first call compiled, later ones did not


def test_gpu_suite_smoke_writes_json_table_and_reports_failures(tmp_path):
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--out", str(tmp_path), "--smoke"],
        cwd=REPO, capture_output=True, text=True, timeout=900, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("*.json")) == [
        "tiny_hart-hf-decode_sdpa_none_4.json", "tiny_hart_sdpa_none_4.json", "tiny_hypertuning_sdpa_none_4.json"
    ]
    assert "no-such-shape" in (tmp_path / "tiny_hart_broken.err").read_text()
    table = (tmp_path / "table.md").read_text().splitlines()
    assert table[0].startswith("| GPU | model | method |") and len(table[2].split("|")) == 15
    assert any("| hart, `--decode hf` |" in line for line in table)
    assert any("failed (see .err)" in line for line in table)
    assert any(line.startswith("HART / HyperTuning step time, tiny_hart_sdpa_none_4") for line in table)
    assert "3 of 4 rows measured" in done.stdout
    # a second run keeps the measured rows (resume) and retries only the failed one
    again = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_suite.py"), "--out", str(tmp_path), "--smoke"],
        cwd=REPO, capture_output=True, text=True, timeout=900, check=False,
    )
    assert again.returncode == 0 and again.stdout.count("] tiny_") == 1


def test_p3_prep_benchmark_reports_size_memory_and_workers(tmp_path, p3_sample):
    out = tmp_path / "prep.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "prep_p3.py"), "--src", str(p3_sample), "--sizes", "300", "900",
         "--parallel-subsets", "2", "--parallel-rows", "300", "--repeats", "1", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert [row["rows"] for row in report["sizes"]] == [300, 900]
    for row in report["sizes"]:  # rows stored once: no copies of the demonstrations in the output
        assert 0 < row["output_bytes"] <= 2 * row["input_bytes"] and row["peak_rss_mb"] > 0
    assert report["parallel"]["identical_manifests"] is True and report["parallel"]["speedup"] > 0
