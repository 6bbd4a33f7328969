"""Data parallel windows on torch.distributed: fused_accum's one reduction per window
against DDP synchronising every micro-step, side by side in one run.

    python benchmarks/distributed_window.py [--world 2] [--shapes gpt2-124m]
        [--windows 3] [--backend gloo|nccl] [--csv out.csv]

Each rank holds the shapes' parameters in fp32; the loss of a micro-step is
sum(p * g) with fixed g, so backward is one cheap pass and the time is the optimizer's
and the communication's. Providers, 8 micro-steps and an AdamW update per window:
  ddp every micro-step  DDP (all-reduce of the gradients in every backward), loss / 8,
                        torch.optim.AdamW(fused=True) at the boundary, zero_grad()
  ddp no_sync + fused_accum   DDP with no_sync() on every micro-step,
                        FusedAccumAdamW(process_group=WORLD)
  fused_accum           no DDP wrapper, FusedAccumAdamW(process_group=WORLD)
Bytes communicated per rank and window are modelled (all-reduced fp32 elements x 4).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fused_accum import FusedAccumAdamW
from fused_accum.bench.shapes import SHAPE_LISTS
from fused_accum.bench.timing import environment, measure

STEPS = 8


class Linear(torch.nn.Module):
    """loss = sum over parameters of sum(p * g): its gradient is g."""

    def __init__(self, shapes, device):
        super().__init__()
        self.weights = torch.nn.ParameterList(
            torch.nn.Parameter(torch.randn(s, device=device) * 0.02) for s in shapes
        )
        self.grads = [torch.randn(s, device=device) * 1e-3 for s in shapes]

    def forward(self):
        return sum((p * g).sum() for p, g in zip(self.weights, self.grads, strict=True))


def _providers(shapes, device):
    def ddp_every_micro_step():
        model = torch.nn.parallel.DistributedDataParallel(Linear(shapes, device))
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def window():
            for _ in range(STEPS):
                (model() / STEPS).backward()
            optimizer.step()
            optimizer.zero_grad()

        return window

    def fused(wrapped):
        def build():
            module = Linear(shapes, device)
            model = torch.nn.parallel.DistributedDataParallel(module) if wrapped else module
            optimizer = FusedAccumAdamW(
                model.parameters(), lr=1e-4, accumulation_steps=STEPS,
                process_group=dist.group.WORLD,
            )  # fmt: skip

            def window():
                for _ in range(STEPS):
                    if wrapped:
                        with model.no_sync():
                            model().backward()
                    else:
                        model().backward()
                    optimizer.step()

            return window

        return build

    return {
        "ddp every micro-step": (ddp_every_micro_step, STEPS),
        "ddp no_sync + fused_accum": (fused(True), 1),
        "fused_accum": (fused(False), 1),
    }


def _worker(rank, world, args, folder):
    device = "cuda" if args.backend == "nccl" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        args.backend, init_method=f"file://{folder}/store", rank=rank, world_size=world
    )
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        shapes = SHAPE_LISTS[args.shapes]()
        elements = sum(math.prod(s) for s in shapes)
        rows = []
        for provider, (build, reductions) in _providers(shapes, device).items():
            window = build()
            dist.barrier()
            timing = measure(window, args.windows, device=device)
            rows.append({
                **environment(device), "world": world, "backend": args.backend,
                "shapes": args.shapes, "provider": provider, **timing,
                "MB_communicated_per_rank": round(reductions * 4 * elements / 2**20, 1),
            })  # fmt: skip
            del window
        if rank == 0:
            torch.save(rows, os.path.join(folder, "rows.pt"))
    finally:
        dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--shapes", default="gpt2-124m", choices=sorted(SHAPE_LISTS))
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(args.world, args, folder), nprocs=args.world, join=True)
        rows = torch.load(os.path.join(folder, "rows.pt"))
    baseline = rows[0]["median_s"]
    for row in rows:
        row["speedup_vs_ddp"] = round(baseline / row["median_s"], 2)
        print(f"{row['provider']:28} median {row['median_s']:.3f}s [p20 {row['p20_s']:.3f}, "
              f"p80 {row['p80_s']:.3f}] {row['MB_communicated_per_rank']:8.1f} MB/rank "
              f"{row['speedup_vs_ddp']:.2f}x vs DDP", flush=True)  # fmt: skip
    if args.csv:
        with args.csv.open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
