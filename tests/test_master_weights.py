"""fp32 master weights for bf16/fp16 parameters: the update lands in the master and the
parameter receives it rounded, so small updates are not lost."""

from __future__ import annotations

import io

import pytest
import torch
from helpers import CPU_BACKENDS

from fused_accum import FusedAccumAdamW, FusedAccumSGD

BACKENDS = CPU_BACKENDS


def _regression(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 32, generator=generator)
    y = x @ torch.randn(32, 1, generator=generator)
    initial = 1.0 + 0.1 * torch.randn(32, 1, generator=generator)  # bf16 ulp here: 2**-7
    return x, y, initial


def _train(dtype, master_weights, backend, updates=200):
    """AdamW with lr 1e-3: each update is far below half an ulp of a bf16 weight near 1."""
    x, y, initial = _regression()
    param = torch.nn.Parameter(initial.to(dtype))
    optimizer = FusedAccumAdamW(
        [param], lr=1e-3, weight_decay=0.0, accumulation_steps=2,
        master_weights=master_weights, backend=backend,
    )  # fmt: skip
    for _ in range(updates):
        for half in (slice(0, 128), slice(128, 256)):
            xb, yb = x[half], y[half]
            grad = 2 * xb.T @ (xb @ param.detach().float() - yb) / len(xb)
            param.grad = grad.to(dtype)
            optimizer.step()
    return param.detach().float(), optimizer


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_master_weights_track_fp32_training(backend, dtype):
    fp32, _ = _train(torch.float32, False, backend)
    plain, _ = _train(dtype, False, backend)
    master, optimizer = _train(dtype, True, backend)
    plain_error = (plain - fp32).abs().max().item()
    master_error = (master - fp32).abs().max().item()
    # measured (both backends): bf16 plain 2.0e-1 against master 5.4e-3; fp16 2.2e-2 against
    # 5.9e-4: master weights are about 36x closer to the fp32 run
    assert master_error * 10 < plain_error, (plain_error, master_error)
    state = optimizer.state[optimizer.param_groups[0]["params"][0]]
    assert state["master_param"].dtype == torch.float32
    assert torch.equal(state["master_param"].to(dtype).float(), master)


@pytest.mark.parametrize("backend", BACKENDS)
def test_master_weights_change_nothing_for_fp32_parameters(backend):
    fp32, optimizer = _train(torch.float32, True, backend, updates=20)
    reference, _ = _train(torch.float32, False, backend, updates=20)
    assert torch.equal(fp32, reference)
    assert "master_param" not in optimizer.state[optimizer.param_groups[0]["params"][0]]


def test_master_weights_survive_a_checkpoint_and_come_from_the_parameter_otherwise():
    param = torch.nn.Parameter(torch.randn(40).bfloat16())
    optimizer = FusedAccumSGD([param], lr=1e-3, momentum=0.9, master_weights=True)
    for _ in range(3):
        param.grad = torch.randn(40).bfloat16()
        optimizer.step()
    stream = io.BytesIO()
    torch.save(optimizer.state_dict(), stream)
    stream.seek(0)
    copy = torch.nn.Parameter(param.detach().clone())
    loaded = FusedAccumSGD([copy], lr=1e-3, momentum=0.9, master_weights=True)
    loaded.load_state_dict(torch.load(stream))
    master = optimizer.state[param]["master_param"]
    assert torch.equal(loaded.state[copy]["master_param"], master)
    assert not torch.equal(master.bfloat16().float(), master)  # more than the bf16 value

    # a torch.optim state dict has no master: it is made from the parameter
    reference = torch.optim.SGD([torch.nn.Parameter(param.detach().clone())], lr=1e-3, momentum=0.9)
    fresh = FusedAccumSGD([torch.nn.Parameter(param.detach().clone())], lr=1e-3, momentum=0.9,
                          master_weights=True)  # fmt: skip
    fresh.load_state_dict(reference.state_dict())
    fresh_param = fresh.param_groups[0]["params"][0]
    fresh_param.grad = torch.zeros(40).bfloat16()
    fresh.step()
    assert torch.equal(fresh.state[fresh_param]["master_param"], param.detach().float())
