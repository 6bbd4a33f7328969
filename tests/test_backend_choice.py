"""Backend resolution: "auto" falls back quietly, an explicit request that cannot be
honoured says why."""

from __future__ import annotations

import sys

import pytest
import torch

from fused_accum import FusedAccumSGD
from fused_accum.backends import resolve_backend
from fused_accum.backends.triton_backend import BLOCK, _Layout

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_is_the_reference_on_cpu_and_triton_on_cuda(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", CPU, torch.float32).name == "torch"
    assert resolve_backend("auto", CUDA, torch.bfloat16).name == "triton"
    assert resolve_backend("torch", CUDA, torch.bfloat16).name == "torch"


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", CPU, torch.float32).name == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match=r"CPU tensors only under the Triton interpreter"):
        resolve_backend("triton", CPU, torch.float32)
    with pytest.raises(ValueError, match=r"backend='triton' cannot run the torch.float32"):
        FusedAccumSGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, backend="triton")


def test_triton_on_another_device_type():
    with pytest.raises(ValueError, match=r"Triton does not run on meta tensors"):
        resolve_backend("triton", torch.device("meta"), torch.float32)


def test_broken_triton_falls_back_for_auto_and_raises_when_asked_for(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` fail
    assert resolve_backend("auto", CUDA, torch.float32).name == "torch"
    with pytest.raises(ValueError, match=r"triton cannot be imported \(ModuleNotFoundError"):
        resolve_backend("triton", CUDA, torch.float32)


def test_block_tables_address_past_two_to_the_31(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    big = 2**31 + 5
    layout = _Layout([0, big + 11], [big, 3], CPU)
    assert layout.block == BLOCK
    assert layout.num_blocks == -(-big // BLOCK) + 1
    assert layout.block_start.dtype == torch.int64 and layout.flat_offsets.dtype == torch.int64
    assert layout.block_start[-2].item() == (-(-big // BLOCK) - 1) * BLOCK >= 2**31
    assert layout.block_tensor[-1].item() == 1 and layout.block_start[-1].item() == 0
    assert layout.flat_offsets[-1].item() == big + 11
