"""Host overhead of fused_accum's optimizers against torch.optim's fused step: windows of
8 micro-steps on models of many 16-element tensors, where kernel time is negligible and
what is timed is Python and CPU work. What is measured: fused_accum.bench.host.

    python benchmarks/host_overhead.py [--tensors 100 1000 10000] [--windows 5]
                                       [--csv out.csv] [--quick] [--device cpu]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

from fused_accum.bench import host
from fused_accum.bench.suite import Progress


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, nargs="+", help="tensor counts (100 1000 10000)")
    parser.add_argument("--windows", type=int, help="timed windows per case (5)")
    parser.add_argument("--quick", action="store_true", help="100 tensors, 3 windows: seconds")
    parser.add_argument("--device", help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--csv", type=Path, help="write the rows here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = host.HostSettings.for_device(device, quick=args.quick)
    if args.tensors:
        settings.tensors = args.tensors
    if args.windows:
        settings.windows = args.windows
    if device == "cpu":
        print(host.TRITON_ON_CPU)
    progress = Progress(len(settings.cases()), enabled=not args.no_progress)
    rows = host.judge_targets(list(host.rows(settings, progress)))
    print(host.format_table(rows))
    for warning in host.spread_warnings(rows):
        print(warning)
    if args.csv:
        with args.csv.open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
