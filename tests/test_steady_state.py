"""Steady state without host synchronisation or new memory: after the first window, a
micro-step and an update read no device value on the host, build no table from host
data (which on a GPU is a blocking upload) and allocate no memory of the optimizer's
own, for every CPU backend and option; the documented exceptions are named in
host_traffic.ALLOWED, with their reasons."""

from __future__ import annotations

import pytest
import torch
from helpers import CPU_BACKENDS
from host_traffic import HostTraffic

from fused_accum import FusedAccumAdamW, FusedAccumSGD

ACCUMULATION_STEPS = 4
OPTIONS = {
    "plain": {},
    "in_backward": dict(accumulate_in_backward=True),
    "clipping": dict(max_grad_norm=0.5),
    "loss_scaling": dict(loss_scaling=True),
    "grad_stats": dict(track_grad_stats=True),
    "everything": dict(
        accumulate_in_backward=True, max_grad_norm=0.5, loss_scaling=True, track_grad_stats=True
    ),
}
OPTIMIZERS = {
    "sgd": lambda groups, **kw: FusedAccumSGD(groups, lr=0.01, momentum=0.9, **kw),
    "adamw": lambda groups, **kw: FusedAccumAdamW(groups, lr=1e-3, **kw),
}


def _model() -> torch.nn.Module:
    """Nine layers: 18 parameters, more than a small cache of per-parameter tables holds."""
    torch.manual_seed(0)
    layers = [torch.nn.Linear(6, 6) for _ in range(9)]
    return torch.nn.Sequential(*[m for layer in layers for m in (layer, torch.nn.Tanh())])


def _persistent(optimizer) -> tuple:
    """What the optimizer keeps between windows: the addresses of its flat tensors and
    state, and the number of block layouts the Triton backend has built (the others
    build none)."""
    accumulation = optimizer._accumulation
    addresses = {t.data_ptr() for g in accumulation.groups.values() for t in g.flat_tensors()}
    for state in optimizer.state.values():
        addresses |= {v.data_ptr() for v in state.values() if isinstance(v, torch.Tensor)}
    backends = accumulation.backends.values()
    layouts = [len(b._tables.layouts) for b in backends if b.name == "triton"]
    return addresses, layouts


def _window(model, optimizer, sizes, micro_step: HostTraffic, update: HostTraffic) -> None:
    """One window of ragged micro-batches; the traffic of the non-boundary micro-steps
    (backward and step()) and of the update (the last ones) is counted apart."""
    for index, size in enumerate(sizes):
        loss = model(torch.randn(size, 6)).square().mean()
        if optimizer._loss_scale is not None:
            loss = optimizer.scale_loss(loss)
        with update if index == len(sizes) - 1 else micro_step:
            loss.backward()
            optimizer.step()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
@pytest.mark.parametrize("case", list(OPTIONS))
def test_no_host_traffic_and_no_new_memory_after_the_first_window(backend, optimizer_name, case):
    model = _model()
    params = list(model.parameters())
    groups = [{"params": params[:10]}, {"params": params[10:], "lr": 5e-3}]
    optimizer = OPTIMIZERS[optimizer_name](
        groups, accumulation_steps=ACCUMULATION_STEPS, backend=backend, **OPTIONS[case]
    )
    ragged = [(3, 5, 2, 4), (1, 6, 3, 2), (4, 4, 7, 1)]
    for sizes in ragged[:2]:  # the first windows build what the others reuse
        _window(model, optimizer, sizes, HostTraffic(), HostTraffic())
    before = _persistent(optimizer)
    micro_step, update = HostTraffic(), HostTraffic()
    for sizes in ragged:
        _window(model, optimizer, sizes, micro_step, update)
    assert optimizer.update_count == 5
    for what, traffic in (("micro-steps", micro_step), ("updates", update)):
        unexplained = traffic.unexplained()
        assert not unexplained, f"{what}: host reads or uploads in steady state: {unexplained}"
    assert _persistent(optimizer) == before, "the optimizer allocated memory in steady state"


def test_the_harness_sees_a_blocking_upload_and_a_host_read(monkeypatch):
    """The harness must fail on what it is there to catch: a table built from host data
    on every update, and a value read back on the host."""
    import fused_accum._optimizer as optimizer_module

    original = optimizer_module.FusedAccumOptimizer._window_scalars

    def uploading(self, squares, weight):
        scalars = original(self, squares, weight)
        torch.tensor([weight], device=self._accumulation.devices[0])  # an upload
        bool(next(iter(scalars.values()))[0] != 0)  # a read
        return scalars

    monkeypatch.setattr(optimizer_module.FusedAccumOptimizer, "_window_scalars", uploading)
    model = _model()
    optimizer = FusedAccumSGD(model.parameters(), lr=0.1, max_grad_norm=1.0, backend="torch")
    with HostTraffic() as traffic:
        model(torch.randn(2, 6)).sum().backward()
        optimizer.step()
    # (attributed to the optimizer's frame that called the patched method)
    assert traffic.unexplained() == {
        ("build", "_update._apply_window"): 1,
        ("read", "_update._apply_window"): 1,
    }


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_the_documented_reads_are_named(backend):
    """A GradScaler's per-micro-step read and a tensor weight's read happen, are
    allowed by name, and are all there is."""
    model = _model()
    optimizer = FusedAccumSGD(
        model.parameters(), lr=0.1, momentum=0.9, accumulation_steps=2, backend=backend
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for _ in range(3):  # the last window is the one counted
        with HostTraffic() as traffic:
            for size in (3, 5):
                scaler.scale(model(torch.randn(size, 6)).square().mean()).backward()
                optimizer.set_weight(torch.tensor(float(size)))
                scaler.step(optimizer)
                scaler.update()
    assert optimizer.update_count == 3
    assert traffic.events["read", "_optimizer._grad_scaler_inputs"] > 0
    assert traffic.events["read", "_checks.check_weight"] == 2
    assert traffic.unexplained() == {}


GPU_OPTIONS = {
    "plain": {},
    "in_backward": dict(accumulate_in_backward=True),
    "scaled_and_clipped": dict(loss_scaling=True, max_grad_norm=0.5, track_grad_stats=True),
}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["auto", "torch", "triton", "cuda"])
@pytest.mark.parametrize("optimizer_name", list(OPTIMIZERS))
@pytest.mark.parametrize("case", list(GPU_OPTIONS))
def test_no_sync_and_no_cuda_malloc_after_the_first_windows(backend, optimizer_name, case):
    """On a GPU, what the harness above stands in for: ragged windows under sync debug
    mode "error" (a blocking copy or a host read raises), and no cudaMalloc of the
    caching allocator after the first windows."""
    model = _model().cuda()
    params = list(model.parameters())
    groups = [{"params": params[:10]}, {"params": params[10:], "lr": 5e-3}]
    optimizer = OPTIMIZERS[optimizer_name](
        groups, accumulation_steps=ACCUMULATION_STEPS, backend=backend, **GPU_OPTIONS[case]
    )
    ragged = [(3, 5, 2, 4), (1, 6, 3, 2), (4, 4, 7, 1)]
    inputs = [[torch.randn(size, 6, device="cuda") for size in sizes] for sizes in ragged * 2]

    def window(batches):
        for x in batches:
            loss = model(x).square().mean()
            if optimizer._loss_scale is not None:
                loss = optimizer.scale_loss(loss)
            loss.backward()
            optimizer.step()

    for batches in inputs[:3]:
        window(batches)
    torch.cuda.synchronize()
    mallocs = torch.cuda.memory_stats()["num_device_alloc"]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batches in inputs[3:]:
            window(batches)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert optimizer.update_count == 6
    assert torch.cuda.memory_stats()["num_device_alloc"] == mallocs
