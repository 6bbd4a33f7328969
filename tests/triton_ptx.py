"""Compile the Triton kernels for NVIDIA GPUs without one, and report facts about the
PTX: run as a script (with TRITON_INTERPRET unset) by test_triton_compiles.py.

Prints one JSON object per compiled variant. Pointer arguments are marked 16-byte
aligned, as Triton marks the tensors it is launched with."""

from __future__ import annotations

import inspect
import itertools
import json
import re

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fused_accum.backends.triton_accumulate import accumulate_kernel
from fused_accum.backends.triton_finalize import finalize_grad_stats_kernel, finalize_sums_kernel
from fused_accum.backends.triton_steps import adam_kernel, sgd_kernel
from fused_accum.backends.triton_tables import FINALIZE_TILE

TL = {"fp32": tl.float32, "bf16": tl.bfloat16, "fp16": tl.float16}
TABLES = ("grads", "params", "block_tensor", "block_start", "numels", "flat_offsets",
          "tensor_first_block", "tensor_blocks")  # fmt: skip


def _compile(kernel, arch, pointer_types, constexprs):
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointer_types:
            signature[name] = pointer_types[name]
        elif name in ("seed", "programs"):
            signature[name] = "i32"
        elif name.endswith(("_offsets", "_start", "numels")) or name in TABLES:
            signature[name] = "*i32" if name == "block_tensor" else "*i64"
        else:
            signature[name] = "fp32"
    aligned = {
        (index,): [["tt.divisibility", 16]]
        for index, name in enumerate(names)
        if signature[name].startswith("*")
    }
    source = ASTSource(kernel, signature, constexprs=constexprs, attrs=aligned)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32)).asm["ptx"]


def _facts(name, arch, variant, extra, ptx):
    return {
        "kernel": name,
        "arch": arch,
        "variant": variant,
        "extra": extra,  # what the variant asks for beyond the plain kernel, "+"-joined
        "atomics": len(re.findall(r"(?:atom|red)\.global", ptx)),
        "scalar_stores": len(re.findall(r"st\.global(?:\.[a-z]+)*\.[bfsu]\d+\s", ptx)),
        "vector_loads": len(re.findall(r"ld\.global(?:\.[a-z]+)*\.v[248]", ptx)),
        "vector_stores": len(re.findall(r"st\.global(?:\.[a-z]+)*\.v[248]", ptx)),
        "local_memory": ".local" in ptx,
        "sqrt_rn": "sqrt.rn.f32" in ptx,
        "div_rn": "div.rn.f32" in ptx,
    }


def _operands(acc):
    flat = f"*{acc}"
    return {
        "grads": "*i64",  # address tables
        "params": "*i64",
        "buffers": "*i64",  # address tables
        "momentum_ptr": flat,
        "exp_avg_ptr": flat,
        "exp_avg_sq_ptr": flat,
        "max_exp_avg_sq_ptr": flat,
        "master_ptr": flat,
        "found_inf_ptr": "*fp32",
        "partials": "*fp32",
        "sum_sq_ptr": "*fp32",
        "grad_sum_sq_ptr": "*fp32",
        "stats_ptr": "*fp32",
        "scalars_ptr": "*fp64",
    }


# what each level of extras asks for, per kernel: nothing (the plain kernel), then more
ACCUMULATE_EXTRAS = ("", "sum_sq", "sum_sq+grad_sum_sq")
STEP_EXTRAS = ("", "scalars", "scalars+stats")


def variants():
    """(kernel, arch, variant, extra, ptx); ``extra`` names the optional outputs and
    inputs compiled in ("" for none): ACCUMULATE_EXTRAS for accumulate, STEP_EXTRAS
    (device scalars, gradient statistics) for the steps; then the finalize kernels
    with everything they can add up."""
    dtypes = ("fp32", "bf16", "fp16")
    for arch, dtype, level in itertools.product((80, 90), dtypes, range(len(STEP_EXTRAS))):
        extra = ACCUMULATE_EXTRAS[level]
        operands = _operands("fp32")
        common = dict(BLOCK=1024)
        variant = dtype
        yield (
            "accumulate", arch, variant, extra,
            _compile(accumulate_kernel, arch, operands,
                     dict(common, GRAD_DTYPE=TL[dtype], OVERWRITE=False, CHECK_FINITE=True,
                          HAS_SUM_SQ="sum_sq" in extra.split("+"),
                          HAS_GRAD_SUM_SQ="grad_sum_sq" in extra.split("+"))),
        )  # fmt: skip
        extra = STEP_EXTRAS[level]
        step = dict(common, PARAM_DTYPE=TL[dtype], GRAD_DTYPE=TL[dtype], USE_BUFFER=True,
                    HAS_GRADS=True, HAS_WEIGHT_DECAY=True, MAXIMIZE=True,
                    HAS_MASTER=dtype == "fp16", STOCHASTIC=dtype == "bf16",
                    HAS_DEVICE_SCALARS="scalars" in extra.split("+"),
                    HAS_GRAD_STATS="stats" in extra.split("+"))  # fmt: skip
        yield (
            "sgd", arch, variant, extra,
            _compile(sgd_kernel, arch, operands,
                     dict(step, HAS_MOMENTUM=True, INIT_MOMENTUM=False, NESTEROV=True)),
        )  # fmt: skip
        yield (
            "adam", arch, variant, extra,
            _compile(adam_kernel, arch, operands, dict(step, DECOUPLED=True, AMSGRAD=True)),
        )  # fmt: skip
    for arch in (80, 90):
        operands = _operands("fp32")
        yield (
            "finalize_sums", arch, "fp32", ACCUMULATE_EXTRAS[2],
            _compile(finalize_sums_kernel, arch, operands,
                     dict(HAS_SUM_SQ=True, HAS_GRAD_SUM_SQ=True, TILE=FINALIZE_TILE)),
        )  # fmt: skip
        yield (
            "finalize_grad_stats", arch, "fp32", STEP_EXTRAS[2],
            _compile(finalize_grad_stats_kernel, arch, operands,
                     dict(HAS_GRADS=True, HAS_DEVICE_SCALARS=True, TILE=FINALIZE_TILE)),
        )  # fmt: skip


if __name__ == "__main__":
    for name, arch, variant, extra, ptx in variants():
        print(json.dumps(_facts(name, arch, variant, extra, ptx)), flush=True)
