"""Host overhead: the Python and CPU time of fused_accum's optimizers per window, on
models of many tiny tensors (16 elements each, so that kernel time is negligible),
against torch.optim's fused step measured in the same run.

One window is ``STEPS`` (8) micro-steps through the public API. A micro-step's timed
region is handing over every parameter's gradient (``p.grad = g``: the gradients are
made in advance, untimed, and handed over as backward would, see gradients.py) and
``optimizer.step()``; the 8th call applies the update. The baseline is the optimizer
work of torch's classic loop for one window: the same handover at every micro-step,
then ``step()`` and ``zero_grad()`` once, with ``AdamW(fused=True)`` or
``SGD(momentum=0.9, fused=True)``. It stays that plain step for every option (no
``clip_grad_norm_``, no GradScaler), so a ratio is what an option costs against
torch's cheapest window.

With ``accumulate_in_backward`` the gradients come from autograd instead: the loss
``sum_i (p_i * x_i).sum()`` is built once, untimed, and a micro-step is
``loss.backward(retain_graph=True)`` then ``step()``, for ours (the backward hooks fold
the gradients) and for the baseline (autograd accumulates them into ``.grad``).

Ours and the baseline take turns window by window, the order alternating, so that a
change of the machine's load hits both alike. Per case: the window (median, 20% and
80% quantiles over the windows), a non-boundary micro-step (the same over all windows'
7), the boundary micro-step, and their ratios to torch's window. On CUDA the device is
synchronised before and after each window, never between micro-steps, so micro-step
times are host time and the window includes the device's tail.

Targets (the project's): at 1000 tensors a window ratio <= 2.0 and a non-boundary
micro-step ratio <= 0.25; at 10000 tensors neither ratio more than
``SCALING_TOLERANCE`` above its value at 1000.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import FusedAccumAdamW, FusedAccumSGD
from .gradients import WindowGradients
from .suite import Progress, our_backends
from .timing import environment, spread_warning, summarize

STEPS = 8
ELEMENTS = 16  # per tensor: small enough that every kernel is a few nanoseconds
LR = 1e-4
WARMUP_WINDOWS = 2  # the first window creates the optimizer state and the buffers

# (our optimizer, torch's, the hyperparameters both get)
OPTIMIZERS: dict[str, tuple[type, type, dict[str, Any]]] = {
    "SGD(momentum=0.9)": (FusedAccumSGD, torch.optim.SGD, {"lr": LR, "momentum": 0.9}),
    "AdamW": (FusedAccumAdamW, torch.optim.AdamW, {"lr": LR}),
}
OPTIONS: dict[str, dict[str, Any]] = {
    "plain": {},
    "max_grad_norm=1.0": {"max_grad_norm": 1.0},
    # valid with fp32 parameters too; the gradients handed over are not scaled, which
    # changes the update's values, not its work
    "loss_scaling=True": {"loss_scaling": True},
    "track_grad_stats=True": {"track_grad_stats": True},
    "accumulate_in_backward=True": {"accumulate_in_backward": True},
}

WINDOW_RATIO_TARGET = 2.0
MICRO_STEP_RATIO_TARGET = 0.25
TARGET_TENSORS = 1000
SCALING_TENSORS = 10000
# A ratio moves by about this much between runs on a shared machine: "worse at 10000
# tensors" means above the 1000-tensor ratio times this.
SCALING_TOLERANCE = 1.1

# Where the triton backend is left out, and why.
TRITON_ON_CPU = (
    "triton is not timed on CPU: it runs there only under TRITON_INTERPRET=1, whose "
    "interpreter, not the host path, would be measured"
)


@dataclass
class HostSettings:
    """What the host benchmark runs: every optimizer x backend x option per tensor count."""

    device: str = "cpu"
    tensors: list[int] = field(default_factory=lambda: [100, 1000, 10000])
    windows: int = 5
    optimizers: list[str] = field(default_factory=lambda: list(OPTIMIZERS))
    options: list[str] = field(default_factory=lambda: list(OPTIONS))

    @classmethod
    def for_device(cls, device: str, quick: bool = False) -> HostSettings:
        """Quick: 100 tensors, 3 windows per case (seconds; for tests)."""
        if quick:
            return cls(device, tensors=[100], windows=3)
        return cls(device)

    def backends(self) -> list[str]:
        """Our backends for fp32 parameters on the device, but triton on CPU."""
        names = our_backends(self.device, torch.float32)
        if self.device == "cpu":
            names = [name for name in names if name != "triton"]
        return names

    def cases(self) -> list[tuple[int, str, str, str]]:
        """(tensors, optimizer, backend, option) of every row, in order."""
        return [
            (tensors, optimizer, backend, option)
            for tensors in self.tensors
            for optimizer in self.optimizers
            for backend in self.backends()
            for option in self.options
        ]


# ----------------------------------------------------------------- one window


def _synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed_window(
    produce_grads: Callable[[int], None], step: Callable[[int], None], device: str
) -> list[float]:
    """One window's ``time.perf_counter`` stamps: the start, then after the gradients
    and after the step call of each micro-step, then the end (after synchronising)."""
    _synchronize(device)
    stamps = [time.perf_counter()]
    for micro_step in range(STEPS):
        produce_grads(micro_step)
        stamps.append(time.perf_counter())
        step(micro_step)
        stamps.append(time.perf_counter())
    _synchronize(device)
    stamps.append(time.perf_counter())
    return stamps


def _no_preparation() -> None:
    pass


@dataclass
class _Provider:
    """A window to time: ``prepare`` runs untimed before each ``run``, which returns
    the stamps of ``_timed_window``."""

    prepare: Callable[[], None]
    run: Callable[[], list[float]]


def _gradient_source(
    params: list[torch.nn.Parameter], from_backward: bool
) -> tuple[Callable[[], None], Callable[[int], None]]:
    """(untimed preparation before a window, what makes a micro-step's gradients)."""
    if from_backward:
        inputs = [torch.randn_like(param) for param in params]
        loss = torch.stack([(p * x).sum() for p, x in zip(params, inputs, strict=True)]).sum()
        return _no_preparation, lambda _: loss.backward(retain_graph=True)
    grads = WindowGradients([torch.randn_like(param) * 1e-3 for param in params])

    def hand_over(micro_step: int) -> None:
        for index, param in enumerate(params):
            param.grad = grads.take(micro_step, index)

    return grads.prepare, hand_over


def _params(tensors: int, device: str) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(ELEMENTS, device=device)) for _ in range(tensors)]


def _ours(tensors: int, optimizer: str, backend: str, option: str, device: str) -> _Provider:
    params = _params(tensors, device)
    options = OPTIONS[option]
    ours, _, hyperparameters = OPTIMIZERS[optimizer]
    prepare, produce_grads = _gradient_source(params, options.get("accumulate_in_backward", False))
    instance = ours(params, accumulation_steps=STEPS, backend=backend, **hyperparameters, **options)

    def step(_: int) -> None:
        instance.step()

    return _Provider(prepare, lambda: _timed_window(produce_grads, step, device))


def _torch(tensors: int, optimizer: str, option: str, device: str) -> _Provider:
    params = _params(tensors, device)
    _, baseline, hyperparameters = OPTIMIZERS[optimizer]
    from_backward = OPTIONS[option].get("accumulate_in_backward", False)
    prepare, produce_grads = _gradient_source(params, from_backward)
    instance = baseline(params, fused=True, **hyperparameters)

    def step(micro_step: int) -> None:
        if micro_step == STEPS - 1:
            instance.step()
            instance.zero_grad()

    return _Provider(prepare, lambda: _timed_window(produce_grads, step, device))


# ----------------------------------------------------------------- measurement


def _interleaved(providers: dict[str, _Provider], windows: int) -> dict[str, list[list[float]]]:
    """Each provider's stamps of ``windows`` timed windows, after ``WARMUP_WINDOWS``;
    the providers take turns window by window, in an order that alternates, so that
    neither always runs just after the other's garbage."""
    names = list(providers)
    stamps: dict[str, list[list[float]]] = {name: [] for name in names}
    for index in range(WARMUP_WINDOWS + windows):
        for name in names if index % 2 == 0 else reversed(names):
            providers[name].prepare()
            window = providers[name].run()
            if index >= WARMUP_WINDOWS:
                stamps[name].append(window)
    return stamps


def _segments(stamps: list[list[float]]) -> dict[str, dict]:
    """Summaries of the parts of the windows whose ``_timed_window`` stamps are given:
    ``window``; ``micro_step`` (the non-boundary ones, all windows' pooled) and
    ``boundary``, each gradients plus step call; their ``_call`` parts (step alone)
    and ``grads`` (making the gradients, non-boundary)."""
    last = STEPS - 1

    def micro(window: list[float], k: int) -> float:
        return window[2 * k + 2] - window[2 * k]

    def call(window: list[float], k: int) -> float:
        return window[2 * k + 2] - window[2 * k + 1]

    def grads(window: list[float], k: int) -> float:
        return window[2 * k + 1] - window[2 * k]

    return {
        "window": summarize([w[-1] - w[0] for w in stamps]),
        "micro_step": summarize([micro(w, k) for w in stamps for k in range(last)]),
        "micro_step_call": summarize([call(w, k) for w in stamps for k in range(last)]),
        "grads": summarize([grads(w, k) for w in stamps for k in range(last)]),
        "boundary": summarize([micro(w, last) for w in stamps]),
        "boundary_call": summarize([call(w, last) for w in stamps]),
    }


def _ms(seconds: float) -> float:
    return float(f"{seconds * 1e3:.4g}")


def _with_quantiles(prefix: str, timing: dict) -> dict[str, float]:
    return {
        f"{prefix}_ms": _ms(timing["median_s"]),
        f"{prefix}_p20_ms": _ms(timing["p20_s"]),
        f"{prefix}_p80_ms": _ms(timing["p80_s"]),
    }


def measure_case(
    tensors: int, optimizer: str, backend: str, option: str, settings: HostSettings
) -> dict:
    """One row: ours and torch's windows of one case, taking turns."""
    device = settings.device
    from_backward = OPTIONS[option].get("accumulate_in_backward", False)
    stamps = _interleaved(
        {
            "ours": _ours(tensors, optimizer, backend, option, device),
            "torch": _torch(tensors, optimizer, option, device),
        },
        settings.windows,
    )
    ours, theirs = _segments(stamps["ours"]), _segments(stamps["torch"])
    label = f"{tensors} tensors {optimizer} {backend} {option}"
    torch_window = theirs["window"]["median_s"]
    gc.collect()  # the case's tensors and graphs, before the next case is timed
    return {
        "tensors": tensors,
        "elements_per_tensor": ELEMENTS,
        "optimizer": optimizer,
        "backend": backend,
        "option": option,
        "micro_step": "loss.backward(); step()" if from_backward else "p.grad = g (all); step()",
        "baseline": f"torch {optimizer.split('(')[0]}(fused=True): per micro-step "
        + ("loss.backward()" if from_backward else "p.grad = g (all)")
        + "; step() + zero_grad() per window",
        "windows": settings.windows,
        **_with_quantiles("ours_window", ours["window"]),
        **_with_quantiles("torch_window", theirs["window"]),
        "ours_us_per_tensor": float(f"{ours['window']['median_s'] * 1e6 / tensors:.4g}"),
        "torch_us_per_tensor": float(f"{torch_window * 1e6 / tensors:.4g}"),
        "window_ratio": round(ours["window"]["median_s"] / torch_window, 3),
        **_with_quantiles("ours_micro_step", ours["micro_step"]),
        "micro_step_ratio": round(ours["micro_step"]["median_s"] / torch_window, 3),
        **_with_quantiles("ours_boundary", ours["boundary"]),
        "boundary_ratio": round(ours["boundary"]["median_s"] / torch_window, 3),
        "ours_micro_step_call_ms": _ms(ours["micro_step_call"]["median_s"]),
        "ours_boundary_call_ms": _ms(ours["boundary_call"]["median_s"]),
        "grads_ms": _ms(theirs["grads"]["median_s"]),
        "torch_step_ms": _ms(theirs["boundary_call"]["median_s"]),
        "spread_warning": " / ".join(
            warning
            for provider, timing in (("ours", ours), ("torch", theirs))
            if (warning := spread_warning(f"{label} {provider} window", timing["window"]))
        ),
    }


def rows(settings: HostSettings, progress: Progress | None = None) -> Iterator[dict]:
    """The rows of every case, with the environment; the targets are judged by
    ``judge_targets`` once all rows are in."""
    env = environment(settings.device)
    for case in settings.cases():
        row = {**env, "benchmark": "host", **measure_case(*case, settings)}
        if progress:
            progress.advance("host " + " ".join(str(part) for part in case))
        yield row


def judge_targets(rows: list[dict]) -> list[dict]:
    """``rows`` with the targets judged: ``target_window`` and ``target_micro_step`` at
    1000 tensors, ``target_scaling`` at 10000 (against the 1000-tensor row of the same
    case); "met" or "missed", empty where no target applies or its reference is
    missing."""
    by_case = {
        (row["optimizer"], row["backend"], row["option"]): row
        for row in rows
        if row["tensors"] == TARGET_TENSORS
    }
    judged = []
    for row in rows:
        row = {**row, "target_window": "", "target_micro_step": "", "target_scaling": ""}
        if row["tensors"] == TARGET_TENSORS:
            row["target_window"] = _verdict(row["window_ratio"] <= WINDOW_RATIO_TARGET)
            row["target_micro_step"] = _verdict(row["micro_step_ratio"] <= MICRO_STEP_RATIO_TARGET)
        reference = by_case.get((row["optimizer"], row["backend"], row["option"]))
        if row["tensors"] == SCALING_TENSORS and reference is not None:
            row["target_scaling"] = _verdict(
                all(
                    row[ratio] <= reference[ratio] * SCALING_TOLERANCE
                    for ratio in ("window_ratio", "micro_step_ratio")
                )
            )
        judged.append(row)
    return judged


def _verdict(met: bool) -> str:
    return "met" if met else "missed"


# ----------------------------------------------------------------- reporting


def _targets_cell(row: dict) -> str:
    parts = []
    if row["target_window"]:
        parts.append(f"window<={WINDOW_RATIO_TARGET:g} {row['target_window']}")
    if row["target_micro_step"]:
        parts.append(f"micro<={MICRO_STEP_RATIO_TARGET:g} {row['target_micro_step']}")
    if row["target_scaling"]:
        parts.append(f"no worse than at {TARGET_TENSORS} {row['target_scaling']}")
    return ", ".join(parts)


def _spread(row: dict, prefix: str) -> str:
    return (
        f"{row[f'{prefix}_ms']:.3g} ({row[f'{prefix}_p20_ms']:.3g}-{row[f'{prefix}_p80_ms']:.3g})"
    )


def format_table(rows: list[dict]) -> str:
    """A markdown table of judged rows (times in ms: median (p20-p80))."""
    header = [
        "tensors", "optimizer", "backend", "option", "ours window ms", "torch window ms",
        "ours us/tensor", "torch us/tensor", "window ratio", "micro-step ms",
        "micro-step / torch window", "boundary ms", "targets",
    ]  # fmt: skip
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        option = row["option"]
        if option == "accumulate_in_backward=True":
            option += " (backward + step, both)"
        cells = [
            row["tensors"], row["optimizer"], row["backend"], option,
            _spread(row, "ours_window"), _spread(row, "torch_window"),
            f"{row['ours_us_per_tensor']:.3g}", f"{row['torch_us_per_tensor']:.3g}",
            f"{row['window_ratio']:.2f}", _spread(row, "ours_micro_step"),
            f"{row['micro_step_ratio']:.3f}", _spread(row, "ours_boundary"), _targets_cell(row),
        ]  # fmt: skip
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines)


def spread_warnings(rows: list[dict]) -> list[str]:
    """The warning lines of the rows whose window times spread too widely to trust."""
    return [row["spread_warning"] for row in rows if row["spread_warning"]]
