"""Pictures of gradient flow from the statistics the optimizers keep with
``track_grad_stats=True``: mean and max |g| per layer (to spot vanishing or exploding
gradients) and the global gradient norm over updates. Needs matplotlib (an optional
dependency: ``pip install matplotlib``); figures are drawn headless and saved as PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _figure(width: float, height: float):
    """A matplotlib Figure drawn off screen (Agg), leaving the user's pyplot backend
    and its figures alone."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as error:
        raise RuntimeError("plotting needs matplotlib: pip install matplotlib") from error
    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def plot_grad_flow(source: Any, path: str | Path, *, log_scale: bool = True, title: str = ""):
    """Bars of max |g| and mean |g| per layer, layers in model order, for the last
    applied window; ``source`` is an optimizer made with ``track_grad_stats=True`` or
    the list its ``grad_stats()`` returns. Saves a PNG at ``path`` and returns the
    matplotlib Figure."""
    stats = source.grad_stats() if hasattr(source, "grad_stats") else list(source)
    if not stats:
        raise ValueError("no gradient statistics yet: plot after the first applied update")
    names = [row["name"] for row in stats]
    positions = range(len(stats))
    figure, axis = _figure(max(6.0, 0.35 * len(stats) + 2), 4.8)
    axis.bar(positions, [row["max_abs"] for row in stats], alpha=0.35, color="tab:cyan",
             label="max |g|")  # fmt: skip
    axis.bar(positions, [row["mean_abs"] for row in stats], alpha=0.9, color="tab:blue",
             label="mean |g|")  # fmt: skip
    axis.set_xticks(list(positions))
    axis.set_xticklabels(names, rotation=90, fontsize=7)
    if log_scale:
        axis.set_yscale("log")
    axis.set_xlim(-0.75, len(stats) - 0.25)
    axis.set_ylabel("gradient magnitude")
    axis.set_title(title or "Gradient flow: the last window's applied gradient per layer")
    axis.grid(axis="y", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return figure


def plot_grad_norm_history(source: Any, path: str | Path, *, log_scale: bool = True):
    """The global L2 norm of the applied gradient of every update so far; ``source`` is
    an optimizer made with ``track_grad_stats=True`` or a sequence of norms. Saves a PNG
    at ``path`` and returns the matplotlib Figure."""
    history = source.grad_norm_history() if hasattr(source, "grad_norm_history") else source
    values = [
        float(value) for value in (history.tolist() if hasattr(history, "tolist") else history)
    ]
    if not values:
        raise ValueError("no gradient norms yet: plot after the first applied update")
    figure, axis = _figure(7, 4)
    axis.plot(range(1, len(values) + 1), values, color="tab:red")
    if log_scale:
        axis.set_yscale("log")
    axis.set_xlabel("update")
    axis.set_ylabel("global gradient norm")
    axis.set_title("Gradient norm per applied window")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return figure
