"""A whole accumulation window on the CPU through the public API: 8 micro-steps and an
AdamW update on the GPT-2-124M parameter shapes, fused_accum against the PyTorch
recipes that give the same fp32 accumulation, measured side by side in one run.

    python benchmarks/cpu_window.py [--windows 5] [--csv out.csv]

Providers:
  fused_accum      FusedAccumAdamW(accumulation_steps=8), p.grad = g; step() per micro-step
  eager-fp32-buf   (bf16) buf.add_(g) per micro-step, p.grad = (buf / 8).to(bf16),
                   AdamW(fused=True).step(), buf.zero_()
  classic          (fp32) autograd's accumulation into .grad (the first gradient kept as
                   .grad, grad.add_(g) after), AdamW(fused=True).step(), zero_grad()
  ...+clip         (fp32) the same with clipping of the window's gradient to norm 1:
                   max_grad_norm=1 for fused_accum, clip_grad_norm_(params, 1) before
                   the classic loop's step
Every provider is handed the same gradients (fused_accum.bench.gradients): private new
tensors on the first micro-step, as backward makes them, made untimed before each
window; made-once tensors after. Only the optimizer work is timed. The two providers
of a row take turns window by window, so a drift of the machine hits both alike.
"""

from __future__ import annotations

import argparse
import csv
import sys
from functools import partial
from pathlib import Path

import torch

from fused_accum import FusedAccumAdamW
from fused_accum.bench.gradients import WindowGradients
from fused_accum.bench.shapes import gpt2_124m
from fused_accum.bench.timing import environment, measure_interleaved

STEPS = 8
LR = 1e-4


def _params(dtype):
    return [torch.nn.Parameter(torch.randn(shape).to(dtype) * 0.02) for shape in gpt2_124m()]


def _grads(params):
    return WindowGradients([torch.randn_like(p) * 1e-3 for p in params])


def fused_window(dtype, **options):
    params = _params(dtype)
    grads = _grads(params)
    optimizer = FusedAccumAdamW(params, lr=LR, accumulation_steps=STEPS, **options)

    def window():
        for micro_step in range(STEPS):
            for index, param in enumerate(params):
                param.grad = grads.take(micro_step, index)
            optimizer.step()
        assert optimizer.last_step_applied

    return grads.prepare, window, optimizer._accumulation.backends


def eager_window(dtype):
    params = _params(dtype)
    grads = _grads(params)
    buffers = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    optimizer = torch.optim.AdamW(params, lr=LR, fused=True)

    def window():
        for micro_step in range(STEPS):
            for index, buffer in enumerate(buffers):
                buffer.add_(grads.take(micro_step, index))
        for param, buffer in zip(params, buffers, strict=True):
            param.grad = (buffer / STEPS).to(dtype)
        optimizer.step()
        for buffer in buffers:
            buffer.zero_()
        optimizer.zero_grad()

    return grads.prepare, window


def classic_window(dtype, clip=False):
    params = _params(dtype)
    grads = _grads(params)
    optimizer = torch.optim.AdamW(params, lr=LR, fused=True)

    def window():
        for micro_step in range(STEPS):
            for index, param in enumerate(params):
                if micro_step == 0:
                    param.grad = grads.take(micro_step, index)  # kept, as autograd does
                else:
                    param.grad.add_(grads.take(micro_step, index))
        if clip:
            torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()

    return grads.prepare, window


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=5, help="timed windows per provider")
    parser.add_argument("--csv", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    cases = [
        ("bf16", torch.bfloat16, "eager-fp32-buf", eager_window, {}),
        ("fp32", torch.float32, "classic", classic_window, {}),
        ("fp32", torch.float32, "classic+clip", partial(classic_window, clip=True),
         {"max_grad_norm": 1.0}),
    ]  # fmt: skip
    for dtype_name, dtype, baseline_name, baseline, options in cases:
        setup, window, backends = fused_window(dtype, **options)
        backend = ",".join(sorted({b.name for b in backends.values()}))
        clip = "+clip" if options else ""
        runs = {f"fused_accum[{backend}]{clip}": (setup, window), baseline_name: baseline(dtype)}
        timings = measure_interleaved(runs, args.windows)  # window by window, in turns
        del setup, window, backends, runs
        reference = timings[baseline_name]["median_s"]
        for provider, timing in timings.items():
            rows.append({
                **environment(), "params": dtype_name, "provider": provider,
                "window": f"{STEPS} micro-steps + AdamW", "shapes": "gpt2-124m",
                **{k: round(v, 4) if isinstance(v, float) else v for k, v in timing.items()},
                f"speedup_vs_{baseline_name}": round(reference / timing["median_s"], 2),
            })  # fmt: skip
            print(
                f"{dtype_name:5} {provider:22} median {timing['median_s']:.3f}s "
                f"[p20 {timing['p20_s']:.3f}, p80 {timing['p80_s']:.3f}] "
                f"speedup vs {baseline_name}: {reference / timing['median_s']:.2f}x",
                flush=True,
            )
    if args.csv:
        fields = sorted(
            {key for row in rows for key in row},
            key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99,
        )
        with args.csv.open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
