"""``python -m benchmarks [--quick] [--only NAME ...] [--output FILE] [--plots-dir DIR]``.

Runs every benchmark (handler, defer, compression, spill, memory, throughput, fanout,
dashboard, metrics, iterate), prints a table, and writes the Markdown report (default
docs/performance.md) and SVG plots (default docs/). ``--legacy install|existing|skip``
controls the appengine-python-standard venv (default: install for a full run, existing for
--quick).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

from . import _setup

NAMES = (
    "handler",
    "defer",
    "compression",
    "spill",
    "memory",
    "throughput",
    "fanout",
    "dashboard",
    "metrics",
    "iterate",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short smoke version (< 60 s)")
    parser.add_argument("--only", nargs="+", choices=NAMES, help="run only these")
    parser.add_argument("--output", default=str(_setup.ROOT / "docs" / "performance.md"))
    parser.add_argument("--plots-dir", default=None, help="default: the output's folder")
    parser.add_argument("--legacy", choices=("install", "existing", "skip"), default=None)
    args = parser.parse_args(argv)
    _setup.prepare()
    from . import (
        dashboard,
        fanout,
        handler,
        iteration,
        memory,
        metrics,
        report,
        serialization,
        spill,
        throughput,
        timing,
    )

    legacy_mode = args.legacy or ("existing" if args.quick else "install")
    runners = {
        "handler": lambda: handler.run(quick=args.quick, legacy_mode=legacy_mode),
        "defer": lambda: serialization.run_defer_cost(quick=args.quick),
        "compression": lambda: serialization.run_compression(quick=args.quick),
        "spill": lambda: spill.run(quick=args.quick),
        "memory": lambda: memory.run(quick=args.quick),
        "throughput": lambda: throughput.run(quick=args.quick),
        "fanout": lambda: fanout.run(quick=args.quick),
        "dashboard": lambda: dashboard.run(quick=args.quick),
        "metrics": lambda: metrics.run(quick=args.quick),
        "iterate": lambda: iteration.run(quick=args.quick),
    }
    started = time.perf_counter()
    sections = []
    for name in args.only or NAMES:
        print(f"running {name}...", file=sys.stderr, flush=True)
        sections.append(runners[name]())
    duration = time.perf_counter() - started

    output = pathlib.Path(args.output).resolve()
    plots_dir = pathlib.Path(args.plots_dir).resolve() if args.plots_dir else output.parent
    output.parent.mkdir(parents=True, exist_ok=True)
    plots_dir.mkdir(parents=True, exist_ok=True)
    plots = _write_plots(sections, plots_dir, output.parent, report)
    command = "python -m benchmarks" + (" --quick" if args.quick else "")
    text = report.render_markdown(
        sections,
        machine=timing.machine(),
        command=command,
        duration=duration,
        plots=plots,
        preamble=(
            "Written by `make bench` (`python -m benchmarks`). Budgets are in docs/design.md "
            '("Budgets"). Absolute times drift on shared machines; the ratios come from '
            "interleaved variants in the same run (A/B/A/B), medians after warm-up."
            + (" **Quick smoke run: numbers are indicative only.**" if args.quick else "")
        ),
    )
    output.write_text(text, encoding="utf-8")
    output.with_suffix(".json").write_text(
        json.dumps({s.key: s.data for s in sections}, indent=1, default=str), encoding="utf-8"
    )
    print(report.render_console(sections))
    print(f"wrote {output} ({duration:.0f} s)")
    return 0


def _write_plots(sections, plots_dir: pathlib.Path, doc_dir: pathlib.Path, report) -> dict:
    plots = {}
    for section in sections:
        path = None
        if section.key == "handler":
            bars = [(row[0], float(row[1].lstrip("≈"))) for row in section.rows]
            svg = report.bar_chart_svg("Handler CPU per task (lower is better)", "us", bars)
            path = plots_dir / "performance-handler.svg"
        elif section.key == "dashboard":
            svg = report.line_chart_svg(
                "Dashboard list pages: time per page", "records", "ms", section.data["plot"]
            )
            path = plots_dir / "performance-dashboard.svg"
        if path is not None:
            path.write_text(svg, encoding="utf-8")
            plots[section.key] = os.path.relpath(path, doc_dir)
    return plots


if __name__ == "__main__":
    sys.exit(main())
