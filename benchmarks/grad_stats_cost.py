"""What track_grad_stats=True costs: the fp32 GPT-2-124M window (8 micro-steps + AdamW)
through the public API with tracking off and on, alternating, in one run. The
gradients are handed over as in cpu_window.py (fused_accum.bench.gradients): tracking
reads the first micro-step's gradients for their norm, so it copies them where an
untracked window adopts them.

    python benchmarks/grad_stats_cost.py [--windows 5] [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys

import torch

from fused_accum import FusedAccumAdamW
from fused_accum.bench.gradients import WindowGradients
from fused_accum.bench.shapes import gpt2_124m
from fused_accum.bench.timing import measure

STEPS = 8


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=5, help="timed windows per setting")
    parser.add_argument("--rounds", type=int, default=2, help="off/on alternations")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape) * 0.02) for shape in gpt2_124m()]
    grads = WindowGradients([torch.randn_like(p) * 1e-3 for p in params])
    for _ in range(args.rounds):
        for track in (False, True):
            optimizer = FusedAccumAdamW(
                params, lr=1e-4, accumulation_steps=STEPS, track_grad_stats=track
            )

            def window(optimizer=optimizer):
                for micro_step in range(STEPS):
                    for index, param in enumerate(params):
                        param.grad = grads.take(micro_step, index)
                    optimizer.step()

            timing = measure(window, args.windows, setup=grads.prepare)
            quantiles = f"[p20 {timing['p20_s']:.3f}, p80 {timing['p80_s']:.3f}]"
            print(f"track_grad_stats={track!s:5} median {timing['median_s']:.3f}s {quantiles}")
            del optimizer, window
    return 0


if __name__ == "__main__":
    sys.exit(main())
