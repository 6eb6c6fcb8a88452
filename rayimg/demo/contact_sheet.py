"""A contact sheet: pictures in a labelled grid (row labels on the left, column headers on top,
an optional caption under each picture), upscaled with nearest-neighbour so small renders stay crisp."""

from __future__ import annotations

from PIL import Image, ImageDraw, ImageFont

__all__ = ["contact_sheet"]

_PAD = 6
_LINE = 12  # pixel height of one text line of PIL's default font


def _wrap(text: str, width_chars: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width_chars:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


def contact_sheet(
    grid: list[list[Image.Image | None]],
    row_labels: list[str],
    column_labels: list[str],
    captions: list[list[str]] | None = None,
    *,
    cell: int = 128,
    title: str = "",
) -> Image.Image:
    """``grid[r][c]`` (None leaves a cell empty) labelled by ``row_labels[r]`` and ``column_labels[c]``;
    ``captions[r][c]`` is written under the picture."""
    if len(grid) != len(row_labels):
        raise ValueError(f"contact_sheet: {len(grid)} rows but {len(row_labels)} row labels")
    columns = len(column_labels)
    if any(len(row) != columns for row in grid):
        raise ValueError(f"contact_sheet: every row needs {columns} pictures (one per column label)")
    font = ImageFont.load_default()
    label_chars = 26
    label_width = label_chars * 6 + 2 * _PAD
    head_lines = max((len(_wrap(c, cell // 6)) for c in column_labels), default=1)
    caption_lines = 1 if captions else 0
    title_height = (_LINE + _PAD) if title else 0
    top = title_height + head_lines * _LINE + _PAD
    row_height = cell + caption_lines * _LINE + _PAD
    sheet = Image.new("RGB", (label_width + columns * (cell + _PAD) + _PAD, top + len(grid) * row_height + _PAD), "white")
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((_PAD, _PAD // 2), title, fill="black", font=font)
    for c, label in enumerate(column_labels):
        for i, line in enumerate(_wrap(label, cell // 6)):
            draw.text((label_width + c * (cell + _PAD), title_height + i * _LINE), line, fill="black", font=font)
    for r, (row, label) in enumerate(zip(grid, row_labels)):
        y = top + r * row_height
        for i, line in enumerate(_wrap(label, label_chars)[: cell // _LINE]):
            draw.text((_PAD, y + i * _LINE), line, fill="black", font=font)
        for c, image in enumerate(row):
            x = label_width + c * (cell + _PAD)
            if image is not None:
                sheet.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
            else:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], outline=(200, 200, 200))
            if captions:
                draw.text((x, y + cell + 1), captions[r][c][: cell // 6], fill=(60, 60, 60), font=font)
    return sheet
