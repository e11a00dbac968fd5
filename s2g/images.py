"""Image grids and PNGs, the one place every script and experiment makes them: `image_grid` tiles images (as
torchvision's make_grid, `tiles`), `save_png` writes a [C, H, W] image in [0, 1], optionally with a label strip: row labels
left of the rows, wrapped to about one tile's width, and column labels above the columns.
"""
from __future__ import annotations

import torch

HEADER = 16  # px: the column-label strip above the grid
LINE = 12  # px: one line of the default font


def image_grid(images: torch.Tensor, rows: int, cols: int, pad: int = 2, scale: int = 1,
               pad_value: float = 0.5) -> torch.Tensor:
    """[rows*cols, C, H, W] (row-major) -> one [C, rows*(H+pad)+pad, cols*(W+pad)+pad] image, each tile upscaled by
    `scale` (nearest), `pad` pixels of `pad_value` around and between the tiles."""
    if images.shape[0] != rows * cols:
        raise ValueError(f"{images.shape[0]} images do not fill a {rows}x{cols} grid")
    if scale > 1:
        images = images.repeat_interleave(scale, -2).repeat_interleave(scale, -1)
    if images.shape[0] == 1:  # make_grid returns a single image unpadded
        return torch.nn.functional.pad(images[0], (pad,) * 4, value=pad_value)
    return tiles(images, cols, pad, pad_value)


def tiles(images: torch.Tensor, cols: int, pad: int = 2, pad_value: float = 0.5) -> torch.Tensor:
    """torchvision.utils.make_grid(images, nrow=cols, padding=pad, pad_value=pad_value), the same pixels (one
    channel becomes three; a single image comes back as it is), without importing torchvision: that import costs
    about 2 s at every entry point that writes a grid."""
    if images.dim() == 4 and images.shape[1] == 1:
        images = torch.cat((images, images, images), 1)
    if images.shape[0] == 1:
        return images[0]
    n, c, h, w = images.shape
    cols = min(int(cols), n)
    rows = -(-n // cols)
    grid = images.new_full((c, rows * (h + pad) + pad, cols * (w + pad) + pad), pad_value)
    for i, image in enumerate(images):
        y, x = divmod(i, cols)
        grid[:, y * (h + pad) + pad:y * (h + pad) + pad + h, x * (w + pad) + pad:x * (w + pad) + pad + w] = image
    return grid


def _wrap(draw, text: str, width: int) -> list[str]:
    """`text` in lines no wider than `width` pixels (a word longer than that gets a line of its own)."""
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def _label_width(draw, labels: list[str], tile: int) -> int:
    """The narrowest strip, from one tile's width up, in which every label wraps into its row's height."""
    longest = max((draw.textlength(s) for s in labels), default=0)
    width = max(8, min(tile, int(longest) + 1))
    while width < longest and any(len(_wrap(draw, s, width)) * LINE > tile for s in labels):
        width += 8
    return width


def save_png(image: torch.Tensor, path, row_labels=None, col_labels=None, tile: int | None = None,
             pad: int = 2) -> None:
    """Save a [C, H, W] image in [0, 1] as PNG; with labels, a strip left of the rows (`row_labels`, one per row of
    `tile`-pixel tiles) and one above the columns (`col_labels`)."""
    from PIL import Image, ImageDraw

    arr = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(arr)
    if row_labels or col_labels:
        tile = tile or img.height
        measure = ImageDraw.Draw(img)
        width = _label_width(measure, list(row_labels or []), tile)
        rows = [_wrap(measure, s, width) for s in row_labels or []]
        left = width + 8 if row_labels else 0
        top = HEADER if col_labels else 0
        canvas = Image.new("RGB", (img.width + left, img.height + top), (255, 255, 255))
        canvas.paste(img, (left, top))
        draw = ImageDraw.Draw(canvas)
        for i, lines in enumerate(rows):
            y = top + pad + i * (tile + pad) + (tile - LINE * len(lines)) // 2
            for k, line in enumerate(lines):
                draw.text((4, y + k * LINE), line, fill=(0, 0, 0))
        for j, s in enumerate(col_labels or []):
            draw.text((left + pad + j * (tile + pad) + 2, 2), s, fill=(0, 0, 0))
        img = canvas
    img.save(path)
