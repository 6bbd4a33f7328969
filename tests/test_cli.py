"""The command line: each subcommand runs on a small setting and writes what it says."""

from __future__ import annotations

import csv
import struct

import pytest

from fused_accum.__main__ import main
from fused_accum.bench.suite import window_lines
from fused_accum.bench.timing import WIDE_SPREAD, spread_warning


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


def _timing(p20: float, median: float, p80: float) -> dict:
    return {"p20_s": p20, "median_s": median, "p80_s": p80, "repeats": 30}


def test_a_spread_too_wide_to_trust_is_warned_of():
    assert spread_warning("row", _timing(1.0, 1.1, WIDE_SPREAD)) is None
    warning = spread_warning("tiny fp32 classic fused", _timing(0.07e-3, 20e-3, 23e-3))
    assert warning.startswith("warning: tiny fp32 classic fused: p80/p20 = 328.57 > 1.5")
    assert spread_warning("row", _timing(1.0, 1.1, 1.2), limit=1.1) is not None


def test_window_lines_show_the_spread_and_warn_when_it_is_too_wide():
    row = {"shapes": "tiny", "dtype": "fp32", "provider": "classic fused",
           "baseline": "classic fused", "speedup_vs_baseline": 1.0,
           **_timing(1e-3, 1.1e-3, 1.2e-3)}  # fmt: skip
    (line,) = window_lines(row)
    assert "1.10 ms (p20-p80 1.00-1.20)" in line and line.endswith("1.00x vs classic fused")
    wide = {**row, **_timing(0.07e-3, 20e-3, 23e-3)}
    line, warning = window_lines(wide)
    assert "20.00 ms (p20-p80 0.07-23.00)" in line
    assert warning.startswith("warning: tiny fp32 classic fused: p80/p20")


def test_bench_prints_the_spread_of_every_window_row(tmp_path, capsys):
    out = tmp_path / "bench"
    args = ["bench", "--quick", "--only", "window", "--device", "cpu", "--out", str(out),
            "--no-progress", "--no-plots", "--repeats", "5"]  # fmt: skip
    assert main(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("tiny ")]
    assert lines and all("(p20-p80 " in line for line in lines)


def test_bench_host_part_writes_its_rows(tmp_path, capsys, monkeypatch):
    from fused_accum.bench import host

    monkeypatch.setattr(host, "OPTIONS", {"plain": {}})
    out = tmp_path / "bench"
    args = ["bench", "--quick", "--only", "host", "--device", "cpu", "--out", str(out),
            "--no-progress", "--repeats", "2"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    with (out / "host.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {row["option"] for row in rows} == {"plain"}
    assert {row["windows"] for row in rows} == {"2"}
    assert len([line for line in printed.splitlines() if line.startswith("| 100 |")]) == len(rows)
