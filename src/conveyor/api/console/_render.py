"""Rendering: the Jinja2 environment (autoescaping everything), filters, SVG charts drawn on
the server, JSON shown as text and the diff of two workflow versions.

Nothing a tenant controls ever reaches the page unescaped: templates autoescape, JSON is
serialised to text and escaped like any other string, and charts contain only numbers and
labels made here.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup, escape

__all__ = ["Series", "diff_lines", "environment", "line_chart", "pretty_json"]


def pretty_json(value: Any) -> str:
    """Readable JSON text (indented, non-ASCII kept); escaped by the template like any text."""
    if value is None:
        return "null"
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=False, default=str)


def when(value: datetime | str | None) -> str:
    """``2026-12-06 07:10:03.123Z`` (UTC, milliseconds), or an em dash."""
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + "Z"


def ms(value: float | int | None) -> str:
    """A duration in ms, shortened (``850 ms``, ``2.4 s``, ``3.1 min``)."""
    if value is None:
        return "—"
    v = float(value)
    if v < 1000:
        return f"{v:.0f} ms" if v >= 10 else f"{v:.1f} ms"
    if v < 60_000:
        return f"{v / 1000:.1f} s"
    if v < 3_600_000:
        return f"{v / 60_000:.1f} min"
    return f"{v / 3_600_000:.1f} h"


def size(value: int | None) -> str:
    """Bytes as ``812 B``, ``4.2 MB`` (powers of 1024); ``—`` when unknown."""
    if value is None:
        return "—"
    amount = float(value)
    for unit in ("B", "KB", "MB", "GB"):
        if abs(amount) < 1024:
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} TB"


def diff_lines(old: Any, new: Any, old_label: str, new_label: str) -> list[tuple[str, str]]:
    """A unified diff of two JSON documents: ``(kind, line)`` with kind ``add``, ``del``,
    ``hunk`` or ``same``."""
    lines = difflib.unified_diff(
        pretty_json(old).splitlines(),
        pretty_json(new).splitlines(),
        fromfile=old_label,
        tofile=new_label,
        lineterm="",
        n=3,
    )
    out: list[tuple[str, str]] = []
    for line in lines:
        if line.startswith(("---", "+++")):
            kind = "file"
        elif line.startswith("@@"):
            kind = "hunk"
        elif line.startswith("+"):
            kind = "add"
        elif line.startswith("-"):
            kind = "del"
        else:
            kind = "same"
        out.append((kind, line))
    return out


Series = tuple[str, str, Sequence[float | None]]
"""A chart series: (label, CSS class, values)."""


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    step = 1.0
    while step * 10 <= value:
        step *= 10
    for m in (1, 2, 5, 10):
        if value <= m * step:
            return m * step
    return 10 * step


def _path(values: Sequence[float | None], x: Any, y: Any) -> str:
    """Line segments through consecutive values; a value alone between gaps is a short tick
    (so a single minute with data stays visible)."""
    parts: list[str] = []
    for i, v in enumerate(values):
        if v is None:
            continue
        before = i > 0 and values[i - 1] is not None
        after = i + 1 < len(values) and values[i + 1] is not None
        if before:
            parts.append(f"L{x(i):.1f},{y(v):.1f}")
        elif after:
            parts.append(f"M{x(i):.1f},{y(v):.1f}")
        else:
            parts.append(f"M{x(i) - 2:.1f},{y(v):.1f} L{x(i) + 2:.1f},{y(v):.1f}")
    return " ".join(parts)


def line_chart(
    title: str,
    series: Sequence[Series],
    labels: Sequence[str],
    *,
    unit: str = "",
    width: int = 640,
    height: int = 180,
) -> Markup:
    """An SVG line chart: a titled, labelled figure with one path per series, the y axis from
    0 to a round maximum, and the first, middle and last x labels. Colours come from the
    stylesheet (classes), so it follows the light or dark theme."""
    left, right, top, bottom = 44, 8, 10, 22
    plot_w, plot_h = width - left - right, height - top - bottom
    peak = max((v for _, _, values in series for v in values if v is not None), default=0.0)
    top_value = _nice_max(float(peak))
    n = max(1, max((len(values) for _, _, values in series), default=1) - 1)

    def x(i: int) -> float:
        return left + plot_w * i / n

    def y(v: float) -> float:
        return top + plot_h * (1 - float(v) / top_value)

    label = f"{title}: " + "; ".join(
        f"{name} latest {_fmt(_last(values))}{unit}" for name, _, values in series
    )
    out = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(label)}" preserveAspectRatio="none">',
        f"<title>{escape(label)}</title>",
    ]
    for frac in (0.0, 0.5, 1.0):
        gy = top + plot_h * (1 - frac)
        out.append(
            f'<line class="grid" x1="{left}" x2="{width - right}" y1="{gy:.1f}" y2="{gy:.1f}"/>'
        )
        out.append(
            f'<text class="axis" x="{left - 4}" y="{gy + 4:.1f}" text-anchor="end">'
            f"{escape(_fmt(top_value * frac))}</text>"
        )
    picks = sorted({0, len(labels) // 2, len(labels) - 1}) if labels else []
    for i in picks:
        anchor = "start" if i == 0 else ("end" if i == len(labels) - 1 else "middle")
        out.append(
            f'<text class="axis" x="{x(i):.1f}" y="{height - 6}" text-anchor="{anchor}">'
            f"{escape(labels[i])}</text>"
        )
    for name, css, values in series:
        d = _path(values, x, y)
        if d:
            out.append(
                f'<path class="line {escape(css)}" d="{d}"><title>{escape(name)}</title></path>'
            )
    out.append("</svg>")
    legend = "".join(
        f'<li><span class="swatch {escape(css)}"></span>{escape(name)}</li>'
        for name, css, _ in series
    )
    return Markup(
        f'<figure class="chart-box"><figcaption>{escape(title)}</figcaption>{"".join(out)}'
        f'<ul class="legend">{legend}</ul></figure>'
    )


def _last(values: Sequence[float | None]) -> float | None:
    return next((v for v in reversed(values) if v is not None), None)


def _fmt(value: float | None) -> str:
    if value is None:
        return "—"
    if value >= 100 or float(value).is_integer():
        return f"{value:.0f}"
    return f"{value:.1f}"


def environment() -> Environment:
    env = Environment(
        loader=PackageLoader("conveyor.api.console", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["json"] = pretty_json
    env.filters["when"] = when
    env.filters["ms"] = ms
    env.filters["size"] = size
    return env
