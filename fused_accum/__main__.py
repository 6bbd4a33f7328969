"""Command line of fused_accum.

python -m fused_accum demo     train a small model with accumulation
python -m fused_accum bench    kernel and window benchmarks, CSV and PNG (--only host:
                               the optimizers' host overhead)
python -m fused_accum info     which backends run here, and why others do not
"""

from __future__ import annotations

import argparse
import csv
import sys
import warnings
from pathlib import Path


def _demo(args: argparse.Namespace) -> int:
    import torch

    from .demo import format_demo, run_demo

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    plots = None if args.no_plots else args.plots
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if plots is not None:
            print("no plots: matplotlib is not installed (pip install matplotlib)")
        plots = None
    results = run_demo(
        args.windows, args.accumulation_steps, seed=args.seed, device=device, plots=plots,
        threads=args.threads or None,
    )  # fmt: skip
    print(format_demo(results, args.windows, args.accumulation_steps, device))
    if plots is not None:
        print(f"gradient flow of the fused_accum run: {plots / 'grad_flow.png'}, "
              f"{plots / 'grad_norms.png'}")  # fmt: skip
    return 0


def _write_csv(rows: list[dict], path: Path) -> Path:
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return path


def _bench(args: argparse.Namespace) -> int:
    import torch

    from .bench import host, suite

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    settings = suite.Settings.for_device(device, quick=args.quick)
    host_settings = host.HostSettings.for_device(device, quick=args.quick)
    if args.shapes:
        settings.shape_lists = args.shapes
    if args.repeats:
        settings.repeats = settings.window_repeats = host_settings.windows = args.repeats
    args.out.mkdir(parents=True, exist_ok=True)
    # host runs only when asked for: its 60 cases took 3.6 minutes on a 2-core CPU,
    # and the host overhead on tiny tensors is a question apart from the bandwidth
    # that the sweep and the windows measure
    parts = ["sweep", "window"] if args.only is None else [args.only]
    jobs = (
        (len(settings.sizes) * len(suite.SWEEP_OPS) if "sweep" in parts else 0)
        + (suite.count_window_jobs(settings) if "window" in parts else 0)
        + (len(host_settings.cases()) if "host" in parts else 0)
    )
    progress = suite.Progress(jobs, enabled=not args.no_progress)
    written = []
    for part in parts:
        if part == "host":
            if device == "cpu":
                print(host.TRITON_ON_CPU)
            rows = host.judge_targets(list(host.rows(host_settings, progress)))
            written.append(_write_csv(rows, args.out / "host.csv"))
            print(host.format_table(rows))
            for warning in host.spread_warnings(rows):
                print(warning)
            continue
        runner = suite.sweep if part == "sweep" else suite.windows
        rows = list(runner(settings, progress))
        written.append(_write_csv(rows, args.out / f"{part}.csv"))
        if not args.no_plots:
            from .bench import plots

            plot = plots.plot_sweep if part == "sweep" else plots.plot_windows
            try:
                written.append(plot(rows, args.out / f"{part}.png"))
            except RuntimeError as error:  # no matplotlib: the CSV is still there
                print(f"no {part}.png: {error}", file=sys.stderr)
        if part == "window":
            for row in rows:
                print("\n".join(suite.window_lines(row)))
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


def _info(args: argparse.Namespace) -> int:
    import torch

    from . import __version__
    from .backends import BACKEND_NAMES, resolve_backend

    print(f"fused_accum {__version__}, torch {torch.__version__}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
        print(f"\n{device} ({name}):")
        for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            with warnings.catch_warnings():  # the fallback notice: the line says it
                warnings.simplefilter("ignore")
                chosen = resolve_backend("auto", torch.device(device), dtype).name
            print(f"  {str(dtype).removeprefix('torch.'):9} auto -> {chosen}")
        for backend in BACKEND_NAMES:
            if backend == "auto":
                continue
            try:
                resolve_backend(backend, torch.device(device), torch.float32)
                print(f"  {backend:7} available")
            except ValueError as error:
                print(f"  {backend:7} unavailable: {error}")
    if not torch.cuda.is_available():
        print("\ncuda: no CUDA device (torch.cuda.is_available() is False)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fused_accum",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo", help="train a small model with accumulation and compare to the large batch"
    )
    demo.add_argument("--windows", type=int, default=300, help="updates to train (300)")
    demo.add_argument("--accumulation-steps", type=int, default=4, help="micro-batches per update")
    demo.add_argument(
        "--threads", type=int, default=1,
        help="CPU threads (1: the demo's small tensors gain nothing from more; 0: torch's)",
    )  # fmt: skip
    demo.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--plots", type=Path, default=Path("demo_results"),
                      help="folder for the gradient-flow plots (demo_results)")  # fmt: skip
    demo.add_argument("--no-plots", action="store_true", help="draw nothing")
    demo.set_defaults(run=_demo)

    bench = commands.add_parser(
        "bench", help="kernel and window benchmarks against PyTorch, written as CSV and PNG"
    )
    bench.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    bench.add_argument("--out", type=Path, default=Path("bench_results"), help="output folder")
    bench.add_argument("--only", choices=["sweep", "window", "host"],
                       help="run one part only; host (the optimizers' host overhead on "
                       "many tiny tensors) runs only when asked for")  # fmt: skip
    bench.add_argument("--shapes", nargs="+", choices=["tiny", "gpt2-124m", "llama-1b"],
                       help="shape lists of the window benchmark")  # fmt: skip
    bench.add_argument("--repeats", type=int,
                       help="timed runs per measurement (windows per case for host)")  # fmt: skip
    bench.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    bench.add_argument("--no-plots", action="store_true", help="CSV only")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")
    bench.set_defaults(run=_bench)

    info = commands.add_parser("info", help="which backends run here, and why others do not")
    info.set_defaults(run=_info)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
