"""The command line: each subcommand runs on a small setting and writes what it says."""

from __future__ import annotations

import csv
import struct

import pytest

from fused_accum.__main__ import main


def _png_size(path):
    """(width, height) from a PNG header, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_info_names_every_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("torch", "triton", "cpu", "cuda"):
        assert f"  {name}" in out
    assert "auto ->" in out


def test_bench_writes_csv_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--device", "cpu", "--out", str(out), "--no-progress"]) == 0
    assert "wrote" in capsys.readouterr().out
    with (out / "sweep.csv").open() as f:
        sweep = list(csv.DictReader(f))
    with (out / "window.csv").open() as f:
        windows = list(csv.DictReader(f))
    providers = {row["provider"] for row in sweep}
    assert {"torch add_(alpha)", "torch eager", "fused_accum[torch]"} <= providers
    assert {row["op"] for row in sweep} == {"accumulate", "adamw_step", "sgd_step"}
    for row in sweep + windows:
        assert row["device"] and row["date"] and row["torch"] and row["fused_accum"]
        assert float(row["p20_s"]) <= float(row["median_s"]) <= float(row["p80_s"])
    for row in sweep:
        if row["GBps"]:
            assert float(row["GBps"]) > 0 and float(row["copy_GBps"]) > 0
    window_providers = {row["provider"] for row in windows}
    assert {"classic fused", "classic foreach", "classic for-loop", "eager fp32 recipe"} <= (
        window_providers
    )
    assert "fused_accum[torch]" in window_providers
    baselines = [row for row in windows if row["provider"] == row["baseline"]]
    assert {row["dtype"] for row in baselines} == {"bf16", "fp32"}
    assert all(float(row["speedup_vs_baseline"]) == 1.0 for row in baselines)
    for name in ("sweep.png", "window.png"):
        width, height = _png_size(out / name)
        assert width > 400 and height > 200
