"""benchmarks/gpu_check.py (make gpu-check): without a GPU it says so and succeeds; its stage
runner (own process, own time limit, the next stage runs after a failure, one report, exit 1 on
any failure) is checked on the CPU with --device cpu."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_check.py")


def gpu_check(work, *args, timeout=600):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1", BMC_GPU_CHECK_WORK=str(work)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is available here")
def test_without_a_gpu_it_says_so_and_exits_0(tmp_path):
    p = gpu_check(tmp_path / "work", "--out", tmp_path / "report.md")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("gpu-check: no CUDA device visible to torch") and "nothing to check" in p.stdout
    assert not (tmp_path / "report.md").exists()


def test_stages_are_isolated_timed_and_reported(tmp_path):
    out = tmp_path / "report.md"
    p = gpu_check(tmp_path / "work", "--device", "cpu", "--tiny", "--stages", "kernels,trainer-streams,tests", "--limit", "tests=3",
                  "--out", out)
    assert p.returncode == 1, p.stdout + p.stderr  # two stages fail
    text = out.read_text()
    assert "**1 of 3 stages passed**; failed: trainer-streams, tests" in text
    assert re.search(r"\| kernels \| pass \|", text)
    assert re.search(r"\| trainer-streams \| fail \|.*needs device='cuda'", text)  # the error, in one line
    assert re.search(r"\| tests \| fail \| \d+ \| 3 \| timed out after 3 s", text)  # killed at its limit
    assert "### trainer-streams: ValueError" in text and "Traceback" in text  # the failure's output
    stages = json.loads(text.split("```json", 1)[1].split("```", 1)[0])["stages"]
    rows = stages[0]["rows"]
    ops = {r["op"] for r in rows}
    assert ops == {"stability_loss", "weight_stability_loss", "batched_distillation_loss",
                   "task_masked_cross_entropy", "task_masked_kd_loss"}
    assert all("error" not in r and r["t_bmc_fast_ms"] > 0 and r["bw_fraction"] > 0 for r in rows)
    assert stages[0]["figures"]["copy_gbps"] > 0
    assert "gpu-check: FAILED; report: " in p.stdout
    assert {"kernels.json", "tests.json", "trainer-streams.json"} <= set(os.listdir(tmp_path / "work"))
