"""Which of our two GPU backends is faster, op by op: reads the CSVs of
`python -m fused_accum bench --device cuda --out DIR` and prints, for every kernel-sweep
row and every window where both ran, the median times of fused_accum[cuda] and
fused_accum[triton], their ratio, and a verdict for the order of backend="auto" on CUDA
(fused_accum/backends/__init__.py, _AUTO_ORDER). Run by benchmarks/gpu_check.sh.

    python benchmarks/backend_order.py DIR
"""

from __future__ import annotations

import csv
import math
import sys
from collections import defaultdict
from pathlib import Path

BACKENDS = ("fused_accum[cuda]", "fused_accum[triton]")


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as file:
        return list(csv.DictReader(file))


def comparisons(folder: Path) -> list[tuple[str, float, float]]:
    """(what, cuda seconds, triton seconds) for every case that both backends ran."""
    cases: dict[str, dict[str, float]] = defaultdict(dict)
    for row in _rows(folder / "sweep.csv"):
        what = f"{row['op']} {row['dtype']} {int(row['elements']):,} elements"
        cases[what][row["provider"]] = float(row["median_s"])
    for row in _rows(folder / "window.csv"):
        what = f"window {row['shapes']} {row['dtype']}"
        cases[what][row["provider"]] = float(row["median_s"])
    return [
        (what, times[BACKENDS[0]], times[BACKENDS[1]])
        for what, times in cases.items()
        if all(name in times for name in BACKENDS)
    ]


def main(folder: Path) -> int:
    rows = comparisons(folder)
    if not rows:
        print(f"no case in {folder} ran both {BACKENDS[0]} and {BACKENDS[1]}")
        return 1
    print("| case | cuda (ms) | triton (ms) | triton / cuda | faster |")
    print("| --- | --- | --- | --- | --- |")
    for what, cuda, triton in rows:
        faster = "cuda" if cuda < triton else "triton"
        times = f"{cuda * 1e3:.4g} | {triton * 1e3:.4g} | {triton / cuda:.3f}"
        print(f"| {what} | {times} | {faster} |")
    cuda_wins = sum(cuda < triton for _, cuda, triton in rows)
    mean = math.exp(sum(math.log(triton / cuda) for _, cuda, triton in rows) / len(rows))
    first = "cuda" if mean >= 1 else "triton"
    print(
        f"\ncuda faster in {cuda_wins} of {len(rows)} cases; geometric mean of triton / cuda "
        f"{mean:.3f}: auto on CUDA should try {first!r} first"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "gpu_check/bench")))
