"""Backend resolution: "auto" falls back quietly, an explicit request that cannot be
honoured says why."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from fused_accum import FusedAccumSGD, backends
from fused_accum.backends import compiled, resolve_backend
from fused_accum.backends.triton_tables import BLOCK, _Layout

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_auto_prefers_fused_kernels(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", CPU, torch.float32).name == "cpu"
    # the CUDA kernels first where this build has them (they register without a GPU)
    first = "cuda" if compiled.unavailable_reason(CUDA) is None else "triton"
    assert resolve_backend("auto", CUDA, torch.bfloat16).name == first
    assert resolve_backend("torch", CUDA, torch.bfloat16).name == "torch"


def test_auto_falls_back_with_one_notice_when_the_extension_is_missing(monkeypatch):
    monkeypatch.setattr(compiled, "_import_error", "No module named 'fused_accum._C'")
    monkeypatch.setattr(compiled, "_loaded", True)
    monkeypatch.setattr(backends, "_noticed", set())
    with pytest.warns(UserWarning, match=r"cpu: the compiled kernels are not built .* reference"):
        assert resolve_backend("auto", CPU, torch.float32).name == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once only
        assert resolve_backend("auto", CPU, torch.bfloat16).name == "torch"
    with pytest.raises(ValueError, match=r"backend='cpu' cannot run .* not built"):
        resolve_backend("cpu", CPU, torch.float32)


def test_compiled_backends_serve_their_own_device_type():
    with pytest.raises(ValueError, match=r"backend='cpu' runs CPU tensors"):
        resolve_backend("cpu", CUDA, torch.float32)
    with pytest.raises(ValueError, match=r"backend='cuda' runs CUDA tensors"):
        resolve_backend("cuda", CPU, torch.float32)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("triton", CPU, torch.float32).name == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match=r"CPU tensors only under the Triton interpreter"):
        resolve_backend("triton", CPU, torch.float32)
    with pytest.raises(ValueError, match=r"backend='triton' cannot run the torch.float32"):
        FusedAccumSGD([torch.nn.Parameter(torch.ones(2))], lr=0.1, backend="triton")


def test_fp64_goes_to_other_backends_than_triton(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_backend("auto", CUDA, torch.float64).name != "triton"
    with pytest.raises(ValueError, match=r"hyperparameters of fp64 parameters"):
        resolve_backend("triton", CUDA, torch.float64)


def test_triton_on_another_device_type():
    with pytest.raises(ValueError, match=r"Triton does not run on meta tensors"):
        resolve_backend("triton", torch.device("meta"), torch.float32)


def test_broken_triton_falls_back_for_auto_and_raises_when_asked_for(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` fail
    monkeypatch.setattr(backends, "_noticed", set())
    cuda_kernels_built = compiled.unavailable_reason(CUDA) is None
    with warnings.catch_warnings(record=True):
        name = resolve_backend("auto", CUDA, torch.float32).name
    assert name == ("cuda" if cuda_kernels_built else "torch")
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


def test_the_optimizer_says_what_each_group_runs_on(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    params = [torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2).double())]
    optimizer = FusedAccumSGD(params, lr=0.1)
    assert optimizer.backend == "auto"
    compiled_cpu = "cpu" if compiled.unavailable_reason(CPU) is None else "torch"
    assert optimizer.backends == {
        (CPU, torch.float32): compiled_cpu,
        (CPU, torch.float64): compiled_cpu,
    }
    assert FusedAccumSGD(params, lr=0.1, backend="torch").backends == {
        (CPU, torch.float32): "torch",
        (CPU, torch.float64): "torch",
    }
