"""benchmarks/backend_order.py, which gpu_check.sh runs to settle the order of "auto"
on CUDA, reads the benchmark CSVs and says which backend was faster."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "backend_order.py"


def _write(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_the_verdict_follows_the_times(tmp_path):
    sweep = []
    for elements, cuda, triton in ((1024, 1e-5, 3e-5), (1 << 24, 1e-3, 0.9e-3)):
        for provider, seconds in (("fused_accum[cuda]", cuda), ("fused_accum[triton]", triton),
                                  ("torch fused", 1.0)):  # fmt: skip
            sweep.append(dict(op="adamw_step", dtype="fp32", elements=elements,
                              provider=provider, median_s=seconds))  # fmt: skip
    _write(tmp_path / "sweep.csv", sweep)
    times = (("fused_accum[cuda]", 2e-3), ("fused_accum[triton]", 2.2e-3))
    window = [dict(shapes="gpt2_124m", dtype="bf16", provider=name, median_s=seconds)
              for name, seconds in times]  # fmt: skip
    _write(tmp_path / "window.csv", window)
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True,
                            text=True, check=True)  # fmt: skip
    lines = result.stdout.splitlines()
    assert "| adamw_step fp32 1,024 elements | 0.01 | 0.03 | 3.000 | cuda |" in lines
    assert "| adamw_step fp32 16,777,216 elements | 1 | 0.9 | 0.900 | triton |" in lines
    assert "| window gpt2_124m bf16 | 2 | 2.2 | 1.100 | cuda |" in lines
    assert lines[-1].startswith("cuda faster in 2 of 3 cases; geometric mean of triton / cuda 1.")
    assert lines[-1].endswith("auto on CUDA should try 'cuda' first")


def test_nothing_to_compare_is_an_error(tmp_path):
    result = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 1
    assert "no case" in result.stdout
