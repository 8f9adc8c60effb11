"""A small inline-SVG chart toolkit: a canvas (:class:`Svg`), linear axes on it (:class:`Panel`),
horizontal bar panels (:func:`bar_panels`) and the standalone file (:func:`write_svg`).

Pure Python, no plotting library: the report's charts and the quantize sensitivity chart are drawn
with it, every shape carrying its own style, so a chart reads the same inline in HTML and as a file.
"""

from __future__ import annotations

import dataclasses
import html
import math
from pathlib import Path
from typing import Any

SVG_NS = "http://www.w3.org/2000/svg"
INK, GRID, MUTED = "#333333", "#e3e3e3", "#777777"
PASS, FAIL, FP32, INT8, BAR = "#2e7d32", "#c62828", "#1f77b4", "#d62728", "#2c7fb8"
STAGE_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2")


def num(v: float) -> str:
    """A value printed beside a mark: at most 2 decimals, trailing zeros dropped."""
    return f"{v:.2f}".rstrip("0").rstrip(".") if abs(v) < 1e6 else f"{v:.0f}"


def tick_label(v: float) -> str:
    """A tick label: 3 significant digits, thousands as k."""
    if v == 0:
        return "0"
    if abs(v) >= 10_000:
        return f"{v / 1000:.0f}k"
    return f"{v:.3g}"


def ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values (steps of 1, 2, 2.5 or 5 times a power of ten) from ``lo`` to ``hi``."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    out, v = [], first
    while v <= hi + step * 1e-6:
        out.append(round(v, 10))
        v += step
    return out


def span(values: list[float], *, zero: bool = False, pad: float = 0.08) -> tuple[float, float]:
    """An axis range over the finite ``values``, padded by ``pad`` of its width (``zero``: it includes 0,
    unpadded on that side)."""
    vals = [v for v in values if v is not None and math.isfinite(v)] or [0.0, 1.0]
    lo, hi = min(vals), max(vals)
    if zero:
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    if hi - lo < 1e-12:
        lo, hi = lo - (abs(lo) * 0.05 or 0.5), hi + (abs(hi) * 0.05 or 0.5)
    d = (hi - lo) * pad
    return (lo if zero and lo == 0.0 else lo - d), (hi if zero and hi == 0.0 else hi + d)


@dataclasses.dataclass
class Chart:
    """One chart of the report: its SVG, or ``None`` and the line saying why there is none."""

    key: str
    title: str
    svg: str | None
    caption: str


class Svg:
    """A small SVG canvas: every shape carries its own style, so the file reads the same standalone."""

    def __init__(self, width: int, height: int, title: str):
        self.w, self.h, self.title, self.parts = width, height, title, []

    def text(self, x, y, s, *, size=11, anchor="start", fill=INK, weight="normal", rotate=False):
        rot = f' transform="rotate(-90 {x:.1f} {y:.1f})"' if rotate else ""
        self.parts.append(f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{fill}" '
                          f'font-weight="{weight}"{rot}>{html.escape(str(s))}</text>')

    def line(self, x1, y1, x2, y2, *, stroke=INK, width=1.0, dash=""):
        d = f' stroke-dasharray="{dash}"' if dash else ""
        self.parts.append(f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{stroke}" '
                          f'stroke-width="{width}"{d}/>')

    def rect(self, x, y, w, h, *, fill=BAR, stroke="none", width=1.0, tip=""):
        t = f"<title>{html.escape(tip)}</title>" if tip else ""
        self.parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(w, 0.0):.1f}" height="{max(h, 0.0):.1f}" '
                          f'fill="{fill}" stroke="{stroke}" stroke-width="{width}">{t}</rect>')

    def circle(self, cx, cy, r, *, fill=BAR, stroke="none", width=1.0, tip=""):
        t = f"<title>{html.escape(tip)}</title>" if tip else ""
        self.parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="{r}" fill="{fill}" stroke="{stroke}" '
                          f'stroke-width="{width}">{t}</circle>')

    def polyline(self, pts, *, stroke=BAR, width=2.0, dash=""):
        d = f' stroke-dasharray="{dash}"' if dash else ""
        xy = " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)
        self.parts.append(f'<polyline points="{xy}" fill="none" stroke="{stroke}" stroke-width="{width}" '
                          f'stroke-linejoin="round"{d}/>')

    def legend(self, x, y, items):
        """``items``: (label, colour, kind) with kind ``dot``, ``ring``, ``line``, ``dash`` or ``box``."""
        for label, colour, kind in items:
            if kind in ("line", "dash"):
                self.line(x, y - 4, x + 18, y - 4, stroke=colour, width=2.5, dash="5,3" if kind == "dash" else "")
                x += 22
            elif kind == "box":
                self.rect(x, y - 10, 11, 11, fill=colour)
                x += 15
            else:
                self.circle(x + 5, y - 4, 5, fill=colour if kind == "dot" else "none",
                            stroke=colour if kind == "ring" else "none", width=2)
                x += 14
            self.text(x, y, label, size=11)
            x += 7 * len(label) + 16

    def render(self) -> str:
        return (f'<svg xmlns="{SVG_NS}" width="{self.w}" height="{self.h}" viewBox="0 0 {self.w} {self.h}" '
                f'role="img" font-family="sans-serif"><title>{html.escape(self.title)}</title>'
                f'<rect x="0" y="0" width="{self.w}" height="{self.h}" fill="#ffffff"/>'
                + "".join(self.parts) + "</svg>")


@dataclasses.dataclass
class Panel:
    """A plot area of an :class:`Svg` with linear axes: :meth:`X` and :meth:`Y` map values to the canvas."""

    svg: Svg
    x0: float
    y0: float
    w: float
    h: float
    xlim: tuple[float, float]
    ylim: tuple[float, float]

    def X(self, v: float) -> float:
        lo, hi = self.xlim
        return self.x0 + (v - lo) / (hi - lo) * self.w

    def Y(self, v: float) -> float:
        lo, hi = self.ylim
        return self.y0 + self.h - (v - lo) / (hi - lo) * self.h

    def axes(self, *, xlabel: str = "", ylabel: str = "", xticks: bool = True, yticks: bool = True,
             ygrid: bool = True, xgrid: bool = False) -> None:
        s = self.svg
        if yticks:
            for t in ticks(*self.ylim, n=4):
                if self.ylim[0] - 1e-9 <= t <= self.ylim[1] + 1e-9:
                    y = self.Y(t)
                    if ygrid:
                        s.line(self.x0, y, self.x0 + self.w, y, stroke=GRID)
                    s.text(self.x0 - 5, y + 4, tick_label(t), size=10, anchor="end", fill=MUTED)
        if xticks:
            for t in ticks(*self.xlim, n=5):
                if self.xlim[0] - 1e-9 <= t <= self.xlim[1] + 1e-9:
                    x = self.X(t)
                    if xgrid:
                        s.line(x, self.y0, x, self.y0 + self.h, stroke=GRID)
                    s.line(x, self.y0 + self.h, x, self.y0 + self.h + 4, stroke=MUTED)
                    s.text(x, self.y0 + self.h + 15, tick_label(t), size=10, anchor="middle", fill=MUTED)
        s.line(self.x0, self.y0 + self.h, self.x0 + self.w, self.y0 + self.h, stroke=INK)
        s.line(self.x0, self.y0, self.x0, self.y0 + self.h, stroke=INK)
        if xlabel:
            s.text(self.x0 + self.w / 2, self.y0 + self.h + (30 if xticks else 16), xlabel, size=11, anchor="middle")
        if ylabel:
            s.text(self.x0 - 42, self.y0 + self.h / 2, ylabel, size=11, anchor="middle", rotate=True)


def bar_panels(title: str, rows: list[dict[str, Any]], label: str,
               series: list[tuple[str, str, str, float | None]]) -> str:
    """Horizontal bars side by side, one panel per series and one row per entry of ``rows`` (the first on
    top, named by its ``label`` field, the first 22 characters of it).

    ``series`` holds ``(axis label, field, colour, cap)``: a panel draws each row's ``field`` (absent: 0), a
    value above ``cap`` at ``cap`` (``None``: no cap); an infinite value (an exact layer's SQNR) is printed
    as ``exact``. Returns the SVG.
    """
    n = len(rows)
    lw = 150
    pw = 230
    h = 70 + 20 * n + 40
    w = 20 + lw + len(series) * (pw + 40)
    svg = Svg(w, h, title)
    svg.text(12, 20, title, size=14, weight="bold")
    for k, (name, field, colour, cap) in enumerate(series):
        vals = [float(r.get(field) or 0.0) for r in rows]
        vals = [min(v, cap) if cap is not None else v for v in vals]
        p = Panel(svg, 20 + lw + k * (pw + 40), 50, pw, 20 * n, span(vals, zero=True), (0, n))
        p.axes(xlabel=name, yticks=False, xgrid=True)
        for i, (r, v) in enumerate(zip(rows, vals)):
            y = p.y0 + 20 * i + 3
            x0, x1 = p.X(min(v, 0.0)), p.X(max(v, 0.0))
            svg.rect(x0, y, x1 - x0, 14, fill=colour, tip=f"{r.get(label)}: {field} {r.get(field)}")
            raw = r.get(field)
            shown = "exact" if isinstance(raw, float) and math.isinf(raw) else num(v)
            inside = x1 + 30 > p.x0 + pw  # no room after the bar: the label goes inside it, in white
            svg.text(x1 - 3 if inside else x1 + 3, y + 11, shown, size=9, fill="#ffffff" if inside else MUTED,
                     anchor="end" if inside else "start")
            if k == 0:
                svg.text(p.x0 - 6, y + 11, str(r.get(label))[:22], size=10, anchor="end")
    return svg.render()


def write_svg(svg: str, path: str | Path) -> Path:
    """``svg`` as a standalone file (with its XML declaration), its folder made if need be."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('<?xml version="1.0" encoding="UTF-8"?>\n' + svg + "\n")
    return path
