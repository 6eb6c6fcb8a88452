"""Pictures of a training run, drawn with PIL: the loss curve and the validation-image grid."""

from __future__ import annotations

import math

from PIL import Image, ImageDraw, ImageFont

__all__ = ["loss_plot", "validation_grid", "smoothed"]

_GRID_CELL_MAX = 256  # validation images are shown at most this many pixels a side


def smoothed(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard's smoothing: a debiased exponential moving average (non-finite values skipped)."""
    out, avg, n = [], 0.0, 0
    for v in values:
        if math.isfinite(v):
            avg, n = weight * avg + (1 - weight) * v, n + 1
        out.append(avg / (1 - weight ** n) if n else float("nan"))
    return out


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def loss_plot(losses: list[float], title: str = "", size: tuple[int, int] = (800, 400)) -> Image.Image:
    """The loss of every optimizer step (light) and its smoothed curve (dark) against the step,
    with labelled axes. Non-finite losses leave gaps."""
    if not losses:
        raise ValueError("loss_plot: no losses to draw")
    width, height = size
    left, right, top, bottom = 70, 20, 34, 40
    font = ImageFont.load_default()
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    finite = [v for v in losses if math.isfinite(v)]
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5 * (abs(lo) or 1), hi + 0.5 * (abs(hi) or 1)
    pad = 0.05 * (hi - lo)
    lo, hi = lo - pad, hi + pad
    n = len(losses)
    plot_w, plot_h = width - left - right, height - top - bottom

    def xy(i: int, v: float) -> tuple[float, float]:
        x = left + (plot_w * (i / (n - 1)) if n > 1 else plot_w / 2)
        return x, top + plot_h * (hi - v) / (hi - lo)

    for tick in _nice_ticks(lo, hi):
        _, y = xy(0, tick)
        draw.line([(left, y), (width - right, y)], fill=(232, 232, 232))
        draw.text((4, y - 6), f"{tick:.4g}", fill="black", font=font)
    for tick in _nice_ticks(1, n, 6):
        step = int(round(tick))
        if 1 <= step <= n:
            x, _ = xy(step - 1, lo)
            draw.line([(x, top + plot_h), (x, top + plot_h + 4)], fill="black")
            draw.text((x - 3 * len(str(step)), top + plot_h + 6), str(step), fill="black", font=font)
    draw.rectangle([left, top, width - right, top + plot_h], outline="black")

    for series, color, line_width in ((losses, (160, 190, 230), 1), (smoothed(losses), (20, 60, 160), 2)):
        run: list[tuple[float, float]] = []
        for i, v in enumerate(series + [float("nan")]):
            if math.isfinite(v):
                run.append(xy(i, v))
                continue
            if len(run) > 1:
                draw.line(run, fill=color, width=line_width)
            elif len(run) == 1:
                x, y = run[0]
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
            run = []
    last = f"last {losses[-1]:.4g}, smoothed {smoothed(losses)[-1]:.4g}" if finite else "no finite loss"
    draw.text((left, 10), f"{title + ': ' if title else ''}loss per step ({n} steps; {last})", fill="black", font=font)
    draw.text((left + plot_w // 2 - 12, height - 14), "step", fill="black", font=font)
    return image


def validation_grid(rows: list[tuple[int, list[Image.Image | None]]], prompts: list[str], title: str = "") -> Image.Image:
    """Validation images: one row per step ``(step, [image of prompt 0, ...])``, one column per
    prompt, so a prompt's images read down its column as training goes on."""
    from rayimg.demo.contact_sheet import contact_sheet

    if not rows:
        raise ValueError("validation_grid: no validation images")
    side = max((im.width for _, ims in rows for im in ims if im is not None), default=64)
    cell = min(_GRID_CELL_MAX, max(128, side))  # small renders are scaled up (nearest), large ones down (Lanczos)
    grid = [[im.convert("RGB").resize((cell, cell), Image.LANCZOS) if im is not None and im.width > cell else im
             for im in ims] for _, ims in rows]
    return contact_sheet(grid, [f"step {step}" for step, _ in rows], prompts, cell=cell, title=title)
