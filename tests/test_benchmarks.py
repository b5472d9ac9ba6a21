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
