"""Facts about the compiled CUDA kernels (csrc/cuda/kernels.cu), from nvcc without a GPU:
registers, spills, stack and shared memory per kernel from ptxas, the occupancy they
allow, and the vector loads and stores of each kernel's PTX. Used by
test_cuda_compiles.py; run as a script to print the table of benchmarks/RESULTS.md."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "csrc" / "cuda" / "kernels.cu"
THREADS = 512  # per block (csrc/cuda/multi_tensor.cuh)
# per SM on sm_80 and sm_90: registers, threads, and the allocation unit of registers
# per warp
REGISTERS, MAX_THREADS, REGISTER_UNIT = 65536, 2048, 256
SHARED_BYTES = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = {"f": "fp32", "d": "fp64", "N3c104HalfE": "fp16", "N3c108BFloat16E": "bf16"}


def nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or "/usr/local/cuda"
    path = Path(home) / "bin" / "nvcc"
    return str(path) if path.exists() else shutil.which("nvcc")


def _compile(arch: int, output: str, directory: Path) -> str:
    include = Path(torch.__file__).parent / "include"
    command = [
        nvcc(), "-std=c++20", "-O3", f"-arch=sm_{arch}", f"--{output}", "-Xptxas", "-v",
        f"-I{include}", f"-I{include / 'torch' / 'csrc' / 'api' / 'include'}",
        # as torch.utils.cpp_extension builds CUDA sources
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
        "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
        "--expt-relaxed-constexpr", "--expt-extended-lambda",
        "-o", str(directory / f"kernels.{output}"), str(SOURCE),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise RuntimeError(f"nvcc failed:\n{result.stderr[-4000:]}")
    return result.stderr if output == "cubin" else (directory / "kernels.ptx").read_text()


def _kernel(mangled: str) -> dict | None:
    """{'kernel', 'op', 'dtype', 'extra'} of a mangled multi_tensor_kernel or
    finalize_kernel name."""
    match = re.match(
        r"_ZN11fused_accum4cuda(\d+)(multi_tensor_kernel|finalize_kernel)ILi(\d)ENS0_"
        r"\d+(Accumulate|Sgd|Adam)I(N3c108BFloat16E|N3c104HalfE|f|d)[fd]((?:Lb[01]E)+)",
        mangled,
    )
    if match is None:
        return None
    flags = [int(flag) for flag in re.findall(r"Lb([01])E", match.group(6))]
    op = match.group(4).lower()
    if op == "accumulate":
        names = ("sum_sq", "grad_sum_sq")
        extra = "+".join(name for name, on in zip(names, flags, strict=True) if on)
    else:
        extra = "stats" if flags[0] else ""
    kernel = "main" if match.group(2) == "multi_tensor_kernel" else "finalize"
    return {"kernel": kernel, "op": op, "dtype": DTYPES[match.group(5)], "extra": extra}


def occupancy(registers: int, shared_bytes: int, arch: int) -> float:
    """Resident threads per SM over the most an SM holds, for blocks of THREADS."""
    per_warp = -(-registers * 32 // REGISTER_UNIT) * REGISTER_UNIT
    blocks = min(REGISTERS // per_warp // (THREADS // 32), MAX_THREADS // THREADS)
    if shared_bytes:
        blocks = min(blocks, SHARED_BYTES[arch] // shared_bytes)
    return blocks * THREADS / MAX_THREADS


def ptxas_facts(arch: int, directory: Path) -> list[dict]:
    """One entry per kernel: registers, spills, stack, shared memory, occupancy."""
    facts, current = [], None
    for line in _compile(arch, "cubin", directory).splitlines():
        entry = re.search(r"Compiling entry function '(\w+)' for 'sm_(\d+)'", line)
        if entry:
            current = _kernel(entry.group(1))
            if current is not None:
                current["arch"] = arch
                facts.append(current)
            continue
        if current is None:
            continue
        spills = re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill", line
        )
        if spills:
            current["stack"], current["spill_stores"], current["spill_loads"] = map(
                int, spills.groups()
            )
        used = re.search(r"Used (\d+) registers", line)
        if used:
            current["registers"] = int(used.group(1))
            shared = re.search(r"(\d+) bytes smem", line)
            current["shared"] = int(shared.group(1)) if shared else 0
            current["occupancy"] = occupancy(current["registers"], current["shared"], arch)
    return facts


def vector_accesses(directory: Path) -> list[dict]:
    """Per main kernel (sm_90 PTX): its vector loads and stores by width, any state space."""
    facts = []
    for body in re.split(r"\n\s*// \.globl\s+", _compile(90, "ptx", directory))[1:]:
        kernel = _kernel(body.split()[0])
        if kernel is None or kernel["kernel"] != "main":
            continue
        accesses = Counter(
            (access, 16 if shape.startswith(("v4.f32", "v2.f64")) else 8)
            for access, shape in re.findall(r"\b(ld|st)(?:\.global)?\.(v[24]\.[a-z]+\d+)", body)
        )
        kernel["loads"] = {width: n for (access, width), n in accesses.items() if access == "ld"}
        kernel["stores"] = {width: n for (access, width), n in accesses.items() if access == "st"}
        facts.append(kernel)
    return facts


def main() -> None:
    with tempfile.TemporaryDirectory() as directory:
        facts = ptxas_facts(90, Path(directory))
        vectors = {(f["op"], f["dtype"], f["extra"]): f for f in vector_accesses(Path(directory))}
    print("| kernel | op | dtype | sums | registers | spills | shared B | occupancy sm_90 | "
          "16 B / 8 B loads | 16 B / 8 B stores |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for f in sorted(facts, key=lambda f: (f["kernel"], f["op"], f["dtype"], f["extra"])):
        vector = vectors.get((f["op"], f["dtype"], f["extra"])) if f["kernel"] == "main" else None
        loads = stores = ""
        if vector:
            loads = f"{vector['loads'].get(16, 0)} / {vector['loads'].get(8, 0)}"
            stores = f"{vector['stores'].get(16, 0)} / {vector['stores'].get(8, 0)}"
        print(f"| {f['kernel']} | {f['op']} | {f['dtype']} | {f['extra'] or '-'} | "
              f"{f['registers']} | {f['spill_stores'] + f['spill_loads']} | {f['shared']} | "
              f"{f['occupancy']:.0%} | {loads} | {stores} |")  # fmt: skip


if __name__ == "__main__":
    if nvcc() is None:
        sys.exit("no nvcc: set CUDA_HOME to the CUDA toolkit")
    main()
