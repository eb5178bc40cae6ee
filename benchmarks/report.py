"""Benchmark results: one Section per benchmark, rendered as a console table, Markdown and SVG.

::

    section = Section("handler", "Task handler", "what was measured", ["variant", "us"])
    section.rows.append(["floor", "150"])
    section.targets.append(Target("CPU vs floor", "1.31x", "≤ 1.25x", met=False, margin="+5%"))
    print(render_console([section]))
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Sequence
from typing import Any


@dataclasses.dataclass
class Target:
    """One budget: what was measured against what it should be, and by how much it missed."""

    name: str
    measured: str
    goal: str
    met: bool
    margin: str = ""


@dataclasses.dataclass
class Section:
    """The result of one benchmark."""

    key: str
    title: str
    what: str
    columns: list[str]
    rows: list[list[str]] = dataclasses.field(default_factory=list)
    targets: list[Target] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


def ratio_target(name: str, value: float, limit: float, *, at_least: bool = False) -> Target:
    """A ratio budget (``≤ limit`` or ``≥ limit``) with the miss in percent when missed."""
    met = value >= limit if at_least else value <= limit
    goal = f"{'≥' if at_least else '≤'} {limit:g}x"
    margin = "" if met else f"missed by {abs(value / limit - 1) * 100:.0f}%"
    return Target(name, f"{value:.2f}x", goal, met, margin)


def count_target(name: str, measured: int, expected: int) -> Target:
    """An exact count budget (RPCs)."""
    margin = "" if measured == expected else f"{measured - expected:+d}"
    return Target(name, str(measured), f"= {expected}", measured == expected, margin)


def _table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [len(c) for c in columns]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return lines


def render_console(sections: Sequence[Section]) -> str:
    """Plain-text tables, then every target with OK / MISS."""
    out: list[str] = []
    for section in sections:
        out += ["", f"== {section.title} ==", *_table(section.columns, section.rows)]
        out += (section.notes and [f"  note: {note}" for note in section.notes]) or []
    out += ["", "== Targets =="]
    rows = [
        [s.title, t.name, t.measured, t.goal, "OK" if t.met else "MISS", t.margin]
        for s in sections
        for t in s.targets
    ]
    out += _table(["benchmark", "target", "measured", "goal", "", "by"], rows)
    return "\n".join(out) + "\n"


def _md_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def cell(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(cell(c) for c in columns) + " |"]
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(
    sections: Sequence[Section],
    *,
    machine: dict[str, str],
    command: str,
    duration: float,
    plots: dict[str, str],
    preamble: str,
) -> str:
    """docs/performance.md: machine, command, targets summary, then one part per benchmark."""
    out = ["# Performance", "", preamble, ""]
    out += [
        "## Run",
        "",
        f"- command: `{command}` ({duration:.0f} s)",
        f"- machine: {machine['nproc']} CPUs, {machine['cpu']}, {machine['platform']}",
        f"- Python: {machine['python']}",
        "",
        "## Targets",
        "",
    ]
    rows = [
        [s.title, t.name, t.measured, t.goal, "met" if t.met else "**missed**", t.margin]
        for s in sections
        for t in s.targets
    ]
    out += _md_table(["benchmark", "target", "measured", "goal", "result", "by"], rows)
    for section in sections:
        out += ["", f"## {section.title}", "", section.what, ""]
        out += _md_table(section.columns, section.rows)
        if section.key in plots:
            out += ["", f"![{section.title}]({plots[section.key]})"]
        if section.notes:
            out += [""] + [f"- {note}" for note in section.notes]
    return "\n".join(out) + "\n"


_COLORS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#b07aa1")


def bar_chart_svg(title: str, unit: str, bars: Sequence[tuple[str, float]]) -> str:
    """A horizontal bar chart: one labelled bar per (label, value)."""
    width, left, bar_h, gap, top = 720, 260, 26, 10, 48
    height = top + len(bars) * (bar_h + gap) + 30
    biggest = max((value for _, value in bars), default=1.0) or 1.0
    scale = (width - left - 90) / biggest
    parts = [_svg_open(width, height), _svg_text(12, 26, title, size=16, weight="bold")]
    for index, (label, value) in enumerate(bars):
        y = top + index * (bar_h + gap)
        color = _COLORS[index % len(_COLORS)]
        parts.append(_svg_text(left - 8, y + 18, label, anchor="end"))
        parts.append(
            f'<rect x="{left}" y="{y}" width="{max(value * scale, 1):.1f}" height="{bar_h}" '
            f'fill="{color}"/>'
        )
        parts.append(_svg_text(left + value * scale + 6, y + 18, f"{value:,.1f} {unit}"))
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def line_chart_svg(
    title: str, x_label: str, y_label: str, series: dict[str, Sequence[tuple[float, float]]]
) -> str:
    """Lines over a log10 x axis (record counts) and a linear y axis starting at 0."""
    import math

    width, height, left, right, top, bottom = 720, 400, 70, 200, 48, 50
    xs = [x for points in series.values() for x, _ in points]
    ys = [y for points in series.values() for _, y in points]
    x_lo, x_hi = math.log10(min(xs)), math.log10(max(xs))
    y_hi = max(ys) * 1.1 or 1.0
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        span = (x_hi - x_lo) or 1.0
        return left + (math.log10(x) - x_lo) / span * plot_w

    def py(y: float) -> float:
        return top + plot_h - y / y_hi * plot_h

    parts = [_svg_open(width, height), _svg_text(12, 26, title, size=16, weight="bold")]
    parts.append(
        f'<path d="M{left},{top} V{top + plot_h} H{left + plot_w}" stroke="#333" fill="none"/>'
    )
    for x in sorted(set(xs)):
        parts.append(_svg_text(px(x), top + plot_h + 18, f"{x:,.0f}", anchor="middle"))
    for step in range(5):
        value = y_hi * step / 4
        parts.append(_svg_text(left - 6, py(value) + 4, f"{value:,.1f}", anchor="end"))
    parts.append(_svg_text(left + plot_w / 2, height - 8, x_label, anchor="middle"))
    parts.append(_svg_text(14, top - 8, y_label))
    for index, (name, points) in enumerate(series.items()):
        color = _COLORS[index % len(_COLORS)]
        path = " ".join(
            f"{'M' if i == 0 else 'L'}{px(x):.1f},{py(y):.1f}" for i, (x, y) in enumerate(points)
        )
        parts.append(f'<path d="{path}" stroke="{color}" stroke-width="2.5" fill="none"/>')
        for x, y in points:
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3.5" fill="{color}"/>')
        legend_y = top + 10 + index * 20
        parts.append(
            f'<rect x="{width - right + 16}" y="{legend_y - 9}" width="12" height="12" '
            f'fill="{color}"/>'
        )
        parts.append(_svg_text(width - right + 34, legend_y + 1, name))
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _svg_open(width: int, height: int) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="13">\n'
        f'<rect width="{width}" height="{height}" fill="white"/>'
    )


def _svg_text(
    x: float, y: float, text: str, *, anchor: str = "start", size: int = 13, weight: str = "normal"
) -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="{size}" '
        f'font-weight="{weight}">{html.escape(text)}</text>'
    )
