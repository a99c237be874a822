"""``make gpu-check`` cannot rot: its dry run on a machine without a GPU (reusing the extension
that ``make test`` built) runs the CPU parts, names every stage it skipped and exits 0."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine gpu-check is the real run (make gpu-check)")
def test_dry_run_without_gpu_names_skipped_stages(tmp_path):
    env = dict(os.environ, GPU_CHECK_OUT=str(tmp_path), GPU_CHECK_STAGES="tests,sanitizer,bench,memory")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py"), "--no-build"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    done = [line for line in proc.stdout.splitlines() if line.startswith("== gpu-check done")]
    assert done and "skipped ['tests', 'sanitizer', 'bench', 'memory'], failed []" in done[0], proc.stdout
    assert "exercised every op on cpu" in proc.stdout, "the sanitizer's ops script ran on the CPU"
    summary = (tmp_path / "summary.md").read_text()
    for stage in ("tests", "sanitizer", "bench", "memory"):
        assert f"| {stage} | skipped |" in summary
    assert "| smoke | float32 | decoder_forward | reference |" in summary, "the CPU smoke benchmark's table"
    assert (tmp_path / "gpu-check.log").stat().st_size > 0


def test_unknown_stage_is_an_error(tmp_path):
    env = dict(os.environ, GPU_CHECK_OUT=str(tmp_path), GPU_CHECK_STAGES="tests,bogus")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "gpu_check.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown stages ['bogus']" in proc.stderr
