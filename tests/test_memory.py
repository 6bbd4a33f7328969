"""The optimizer allocates only what a step will read: its own bytes per parameter
element (flat accumulation buffer and flat optimizer state; a first gradient adopted
as the buffer is autograd's memory, as .grad is in the classic loop), measured after
a few windows. The README's memory table is this test's."""

from __future__ import annotations

import pytest
import torch
from helpers import CPU_BACKENDS

from fused_accum import FusedAccumAdamW, FusedAccumSGD

NUMEL = 4096  # a multiple of the flat alignment: no padding in the figures

# (optimizer, parameter dtype, accumulation_steps, master_weights) -> bytes per element
OWN_BYTES = {
    ("sgd", torch.float32, 1, False): 4,  # momentum
    ("sgd", torch.float32, 8, False): 4,  # momentum; the buffer is the adopted gradient
    ("sgd", torch.float32, 1, True): 4,  # no master for fp32 parameters
    ("sgd", torch.float32, 8, True): 4,
    ("sgd", torch.bfloat16, 1, False): 4,  # momentum; no buffer: nothing sums into it
    ("sgd", torch.bfloat16, 8, False): 8,  # fp32 buffer + momentum
    ("sgd", torch.bfloat16, 1, True): 8,  # momentum + fp32 master
    ("sgd", torch.bfloat16, 8, True): 12,
    ("adamw", torch.float32, 1, False): 8,  # exp_avg + exp_avg_sq
    ("adamw", torch.float32, 8, False): 8,
    ("adamw", torch.float32, 1, True): 8,
    ("adamw", torch.float32, 8, True): 8,
    ("adamw", torch.bfloat16, 1, False): 8,
    ("adamw", torch.bfloat16, 8, False): 12,
    ("adamw", torch.bfloat16, 1, True): 12,
    ("adamw", torch.bfloat16, 8, True): 16,
}


def own_bytes_per_element(optimizer, params) -> float:
    """The bytes of the flat tensors the optimizer has allocated, per parameter element."""
    groups = optimizer._accumulation.groups.values()
    total = sum(flat.nbytes for group in groups for flat in group.flat_tensors())
    return total / sum(p.numel() for p in params)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "key", list(OWN_BYTES), ids=lambda k: f"{k[0]}-{str(k[1])[6:]}-N{k[2]}{'-master' * k[3]}"
)
def test_the_optimizer_owns_only_what_a_step_reads(backend, key):
    name, dtype, accumulation_steps, master_weights = key
    expected = OWN_BYTES[key]
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(NUMEL).to(dtype)) for _ in range(3)]
    make = {"sgd": lambda: FusedAccumSGD(params, lr=0.01, momentum=0.9, **options),
            "adamw": lambda: FusedAccumAdamW(params, lr=0.01, **options)}  # fmt: skip
    options = dict(
        accumulation_steps=accumulation_steps, master_weights=master_weights, backend=backend
    )
    optimizer = make[name]()
    for _ in range(3 * accumulation_steps):  # three windows
        for param in params:
            param.grad = torch.randn(NUMEL).to(dtype)
        optimizer.step()
    assert optimizer.update_count == 3
    assert own_bytes_per_element(optimizer, params) == expected
