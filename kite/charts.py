"""Time-series charts as server-rendered SVG: no JavaScript, no build step. Pure: no Django.

One chart is lines (and optionally bars) over evenly spaced time buckets, on one y axis from 0
to a round maximum. Accessible by construction: `role="img"`, `aria-labelledby` naming its
`<title>` and `<desc>` (the caller's figures in a sentence), and the page shows a table of the
same figures next to it (`summary`, the view's text alternative). Colours come from the page's
stylesheet (`.chart .series-<n>`), so the chart follows the screens' palette; every text is
escaped here, the caller passes plain strings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

WIDTH, HEIGHT = 720, 220
LEFT, RIGHT, TOP, BOTTOM = 72, 12, 30, 26  # room for the y labels, the legend and the x labels
X_LABELS = 6


@dataclass(frozen=True)
class Series:
    """`values[i]` belongs to the chart's `labels[i]`; None is a gap (no data in that bucket)."""

    name: str
    values: list[float | None]
    kind: str = "line"  # line | bars
    tone: str = ""  # "bad": drawn in the screens' colour for failures, whatever its place

    def css(self, index: int) -> str:
        return f"series series-{index}" + (f" tone-{self.tone}" if self.tone else "")


def nice_max(value: float) -> float:
    """The smallest 1, 2 or 5 × 10ⁿ at or above `value` (1 for nothing to show)."""
    if value <= 0 or math.isnan(value):
        return 1
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * power * (1 + 1e-9):
            return step * power
    return 10 * power  # unreachable: 10 × power ≥ value by construction


def number(value: float | None, unit: str = "") -> str:
    """A figure as the charts and their tables print it: integers plainly, with thousands separators."""
    if value is None:
        return "—"
    text = f"{value:,.0f}" if float(value).is_integer() or abs(value) >= 100 else f"{value:,.1f}"
    return f"{text} {unit}".rstrip()


def time_chart(*, chart_id: str, title: str, desc: str, labels: list[str], series: list[Series],
               unit: str = "") -> str:  # fmt: skip
    """An `<svg>` element: `labels` name the buckets (oldest first), every series has one value per label."""
    if any(len(item.values) != len(labels) for item in series):
        raise ValueError("every series needs one value per label")
    top = nice_max(max((v for item in series for v in item.values if v is not None), default=0))
    plot = _Plot(len(labels), top)
    title_id, desc_id = f"{chart_id}-title", f"{chart_id}-desc"
    parts = [
        f'<svg class="chart" id="{escape(chart_id)}" role="img" aria-labelledby="{escape(title_id)} {escape(desc_id)}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" preserveAspectRatio="xMidYMid meet" xmlns="http://www.w3.org/2000/svg">',
        f'<title id="{escape(title_id)}">{escape(title)}</title>',
        f'<desc id="{escape(desc_id)}">{escape(desc)}</desc>',
        *plot.grid(unit),
        *plot.x_labels(labels),
    ]
    for index, item in enumerate(series):
        parts.extend(plot.bars(item, index) if item.kind == "bars" else plot.line(item, index))
    parts.extend(_legend(series))
    parts.append("</svg>")
    return "".join(parts)


class _Plot:
    def __init__(self, count: int, top: float):
        self.count, self.top = max(count, 1), top
        self.inner_w, self.inner_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(self, index: float) -> float:
        """The centre of bucket `index`."""
        return LEFT + (index + 0.5) * self.inner_w / self.count

    def y(self, value: float) -> float:
        return TOP + self.inner_h * (1 - min(value, self.top) / self.top)

    def grid(self, unit: str) -> list[str]:
        parts = ['<g class="grid" aria-hidden="true">']
        for fraction in (0, 0.5, 1):
            value, y = self.top * fraction, self.y(self.top * fraction)
            parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
            parts.append(f'<text class="axis" x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
                         f"{escape(number(value, unit if fraction == 1 else ''))}</text>")  # fmt: skip
        parts.append("</g>")
        return parts

    def x_labels(self, labels: list[str]) -> list[str]:
        if not labels:
            return []
        step = max(1, math.ceil(len(labels) / X_LABELS))
        shown = sorted({*range(0, len(labels), step), len(labels) - 1})
        if len(shown) > 1 and shown[-1] - shown[-2] < step / 2:
            shown.pop(-2)  # the last label would overlap its neighbour
        parts = ['<g class="x-labels" aria-hidden="true">']
        for index in shown:
            anchor = "end" if index == len(labels) - 1 and index else "middle"
            parts.append(f'<text class="axis" x="{self.x(index):.1f}" y="{HEIGHT - 8}" text-anchor="{anchor}">'
                         f"{escape(labels[index])}</text>")  # fmt: skip
        parts.append("</g>")
        return parts

    def line(self, item: Series, index: int) -> list[str]:
        """One path; a gap (None) lifts the pen; a lone point between gaps is a dot."""
        runs, run = [], []
        for position, value in enumerate(item.values):
            if value is None:
                runs, run = (runs + [run]) if run else runs, []
            else:
                run.append((self.x(position), self.y(value)))
        runs = runs + [run] if run else runs
        parts = [f'<g class="{item.css(index)}" aria-hidden="true">']
        path = " ".join("M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in points) for points in runs if len(points) > 1)
        if path:
            parts.append(f'<path d="{path}" fill="none"/>')
        parts.extend(f'<circle cx="{points[0][0]:.1f}" cy="{points[0][1]:.1f}" r="3.5"/>'
                     for points in runs if len(points) == 1)  # fmt: skip
        parts.append("</g>")
        return parts

    def bars(self, item: Series, index: int) -> list[str]:
        width = max(self.inner_w / self.count * 0.7, 1)
        parts = [f'<g class="{item.css(index)} bars" aria-hidden="true">']
        for position, value in enumerate(item.values):
            if value:
                y = self.y(value)
                parts.append(f'<rect x="{self.x(position) - width / 2:.1f}" y="{y:.1f}" width="{width:.1f}" '
                             f'height="{TOP + self.inner_h - y:.1f}"/>')  # fmt: skip
        parts.append("</g>")
        return parts


def figures_table(*, caption: str, headers: list[str], rows: list[tuple]) -> str:
    """A chart's text alternative: the first column names the row (a time), the others are figures
    (`number`). Written here rather than in a template: a day of buckets is ~500 cells."""
    numeric = ' class="num"'
    head = "".join(f'<th scope="col"{numeric if index else ""}>{escape(text)}</th>' for index, text in enumerate(headers))
    body = "".join(f'<tr><th scope="row" class="nowrap">{escape(str(row[0]))}</th>'
                   + "".join(f'<td class="num">{escape(number(value))}</td>' for value in row[1:]) + "</tr>"
                   for row in rows)  # fmt: skip
    return (f'<table><caption class="visually-hidden">{escape(caption)}</caption><thead><tr>{head}</tr></thead>'
            f"<tbody>{body}</tbody></table>")


def _legend(series: list[Series]) -> list[str]:
    parts, x = ['<g class="legend" aria-hidden="true">'], LEFT
    for index, item in enumerate(series):
        shape = (f'<rect x="{x}" y="8" width="12" height="10"/>' if item.kind == "bars"
                 else f'<line x1="{x}" x2="{x + 14}" y1="13" y2="13"/>')  # fmt: skip
        parts.append(f'<g class="{item.css(index)}">{shape}</g>')
        parts.append(f'<text x="{x + 18}" y="17">{escape(item.name)}</text>')
        x += 18 + 7 * len(item.name) + 18
    parts.append("</g>")
    return parts
