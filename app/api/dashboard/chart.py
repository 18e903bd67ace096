"""The dashboard's chart as inline SVG geometry: computed here, drawn by the template."""

from __future__ import annotations

import math
from typing import Any

from app.observability import overview

W, H, LEFT, RIGHT = 760, 230, 56, 12
BARS_TOP, BARS_BOTTOM = 16, 96
LAT_TOP, LAT_BOTTOM = 126, 206


def _lat_y(value: float, lo: float, hi: float) -> float:
    value = min(max(value, lo), hi)
    frac = (math.log10(value) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
    return round(LAT_BOTTOM - frac * (LAT_BOTTOM - LAT_TOP), 1)


def chart(series: overview.Series) -> dict[str, Any]:
    """Bars of revocations per bucket over p50/p99 lines of time to revoke (log scale)."""
    n = len(series.buckets)
    step = (W - LEFT - RIGHT) / n
    most = max((b.count for b in series.buckets), default=0)
    worst = max((b.p99 for b in series.buckets if b.p99 is not None), default=0.0)
    lo, hi = 0.001, 10 ** max(0, math.ceil(math.log10(worst))) if worst > 0 else 1.0
    bars: list[dict[str, Any]] = []
    lines: dict[str, list[list[str]]] = {"p50": [[]], "p99": [[]]}
    dots: dict[str, list[dict[str, Any]]] = {"p50": [], "p99": []}
    for i, b in enumerate(series.buckets):
        x = LEFT + i * step
        if b.count:
            height = max(1.0, (BARS_BOTTOM - BARS_TOP) * b.count / most)
            bars.append(
                {
                    "x": round(x + 1, 1),
                    "y": round(BARS_BOTTOM - height, 1),
                    "w": round(step - 2, 1),
                    "h": round(height, 1),
                    "title": (
                        f"{b.start:%H:%M} UTC: {b.count} revoked, "
                        f"p50 {overview.duration(b.p50)}, p99 {overview.duration(b.p99)}"
                    ),
                }
            )
        for name in ("p50", "p99"):
            value = getattr(b, name)
            if value is None:
                if lines[name][-1]:
                    lines[name].append([])  # a gap: start a new line
                continue
            cx, cy = round(x + step / 2, 1), _lat_y(value, lo, hi)
            lines[name][-1].append(f"{cx},{cy}")
            dots[name].append(
                {
                    "x": cx,
                    "y": cy,
                    "title": f"{b.start:%H:%M} UTC: {name} {overview.duration(value)}",
                }
            )
    ticks = []
    exp = -3
    while 10.0**exp <= hi * 1.0001:
        ticks.append({"y": _lat_y(10.0**exp, lo, hi), "label": overview.duration(10.0**exp)})
        exp += 1
    minutes = int((series.width * n).total_seconds() // 60)
    return {
        "w": W,
        "h": H,
        "left": LEFT,
        "right": W - RIGHT,
        "bars_top": BARS_TOP,
        "bars_bottom": BARS_BOTTOM,
        "lat_top": LAT_TOP,
        "lat_bottom": LAT_BOTTOM,
        "most": most,
        "bars": bars,
        "ticks": ticks,
        "p50": [" ".join(pts) for pts in lines["p50"] if pts],
        "p99": [" ".join(pts) for pts in lines["p99"] if pts],
        "dots": dots,
        "x_labels": [
            {"x": LEFT, "label": f"-{minutes}m"},
            {"x": round(LEFT + (W - LEFT - RIGHT) / 2, 1), "label": f"-{minutes // 2}m"},
            {"x": W - RIGHT, "label": "now"},
        ],
        "empty": most == 0,
    }
