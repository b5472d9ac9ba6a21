"""The GPU benchmark runs end to end (its CPU dry run): device time is scarce, and a script that
breaks after a long start-up wastes it. The quality benchmark too, on a budget of seconds: it is
the one that ranks training recipes, and runs for many minutes when it is used."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


pytestmark = pytest.mark.slow  # each test starts processes


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.real_model
def test_bench_gpu_dry_run_measures_everything(smollm2_tokenizer_dir, tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    script = BENCHMARKS / "bench_gpu.py"
    command = [sys.executable, str(script), "--repeats", "1", "--tokenizer", str(smollm2_tokenizer_dir)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=BENCHMARKS)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "bench_gpu.json").read_text())
    measures = report["shapes"]["tiny"]
    failed = {name: values["error"] for name, values in measures.items() if "error" in values}
    assert not failed, failed
    for name in ("prefill (ms)", "forced replay (bytes/s)", "LoRA training step (bytes/s)"):
        assert measures[name]["base"] > 0 and measures[name]["zip2zip"] > 0, name
    assert any("compiled + static" in name for name in measures)
    # Beside each eager measure, the ops and host syncs per step of both models (what a GPU pays per launch).
    counted = [name for name in measures if "counts" in measures[name]]
    assert {"prefill (ms)", "decoding step, batch 1 (ms)", "forced replay (bytes/s)"} <= set(counted)
    assert {"LoRA training step (bytes/s)", "decoding step, batch 1, codebooks in Python streams (ms)"} <= set(counted)
    for name in counted:
        counts = measures[name]["counts"]
        assert counts["base"]["ops"] > 0 and counts["zip2zip"]["ops"] > 0 and counts["zip2zip"]["syncs"] >= 0, name
    streams = measures["decoding step, batch 1, codebooks in Python streams (ms)"]
    assert streams["base"] == measures["decoding step, batch 1 (ms)"]["base"]  # the ratio is against the same base
    assert "| ops base | ops zip2zip | syncs base | syncs zip2zip |" in done.stdout


@pytest.mark.real_model
def test_bench_gpu_counts_a_decoding_step_without_timing(smollm2_tokenizer_dir, tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, str(BENCHMARKS / "bench_gpu.py"), "--count-only", "--shapes", "tiny"]
    command += ["--tokenizer", str(smollm2_tokenizer_dir)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=BENCHMARKS)
    assert done.returncode == 0, done.stderr[-3000:]
    counts = json.loads((tmp_path / "bench_gpu.json").read_text())["shapes"]["tiny"]
    assert set(counts) == {"base", "zip2zip, codebooks on the device", "zip2zip, codebooks in Python streams"}
    assert counts["base"]["syncs"] == 0  # a plain decoding step never waits for the device
    assert all(values["ops"] > counts["base"]["ops"] for name, values in counts.items() if name != "base")


@pytest.mark.real_model
def test_bench_quality_trains_and_scores_both_arms(smollm2_dir, tmp_path):
    report, plot = tmp_path / "quality.json", tmp_path / "quality.png"
    command = [sys.executable, str(BENCHMARKS / "bench_quality.py"), "--model", str(smollm2_dir)]
    command += ["--arms", "lora", "zip2zip", "--budget", "1", "--checkpoints", "1", "--window", "32"]
    command += ["--eval-bytes", "400"]
    command += ["--train-chars", "20000", "--new-tokens", "4", "--json", str(report), "--plot", str(plot)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=BENCHMARKS)
    assert done.returncode == 0, done.stderr[-3000:]
    curves = {curve["name"]: curve for curve in json.loads(report.read_text())["curves"]}
    assert set(curves) == {"lora", "zip2zip"}
    for curve in curves.values():
        assert len(curve["bits_per_byte"]) == 2 and all(0 < bits < 20 for bits in curve["bits_per_byte"])
        assert curve["steps"][0] == 0 < curve["steps"][-1]
    assert curves["zip2zip"]["generation"]["bytes"] > 0
    assert plot.stat().st_size > 0


def test_bench_excess_splits_exactly_what_zip2zip_costs_over_its_base(text_model, text_tok, tiny_base_tokenizer):
    """`bench_excess` sets each compressed position against the base tokens it covers: its groups of
    what a position predicts add up to the zip2zip model's nats less the base's, every base token
    counted once (both totals are what `score_texts` gives for the same window)."""
    sys.path.insert(0, str(BENCHMARKS))
    from bench_excess import GROUPS, excess_by_group

    from zip2zip_hf.evaluation import base_mode, score_texts

    text = "def area(width, height):\n    return width * height\n\n" * 6
    base_ids = text_tok.base_ids([text], add_special_tokens=False)[0]
    prefix = text_tok.bos_token_id
    base = base_mode(text_model)
    excess, zip_nats, base_nats = excess_by_group(base, text_model, text_tok.codec, prefix, base_ids)
    assert sum(excess[group] for group in GROUPS[:3]) == pytest.approx(zip_nats - base_nats, abs=1e-3)
    assert all(excess[group] != 0 for group in GROUPS), "the text repeats: hypertokens, first and again"
    window = len(base_ids)
    assert zip_nats == pytest.approx(score_texts(text_model, text_tok, [text], window=window).nats, rel=1e-4)
    assert base_nats == pytest.approx(score_texts(base, tiny_base_tokenizer, [text], window=window).nats, rel=1e-4)
