"""The byte model of DESIGN.md (with its recorded deviation: steps do not zero the
buffer), bytes per parameter element for each operation and dtype."""

from __future__ import annotations

import pytest
import torch

from fused_accum.bench import byte_model

FP32, BF16, FP16 = torch.float32, torch.bfloat16, torch.float16


@pytest.mark.parametrize(
    "dtype,first,expected",
    [(BF16, False, 10), (FP16, False, 10), (FP32, False, 12), (BF16, True, 6), (FP32, True, 8)],
)
def test_accumulate(dtype, first, expected):
    assert byte_model.accumulate_bytes(dtype, first=first) == expected


@pytest.mark.parametrize(
    "optimizer,dtype,options,expected",
    [
        ("sgd", FP32, {}, 20),  # DESIGN.md's 24, less the zeroing write
        ("sgd", FP32, {"momentum": False}, 12),
        ("adamw", FP32, {}, 28),  # DESIGN.md's 32, less the zeroing write
        ("adamw", BF16, {"master": True}, 30),  # DESIGN.md's 34, less the zeroing write
        ("adamw", BF16, {}, 24),
        ("adamw", FP32, {"fresh_grad": True}, 32),  # the last micro-step's fused pass
        ("adam", BF16, {"fresh_grad": True}, 26),
    ],
)
def test_step(optimizer, dtype, options, expected):
    assert byte_model.step_bytes(optimizer, dtype, **options) == expected


def test_window_and_eager_recipe():
    # first micro-step 8, six accumulates of 12, the accumulate-and-step 32
    assert byte_model.window_bytes("adamw", FP32, 8) == 8 + 6 * 12 + 32
    # the first fp32 gradient adopted as the buffer: nothing moved for it
    assert byte_model.window_bytes("adamw", FP32, 8, adopt_first=True) == 6 * 12 + 32
    assert byte_model.window_bytes("adamw", BF16, 8, adopt_first=True) == 6 + 6 * 10 + 26
    assert byte_model.window_bytes("adamw", BF16, 8) == 6 + 6 * 10 + 26
    assert byte_model.window_bytes("adamw", FP32, 1) == 28  # the gradient, no buffer
    assert byte_model.eager_accumulate_bytes(BF16) == 26
    assert byte_model.eager_accumulate_bytes(FP32) == 20  # .float() is no copy
