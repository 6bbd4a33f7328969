"""The hyperparameter records (backends/spec.py): read from torch.optim param groups
as Python numbers, handed to the ops in field order."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from fused_accum import FusedAccumAdamW, FusedAccumSGD
from fused_accum.backends import AdamHyperparams, SgdHyperparams


def _python_numbers(record) -> list[type]:
    return [type(getattr(record, field.name)) for field in fields(record)]


def test_adam_record_reads_tensor_lr_and_betas_as_floats():
    params = [torch.nn.Parameter(torch.ones(3))]
    lr, betas = torch.tensor(0.01), (torch.tensor(0.9), torch.tensor(0.99))
    optimizer = FusedAccumAdamW(params, lr=lr, betas=betas, weight_decay=0.1, amsgrad=True)
    hyper = AdamHyperparams.from_group(optimizer.param_groups[0])
    assert hyper == AdamHyperparams(
        lr=float(lr), beta1=float(betas[0]), beta2=float(betas[1]), eps=1e-8,
        weight_decay=0.1, decoupled_weight_decay=True, amsgrad=True, maximize=False,
    )  # fmt: skip
    assert _python_numbers(hyper) == [float] * 5 + [bool] * 3


def test_sgd_record_reads_a_tensor_lr_and_integers_as_floats():
    params = [torch.nn.Parameter(torch.ones(3))]
    optimizer = FusedAccumSGD(params, lr=torch.tensor(0.5), momentum=1, nesterov=True)
    hyper = SgdHyperparams.from_group(optimizer.param_groups[0])
    assert hyper == SgdHyperparams(
        lr=0.5, momentum=1.0, dampening=0.0, weight_decay=0.0, nesterov=True, maximize=False
    )
    assert _python_numbers(hyper) == [float] * 4 + [bool] * 2


@pytest.mark.parametrize("record_class", [SgdHyperparams, AdamHyperparams])
def test_as_tuple_gives_the_fields_in_order(record_class):
    """What the ops get positionally: every field once, where the schema check
    (compiled.schema_mismatch) expects it."""
    names = [field.name for field in fields(record_class)]
    record = record_class(**{name: float(index) for index, name in enumerate(names)})
    assert record.as_tuple() == tuple(float(index) for index in range(len(names)))
