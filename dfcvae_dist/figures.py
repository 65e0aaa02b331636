"""Figures that read without the code: faces on a grid, upscaled by a whole nearest-neighbour factor to at least
MIN_FACE_PX so that their pixels stay visible and honest, under a title, with labelled rows and columns, and a
caption or a colour legend below where the picture needs one. One module draws the latent-space studies
(evaluation/studies.py), the sweep report's figures (sweeps/figures.py) and the run page's image panels
(training/run_page.py).

A grid's `layout` says where every face is (`cell_box`); a saved grid keeps it in its PNG (`read_layout`), so
that the report, the tests and any reader can find the faces."""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import make_grid

MIN_FACE_PX = 128
PADDING_PX = 2
MARGIN_PX = 8
FONT_PX = 16
TITLE_FONT_PX = 18
SWATCH_PX = 14


@functools.lru_cache(maxsize=None)
def font(size: int = FONT_PX) -> ImageFont.FreeTypeFont:
    """DejaVu Sans (shipped with matplotlib: it has α, →, − and subscripts); Pillow's own font where it is missing."""
    import matplotlib

    path = Path(matplotlib.get_data_path(), "fonts", "ttf", "DejaVuSans.ttf")
    return ImageFont.truetype(str(path), size) if path.is_file() else ImageFont.load_default(size=size)


def upscale(images: torch.Tensor, min_px: int = MIN_FACE_PX) -> torch.Tensor:
    """(N, 3, h, w) in [0, 1], enlarged by the smallest whole factor that makes them at least `min_px` high."""
    images = images.detach().float().cpu().clamp(0, 1)
    factor = -(-min_px // images.shape[-2])
    return F.interpolate(images, scale_factor=factor, mode="nearest") if factor > 1 else images


def to_bytes(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] floats as rounded 8-bit values (as torchvision's save_image writes them; to_pil_image truncates)."""
    return (images * 255 + 0.5).clamp(0, 255).to(torch.uint8)


def text_size(text: str, size: int = FONT_PX) -> tuple[int, int]:
    """Width and height in pixels of `text` (lines split at newlines)."""
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (1, 1))).multiline_textbbox((0, 0), text, font(size))
    return int(right - min(left, 0)) + 1, int(bottom) + 1


def wrap(text: str, width_px: int, size: int = FONT_PX) -> str:
    """`text` with newlines where it would run past `width_px` (existing newlines kept)."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and font(size).getlength(candidate) > width_px:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return "\n".join(lines)


def face_grid(rows: Sequence[tuple[str, torch.Tensor]], column_labels: Sequence[str] = ()) -> tuple[Image.Image, dict]:
    """Rows of faces ((N, 3, h, w) in [0, 1], N equal) upscaled, each row labelled on its left, the columns
    labelled above; the picture and its layout."""
    enlarged = [upscale(images) for _, images in rows]
    cell = max(images.shape[-2] for images in enlarged)  # rows of models of different image sizes: one cell size
    faces = torch.cat([images if images.shape[-2] == cell else F.interpolate(images, size=(cell, cell), mode="nearest")
                       for images in enlarged])
    columns = len(rows[0][1])
    grid = to_pil_image(to_bytes(make_grid(faces, nrow=columns, padding=PADDING_PX, pad_value=1.0)))
    labels = [label for label, _ in rows]
    label_px = max(text_size(label)[0] for label in labels) + 2 * MARGIN_PX if any(labels) else 0
    header_px = max(text_size(label)[1] for label in column_labels) + 2 * PADDING_PX if column_labels else 0
    picture = Image.new("RGB", (label_px + grid.width, header_px + grid.height), "white")
    picture.paste(grid, (label_px, header_px))
    draw = ImageDraw.Draw(picture)
    step = cell + PADDING_PX
    for i, label in enumerate(labels):
        height = text_size(label)[1]
        draw.multiline_text((MARGIN_PX, header_px + PADDING_PX + i * step + (cell - height) // 2), label,
                            fill="black", font=font())
    for j, label in enumerate(column_labels):
        draw.text((label_px + PADDING_PX + j * step + cell // 2, header_px // 2), label, fill="black", font=font(),
                  anchor="mm")
    layout = {"rows": labels, "columns": columns, "column_labels": list(column_labels), "cell_px": cell,
              "padding_px": PADDING_PX, "label_px": label_px, "top_px": header_px}
    return picture, layout


def titled(picture: Image.Image, title: str, caption: str = "",
           legend: Sequence[tuple[str, str]] = ()) -> tuple[Image.Image, int]:
    """`picture` under `title`, above a `legend` (label, colour) and a `caption`; the result and the height
    added above the picture."""
    width = max(picture.width, 480)
    title = wrap(title, width - 2 * MARGIN_PX, TITLE_FONT_PX)
    caption = wrap(caption, width - 2 * MARGIN_PX) if caption else ""
    title_px = text_size(title, TITLE_FONT_PX)[1] + 2 * MARGIN_PX
    legend_px = SWATCH_PX + MARGIN_PX if legend else 0
    caption_px = text_size(caption)[1] + MARGIN_PX if caption else 0
    bottom_px = legend_px + caption_px + (MARGIN_PX if legend or caption else 0)
    canvas = Image.new("RGB", (width, title_px + picture.height + bottom_px), "white")
    canvas.paste(picture, (0, title_px))
    draw = ImageDraw.Draw(canvas)
    draw.multiline_text((MARGIN_PX, MARGIN_PX), title, fill="black", font=font(TITLE_FONT_PX))
    y, x = title_px + picture.height + MARGIN_PX, MARGIN_PX
    for label, colour in legend:
        draw.rectangle((x, y, x + SWATCH_PX, y + SWATCH_PX), fill=colour, outline="black")
        draw.text((x + SWATCH_PX + 6, y + SWATCH_PX // 2), label, fill="black", font=font(), anchor="lm")
        x += SWATCH_PX + 6 + int(font().getlength(label)) + 3 * MARGIN_PX
    if caption:
        draw.multiline_text((MARGIN_PX, y + legend_px), caption, fill="black", font=font())
    return canvas, title_px


@dataclass
class Figure:
    picture: Image.Image
    layout: dict

    def save(self, path: Path) -> dict:
        """Write the PNG, its layout in the PNG's text chunk `layout` (JSON); the layout with the file's name."""
        info = PngInfo()
        info.add_text("layout", json.dumps(self.layout))
        self.picture.save(path, pnginfo=info)
        return {"file": Path(path).name, **self.layout}


def labelled_grid(rows: Sequence[tuple[str, torch.Tensor]], title: str = "", column_labels: Sequence[str] = (),
                  caption: str = "", legend: Sequence[tuple[str, str]] = ()) -> Figure:
    """Rows of faces, each labelled on its left (an empty label: none), under a title, with optional column
    labels, colour legend and caption."""
    picture, layout = face_grid(rows, column_labels)
    if title or caption or legend:
        picture, title_px = titled(picture, title, caption, legend)
        layout["top_px"] += title_px
    return Figure(picture, {"title": title, **layout, "size": list(picture.size)})


def cell_box(layout: dict, row: int, column: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the face at `row`, `column` of a grid with this layout."""
    step = layout["cell_px"] + layout["padding_px"]
    left = layout["label_px"] + layout["padding_px"] + column * step
    top = layout["top_px"] + layout["padding_px"] + row * step
    return left, top, left + layout["cell_px"], top + layout["cell_px"]


def read_layout(path: Path) -> dict:
    """The layout a grid saved with `Figure.save` keeps in its PNG."""
    with Image.open(path) as picture:
        return json.loads(picture.text["layout"])
