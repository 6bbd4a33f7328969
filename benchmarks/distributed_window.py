"""Data parallel and sharded windows on torch.distributed: fused_accum's one reduction
per window against DDP synchronising every micro-step, and FSDP2 with fused_accum
against FSDP2 with torch.optim, side by side in one run.

    python benchmarks/distributed_window.py [--world 2] [--shapes gpt2-124m]
        [--windows 3] [--backend gloo|nccl] [--csv out.csv] [--only NAMES] [--interleave]

Each rank holds the shapes' parameters in fp32; the loss of a micro-step is
sum(p * g) with fixed g, so backward is one cheap pass and the time is the optimizer's
and the communication's. Providers, 8 micro-steps and an AdamW update per window:
  ddp every micro-step  DDP (all-reduce of the gradients in every backward), loss / 8,
                        torch.optim.AdamW(fused=True) at the boundary, zero_grad()
  ddp no_sync + fused_accum   DDP with no_sync() on every micro-step,
                        FusedAccumAdamW(process_group=WORLD)
  fused_accum           no DDP wrapper, FusedAccumAdamW(process_group=WORLD)
  fused_accum shard_state  the same with shard_state=True: a reduce-scatter of the
                        buffers, each rank updates 1/world, an all-gather of the parameters
  fsdp2 + torch.optim   fully_shard (reduce-scatter in every backward), loss / 8,
                        torch.optim.AdamW(fused=True) at the boundary, zero_grad()
  fsdp2 + fused_accum   fully_shard, FusedAccumAdamW stepped at every micro-step
  fsdp2 no-sync + ...   the same two with set_requires_gradient_sync(False) but at
                        the window's last micro-step (FSDP2 keeps the unsharded sum)
Bytes sent per rank and window are modelled from the tensors' sizes, as a ring sends
them: a reduce-scatter or an all-gather of all fp32 parameters sends (world - 1) / world
times 4 bytes per element, an all-reduce (a reduce-scatter and an all-gather) twice
that. FSDP2 all-gathers in forward and again in backward (it reshards after forward)
and reduce-scatters in backward. Optimizer memory per rank is modelled too: the fp32
state (AdamW's two moments, 1/world of them where sharded), plus what holds the
gradients between micro-steps (.grad, our buffers, or FSDP2's unsharded sum without
gradient sync), 1/world of it where sharded.
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
from fused_accum.bench.timing import environment, measure, measure_interleaved

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

    def fused(wrapped, shard_state=False):
        def build():
            module = Linear(shapes, device)
            model = torch.nn.parallel.DistributedDataParallel(module) if wrapped else module
            optimizer = FusedAccumAdamW(
                model.parameters(), lr=1e-4, accumulation_steps=STEPS,
                process_group=dist.group.WORLD, shard_state=shard_state,
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

    def fsdp2(ours, no_sync):
        def build():
            from torch.distributed.fsdp import fully_shard

            model = fully_shard(Linear(shapes, device))
            if ours:
                optimizer = FusedAccumAdamW(model.parameters(), lr=1e-4, accumulation_steps=STEPS)
            else:
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

            def window():
                for micro_step in range(STEPS):
                    if no_sync:
                        model.set_requires_gradient_sync(micro_step == STEPS - 1)
                    if ours:
                        model().backward()
                        optimizer.step()
                    else:
                        (model() / STEPS).backward()
                if not ours:
                    optimizer.step()
                    optimizer.zero_grad()

            return window

        return build

    # (build, reduce-scatters and all-gathers of the fp32 parameters per window (an
    # all-reduce counts two), whether the state is sharded, how the gradients are held
    # between micro-steps: in units of the fp32 parameters per rank)
    world = dist.get_world_size()
    return {
        "ddp every micro-step": (ddp_every_micro_step, 2 * STEPS, False, 1.0),
        "ddp no_sync + fused_accum": (fused(True), 2, False, 1.0),
        "fused_accum": (fused(False), 2, False, 1.0),
        "fused_accum shard_state": (fused(False, shard_state=True), 2, True, 1.0),
        "fsdp2 + torch.optim": (fsdp2(False, False), 3 * STEPS, True, 1 / world),
        "fsdp2 + fused_accum": (fsdp2(True, False), 3 * STEPS, True, 1 / world),
        "fsdp2 no-sync + torch.optim": (fsdp2(False, True), 2 * STEPS + 1, True, 1.0),
        "fsdp2 no-sync + fused_accum": (fsdp2(True, True), 2 * STEPS + 1, True, 1.0),
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
        providers = {
            name: provider
            for name, provider in _providers(shapes, device).items()
            if not args.only or any(name.startswith(part) for part in args.only.split(","))
        }
        timings = {}
        if args.interleave:  # all built at once, then window by window in turns
            windows = {name: (None, build()) for name, (build, *_) in providers.items()}
            dist.barrier()
            timings = measure_interleaved(windows, args.windows)
            del windows
        rows = []
        for provider, (build, collectives, sharded, held) in providers.items():
            state = 8 * elements / (world if sharded else 1)  # AdamW's two fp32 moments
            timing = timings.get(provider)
            if timing is None:
                window = build()
                dist.barrier()
                timing = measure(window, args.windows, device=device)
                del window
            rows.append({
                **environment(device), "world": world, "backend": args.backend,
                "shapes": args.shapes, "provider": provider, **timing,
                "MB_communicated_per_rank": round(
                    collectives * (world - 1) / world * 4 * elements / 2**20, 1
                ),
                "optimizer_MB_per_rank": round((state + held * 4 * elements) / 2**20, 1),
            })  # fmt: skip
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
    parser.add_argument(
        "--only", help="comma-separated beginnings of provider names: time only those rows"
    )
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="build the rows' models at once and time them window by window in turns "
        "(gloo only; memory for all of them)",
    )
    args = parser.parse_args(argv)
    if args.interleave and args.backend != "gloo":
        parser.error("--interleave times on CPU: use it with --backend gloo")
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_worker, args=(args.world, args, folder), nprocs=args.world, join=True)
        rows = torch.load(os.path.join(folder, "rows.pt"))
    # against DDP every micro-step, or the first row timed when that one is left out
    baseline = rows[0]
    for row in rows:
        row["baseline"] = baseline["provider"]
        row["speedup_vs_baseline"] = round(baseline["median_s"] / row["median_s"], 2)
        print(f"{row['provider']:28} median {row['median_s']:.3f}s [p20 {row['p20_s']:.3f}, "
              f"p80 {row['p80_s']:.3f}] {row['MB_communicated_per_rank']:8.1f} MB/rank "
              f"{row['optimizer_MB_per_rank']:8.1f} MB optimizer/rank "
              f"{row['speedup_vs_baseline']:.2f}x vs {row['baseline']}", flush=True)  # fmt: skip
    if args.csv:
        with args.csv.open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
