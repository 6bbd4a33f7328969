"""The accumulate kernel alone over a log-spaced size sweep: effective GB/s from the
byte model (DESIGN.md) against a copy measured in the same run.

    python benchmarks/accumulate_sweep.py [--device cpu] [--csv out.csv]

Providers, per gradient dtype: fused_accum's backends (what is available on the device),
PyTorch's one-kernel mixed-dtype `buf.add_(grad, alpha=s)` and the 3-kernel eager
`buf += grad.float() * s`. Copy: `dst.copy_(src)` in fp32, counting read + write.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from timing import environment, measure

from fused_accum.backends import resolve_backend

SIZES = [2**k for k in range(14, 26, 2)] + [2**25]
# bytes per element: read the gradient, read and write the fp32 buffer
MODEL_BYTES = {torch.float32: 12, torch.bfloat16: 10}
EAGER_BYTES = {torch.float32: 12 + 8 + 4, torch.bfloat16: 26}  # cast + scale + add


def _backends(device):
    names = ["torch", "cpu"] if device == "cpu" else ["triton", "cuda", "torch"]
    found = []
    for name in names:
        try:
            found.append(resolve_backend(name, torch.device(device), torch.float32))
        except ValueError:
            continue
    return found


def _providers(buffer, grad, device):
    """(run, bytes per element it moves) per provider, for one buffer and gradient."""
    dtype = grad.dtype
    providers = {
        "torch add_(alpha)": (lambda: buffer.add_(grad, alpha=0.5), MODEL_BYTES[dtype]),
        "torch eager 3 ops": (lambda: buffer.add_(grad.float() * 0.5), EAGER_BYTES[dtype]),
    }
    for backend in _backends(device):
        providers[f"fused_accum[{backend.name}]"] = (
            lambda b=backend: b.accumulate([buffer], [grad], scale=0.5, overwrite=False),
            MODEL_BYTES[dtype],
        )
    return providers


def _copy_gbps(size, device, repeats):
    source, target = torch.randn(size, device=device), torch.empty(size, device=device)
    copy = measure(lambda: target.copy_(source), repeats, device=device)
    return 8 * size / copy["median_s"] / 1e9


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--csv", type=Path)
    args = parser.parse_args(argv)
    device, rows = args.device, []
    for size in SIZES:
        copy_gbps = _copy_gbps(size, device, args.repeats)
        for dtype in (torch.float32, torch.bfloat16):
            grad = torch.randn(size, device=device).to(dtype)
            buffer = torch.randn(size, device=device)
            for provider, (run, moved) in _providers(buffer, grad, device).items():
                timing = measure(run, args.repeats, device=device)
                modelled = MODEL_BYTES[dtype] * size / timing["median_s"] / 1e9
                rows.append({
                    **environment(device), "op": "accumulate",
                    "grad": str(dtype).removeprefix("torch."), "elements": size,
                    "provider": provider, **timing, "bytes_per_element_moved": moved,
                    "modelled_GBps": round(modelled, 2), "copy_GBps": round(copy_gbps, 2),
                    "fraction_of_copy": round(modelled / copy_gbps, 3),
                })  # fmt: skip
                print(
                    f"{size:>10} {rows[-1]['grad']:8} {provider:22} {modelled:7.1f} GB/s "
                    f"(copy {copy_gbps:5.1f}, {modelled / copy_gbps:5.2f}x)",
                    flush=True,
                )
    if args.csv:
        with args.csv.open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
