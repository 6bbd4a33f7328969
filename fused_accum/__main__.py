"""Command line: ``python -m fused_accum demo``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_accum", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train a small model with accumulation and compare to the large batch"
    )
    demo.add_argument("--windows", type=int, default=300, help="updates to train (300)")
    demo.add_argument("--accumulation-steps", type=int, default=4, help="micro-batches per update")
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torch

    from .demo import format_demo, run_demo

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = run_demo(args.windows, args.accumulation_steps, seed=args.seed, device=device)
    print(format_demo(results, args.windows, args.accumulation_steps, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
