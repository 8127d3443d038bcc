"""Line and dot charts as inline SVG: crisp, light, and each point says its value on hover.

Used for the curves against depth (attention distance per head, probe
accuracy, skip ratios) with their baselines dashed. NaN values are gaps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from vitcnn_store.serve.pages.html import esc

__all__ = ["PALETTE", "Series", "chart"]

PALETTE = ("#3b6fd4", "#d4553b", "#2e9e6a", "#a04ec0", "#c28a12", "#4aa3b8", "#777777")


@dataclass
class Series:
    """One curve: ``style`` is ``line`` (with dots), ``dots`` or ``dash`` (a baseline)."""

    label: str
    x: Sequence[float] | np.ndarray
    y: Sequence[float] | np.ndarray
    style: str = "line"
    color: str = PALETTE[0]
    tips: Sequence[str] = field(default_factory=list)  # hover text per point


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not hi > lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    for m in (1, 2, 5, 10):
        if (hi - lo) / (step * m) <= n:
            step *= m
            break
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def chart(
    series: Sequence[Series],
    *,
    xlabel: str,
    ylabel: str,
    width: int = 600,
    height: int = 320,
    ylim: tuple[float, float] | None = None,
) -> str:
    """An SVG chart of ``series`` with axes, ticks and a legend."""
    xs = np.array([v for s in series for v in s.x], dtype=float)
    ys = np.array([v for s in series for v in s.y], dtype=float)
    xs, ys = xs[np.isfinite(xs)], ys[np.isfinite(ys)]
    x0, x1 = (float(xs.min()), float(xs.max())) if xs.size else (0.0, 1.0)
    y0, y1 = ylim or ((float(ys.min()), float(ys.max())) if ys.size else (0.0, 1.0))
    if x1 <= x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 <= y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = (y1 - y0) * 0.06
    y0, y1 = (y0, y1) if ylim else (y0 - pad, y1 + pad)
    left, right, top, bottom = 56, 150, 12, 44
    w, h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * w

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * h

    out = [
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="{esc(ylabel)} against {esc(xlabel)}">',
        f'<rect x="{left}" y="{top}" width="{w}" height="{h}" class="plot"/>',
    ]
    for t in _ticks(x0, x1):
        out.append(
            f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{top}" y2="{top + h}" '
            f'class="grid"/><text x="{px(t):.1f}" y="{top + h + 16}" '
            f'class="tick" text-anchor="middle">{t:g}</text>'
        )
    for t in _ticks(y0, y1):
        out.append(
            f'<line x1="{left}" x2="{left + w}" y1="{py(t):.1f}" y2="{py(t):.1f}" '
            f'class="grid"/><text x="{left - 6}" y="{py(t) + 4:.1f}" class="tick" '
            f'text-anchor="end">{t:g}</text>'
        )
    out.append(
        f'<text x="{left + w / 2}" y="{height - 6}" class="label" '
        f'text-anchor="middle">{esc(xlabel)}</text>'
    )
    out.append(
        f'<text transform="translate(14 {top + h / 2}) rotate(-90)" class="label" '
        f'text-anchor="middle">{esc(ylabel)}</text>'
    )
    for k, s in enumerate(series):
        pts = [(float(a), float(b)) for a, b in zip(s.x, s.y, strict=True)]
        if s.style in ("line", "dash"):
            runs: list[list[tuple[float, float]]] = [[]]
            for a, b in pts:
                if math.isfinite(a) and math.isfinite(b):
                    runs[-1].append((a, b))
                elif runs[-1]:
                    runs.append([])
            dash = ' stroke-dasharray="6 4"' if s.style == "dash" else ""
            for r in runs:
                if len(r) > 1:
                    d = " ".join(f"{px(a):.1f},{py(b):.1f}" for a, b in r)
                    out.append(
                        f'<polyline points="{d}" fill="none" stroke="{s.color}" '
                        f'stroke-width="2"{dash}/>'
                    )
        if s.style in ("line", "dots"):
            for i, (a, b) in enumerate(pts):
                if not (math.isfinite(a) and math.isfinite(b)):
                    continue
                tip = s.tips[i] if i < len(s.tips) else f"{s.label}: {b:.4g}"
                out.append(
                    f'<circle cx="{px(a):.1f}" cy="{py(b):.1f}" r="4" fill="{s.color}" '
                    f'class="pt"><title>{esc(tip)}</title></circle>'
                )
        ly = top + 14 + 18 * k
        mark = "6 4" if s.style == "dash" else "none"
        out.append(
            f'<line x1="{left + w + 10}" x2="{left + w + 30}" y1="{ly}" y2="{ly}" '
            f'stroke="{s.color}" stroke-width="2" stroke-dasharray="{mark}"/>'
            f'<text x="{left + w + 36}" y="{ly + 4}" class="legend">{esc(s.label)}</text>'
        )
    out.append("</svg>")
    return "".join(out)
