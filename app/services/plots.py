"""Server-side SVG charts for the report and the embeddable plot endpoints.

Plain Python string building: no JavaScript, no plotting library, nothing fetched by the browser.
Every chart is one `<svg data-chart="…">` whose series are `<g class="series" data-series="<label>">`
groups, so a test (or a person with dev tools) can count what was drawn. Styling uses presentation
attributes only, so a chart looks the same inline in the report and opened on its own.

Colours are the Okabe–Ito palette (distinguishable with the common colour-vision deficiencies),
and every variant also gets its own marker shape and, past the eighth, a dash pattern, so no
reading depends on colour alone. Every string that reaches the markup goes through `html.escape`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from html import escape

FONT = "'Liberation Sans', 'Helvetica Neue', Arial, 'DejaVu Sans', sans-serif"
# Okabe & Ito (2008), black moved back and yellow replaced by Tol's olive (yellow is unreadable on white).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#999933")
MARKERS = ("circle", "square", "triangle", "diamond", "triangle_down")
DASHES = ("", "7 4", "2 3", "9 3 2 3")
INK = "#1f2328"
MUTED = "#57606a"
GRID = "#e6e8eb"
AXIS = "#8c959f"
BAD = "#b42318"


@dataclass(frozen=True)
class VariantStyle:
    colour: str
    marker: str
    dash: str


def variant_style(index: int) -> VariantStyle:
    """The look of the index-th variant of a job: the same in every chart and table of the report."""
    return VariantStyle(
        colour=PALETTE[index % len(PALETTE)],
        marker=MARKERS[index % len(MARKERS)],
        dash=DASHES[(index // len(PALETTE)) % len(DASHES)],
    )


# ----------------------------------------------------------------------------------------------
# inputs


@dataclass(frozen=True)
class CellPoint:
    """One (variant, batch size) cell of the accuracy chart, in percent."""

    mean: float | None
    low: float | None
    high: float | None
    n: int
    n_total: int
    diverged: int = 0
    pending: int = 0


@dataclass(frozen=True)
class BandPoint:
    """One point of a training curve: x (epochs), the mean across seeds and the band around it."""

    x: float
    mean: float
    lower: float | None
    upper: float | None
    n: int = 1


# ----------------------------------------------------------------------------------------------
# small helpers


def _f(v: float) -> str:
    """A coordinate: two decimals are plenty at screen resolution and keep the markup small."""
    return f"{v:.2f}".rstrip("0").rstrip(".") if math.isfinite(v) else "0"


def _attr(s: object) -> str:
    return escape(str(s), quote=True)


def _text(
    x: float,
    y: float,
    s: str,
    *,
    size: float = 12,
    anchor: str = "start",
    fill: str = INK,
    weight: str = "normal",
    rotate: bool = False,
    baseline: str = "auto",
    extra: str = "",
) -> str:
    transform = f' transform="rotate(-90 {_f(x)} {_f(y)})"' if rotate else ""
    dominant = f' dominant-baseline="{baseline}"' if baseline != "auto" else ""
    return (
        f'<text x="{_f(x)}" y="{_f(y)}" font-size="{_f(size)}" text-anchor="{anchor}" fill="{fill}" '
        f'font-weight="{weight}"{dominant}{transform}{extra}>{escape(s)}</text>'
    )


def text_width(s: str, size: float = 12) -> float:
    """A rough width for layout (no font metrics on the server): average glyph ≈ 0.56 em."""
    return len(s) * size * 0.56


def shorten(s: str, limit: int = 32) -> str:
    return s if len(s) <= limit else s[: limit - 1] + "…"


def nice_step(span: float, target: int) -> float:
    raw = span / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1, 2, 2.5, 5, 10):
        if raw <= m * mag * (1 + 1e-9):
            return m * mag
    return 10 * mag


def nice_ticks(lo: float, hi: float, target: int = 5) -> tuple[float, float, list[float]]:
    """An axis range that starts and ends on a tick, and the ticks (1, 2, 2.5 or 5 × 10^k apart)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        lo, hi = 0.0, 1.0
    if hi - lo < 1e-12:
        pad = abs(lo) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
    step = nice_step(hi - lo, target)
    start = math.floor(lo / step + 1e-9) * step
    end = math.ceil(hi / step - 1e-9) * step
    count = round((end - start) / step)
    return start, end, [start + i * step for i in range(count + 1)]


def clamp_ticks(
    start: float, end: float, ticks: list[float], low: float, high: float
) -> tuple[float, float, list[float]]:
    """Keep a nice axis inside hard limits (accuracy: 0..100); the limits are multiples of every nice step."""
    start, end = max(start, low), min(end, high)
    return start, end, [t for t in ticks if start - 1e-9 <= t <= end + 1e-9]


def tick_label(v: float, step: float) -> str:
    decimals = 0
    while decimals < 6 and abs(step * 10**decimals - round(step * 10**decimals)) > 1e-6:
        decimals += 1
    if abs(v) < step * 1e-6:
        v = 0.0
    return f"{v:.{decimals}f}"


@dataclass(frozen=True)
class Frame:
    """A plot area in pixels and the data range it shows."""

    left: float
    top: float
    width: float
    height: float
    x0: float
    x1: float
    y0: float
    y1: float

    def px(self, x: float) -> float:
        return self.left + (x - self.x0) / (self.x1 - self.x0) * self.width

    def py(self, y: float) -> float:
        return self.top + self.height - (y - self.y0) / (self.y1 - self.y0) * self.height

    @property
    def bottom(self) -> float:
        return self.top + self.height

    @property
    def right(self) -> float:
        return self.left + self.width


def marker(shape: str, x: float, y: float, r: float, colour: str, hollow: bool = False) -> str:
    fill = "#ffffff" if hollow else colour
    paint = f'fill="{fill}" stroke="{colour}" stroke-width="{1.8 if hollow else 1.2}"'
    if shape == "circle":
        return f'<circle cx="{_f(x)}" cy="{_f(y)}" r="{_f(r)}" {paint}/>'
    if shape == "square":
        s = r * 0.9
        return f'<rect x="{_f(x - s)}" y="{_f(y - s)}" width="{_f(2 * s)}" height="{_f(2 * s)}" {paint}/>'
    if shape == "triangle":
        pts = [(x, y - r * 1.2), (x + r * 1.1, y + r * 0.8), (x - r * 1.1, y + r * 0.8)]
    elif shape == "triangle_down":
        pts = [(x, y + r * 1.2), (x + r * 1.1, y - r * 0.8), (x - r * 1.1, y - r * 0.8)]
    else:  # diamond
        pts = [(x, y - r * 1.3), (x + r * 1.1, y), (x, y + r * 1.3), (x - r * 1.1, y)]
    return f'<polygon points="{" ".join(f"{_f(a)},{_f(b)}" for a, b in pts)}" {paint}/>'


def cross(x: float, y: float, r: float, colour: str) -> str:
    return (
        f'<path d="M{_f(x - r)} {_f(y - r)}L{_f(x + r)} {_f(y + r)}M{_f(x - r)} {_f(y + r)}L{_f(x + r)} {_f(y - r)}" '
        f'stroke="{colour}" stroke-width="2.2" stroke-linecap="round" fill="none"/>'
    )


def _svg_open(chart: str, width: float, height: float, title: str, description: str) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" data-chart="{_attr(chart)}" '
        f'width="{_f(width)}" height="{_f(height)}" viewBox="0 0 {_f(width)} {_f(height)}" role="img" '
        f'aria-label="{_attr(title)}" font-family="{_attr(FONT)}">',
        f"<title>{escape(title)}</title>",
        f"<desc>{escape(description)}</desc>",
        f'<rect x="0" y="0" width="{_f(width)}" height="{_f(height)}" fill="#ffffff"/>',
    ]


def _heading(parts: list[str], title: str, subtitle: str, left: float) -> None:
    parts.append(_text(left, 26, title, size=17, weight="bold"))
    if subtitle:
        parts.append(_text(left, 46, subtitle, size=12, fill=MUTED))


def _y_axis(parts: list[str], frame: Frame, ticks: list[float], step: float, label: str | None, grid: bool) -> None:
    for t in ticks:
        y = frame.py(t)
        if grid:
            parts.append(
                f'<line x1="{_f(frame.left)}" y1="{_f(y)}" x2="{_f(frame.right)}" y2="{_f(y)}" stroke="{GRID}"/>'
            )
        parts.append(
            _text(frame.left - 7, y, tick_label(t, step), size=11, anchor="end", fill=MUTED, baseline="middle")
        )
    parts.append(
        f'<line x1="{_f(frame.left)}" y1="{_f(frame.top)}" x2="{_f(frame.left)}" y2="{_f(frame.bottom)}" '
        f'stroke="{AXIS}"/>'
    )
    if label:
        parts.append(
            _text(frame.left - 48, frame.top + frame.height / 2, label, size=12, anchor="middle", fill=INK, rotate=True)
        )


def _x_axis_line(parts: list[str], frame: Frame) -> None:
    parts.append(
        f'<line x1="{_f(frame.left)}" y1="{_f(frame.bottom)}" x2="{_f(frame.right)}" y2="{_f(frame.bottom)}" '
        f'stroke="{AXIS}"/>'
    )


def _legend_swatch(x: float, y: float, style: VariantStyle) -> str:
    dash = f' stroke-dasharray="{style.dash}"' if style.dash else ""
    return (
        f'<line x1="{_f(x)}" y1="{_f(y)}" x2="{_f(x + 26)}" y2="{_f(y)}" stroke="{style.colour}" '
        f'stroke-width="2.5"{dash}/>' + marker(style.marker, x + 13, y, 4.5, style.colour)
    )


def _legend_row(parts: list[str], variants: Sequence[str], x: float, y: float, max_width: float) -> float:
    """A horizontal legend that wraps; returns the y below it."""
    cx, cy = x, y
    parts.append('<g class="legend">')
    for i, v in enumerate(variants):
        label = shorten(v)
        w = 34 + text_width(label, 12) + 22
        if cx > x and cx + w > x + max_width:
            cx, cy = x, cy + 20
        parts.append(f'<g data-legend="{_attr(v)}"><title>{escape(v)}</title>')
        parts.append(_legend_swatch(cx, cy, variant_style(i)))
        parts.append(_text(cx + 33, cy, label, size=12, baseline="middle"))
        parts.append("</g>")
        cx += w
    parts.append("</g>")
    return cy + 20


def empty_note(parts: list[str], frame: Frame, message: str) -> None:
    parts.append(
        _text(frame.left + frame.width / 2, frame.top + frame.height / 2, message, size=13, anchor="middle", fill=MUTED)
    )


# ----------------------------------------------------------------------------------------------
# accuracy vs batch size (the GroupNorm paper's Figure 1, for the user's own data)


def accuracy_chart(
    variants: Sequence[str],
    batch_sizes: Sequence[int],
    cells: Mapping[tuple[str, int], CellPoint],
    *,
    title: str = "Final validation accuracy vs batch size",
    subtitle: str = "",
    y_label: str = "validation accuracy (%)",
    error_label: str = "95% CI",
    width: float = 1000,
    height: float = 440,
) -> str:
    """One line per variant over log2(batch size), error bars from `low`/`high` of each cell.

    Hollow markers: the cell is missing seeds (diverged, failed or unfinished). A cross at the
    bottom: no seed of the cell has a result; the line breaks there instead of bridging the gap.
    """
    bss = sorted(set(batch_sizes))
    legend_w = max([text_width(shorten(v), 12) for v in variants] + [60]) + 60
    frame, ticks = _accuracy_frame(bss, cells, width - 72 - legend_w - 24, height - 66 - 78)
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    description = (
        f"Mean final validation accuracy over seeds for each variant at each batch size; error bars show the "
        f"{error_label}. Hollow markers: some seeds diverged, failed or are unfinished; a cross: no seed has a result."
    )
    parts = _svg_open("accuracy-vs-batch", width, height, title, description)
    _heading(parts, title, subtitle, 2)
    _y_axis(parts, frame, ticks, step, y_label, grid=True)
    _batch_size_axis(parts, frame, bss)
    if not any(c.mean is not None for c in cells.values()):
        empty_note(parts, frame, "No finished runs yet — the chart fills in as runs finish")
    drawn = [_accuracy_series(parts, frame, variants, i, bss, cells, error_label) for i in range(len(variants))]
    _variant_legend(parts, frame, variants)
    notes = [f"Mean over seeds; error bars: {error_label}."]
    if any(d.hollow for d in drawn):
        notes.append("Hollow marker: some seeds diverged, failed or are unfinished.")
    if any(d.cross for d in drawn):
        notes.append("✕: no seed has a result.")
    parts.append(_text(2, height - 10, " ".join(notes), size=11, fill=MUTED))
    parts.append("</svg>")
    return "\n".join(parts)


def _accuracy_frame(
    bss: Sequence[int], cells: Mapping[tuple[str, int], CellPoint], frame_w: float, frame_h: float
) -> tuple[Frame, list[float]]:
    """The plot area: log2(batch size) across, accuracy up, padded around every mean and interval end."""
    values = [
        v
        for c in cells.values()
        for v in (c.mean, c.low, c.high)
        if v is not None and math.isfinite(v) and c.mean is not None
    ]
    lo, hi = (min(values), max(values)) if values else (0.0, 100.0)
    span = max(hi - lo, 1.0)
    lo, hi = lo - 0.06 * span, hi + 0.06 * span
    y0, y1, ticks = clamp_ticks(*nice_ticks(max(lo, 0.0), min(hi, 100.0), 6), 0.0, 100.0)  # intervals may poke past
    logs = [math.log2(b) for b in bss] if bss else [0.0]
    pad = 0.45 if len(logs) > 1 else 1.0
    return Frame(72.0, 66.0, frame_w, frame_h, min(logs) - pad, max(logs) + pad, y0, y1), ticks


def _batch_size_axis(parts: list[str], frame: Frame, bss: Sequence[int]) -> None:
    _x_axis_line(parts, frame)
    for b in bss:
        x = frame.px(math.log2(b))
        parts.append(
            f'<line x1="{_f(x)}" y1="{_f(frame.bottom)}" x2="{_f(x)}" y2="{_f(frame.bottom + 5)}" stroke="{AXIS}"/>'
        )
        parts.append(_text(x, frame.bottom + 19, str(b), size=12, anchor="middle", fill=INK))
    parts.append(
        _text(frame.left + frame.width / 2, frame.bottom + 42, "batch size (log₂ scale)", size=12, anchor="middle")
    )


@dataclass
class _Drawn:
    """What a series drew that the chart's footnote must explain."""

    hollow: bool = False
    cross: bool = False


def _accuracy_series(
    parts: list[str],
    frame: Frame,
    variants: Sequence[str],
    i: int,
    bss: Sequence[int],
    cells: Mapping[tuple[str, int], CellPoint],
    error_label: str,
) -> _Drawn:
    """The i-th variant: its line (broken at cells without a result), error bars and markers."""
    v, k, style = variants[i], len(variants), variant_style(i)
    off = (i - (k - 1) / 2) * min(9.0, 48.0 / max(k, 1))  # dodge: bars of one batch size side by side
    parts.append(f'<g class="series" data-series="{_attr(v)}" data-colour="{style.colour}">')
    segments: list[list[tuple[float, float]]] = [[]]
    marks: list[str] = []
    drawn = _Drawn()
    for b in bss:
        c = cells.get((v, b))
        x = frame.px(math.log2(b)) + off
        if c is None or c.mean is None:
            if segments[-1]:
                segments.append([])
            if c is not None and c.n_total and c.pending < c.n_total:
                drawn.cross = True
                marks.extend(_no_result_mark(v, b, c, x, frame.bottom - 10 - 13 * i, style))
            continue
        y = frame.py(c.mean)
        segments[-1].append((x, y))
        if c.low is not None and c.high is not None:
            marks.append(_error_bar(frame, x, c.low, c.high, style))
        hollow = c.n < c.n_total
        drawn.hollow = drawn.hollow or hollow
        tip = _cell_tip(v, b, c, error_label)
        marks.append(f"<g><title>{escape(tip)}</title>{marker(style.marker, x, y, 5, style.colour, hollow)}</g>")
    dash = f' stroke-dasharray="{style.dash}"' if style.dash else ""
    for seg in segments:
        if len(seg) > 1:
            d = "M" + "L".join(f"{_f(a)} {_f(b)}" for a, b in seg)
            parts.append(
                f'<path d="{d}" fill="none" stroke="{style.colour}" stroke-width="2.4" stroke-linejoin="round"{dash}/>'
            )
    parts.extend(marks)
    parts.append("</g>")
    return drawn


def _no_result_mark(v: str, b: int, c: CellPoint, x: float, y: float, style: VariantStyle) -> list[str]:
    why = f"{c.diverged} of {c.n_total} seeds diverged" if c.diverged else "no seed finished"
    return [
        f"<g><title>{escape(f'{v} at batch {b}: no result ({why})')}</title>",
        cross(x, y, 4.5, style.colour) + "</g>",
    ]


def _error_bar(frame: Frame, x: float, low: float, high: float, style: VariantStyle) -> str:
    ylo, yhi = frame.py(max(low, frame.y0)), frame.py(min(high, frame.y1))
    # a cap marks an end inside the axis; a bar cut by the axis limit has none there
    caps = "".join(
        f"M{_f(x - 4)} {_f(frame.py(end))}H{_f(x + 4)}" for end in (low, high) if frame.y0 <= end <= frame.y1
    )
    return f'<path d="M{_f(x)} {_f(ylo)}V{_f(yhi)}{caps}" stroke="{style.colour}" stroke-width="1.6" fill="none"/>'


def _cell_tip(v: str, b: int, c: CellPoint, error_label: str) -> str:
    tip = f"{v} at batch {b}: {c.mean:.1f}%"
    if c.low is not None and c.high is not None:
        tip += f" ({error_label} {c.low:.1f} to {c.high:.1f})"
    tip += f", {c.n} of {c.n_total} seeds"
    if c.diverged:
        tip += f", {c.diverged} diverged"
    if c.pending:
        tip += f", {c.pending} still running or queued"
    return tip


def _variant_legend(parts: list[str], frame: Frame, variants: Sequence[str]) -> None:
    """A vertical legend right of the plot area."""
    lx, ly = frame.right + 28, frame.top + 6
    parts.append('<g class="legend">')
    parts.append(_text(lx, ly, "variant", size=11, fill=MUTED, weight="bold"))
    for i, v in enumerate(variants):
        y = ly + 22 + 22 * i
        parts.append(f'<g data-legend="{_attr(v)}"><title>{escape(v)}</title>')
        parts.append(_legend_swatch(lx, y, variant_style(i)))
        parts.append(_text(lx + 34, y, shorten(v), size=13, baseline="middle"))
        parts.append("</g>")
    parts.append("</g>")


# ----------------------------------------------------------------------------------------------
# training curves: small multiples, one panel per batch size


def curves_chart(
    variants: Sequence[str],
    batch_sizes: Sequence[int],
    curves: Mapping[tuple[str, int], Sequence[BandPoint]],
    *,
    title: str,
    subtitle: str = "",
    y_label: str = "",
    x_label: str = "epoch",
    width: float = 1000,
    panel_height: float = 230,
    columns: int | None = None,
    percent: bool = False,
) -> str:
    """One panel per batch size (shared axes), one mean line and a shaded band per variant."""
    bss = list(batch_sizes)
    cols = columns or max(1, min(len(bss), 3))
    rows = max(1, math.ceil(len(bss) / cols))
    left_margin, right_margin, gap_x, gap_y = 72.0, 16.0, 34.0, 62.0

    parts_head: list[str] = []
    legend_bottom = _legend_row(parts_head, variants, 2, 70, width - 4)
    top = legend_bottom + 14
    height = top + rows * panel_height + (rows - 1) * gap_y + 52
    panel_w = (width - left_margin - right_margin - (cols - 1) * gap_x) / cols
    axes = _curve_axes(curves, percent)

    description = (
        "Training curves per batch size: for each variant the mean across seeds as a line and the spread "
        "across seeds as a shaded band."
    )
    parts = _svg_open("curves", width, height, title, description)
    _heading(parts, title, subtitle, 2)
    parts.extend(parts_head)
    for idx, b in enumerate(bss):
        r, c = divmod(idx, cols)
        left, panel_top = left_margin + c * (panel_w + gap_x), top + r * (panel_height + gap_y)
        frame = Frame(left, panel_top, panel_w, panel_height - 28, axes.x0, axes.x1, axes.y0, axes.y1)
        labels = (y_label if c == 0 else None, x_label)
        _curves_panel(parts, frame, idx, b, variants, curves, axes, labels)
    parts.append("</svg>")
    return "\n".join(parts)


@dataclass(frozen=True)
class _CurveAxes:
    """The data range every panel of a curves chart shares, and its ticks."""

    x0: float
    x1: float
    xticks: list[float]
    y0: float
    y1: float
    yticks: list[float]

    @property
    def xstep(self) -> float:
        return self.xticks[1] - self.xticks[0] if len(self.xticks) > 1 else 1.0

    @property
    def ystep(self) -> float:
        return self.yticks[1] - self.yticks[0] if len(self.yticks) > 1 else 1.0


def _curve_axes(curves: Mapping[tuple[str, int], Sequence[BandPoint]], percent: bool) -> _CurveAxes:
    ys = [
        v
        for pts in curves.values()
        for p in pts
        for v in (p.mean, p.lower, p.upper)
        if v is not None and math.isfinite(v)
    ]
    xs = [p.x for pts in curves.values() for p in pts if math.isfinite(p.x)]
    ylo, yhi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    ypad = 0.04 * max(yhi - ylo, 1e-9)
    if percent:  # accuracy lives in 0..100; a ±std band may poke past it and is clipped
        y0, y1, yticks = clamp_ticks(*nice_ticks(max(ylo - ypad, 0.0), min(yhi + ypad, 100.0), 5), 0.0, 100.0)
    else:
        y0, y1, yticks = nice_ticks(ylo - ypad, yhi + ypad, 5)
    x0, x1, xticks = nice_ticks(min([0.0, *xs]), max(xs) if xs else 1.0, 5)
    return _CurveAxes(x0, x1, xticks, y0, y1, yticks)


def _curves_panel(
    parts: list[str],
    frame: Frame,
    idx: int,
    b: int,
    variants: Sequence[str],
    curves: Mapping[tuple[str, int], Sequence[BandPoint]],
    axes: _CurveAxes,
    labels: tuple[str | None, str],
) -> None:
    """The panel of one batch size: its axes, then a band and a mean line per variant, clipped to the frame."""
    y_label, x_label = labels
    clip = f"clip-curves-{idx}"
    parts.append(f'<g class="panel" data-batch-size="{b}">')
    parts.append(
        f'<clipPath id="{clip}"><rect x="{_f(frame.left)}" y="{_f(frame.top)}" '
        f'width="{_f(frame.width)}" height="{_f(frame.height)}"/></clipPath>'
    )
    parts.append(_text(frame.left, frame.top - 10, f"batch size {b}", size=13, weight="bold"))
    _y_axis(parts, frame, axes.yticks, axes.ystep, y_label, grid=True)
    _x_axis_line(parts, frame)
    for t in axes.xticks:
        x = frame.px(t)
        parts.append(
            f'<line x1="{_f(x)}" y1="{_f(frame.bottom)}" x2="{_f(x)}" y2="{_f(frame.bottom + 4)}" stroke="{AXIS}"/>'
        )
        parts.append(_text(x, frame.bottom + 17, tick_label(t, axes.xstep), size=11, anchor="middle", fill=MUTED))
    parts.append(_text(frame.left + frame.width / 2, frame.bottom + 36, x_label, size=12, anchor="middle"))
    drawn = 0
    for i, v in enumerate(variants):
        pts = [p for p in curves.get((v, b), ()) if math.isfinite(p.mean) and math.isfinite(p.x)]
        if pts:
            drawn += 1
            _curve_series(parts, frame, clip, v, b, variant_style(i), pts)
    if not drawn:
        empty_note(parts, frame, "no points yet")
    parts.append("</g>")


def _curve_series(
    parts: list[str], frame: Frame, clip: str, v: str, b: int, style: VariantStyle, pts: Sequence[BandPoint]
) -> None:
    parts.append(
        f'<g class="series" data-series="{_attr(v)}" data-batch-size="{b}" data-colour="{style.colour}" '
        f'clip-path="url(#{clip})">'
    )
    parts.append(f"<title>{escape(f'{v} at batch {b}')}</title>")
    for run in _band_runs(pts):
        upper = " L".join(f"{_f(frame.px(p.x))} {_f(frame.py(p.mean if p.upper is None else p.upper))}" for p in run)
        lower = " L".join(
            f"{_f(frame.px(p.x))} {_f(frame.py(p.mean if p.lower is None else p.lower))}" for p in reversed(run)
        )
        parts.append(
            f'<path class="band" d="M{upper} L{lower} Z" fill="{style.colour}" fill-opacity="0.16" stroke="none"/>'
        )
    dash = f' stroke-dasharray="{style.dash}"' if style.dash else ""
    if len(pts) == 1:
        parts.append(marker(style.marker, frame.px(pts[0].x), frame.py(pts[0].mean), 3.5, style.colour))
    else:
        d = "M" + " L".join(f"{_f(frame.px(p.x))} {_f(frame.py(p.mean))}" for p in pts)
        parts.append(
            f'<path class="mean" d="{d}" fill="none" stroke="{style.colour}" stroke-width="2" '
            f'stroke-linejoin="round"{dash}/>'
        )
    parts.append("</g>")


def _band_runs(points: Sequence[BandPoint]) -> list[list[BandPoint]]:
    """Stretches of consecutive points that have a band (a single seed has none)."""
    runs: list[list[BandPoint]] = [[]]
    for p in points:
        if p.lower is not None and p.upper is not None:
            runs[-1].append(p)
        elif runs[-1]:
            runs.append([])
    return [r for r in runs if len(r) > 1]
