"""The benchmarks: every provider of an operation measured side by side in one run.

- ``sweep``: accumulate (fp32 and bf16 gradients), the AdamW step and the SGD momentum
  step from the buffer, over log-spaced sizes, one tensor; providers are our backends
  and PyTorch's kernels for the same work. Effective GB/s comes from the byte model
  and is also given as a fraction of a copy measured in the same run.
- ``window``: a whole window (``steps`` micro-steps and an AdamW update) on a real
  parameter-shape list, through the public optimizer API, for bf16 and fp32
  parameters; providers are our backends, PyTorch's classic loop (autograd's
  accumulation into ``.grad``, then AdamW for-loop, foreach and fused, then
  ``zero_grad()``) and the eager fp32 recipe (``buf.add_(grad.float(), alpha=s)``,
  AdamW(fused) on the mean, ``buf.zero_()``). Gradients are made once and fed every
  micro-step, so only the optimizer's work is timed.
"""

from __future__ import annotations

import gc
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .. import FusedAccumAdamW
from ..backends import BACKEND_NAMES, resolve_backend
from . import byte_model
from .gradients import WindowGradients
from .shapes import SHAPE_LISTS
from .timing import environment, measure, measure_cuda, spread_warning

LR = 1e-4
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


@dataclass
class Settings:
    device: str
    sizes: list[int]
    shape_lists: list[str]
    steps: int = 8
    repeats: int = 10
    window_repeats: int | None = None  # None: ``repeats``
    param_dtypes: list[torch.dtype] = field(default_factory=lambda: [torch.bfloat16, torch.float32])

    @classmethod
    def for_device(cls, device: str, quick: bool = False) -> Settings:
        """Quick: tiny sizes and the small shape list (seconds; for tests), with 30
        repeats of a window, as a sub-millisecond window's time swings with the
        machine's load (with 3, one row read 272x in one run and 0.36x in the next on
        a busy 2-core machine). Else the full run: sizes up to 64M elements on CUDA,
        16M on CPU; GPT-2-124M, and on CUDA also the 1B Llama-like list."""
        if quick:
            return cls(
                device, sizes=[2**10, 2**13], shape_lists=["tiny"], steps=3, repeats=3,
                window_repeats=30,
            )  # fmt: skip
        if device == "cuda":
            return cls(device, [2**k for k in range(12, 27, 2)], ["gpt2-124m", "llama-1b"])
        return cls(device, [2**k for k in range(12, 25, 2)], ["gpt2-124m"], repeats=5)


def _time(run: Callable[[], None], settings: Settings, graph: bool = False) -> dict:
    if settings.device == "cuda":
        return measure_cuda(run, settings.repeats, graph=graph)
    return measure(run, settings.repeats)


def _no_setup() -> None:
    pass


def count_launches(
    run: Callable[[], None], device: str, setup: Callable[[], None] = _no_setup
) -> int | None:
    """GPU kernels (and memsets/copies) one call of ``run`` launches, after ``setup``
    (not counted); None on CPU."""
    if device != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    setup()
    run()
    setup()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    return sum(1 for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA)


def peak_memory_mb(
    run: Callable[[], None], device: str, setup: Callable[[], None] = _no_setup
) -> float | None:
    """Peak GPU memory allocated during one call of ``run`` after ``setup`` (what that
    allocates counts), in MB; None on CPU."""
    if device != "cuda":
        return None
    setup()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def our_backends(device: str, dtype: torch.dtype) -> list[str]:
    """Our backends that serve ``dtype`` parameters on ``device``."""
    names = []
    for name in BACKEND_NAMES:
        if name == "auto":
            continue
        try:
            resolve_backend(name, torch.device(device), dtype)
        except ValueError:
            continue
        names.append(name)
    return names


def copy_gbps(elements: int, settings: Settings) -> float:
    """In-run copy bandwidth, fp32, counting read and write."""
    source = torch.randn(elements, device=settings.device)
    target = torch.empty_like(source)
    timing = _time(lambda: target.copy_(source), settings)
    return 8 * elements / timing["median_s"] / 1e9


class Progress:
    """A one-line progress bar on stderr."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done, self.enabled = total, 0, enabled

    def advance(self, what: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        filled = int(30 * self.done / self.total)
        bar = "#" * filled + "." * (30 - filled)
        sys.stderr.write(f"\r[{bar}] {self.done}/{self.total} {what[:60]:60}")
        if self.done == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


# ---------------------------------------------------------------------- the sweep


def _sweep_providers(op: str, elements: int, dtype: torch.dtype, device: str):
    """(provider, run, bytes per element) for one op on one tensor of ``elements``."""
    buffer = torch.randn(elements, device=device)
    if op == "accumulate":
        grad = torch.randn(elements, device=device).to(dtype)
        modelled = byte_model.accumulate_bytes(dtype)
        yield "torch add_(alpha)", lambda: buffer.add_(grad, alpha=0.5), modelled
        eager = byte_model.eager_accumulate_bytes(dtype)
        yield "torch eager", lambda: buffer.add_(grad.float() * 0.5), eager
        for name in our_backends(device, dtype):
            backend = resolve_backend(name, torch.device(device), dtype)
            run = lambda b=backend: b.accumulate([buffer], [grad], scale=0.5, overwrite=False)  # noqa: E731
            yield f"fused_accum[{name}]", run, modelled
        return
    optimizer = "adamw" if op == "adamw_step" else "sgd"
    modelled = byte_model.step_bytes(optimizer, dtype)
    param = torch.randn(elements, device=device).to(dtype)
    buffer.mul_(1e-3)
    torch_param = torch.nn.Parameter(param.clone())
    torch_param.grad = buffer.to(dtype)
    if optimizer == "adamw":
        torch_opt = torch.optim.AdamW([torch_param], lr=LR, fused=True)
    else:
        torch_opt = torch.optim.SGD([torch_param], lr=LR, momentum=0.9, fused=True)
    # torch keeps state in the parameter's dtype: for bf16 that is fewer bytes
    torch_bytes = modelled if dtype == torch.float32 else None
    yield "torch fused", torch_opt.step, torch_bytes
    from ..backends.spec import AdamHyperparams, SgdHyperparams, StepBatch

    adam = AdamHyperparams(
        lr=LR, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled_weight_decay=True,
        amsgrad=False, maximize=False,
    )  # fmt: skip
    sgd = SgdHyperparams(
        lr=LR, momentum=0.9, dampening=0.0, weight_decay=0.0, nesterov=False, maximize=False
    )
    for name in our_backends(device, dtype):
        backend = resolve_backend(name, torch.device(device), dtype)
        states = [torch.zeros(elements, device=device) for _ in range(2)]
        batch = StepBatch(
            params=[param], buffers=[buffer], grads=None, use_buffer=True, normaliser=0.125,
            grad_weight=0.0,
        )  # fmt: skip
        if optimizer == "adamw":
            run = lambda b=backend, s=states, q=batch: b.adam_step(  # noqa: E731
                q, [s[0]], [s[1]], None, adam, step=3
            )
        else:
            run = lambda b=backend, s=states, q=batch: b.sgd_step(  # noqa: E731
                q, [s[0]], sgd, init_momentum=False
            )
        yield f"fused_accum[{name}]", run, modelled


SWEEP_OPS = [
    ("accumulate", torch.float32),
    ("accumulate", torch.bfloat16),
    ("adamw_step", torch.float32),
    ("sgd_step", torch.float32),
]


def sweep(settings: Settings, progress: Progress | None = None) -> Iterator[dict]:
    """Rows of the kernel sweep."""
    env = environment(settings.device)
    for elements in settings.sizes:
        copy = copy_gbps(elements, settings)
        for op, dtype in SWEEP_OPS:
            for provider, run, moved in _sweep_providers(op, elements, dtype, settings.device):
                timing = _time(run, settings)
                row = {
                    **env, "benchmark": "sweep", "op": op, "dtype": DTYPE_NAMES[dtype],
                    "elements": elements, "provider": provider, **timing,
                    "bytes_per_element": moved, "copy_GBps": float(f"{copy:.4g}"),
                }  # fmt: skip
                if moved is not None:
                    gbps = moved * elements / timing["median_s"] / 1e9
                    row["GBps"] = float(f"{gbps:.4g}")
                    row["fraction_of_copy"] = float(f"{gbps / copy:.3g}")
                if settings.device == "cuda":
                    row["graph_median_s"] = _time(run, settings, graph=True)["median_s"]
                    row["launches"] = count_launches(run, settings.device)
                yield row
            if progress:
                progress.advance(f"sweep {op} {DTYPE_NAMES[dtype]} {elements}")
        gc.collect()


# --------------------------------------------------------------------- the window


def _make_params(shapes, dtype, device):
    """Parameters and the gradients handed over for them (see gradients.py)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device).to(dtype) * 0.02) for s in shapes]
    grads = WindowGradients([torch.randn_like(p) * 1e-3 for p in params])
    return params, grads


def _fused_window(shapes, dtype, settings, backend):
    params, grads = _make_params(shapes, dtype, settings.device)
    optimizer = FusedAccumAdamW(params, lr=LR, accumulation_steps=settings.steps, backend=backend)

    def window():
        for micro_step in range(settings.steps):
            for index, param in enumerate(params):
                param.grad = grads.take(micro_step, index)
            optimizer.step()

    return grads.prepare, window


def _classic_window(shapes, dtype, settings, implementation):
    """autograd's accumulation: the first gradient kept as .grad, then added into it;
    torch.optim.AdamW, then zero_grad()."""
    params, grads = _make_params(shapes, dtype, settings.device)
    flags = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True)}
    optimizer = torch.optim.AdamW(params, lr=LR, **flags.get(implementation, dict(fused=True)))

    def window():
        for micro_step in range(settings.steps):
            for index, param in enumerate(params):
                if micro_step == 0:
                    param.grad = grads.take(micro_step, index)
                else:
                    param.grad.add_(grads.take(micro_step, index))
        optimizer.step()
        optimizer.zero_grad()

    return grads.prepare, window


def _eager_window(shapes, dtype, settings):
    """The eager fp32 recipe: an fp32 buffer per parameter, buf.add_(g.float(), alpha=s)."""
    params, grads = _make_params(shapes, dtype, settings.device)
    buffers = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    optimizer = torch.optim.AdamW(params, lr=LR, fused=True)

    def window():
        for micro_step in range(settings.steps):
            for index, buffer in enumerate(buffers):
                buffer.add_(grads.take(micro_step, index).float(), alpha=1.0)
        for param, buffer in zip(params, buffers, strict=True):
            param.grad = (buffer / settings.steps).to(dtype)
        optimizer.step()
        for buffer in buffers:
            buffer.zero_()
        optimizer.zero_grad()

    return grads.prepare, window


def window_providers(dtype: torch.dtype, settings: Settings):
    """(provider, builder of a (setup, window) pair of closures), the baseline of each
    dtype first; setup() runs untimed before each window()."""
    baseline = "eager fp32 recipe" if dtype != torch.float32 else "classic fused"
    providers = {"eager fp32 recipe": lambda shapes: _eager_window(shapes, dtype, settings)}
    for implementation in ("fused", "foreach", "for-loop"):
        providers[f"classic {implementation}"] = lambda shapes, i=implementation: _classic_window(
            shapes, dtype, settings, i
        )
    for name in our_backends(settings.device, dtype):
        providers[f"fused_accum[{name}]"] = lambda shapes, n=name: _fused_window(
            shapes, dtype, settings, n
        )
    ordered = {baseline: providers.pop(baseline)}
    ordered.update(providers)
    return baseline, ordered


def windows(settings: Settings, progress: Progress | None = None) -> Iterator[dict]:
    """Rows of the window benchmark, with each provider's speedup over the baseline of
    its dtype (the eager recipe for bf16, the classic fused loop for fp32)."""
    env = environment(settings.device)
    for list_name in settings.shape_lists:
        shapes = SHAPE_LISTS[list_name]()
        elements = sum(math.prod(s) for s in shapes)
        for dtype in settings.param_dtypes:
            baseline, providers = window_providers(dtype, settings)
            reference_s = None
            for provider, build in providers.items():
                setup, window = build(shapes)
                # wall time: do_bench cannot run the untimed setup between calls
                repeats = settings.window_repeats or settings.repeats
                timing = measure(window, repeats, device=settings.device, setup=setup)
                reference_s = reference_s or timing["median_s"]
                moved = _fused_window_bytes(provider, dtype, settings)
                yield {
                    **env, "benchmark": "window", "op": f"{settings.steps} micro-steps + AdamW",
                    "shapes": list_name, "tensors": len(shapes), "elements": elements,
                    "dtype": DTYPE_NAMES[dtype], "provider": provider, **timing,
                    "baseline": baseline,
                    "speedup_vs_baseline": round(reference_s / timing["median_s"], 3),
                    "bytes_per_element": moved,
                    "launches": count_launches(window, settings.device, setup),
                    "peak_memory_MB": peak_memory_mb(window, settings.device, setup),
                }  # fmt: skip
                del setup, window
                gc.collect()
                if progress:
                    progress.advance(f"window {list_name} {DTYPE_NAMES[dtype]} {provider}")


def _fused_window_bytes(provider: str, dtype: torch.dtype, settings: Settings) -> int | None:
    """The byte model of a fused_accum provider's window (None for PyTorch's): every
    backend adopts the first fp32 gradients the benchmark hands over."""
    if not provider.startswith("fused_accum["):
        return None
    return byte_model.window_bytes("adamw", dtype, settings.steps, adopt_first=True)


def window_lines(row: dict) -> list[str]:
    """The printed line of a window row, its median with p20-p80, and a warning line
    after it when its spread is too wide to trust (see ``timing.spread_warning``)."""
    ms = {key: row[f"{key}_s"] * 1e3 for key in ("median", "p20", "p80")}
    lines = [
        f"{row['shapes']:10} {row['dtype']} {row['provider']:24} {ms['median']:9.2f} ms "
        f"(p20-p80 {ms['p20']:.2f}-{ms['p80']:.2f})  {row['speedup_vs_baseline']:6.2f}x "
        f"vs {row['baseline']}"
    ]
    warning = spread_warning(f"{row['shapes']} {row['dtype']} {row['provider']}", row)
    if warning is not None:
        lines.append(warning)
    return lines


def count_window_jobs(settings: Settings) -> int:
    return sum(
        len(window_providers(dtype, settings)[1])
        for _ in settings.shape_lists
        for dtype in settings.param_dtypes
    )
