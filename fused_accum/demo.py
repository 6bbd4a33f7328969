"""The demo: train one small model three ways on ragged micro-batches and show that
fused_accum's weighted accumulation gives the large-batch result, while the plain loop
(divide the loss by N, step every N micro-batches) does not."""

from __future__ import annotations

import resource
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .adam import FusedAccumAdamW
from .grad_flow import plot_grad_flow, plot_grad_norm_history


@dataclass
class DemoRun:
    name: str
    seconds: float
    loss: float
    """Mean loss over all the training data at the end."""
    max_difference: float
    """Largest |parameter - large-batch parameter| at the end."""


def _model(seed: int, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 256), torch.nn.GELU(), torch.nn.Linear(256, 1)
    ).to(device)


def _data(windows: int, accumulation_steps: int, seed: int, device: torch.device):
    """Windows of micro-batches of 3 to 13 items: ragged, as token counts are."""
    generator = torch.Generator().manual_seed(seed)
    true_weights = torch.randn(32, 1, generator=generator)
    data = []
    for _ in range(windows):
        window = []
        for _ in range(accumulation_steps):
            size = int(torch.randint(3, 14, (1,), generator=generator))
            x = torch.randn(size, 32, generator=generator)
            y = torch.sin(x @ true_weights) + 0.1 * torch.randn(size, 1, generator=generator)
            window.append((x.to(device), y.to(device)))
        data.append(window)
    return data


def _loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.mse_loss(model(x), y)


def run_demo(
    windows: int = 300,
    accumulation_steps: int = 4,
    lr: float = 3e-3,
    seed: int = 0,
    device: str = "cpu",
    plots: str | Path | None = None,
    threads: int | None = 1,
    rounds: int = 3,
) -> list[DemoRun]:
    """Train the same model from the same start three ways; return one DemoRun each,
    with the median time of ``rounds`` trainings, the three taking turns. On CPU the
    demo runs on ``threads`` threads (None: torch's setting), by default one: its
    tensors are small, so more threads only wait for each other, and on a busy machine
    for a core that is not free (one thread was 9x faster there). With ``plots`` (a
    folder), a further fused_accum run, untimed, tracks its gradient statistics and
    draws them there: ``grad_flow.png`` (per layer) and ``grad_norms.png`` (per update)."""
    device = torch.device(device)
    data = _data(windows, accumulation_steps, seed, device)
    before = torch.get_num_threads()
    if threads is not None and device.type == "cpu":
        torch.set_num_threads(threads)
    try:
        return _run(data, accumulation_steps, lr, seed, device, plots, rounds)
    finally:
        torch.set_num_threads(before)


def _run(data, accumulation_steps, lr, seed, device, plots, rounds) -> list[DemoRun]:
    def trained(train):
        """(seconds, model) of one training from the seed's start."""
        model = _model(seed, device)
        start = time.perf_counter()
        train(model)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, model

    def large_batch(model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        for window in data:
            x = torch.cat([x for x, _ in window])
            y = torch.cat([y for _, y in window])
            _loss(model, x, y).backward()
            optimizer.step()
            optimizer.zero_grad()

    def fused(model, track_grad_stats=False):
        optimizer = FusedAccumAdamW(
            model.named_parameters(), lr=lr, accumulation_steps=accumulation_steps,
            track_grad_stats=track_grad_stats,
        )  # fmt: skip
        for window in data:
            for x, y in window:
                _loss(model, x, y).backward()
                optimizer.step(weight=len(x))
        return optimizer

    def plain(model):
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        for window in data:
            for x, y in window:
                (_loss(model, x, y) / accumulation_steps).backward()
            optimizer.step()
            optimizer.zero_grad()

    trainings = {
        "large batch, torch.optim.AdamW": large_batch,
        "fused_accum, weighted micro-batches": fused,
        "plain loop, loss / N": plain,
    }
    for train in trainings.values():  # warm-up: first calls pay for lazy initialisation
        train(_model(seed, device))
    seconds: dict[str, list[float]] = {name: [] for name in trainings}
    models = {}
    for _ in range(rounds):
        for name, train in trainings.items():
            elapsed, models[name] = trained(train)
            seconds[name].append(elapsed)
    x = torch.cat([x for window in data for x, _ in window])
    y = torch.cat([y for window in data for _, y in window])
    runs = []
    for name, model in models.items():
        with torch.no_grad():
            loss = _loss(model, x, y).item()
        runs.append((name, statistics.median(seconds[name]), loss, model))
    if plots is not None:  # a run of its own, so that the timings above are plain
        tracked = fused(_model(seed, device), track_grad_stats=True)
        folder = Path(plots)
        folder.mkdir(parents=True, exist_ok=True)
        plot_grad_flow(tracked, folder / "grad_flow.png")
        plot_grad_norm_history(tracked, folder / "grad_norms.png")
    reference = list(runs[0][3].parameters())
    results = []
    for name, seconds, loss, model in runs:
        difference = max(
            (p - r).abs().max().item() for p, r in zip(model.parameters(), reference, strict=True)
        )
        results.append(DemoRun(name, seconds, loss, difference))
    return results


def peak_memory_mib(device: str) -> float:
    """Peak memory of the process so far: the CUDA allocator's on a GPU, else the
    resident set size."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def format_demo(results: list[DemoRun], windows: int, accumulation_steps: int, device: str) -> str:
    lines = [
        f"{windows} updates of a 32-256-1 MLP on {device}, each from {accumulation_steps} "
        f"micro-batches of 3 to 13 items",
        "",
        f"{'':38} {'max |p - p_large_batch|':>24} {'train loss':>11} {'time':>8}",
    ]
    for run in results:
        lines.append(
            f"{run.name:38} {run.max_difference:24.2e} {run.loss:11.5f} {run.seconds:7.2f}s"
        )
    fused, plain = results[1], results[2]
    lines += [
        "",
        f"fused_accum ends {fused.max_difference:.1e} from the large-batch parameters (fp32 "
        f"rounding); the plain loop ends {plain.max_difference:.1e} away, because dividing by "
        f"N weighs a 3-item micro-batch like a 13-item one.",
        f"peak memory of the process: {peak_memory_mib(device):.0f} MiB",
    ]
    return "\n".join(lines)
