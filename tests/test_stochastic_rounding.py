"""stochastic_rounding=True for bf16 parameters: unbiased, repeatable, resumable."""

from __future__ import annotations

import io

import pytest
import torch

from fused_accum import FusedAccumAdamW, FusedAccumSGD
from fused_accum.backends.reference import _stochastic_bf16
from fused_accum.backends.spec import stochastic_noise_reference

UPDATES = 400


def _drift(stochastic_rounding, backend):
    """Plain SGD on bf16 weights at 1.0, each update -1e-4: a fortieth of an ulp (2**-8
    below 1.0). Returns the mean weight and what exact arithmetic gives."""
    param = torch.nn.Parameter(torch.ones(8192, dtype=torch.bfloat16))
    torch.manual_seed(11)
    optimizer = FusedAccumSGD(
        [param], lr=1.0, stochastic_rounding=stochastic_rounding, backend=backend
    )
    grad = torch.full((8192,), 1e-4, dtype=torch.bfloat16)
    for _ in range(UPDATES):
        param.grad = grad
        optimizer.step()
    return param.float().mean().item(), 1.0 - UPDATES * grad[0].float().item()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_stochastic_rounding_is_unbiased_where_rounding_to_nearest_is_not(backend):
    stochastic, exact = _drift(True, backend)
    nearest, _ = _drift(False, backend)
    # Each element's error is a sum of 400 independent roundings of at most an ulp:
    # the mean of 8192 elements lands near the exact 0.96 (measured on both backends:
    # 0.95992 against 0.95995), while rounding to nearest stays at 1.0.
    assert abs(stochastic - exact) < 2e-3, (stochastic, exact)
    assert abs(nearest - exact) > 2e-2, (nearest, exact)  # stuck at 1.0: every update lost


def test_the_noise_follows_its_definition():
    value = torch.tensor([1.0 + 2**-10, -(1.0 + 2**-10), 3.5, 1e-30, float("inf")])
    buffer = torch.zeros(64)[17:22]
    rounded = _stochastic_bf16(value, buffer, 99).view(torch.int16).tolist()
    for index, number in enumerate(value.tolist()):
        bits = torch.tensor([number]).view(torch.int32).item() & 0xFFFFFFFF
        noise = stochastic_noise_reference(17 + index, 99) & 0xFFFF
        assert rounded[index] & 0xFFFF == ((bits + noise) >> 16) & 0xFFFF


def test_repeatable_with_the_torch_seed_and_resumable():
    def run(seed, checkpoint_at=None):
        torch.manual_seed(seed)
        param = torch.nn.Parameter(torch.linspace(-1, 1, 999).bfloat16())
        optimizer = FusedAccumAdamW([param], lr=1e-3, stochastic_rounding=True)
        grads = torch.randn(10, 999).bfloat16()
        for index, grad in enumerate(grads):
            if index == checkpoint_at:
                stream = io.BytesIO()
                torch.save({"param": param.detach(), "optimizer": optimizer.state_dict()}, stream)
                stream.seek(0)
                saved = torch.load(stream)
                torch.manual_seed(seed + 1)  # a resumed run does not share the generator
                param = torch.nn.Parameter(saved["param"].clone())
                optimizer = FusedAccumAdamW([param], lr=1e-3, stochastic_rounding=True)
                optimizer.load_state_dict(saved["optimizer"])
            param.grad = grad
            optimizer.step()
        return param.detach()

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))
    assert torch.equal(run(5), run(5, checkpoint_at=4))


def test_master_weights_and_stochastic_rounding_are_alternatives():
    with pytest.raises(ValueError, match=r"choose one"):
        FusedAccumSGD(
            [torch.nn.Parameter(torch.ones(2).bfloat16())],
            lr=0.1,
            master_weights=True,
            stochastic_rounding=True,
        )
