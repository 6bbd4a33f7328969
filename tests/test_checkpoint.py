"""torch.distributed.checkpoint (DCP) with the fused_accum optimizers, on one process:
its dummy step (which creates an empty optimizer's state) must not become a
micro-step, a checkpoint at a window boundary must resume bit for bit, and so must one
mid-window with checkpoint_partial_windows=True; without it a partial window, which
DCP would drop, must be refused, not lost, and a load that would lose one must raise.
DTensors of another sharding than FSDP2's are refused at construction."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from process_groups import run_ranks
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from fused_accum import FusedAccumAdamW, FusedAccumSGD

STEPS = 2
OPTIMIZERS = {
    "adamw": lambda params: FusedAccumAdamW(params, lr=0.05, accumulation_steps=STEPS),
    # dampening: a momentum started from zeros differs from one started by a gradient
    "sgd": lambda params: FusedAccumSGD(
        params, lr=0.05, momentum=0.9, dampening=0.5, accumulation_steps=STEPS
    ),
}


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))


def _micro_steps(model, optimizer, first: int, count: int) -> None:
    for index in range(first, first + count):
        torch.manual_seed(100 + index)
        model(torch.randn(6, 5)).square().mean().backward()
        optimizer.step()


def _twins(name: str):
    """Two equal models, each with its optimizer ``name``."""
    models = _model(), _model()
    return [(model, OPTIMIZERS[name](model.parameters())) for model in models]


def _assert_same_params(model, other) -> None:
    for param, expected in zip(model.parameters(), other.parameters(), strict=True):
        assert torch.equal(param, expected)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_the_dummy_step_of_a_checkpoint_is_not_a_micro_step(name):
    (model, optimizer), (reference, expected) = _twins(name)
    state = get_optimizer_state_dict(model, optimizer)  # an empty optimizer: DCP steps it
    assert state["state"]  # the state was created, for a load to fill
    assert optimizer._accumulation.window_micro_steps == 0
    assert optimizer.update_count == 0
    _micro_steps(model, optimizer, 0, 3 * STEPS)
    _micro_steps(reference, expected, 0, 3 * STEPS)
    _assert_same_params(model, reference)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_a_partial_window_is_refused_and_kept(name):
    (model, optimizer), (reference, expected) = _twins(name)
    _micro_steps(model, optimizer, 0, STEPS + 1)  # one window and a micro-step
    with pytest.raises(RuntimeError, match=r"drop the 1 micro-step.*partial_windows=True.*flush"):
        get_optimizer_state_dict(model, optimizer)
    assert optimizer._accumulation.window_micro_steps == 1
    _micro_steps(model, optimizer, STEPS + 1, 2 * STEPS - 1)
    _micro_steps(reference, expected, 0, 3 * STEPS)
    _assert_same_params(model, reference)


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_checkpoint_at_a_boundary_resumes_bit_for_bit(name, tmp_path):
    model = _model()
    optimizer = OPTIMIZERS[name](model.parameters())
    _micro_steps(model, optimizer, 0, STEPS)
    assert optimizer.last_step_applied
    dcp.save({"optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=tmp_path)
    resumed = _model(seed=1)  # other values: everything must come from the checkpoint
    resumed.load_state_dict(model.state_dict())
    resumed_optimizer = OPTIMIZERS[name](resumed.parameters())
    # a fresh optimizer has no state: DCP's template needs it created to load into
    template = {"optim": get_optimizer_state_dict(resumed, resumed_optimizer)}
    dcp.load(template, checkpoint_id=tmp_path)
    set_optimizer_state_dict(resumed, resumed_optimizer, template["optim"])
    _micro_steps(model, optimizer, STEPS, 2 * STEPS)
    _micro_steps(resumed, resumed_optimizer, STEPS, 2 * STEPS)
    _assert_same_params(model, resumed)


PARTIAL = {
    "adamw": lambda params: FusedAccumAdamW(params, lr=0.05, accumulation_steps=3),
    "sgd_dampening": lambda params: FusedAccumSGD(
        params, lr=0.05, momentum=0.9, dampening=0.5, accumulation_steps=3
    ),
    "sgd_no_state": lambda params: FusedAccumSGD(params, lr=0.05, accumulation_steps=3),
    "loss_scaling": lambda params: FusedAccumAdamW(
        params, lr=0.05, accumulation_steps=3, loss_scaling=True
    ),
    "in_backward": lambda params: FusedAccumAdamW(
        params, lr=0.05, accumulation_steps=3, accumulate_in_backward=True
    ),
}


def _partial_optimizer(name, params, **kwargs):
    optimizer = PARTIAL[name](params)
    optimizer.checkpoint_partial_windows = kwargs.get("checkpoint_partial_windows", True)
    return optimizer


def _backward(model, optimizer, index):
    torch.manual_seed(100 + index)
    loss = model(torch.randn(6, 5)).square().mean()
    if getattr(optimizer, "loss_scale", None) is not None:
        loss = optimizer.scale_loss(loss)
    loss.backward()


def _save_mid_window(name, path, **kwargs):
    """A model trained one window and a micro-step (and, with accumulate_in_backward,
    the backward of the next: folded, not yet stepped), checkpointed there."""
    model = _model()
    optimizer = _partial_optimizer(name, model.parameters(), **kwargs)
    for index in range(4):
        _backward(model, optimizer, index)
        optimizer.step()
    if name == "in_backward":
        _backward(model, optimizer, 4)
    dcp.save({"optim": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=path)
    return model, optimizer


def _load(name, model, path, **kwargs):
    resumed = _model(seed=1)
    resumed.load_state_dict(model.state_dict())
    optimizer = _partial_optimizer(name, resumed.parameters(), **kwargs)
    template = {"optim": get_optimizer_state_dict(resumed, optimizer)}
    dcp.load(template, checkpoint_id=path)
    set_optimizer_state_dict(resumed, optimizer, template["optim"])
    return resumed, optimizer


@pytest.mark.parametrize("name", PARTIAL)
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_checkpoint_mid_window_resumes_bit_for_bit(name, tmp_path):
    model, optimizer = _save_mid_window(name, tmp_path)
    resumed, resumed_optimizer = _load(name, model, tmp_path)
    assert resumed_optimizer.window_micro_steps == optimizer.window_micro_steps == 1
    assert resumed_optimizer.update_count == optimizer.update_count == 1
    for twin, twin_optimizer in ((model, optimizer), (resumed, resumed_optimizer)):
        if name == "in_backward":
            twin_optimizer.step()  # the micro-batch whose backward came before the save
        for index in range(5, 11):
            _backward(twin, twin_optimizer, index)
            twin_optimizer.step()
    assert optimizer.update_count == 3
    _assert_same_params(model, resumed)
    assert str(resumed_optimizer.state_dict()) == str(optimizer.state_dict())


@pytest.mark.parametrize("name", ["adamw", "sgd_dampening"])
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_without_the_option_a_checkpoint_has_torch_optims_entries(name, tmp_path):
    """So that torch.optim's DCP checkpoints load into ours, and ours into torch.optim."""
    ours = _model()
    optimizer = _partial_optimizer(name, ours.parameters(), checkpoint_partial_windows=False)
    reference = _model()
    classes = {"adamw": torch.optim.AdamW, "sgd_dampening": torch.optim.SGD}
    kwargs = {"adamw": {}, "sgd_dampening": dict(momentum=0.9, dampening=0.5)}
    expected = classes[name](reference.parameters(), lr=0.05, **kwargs[name])
    for model, opt, steps in ((ours, optimizer, 3), (reference, expected, 1)):
        for index in range(steps):
            _backward(model, opt, index)
            opt.step()
    saved = get_optimizer_state_dict(ours, optimizer)
    theirs = get_optimizer_state_dict(reference, expected)
    assert saved["param_groups"][0].keys() == theirs["param_groups"][0].keys()
    for key, entries in theirs["state"].items():
        assert saved["state"][key].keys() == entries.keys(), key


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_the_flattened_format_refuses_a_partial_window():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    model = _model()
    optimizer = _partial_optimizer("adamw", model.parameters())
    _backward(model, optimizer, 0)
    optimizer.step()
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    with pytest.raises(RuntimeError, match=r"drop the 1 micro-step.*flattened format"):
        get_optimizer_state_dict(model, optimizer, options=flat)


def _refusal_worker(rank: int, world: int, folder: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    replicated = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Replicate()]))
    with pytest.raises(ValueError, match=r"parameter 0 of param group 0 is a DTensor with "):
        FusedAccumAdamW([replicated], lr=0.1)
    sharded = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Shard(0)]))
    with pytest.raises(ValueError, match=r"with process_group yet: FSDP2 already reduces"):
        FusedAccumAdamW([sharded], lr=0.1, process_group=dist.group.WORLD)
    FusedAccumAdamW([sharded], lr=0.1)  # FSDP2's sharding, without those options
    plain = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=r"mix DTensors \(FSDP2\) with plain tensors, and max"):
        FusedAccumAdamW([sharded, plain], lr=0.1, max_grad_norm=1.0)
    optimizer = FusedAccumAdamW([sharded], lr=0.1, track_grad_stats=True)
    with pytest.raises(ValueError, match=r"plain tensors, and track_grad_stats sums"):
        optimizer.add_param_group({"params": [plain]})
    FusedAccumAdamW([sharded, plain], lr=0.1)  # nothing summed over the mesh
    # a model sharded after its optimizer was made: FSDP2 replaced the parameters
    from torch.distributed.fsdp import fully_shard

    model = torch.nn.Linear(3, 2)
    optimizer = FusedAccumAdamW(model.parameters(), lr=0.1, accumulation_steps=2)
    fully_shard(model)
    with pytest.warns(UserWarning, match=r"without a gradient .* fully_shard") as seen:
        for _ in range(4):
            model(torch.randn(5, 3)).sum().backward()
            optimizer.step()
    ours = [w for w in seen if "without a gradient" in str(w.message)]
    assert len(ours) == 1  # once
    assert ours[0].filename == __file__  # where step() was called


def test_dtensors_fsdp2_does_not_make_and_mixed_ones_are_refused_at_construction(tmp_path):
    # in a process of its own: the later spawned gloo tests had a rank abort now and
    # then only after a process group had been made in pytest's own process
    run_ranks(_refusal_worker, 1, tmp_path)
