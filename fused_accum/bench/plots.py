"""PNG figures of benchmark rows (matplotlib, headless; an optional dependency:
``pip install matplotlib``)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise RuntimeError(
            "plots need matplotlib: pip install matplotlib (or pass --no-plots)"
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colors(rows: list[dict]) -> dict[str, str]:
    """One colour per provider, the same in every panel."""
    providers = sorted({row["provider"] for row in rows})
    return {name: f"C{index % 10}" for index, name in enumerate(providers)}


def _title(rows: list[dict]) -> str:
    first = rows[0]
    return f"{first['device']} | torch {first['torch']} | fused_accum {first['fused_accum']}"


def plot_sweep(rows: list[dict], path: Path) -> Path:
    """Effective GB/s against size, one panel per (op, dtype), one line per provider,
    the in-run copy dashed."""
    plt = _pyplot()
    panels: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        panels[(row["op"], row["dtype"])].append(row)
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2), squeeze=False)
    colors = _colors(rows)
    for axis, ((op, dtype), panel) in zip(axes[0], panels.items(), strict=True):
        by_provider: dict[str, list[dict]] = defaultdict(list)
        for row in panel:
            if row.get("GBps") is not None:
                by_provider[row["provider"]].append(row)
        for provider, series in by_provider.items():
            series.sort(key=lambda r: r["elements"])
            style = "-o" if provider.startswith("fused_accum") else "--s"
            axis.plot([r["elements"] for r in series], [r["GBps"] for r in series], style,
                      label=provider, markersize=4, color=colors[provider])  # fmt: skip
        copies = sorted({(r["elements"], r["copy_GBps"]) for r in panel})
        axis.plot(*zip(*copies, strict=True), ":", color="gray", label="copy")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("elements")
        axis.set_ylabel("effective GB/s (byte model)")
        axis.set_title(f"{op}, {dtype}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(_title(rows), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_windows(rows: list[dict], path: Path) -> Path:
    """Median seconds per window, one panel per (shape list, dtype), with each
    provider's speedup over the baseline."""
    plt = _pyplot()
    panels: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        panels[(row["shapes"], row["dtype"])].append(row)
    figure, axes = plt.subplots(
        1, len(panels), figsize=(6.5 * len(panels), 0.5 + 0.45 * max(map(len, panels.values()))),
        squeeze=False,
    )  # fmt: skip
    for axis, ((shapes, dtype), panel) in zip(axes[0], panels.items(), strict=True):
        names = [row["provider"] for row in panel]
        seconds = [row["median_s"] for row in panel]
        colors = ["tab:orange" if n.startswith("fused_accum") else "tab:blue" for n in names]
        bars = axis.barh(names, seconds, color=colors)
        for bar, row in zip(bars, panel, strict=True):
            axis.text(bar.get_width(), bar.get_y() + bar.get_height() / 2,
                      f" {row['speedup_vs_baseline']:.2f}x", va="center", fontsize=8)  # fmt: skip
        axis.invert_yaxis()
        axis.set_xlabel(f"seconds per window (median); x = speedup vs {panel[0]['baseline']}")
        axis.set_title(f"{panel[0]['op']}, {shapes}, {dtype} parameters", fontsize=10)
        axis.set_xlim(0, max(seconds) * 1.25)
    figure.suptitle(_title(rows), fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
