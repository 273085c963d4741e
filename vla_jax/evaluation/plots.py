"""PNG line plots of predicted vs recorded action trajectories, drawn with PIL (no matplotlib).

One figure per episode: a grid with one panel per action dimension, time on x, the recorded
action (blue) and the prediction (orange) on y, each panel with its own y-range.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

DIM_NAMES_7D = ("x", "y", "z", "roll", "pitch", "yaw", "gripper")
TRUE_COLOR, PRED_COLOR = (31, 119, 180), (255, 127, 14)
PANEL_W, PANEL_H, MARGIN_L, MARGIN_B, TITLE_H = 300, 190, 62, 26, 44


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"


def _panel(draw, font, x0: int, y0: int, name: str, true: np.ndarray, pred: np.ndarray) -> None:
    """Draws one dimension's panel with its top-left corner at (x0, y0)."""
    left, top = x0 + MARGIN_L, y0 + 22
    right, bottom = x0 + PANEL_W - 10, y0 + PANEL_H - MARGIN_B
    lo = float(min(np.min(true), np.min(pred)))
    hi = float(max(np.max(true), np.max(pred)))
    if not math.isfinite(lo + hi):
        lo, hi = -1.0, 1.0
    # A near-constant series (e.g. a gripper at 0.996 vs 1.0) should look flat, not span the panel.
    span = max(1e-9, 0.05 * max(abs(lo), abs(hi)))
    if hi - lo < span:
        mid = 0.5 * (lo + hi)
        lo, hi = mid - span / 2, mid + span / 2
    pad = 0.08 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    t = len(true)

    def xy(i, v):
        x = left + (right - left) * (i / max(t - 1, 1))
        y = bottom - (bottom - top) * ((v - lo) / (hi - lo))
        return (x, y)

    draw.text((x0 + MARGIN_L, y0 + 4), name, fill=(0, 0, 0), font=font)
    draw.rectangle([left, top, right, bottom], outline=(90, 90, 90))
    if lo < 0 < hi:  # the zero line helps read relative actions
        zy = xy(0, 0.0)[1]
        draw.line([(left, zy), (right, zy)], fill=(215, 215, 215))
    for frac in (0.0, 0.5, 1.0):
        v = lo + pad + frac * (hi - lo - 2 * pad)
        y = xy(0, v)[1]
        draw.line([(left - 4, y), (left, y)], fill=(90, 90, 90))
        draw.text((x0 + 2, y - 6), _fmt(v), fill=(60, 60, 60), font=font)
    for i in range(t):
        if t <= 20 or i % max(1, t // 10) == 0 or i == t - 1:
            x = xy(i, lo)[0]
            draw.line([(x, bottom), (x, bottom + 3)], fill=(90, 90, 90))
            draw.text((x - 4, bottom + 5), str(i), fill=(60, 60, 60), font=font)
    for series, color in ((true, TRUE_COLOR), (pred, PRED_COLOR)):
        pts = [xy(i, float(v)) for i, v in enumerate(series)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for (px, py) in pts:
            draw.ellipse([px - 2.5, py - 2.5, px + 2.5, py + 2.5], fill=color)


def plot_trajectory(true: np.ndarray, pred: np.ndarray, path: str, title: str = "",
                    dim_names: Optional[Sequence[str]] = None, columns: int = 4) -> str:
    """true, pred: [T, D] actions (same units) -> PNG at `path`. Returns `path`."""
    from PIL import Image, ImageDraw, ImageFont

    true, pred = np.asarray(true, np.float64), np.asarray(pred, np.float64)
    if true.shape != pred.shape or true.ndim != 2 or true.shape[0] == 0:
        raise ValueError(f"true and pred must both be [T, D] with T > 0, got {true.shape} and {pred.shape}")
    d = true.shape[1]
    names = list(dim_names) if dim_names is not None else (list(DIM_NAMES_7D) if d == 7 else [f"dim {i}" for i in range(d)])
    cols = min(columns, d)
    rows = -(-d // cols)
    img = Image.new("RGB", (cols * PANEL_W, TITLE_H + rows * PANEL_H), "white")
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text((10, 6), title, fill=(0, 0, 0), font=font)
    lx = 10
    for label, color in (("recorded", TRUE_COLOR), ("predicted", PRED_COLOR)):
        draw.line([(lx, 30), (lx + 24, 30)], fill=color, width=3)
        draw.text((lx + 30, 24), label, fill=(0, 0, 0), font=font)
        lx += 120
    for k in range(d):
        r, c = divmod(k, cols)
        _panel(draw, font, c * PANEL_W, TITLE_H + r * PANEL_H, names[k], true[:, k], pred[:, k])
    img.save(path, format="PNG")
    return path
