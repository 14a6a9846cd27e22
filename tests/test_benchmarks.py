"""The benchmark scripts run from the checkout and write the JSON the README tables come from (tiny sizes: these
check the scripts, they measure nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from r2gen_mamba.packed_linear import packed_linear_available

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.slow


def run_benchmark(tmp_path, *args: str) -> list[dict]:
    out = tmp_path / "result.json"
    command = [sys.executable, os.path.join(REPO, "benchmarks", "run.py"), *args, "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == args[0] and payload["machine"]["torch_threads"] >= 1
    return payload["results"]


def test_train_step(tmp_path):
    (row,) = run_benchmark(tmp_path, "train-step", "--tiny", "--batch-sizes", "2", "--steps", "1")
    assert row["batch_size"] == 2 and row["total_s"] > 0 and row["visual_extractor_fwd_bwd_s"] > 0
    assert row["rest_s"] == pytest.approx(row["total_s"] - row["visual_extractor_fwd_bwd_s"])
    assert row["rest_alone_s"] > 0 and row["peak_rss_mb"] >= 0


def test_generate(tmp_path):
    rows = run_benchmark(
        tmp_path, "generate", "--tiny", "--batch-sizes", "1", "2", "--new-tokens", "6", "--repeats", "1"
    )
    assert [row["batch_size"] for row in rows] == [1, 2]
    packed = packed_linear_available()
    for row in rows:
        assert row["new_tokens"] == 6 and row["total_s"] > 0 and row["no_cache_s"] > 0
        assert row["same_ids_without_cache"]
        assert ("plain_linear_same_ids" in row) == packed  # packed vs plain F.linear, where oneDNN packing exists
        assert row.get("plain_linear_same_ids", True)


def test_encoder_scaling(tmp_path):
    pytest.importorskip("matplotlib")
    rows = run_benchmark(tmp_path, "encoder-scaling", "--tokens", "16", "64", "--repeats", "1")
    assert {(row["encoder"], row["tokens"]) for row in rows} == {
        (encoder, tokens) for encoder in ("mamba", "transformer") for tokens in (16, 64)
    }
    assert all(row["seconds"] > 0 for row in rows)
    assert (tmp_path / "result.png").stat().st_size > 0


def test_params_flops(tmp_path):
    result = run_benchmark(tmp_path, "params-flops", "--image-size", "64", "--decoder-tokens", "4")
    rows = result if isinstance(result, list) else result["rows"]
    text = json.dumps(rows)
    assert "75433273" in text.replace(",", "") or "75,433,273" in text  # the measured full-size total
