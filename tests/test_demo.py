"""The demo, through its function and through the command line."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fused_accum.demo import run_demo


def test_demo_matches_the_large_batch_and_the_plain_loop_does_not():
    large_batch, fused, plain = run_demo(windows=20, accumulation_steps=3)
    assert large_batch.max_difference == 0.0
    assert fused.max_difference < 1e-5
    assert plain.max_difference > 100 * fused.max_difference
    assert abs(fused.loss - large_batch.loss) < 1e-5


def test_demo_command_line(tmp_path):
    pytest.importorskip("matplotlib")
    plots = tmp_path / "plots"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fused_accum",
            "demo",
            "--windows",
            "5",
            "--device",
            "cpu",
            "--plots",
            str(plots),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert "5 updates of a 32-256-1 MLP on cpu" in result.stdout
    assert "fused_accum, weighted micro-batches" in result.stdout
    assert "peak memory of the process" in result.stdout
    for name in ("grad_flow.png", "grad_norms.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
