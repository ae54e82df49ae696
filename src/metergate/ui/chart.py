"""Geometry of the dashboard's inline SVG pictures: a value against its tiers, usage over periods.

Only numbers are computed here; the templates draw them (and escape every label).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from metergate.config import TierConfig
from metergate.core.history import Series

__all__ = ["Bar", "Chart", "tier_bar", "usage_chart"]

WIDTH = 480
BAR_HEIGHT = 28
CHART_HEIGHT = 170


@dataclass(frozen=True, slots=True)
class Segment:
    """One tier on the bar: where it starts and ends (x), its level and its `from`."""

    x0: float
    x1: float
    level: str
    start: int


@dataclass(frozen=True, slots=True)
class Bar:
    """A value against its tier boundaries: coloured segments and a marker at the value."""

    width: int
    height: int
    segments: list[Segment]
    marker: float
    limit: float | None


def _x(value: int, scale: float) -> float:
    return round(min(value, scale) / scale * WIDTH, 1)


def tier_bar(tiers: Sequence[TierConfig], value: int, limit: int | None) -> Bar:
    """Lay out the tiers from 0 past the last boundary (or the value, if beyond it)."""
    top = max([value, limit or 0, *(t.from_ for t in tiers)])
    scale = max(1.0, top * 1.15)
    segments = []
    for i, tier in enumerate(tiers):
        end = tiers[i + 1].from_ if i + 1 < len(tiers) else scale
        segments.append(Segment(_x(tier.from_, scale), _x(int(end), scale), tier.level, tier.from_))
    return Bar(
        WIDTH,
        BAR_HEIGHT,
        segments,
        _x(value, scale),
        None if limit is None else _x(limit, scale),
    )


@dataclass(frozen=True, slots=True)
class Line:
    """A tier boundary across the chart: its height, level and value."""

    y: float
    level: str
    value: int


@dataclass(frozen=True, slots=True)
class Chart:
    """Running totals of the current and previous period over the period's length."""

    width: int
    height: int
    current: str
    previous: str
    lines: list[Line]
    top: int
    current_total: int
    previous_total: int


def _running(series: Series, start: int, end: int, until: int) -> list[tuple[float, int]]:
    """(fraction of the period, running total) at the end of each bucket with usage."""
    length = end - start
    points: list[tuple[float, int]] = [(0.0, 0)]
    for at, total in series.cumulative(start, end):
        reached = min(at + series.bucket_ms, until, end)
        points.append((max(0.0, (reached - start) / length), total))
    last = points[-1][1]
    points.append((min(1.0, (until - start) / length), last))
    return points


def usage_chart(series: Series, tiers: Sequence[TierConfig], now_ms: int) -> Chart:
    """Lay out the current period's running total over the previous one's, with the boundaries."""
    current = _running(series, *series.current, until=now_ms)
    previous = _running(series, *series.previous, until=series.previous[1])
    peak = max(current[-1][1], previous[-1][1])
    above = [t.from_ for t in tiers if t.from_ > peak]
    top = max(1, peak, min(above) if above else 0)
    scale = top * 1.1

    def path(points: list[tuple[float, int]]) -> str:
        return " ".join(
            f"{round(f * WIDTH, 1)},{round(CHART_HEIGHT - v / scale * CHART_HEIGHT, 1)}"
            for f, v in points
        )

    lines = [
        Line(round(CHART_HEIGHT - t.from_ / scale * CHART_HEIGHT, 1), t.level, t.from_)
        for t in tiers
        if 0 < t.from_ <= top
    ]
    return Chart(
        WIDTH,
        CHART_HEIGHT,
        path(current),
        path(previous),
        lines,
        top,
        current[-1][1],
        previous[-1][1],
    )
