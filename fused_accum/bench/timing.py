"""Timing: median and 20/80% quantiles of repeated runs (on CUDA with Triton's
do_bench, which flushes the L2 cache between runs, and with a CUDA-graph replay), and
the environment that each result row carries."""

from __future__ import annotations

import datetime
import platform
import statistics
import time
from collections.abc import Callable

import torch


def measure(
    run: Callable[[], None],
    repeats: int,
    warmup: int = 1,
    device: str = "cpu",
    setup: Callable[[], None] | None = None,
) -> dict:
    """Seconds per call of ``run``: median, 20% and 80% quantiles over ``repeats``.
    ``setup``, if given, runs before every call, untimed."""
    for _ in range(warmup):
        if setup is not None:
            setup()
        run()
    seconds = [_seconds(run, device, setup) for _ in range(repeats)]
    return summarize(seconds)


def measure_interleaved(
    runs: dict[str, tuple[Callable[[], None] | None, Callable[[], None]]],
    repeats: int,
    warmup: int = 1,
) -> dict[str, dict]:
    """``measure`` for several (setup, run) pairs by name, taking turns call by call,
    so that a drift of the machine's speed during the measurement hits each alike."""
    for _ in range(warmup):
        for setup, run in runs.values():
            _seconds(run, "cpu", setup)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, (setup, run) in runs.items():
            seconds[name].append(_seconds(run, "cpu", setup))
    return {name: summarize(values) for name, values in seconds.items()}


def _seconds(run: Callable[[], None], device: str, setup: Callable[[], None] | None) -> float:
    if setup is not None:
        setup()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def summarize(seconds: list[float]) -> dict:
    """Median, 20% and 80% quantiles (seconds) and the count of ``seconds``."""
    quantiles = (
        statistics.quantiles(seconds, n=10, method="inclusive")
        if len(seconds) > 1
        else [seconds[0]] * 9
    )
    return {
        "median_s": statistics.median(seconds),
        "p20_s": quantiles[1],
        "p80_s": quantiles[7],
        "repeats": len(seconds),
    }


# A row whose 80% quantile exceeds its 20% quantile by more than this is flagged: the
# repeats of one measurement usually stay within 10-20% of each other, even on a busy
# 2-core machine, so a wider spread means that something else took part in some
# repeats, and the median may be far off: the machine's load changed (a CPU fused
# AdamW step swung from 20 ms to 0.07 ms so), or Python's garbage collector ran (a
# full collection with 10000 parameters alive takes a window's time).
WIDE_SPREAD = 1.5


def spread_warning(what: str, timing: dict, limit: float = WIDE_SPREAD) -> str | None:
    """A warning line naming ``what`` when ``timing`` (from ``summarize``) is too
    spread to trust, p80 / p20 > ``limit``; else None."""
    if timing["p80_s"] <= limit * timing["p20_s"]:
        return None
    return (
        f"warning: {what}: p80/p20 = {timing['p80_s'] / timing['p20_s']:.2f} > {limit:g}, "
        f"too spread to trust (the machine's load changed, or a garbage collection ran, "
        f"in some repeats); rerun with more repeats, on a quiet machine"
    )


def measure_cuda(run: Callable[[], None], repeats: int, graph: bool = False) -> dict:
    """Seconds per call of ``run`` on CUDA, by triton.testing.do_bench (the L2 cache
    flushed before each call) or, with ``graph``, by replaying a CUDA graph of it
    (launch overhead gone). ``repeats`` sets the time budget: about 4 ms per repeat."""
    from triton.testing import do_bench, do_bench_cudagraph

    budget_ms = max(25, 4 * repeats)
    if graph:
        quantiles = do_bench_cudagraph(run, rep=budget_ms, quantiles=[0.5, 0.2, 0.8])
    else:
        quantiles = do_bench(run, warmup=10, rep=budget_ms, quantiles=[0.5, 0.2, 0.8])
    median, p20, p80 = (q / 1e3 for q in quantiles)
    return {"median_s": median, "p20_s": p20, "p80_s": p80, "repeats": repeats}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str = "cpu") -> dict:
    """Device name, date and versions, for every result row."""
    import fused_accum

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    name = torch.cuda.get_device_name() if device == "cuda" else _cpu_name()
    return {
        "device": f"{name} ({torch.get_num_threads()} threads)" if device == "cpu" else name,
        "date": datetime.date.today().isoformat(),
        "torch": str(torch.__version__),
        "triton": triton_version,
        "fused_accum": fused_accum.__version__,
    }
