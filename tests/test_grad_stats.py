"""track_grad_stats: per-parameter statistics of each window's applied gradient and
per-micro-step norms, from the kernels, equal to what PyTorch computes from the same
gradients, on every backend; off, nothing is computed."""

from __future__ import annotations

import pytest
import torch
from helpers import CPU_BACKENDS, Oracle

from fused_accum import FusedAccumAdamW, FusedAccumSGD

SHAPES = [(7, 5), (1,), (1023,), (0,)]
STEPS = 3


def _window(params, optimizer, oracle, generator, scale=1.0):
    norms = []
    for micro_step in range(STEPS):
        weight = 1.0 + micro_step
        grads = [torch.randn(s, generator=generator) for s in SHAPES]
        oracle.micro_step(grads, weight)
        norms.append(torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads])))
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad * scale
        optimizer.step(weight=weight)
    return torch.stack(norms)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize(
    "cls,options",
    [
        (FusedAccumAdamW, {}),
        (FusedAccumSGD, {"momentum": 0.9}),
        (FusedAccumAdamW, {"max_grad_norm": 0.1}),
        (FusedAccumSGD, {"loss_scaling": True}),
    ],
    ids=["adamw", "sgd", "adamw-clipped", "sgd-loss-scaling"],
)
def test_stats_equal_pytorch_on_the_mean_gradient(backend, cls, options):
    generator = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=generator, requires_grad=True) for s in SHAPES]
    named = [(f"layer{i}.weight", p) for i, p in enumerate(params)]
    optimizer = cls(named, lr=0.01, accumulation_steps=STEPS, backend=backend,
                    track_grad_stats=True, **options)  # fmt: skip
    oracle = Oracle("sgd", dict(lr=0.01), params)
    history = []
    for _ in range(2):
        scale = optimizer.loss_scale.item() if optimizer.loss_scale is not None else 1.0
        norms = _window(params, optimizer, oracle, generator, scale)
        mean = [buffer / oracle.weight for buffer in oracle.buffers]
        if "max_grad_norm" in options:
            total = torch.linalg.vector_norm(torch.cat([m.flatten() for m in mean]))
            coefficient = min(1.0, options["max_grad_norm"] / (total.item() + 1e-6))
            mean = [m * coefficient for m in mean]
        oracle._reset()
        stats = optimizer.grad_stats()
        assert [s["name"] for s in stats] == [name for name, _ in named]
        for row, expected in zip(stats, mean, strict=True):
            if expected.numel() == 0:
                assert row["norm"] == 0.0 and row["max_abs"] == 0.0
                continue
            assert row["mean_abs"] == pytest.approx(expected.abs().mean().item(), rel=1e-5)
            assert row["max_abs"] == pytest.approx(expected.abs().max().item(), rel=1e-5)
            assert row["norm"] == pytest.approx(expected.norm().item(), rel=1e-5)
        torch.testing.assert_close(optimizer.micro_step_grad_norms(), norms, rtol=1e-5, atol=0)
        history.append(torch.linalg.vector_norm(torch.cat([m.flatten() for m in mean])))
    torch.testing.assert_close(optimizer.grad_norm_history(), torch.stack(history), rtol=1e-5,
                               atol=0)  # fmt: skip


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_with_accumulate_in_backward_and_flush(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    optimizer = FusedAccumSGD(model.named_parameters(), lr=0.1, accumulation_steps=5,
                              accumulate_in_backward=True, backend=backend,
                              track_grad_stats=True)  # fmt: skip
    for _ in range(2):
        model(torch.randn(6, 4)).square().mean().backward()
        optimizer.step()
    optimizer.flush()
    stats = optimizer.grad_stats()
    assert [s["name"] for s in stats] == [name for name, _ in model.named_parameters()]
    assert optimizer.micro_step_grad_norms().shape == (2,)
    assert all(s["norm"] > 0 for s in stats)


class _Recorder:
    """Wraps a backend, recording what each call was given."""

    def __init__(self, backend):
        self.backend, self.calls = backend, []

    def __getattr__(self, name):
        method = getattr(self.backend, name)

        def record(*args, **kwargs):
            batch = args[0] if args and hasattr(args[0], "grad_stats") else None
            self.calls.append((name, kwargs.get("grad_sum_sq"), getattr(batch, "grad_stats", None)))
            return method(*args, **kwargs)

        return record


@pytest.mark.parametrize("track", [False, True], ids=["off", "on"])
def test_tracking_off_asks_the_kernels_for_nothing(track):
    params = [torch.randn(s, requires_grad=True) for s in SHAPES]
    optimizer = FusedAccumAdamW(params, accumulation_steps=STEPS, track_grad_stats=track)
    for key, backend in list(optimizer._accumulation.backends.items()):
        optimizer._accumulation.backends[key] = _Recorder(backend)
    for _ in range(STEPS):
        for param in params:
            param.grad = torch.randn_like(param)
        optimizer.step()
    calls = next(iter(optimizer._accumulation.backends.values())).calls
    # the same calls either way: the first micro-step's fresh gradients are adopted as
    # the buffers (no call), then an accumulate per micro-step, one accumulate-and-step
    assert [name for name, *_ in calls] == ["accumulate"] * (STEPS - 2) + ["adam_step"]
    asked = [grad_sum_sq is not None or stats is not None for _, grad_sum_sq, stats in calls]
    assert asked == [track] * len(calls)
    if not track:
        with pytest.raises(RuntimeError, match="track_grad_stats=True"):
            optimizer.grad_stats()


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plots_render_to_png(tmp_path):
    pytest.importorskip("matplotlib")
    from fused_accum import plot_grad_flow, plot_grad_norm_history

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    optimizer = FusedAccumSGD(model.named_parameters(), lr=0.1, accumulation_steps=2,
                              track_grad_stats=True)  # fmt: skip
    for _ in range(6):
        model(torch.randn(5, 4)).square().mean().backward()
        optimizer.step()
    figure = plot_grad_flow(optimizer, tmp_path / "flow.png")
    width, height = _png_size(tmp_path / "flow.png")
    assert (width, height) == tuple(int(v) for v in figure.get_size_inches() * 110)
    labels = [label.get_text() for label in figure.axes[0].get_xticklabels()]
    assert labels == [name for name, _ in model.named_parameters()]
    assert figure.axes[0].get_yscale() == "log"
    figure = plot_grad_norm_history(optimizer, tmp_path / "norms.png")
    assert _png_size(tmp_path / "norms.png") == (770, 440)
    assert len(figure.axes[0].lines[0].get_xdata()) == 3  # three applied windows
    with pytest.raises(ValueError, match="no gradient statistics yet"):
        plot_grad_flow([], tmp_path / "empty.png")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_window_skipped_on_the_device_reads_nan(backend):
    params = [torch.randn(s, requires_grad=True) for s in SHAPES]
    optimizer = FusedAccumAdamW(params, lr=0.01, accumulation_steps=2, loss_scaling=True,
                                track_grad_stats=True, backend=backend)  # fmt: skip
    for window in range(2):
        for micro_step in range(2):
            for param in params:
                param.grad = torch.randn_like(param) * optimizer.loss_scale
            if window == 1 and micro_step == 0:
                params[2].grad[5] = float("nan")
            optimizer.step()
        norms = optimizer.grad_norm_history()
        stats = optimizer.grad_stats()
        assert bool(norms[-1].isnan()) == (window == 1)
        assert all(row["norm"] != row["norm"] for row in stats) == (window == 1)
    assert torch.isfinite(norms[0])
