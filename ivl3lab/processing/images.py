"""Image side of the InternVL3 input pipeline: load -> RGB -> dynamic tiles -> normalised tensor.

Follows the original `load_image` / `dynamic_preprocess` / `build_transform` of OpenGVLab/InternVL
(spec §3.1-3.2) step by step, so pixel values match the reference code (and transformers'
`GotOcr2ImageProcessorPil`) to float precision. `TileLayout` records where every tile came from so
later tools (attribution, attention maps) can map visual tokens back to boxes in the original image.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageSource = Union[Image.Image, str, Path, bytes, bytearray]


# ---------------------------------------------------------------------------------------------------------
# Loading


def _to_8bit(image: Image.Image) -> Image.Image:
    """Rescale a 16/32-bit image to mode L; PIL's own convert('RGB') would clip everything above 255."""
    values = np.asarray(image)
    if image.mode.startswith("I;16"):
        scaled = values.astype(np.float64) / 257.0  # 65535 -> 255 exactly
    else:  # "I" (int32) or "F" (float32): no fixed range, so stretch min..max to 0..255
        values = values.astype(np.float64)
        lo, hi = float(values.min()), float(values.max())
        scaled = (values - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(values)  # constant -> black
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. 8-bit modes use `convert('RGB')` exactly like the original code (alpha is dropped,
    not composited); high-bit-depth modes are rescaled to 8 bits first instead of being clipped."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        image = _to_8bit(image)
    return image.convert("RGB")


def _open(src: ImageSource) -> Image.Image:
    if isinstance(src, (bytes, bytearray)):
        return Image.open(io.BytesIO(bytes(src)))
    if isinstance(src, (str, Path)):
        return Image.open(src)
    raise TypeError(f"expected a PIL image, a path or bytes, got {type(src).__name__}")


def _describe(src: ImageSource) -> str:
    return f"<{len(src)} bytes>" if isinstance(src, (bytes, bytearray)) else repr(str(src))


def load_image(src: ImageSource) -> Image.Image:
    """Open a PIL image, path or bytes as RGB. Decoding is forced here (`load()`), so a corrupt or truncated
    file fails now with a `ValueError` naming the source, not deep inside the model later."""
    if isinstance(src, Image.Image):
        return to_rgb(src)
    try:
        image = _open(src)
        image.load()
        return to_rgb(image)
    except TypeError:
        raise
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError, ...
        raise ValueError(f"cannot read image {_describe(src)}: {err}") from err


# ---------------------------------------------------------------------------------------------------------
# Grid choice


def candidate_grids(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All (cols, rows) with min_num <= cols*rows <= max_num, ordered exactly like the original: a Python set
    sorted (stably) by tile count. The order inside equal-area groups decides exact ties, so keep the set."""
    grids = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_num <= i * j <= max_num
    )
    return sorted(grids, key=lambda x: x[0] * x[1])


def choose_grid(width: int, height: int, min_num: int, max_num: int, image_size: int) -> tuple[int, int]:
    """The original `find_closest_aspect_ratio`: the grid whose cols/rows is closest to the image aspect.
    On an exact tie a later (larger) grid wins while the image has more than half its canvas' pixels."""
    aspect = width / height
    area = width * height
    best_diff, best = float("inf"), (1, 1)
    for cols, rows in candidate_grids(min_num, max_num):
        diff = abs(aspect - cols / rows)
        if diff < best_diff:
            best_diff, best = diff, (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


# ---------------------------------------------------------------------------------------------------------
# Tiling


@dataclass(frozen=True)
class TileLayout:
    """How one image was cut: a cols x rows grid (row-major) plus, optionally, a thumbnail as the last tile."""

    cols: int
    rows: int
    has_thumbnail: bool
    image_width: int  # original image, before any resize
    image_height: int
    tile_size: int

    @property
    def num_tiles(self) -> int:
        return self.cols * self.rows + int(self.has_thumbnail)

    def tile_box(self, k: int) -> tuple[float, float, float, float]:
        """(left, top, right, bottom) of tile k in ORIGINAL-image pixels. The canvas was a plain (non
        aspect-preserving) resize, so each grid cell maps back to an equal 1/cols x 1/rows share."""
        if not 0 <= k < self.num_tiles:
            raise IndexError(f"tile {k} out of range for a layout with {self.num_tiles} tiles")
        if k == self.cols * self.rows:  # the thumbnail sees the whole image
            return (0.0, 0.0, float(self.image_width), float(self.image_height))
        col, row = k % self.cols, k // self.cols
        w, h = self.image_width / self.cols, self.image_height / self.rows
        return (col * w, row * h, (col + 1) * w, (row + 1) * h)


def dynamic_preprocess(
    image: Image.Image, min_num: int = 1, max_num: int = 12, image_size: int = 448, use_thumbnail: bool = True
) -> tuple[list[Image.Image], TileLayout]:
    """Resize the whole image (aspect NOT kept, no padding) onto a cols x rows canvas of image_size tiles and
    cut it row-major; append the original image squashed to one tile as a thumbnail when there are >1 tiles."""
    image = to_rgb(image)
    width, height = image.size
    cols, rows = choose_grid(width, height, min_num, max_num, image_size)
    canvas = image.resize((image_size * cols, image_size * rows), Image.BICUBIC)
    tiles = []
    for k in range(cols * rows):
        left, top = (k % cols) * image_size, (k // cols) * image_size
        tiles.append(canvas.crop((left, top, left + image_size, top + image_size)))
    has_thumbnail = use_thumbnail and cols * rows != 1
    if has_thumbnail:
        tiles.append(image.resize((image_size, image_size), Image.BICUBIC))  # from the original, not the canvas
    return tiles, TileLayout(cols, rows, has_thumbnail, width, height, image_size)


def tiles_to_tensor(
    tiles: Sequence[Image.Image],
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    size: int | None = None,
) -> torch.Tensor:
    """ToTensor + Normalize of the original transform, in float32 numpy. A tile that is not size x size
    (default: the first tile's width) is resized bicubic like the original Resize((S, S)); exact tiles are
    untouched, as in PIL, where a same-size resize is a copy."""
    if not tiles:
        raise ValueError("tiles_to_tensor needs at least one tile")
    size = size or tiles[0].size[0]
    mean_arr = np.asarray(mean, dtype=np.float32)
    std_arr = np.asarray(std, dtype=np.float32)
    arrays = []
    for tile in tiles:
        if tile.mode != "RGB":
            raise ValueError(f"tiles must be RGB, got mode {tile.mode!r} (use to_rgb first)")
        if tile.size != (size, size):
            tile = tile.resize((size, size), Image.BICUBIC)
        x = np.asarray(tile, dtype=np.float32) / np.float32(255.0)  # [S, S, 3] in 0..1
        arrays.append(((x - mean_arr) / std_arr).transpose(2, 0, 1))  # [3, S, S]
    return torch.from_numpy(np.ascontiguousarray(np.stack(arrays)))  # [T, 3, S, S]


def process_image(
    image: ImageSource, image_size: int = 448, min_num: int = 1, max_num: int = 12, use_thumbnail: bool = True
) -> tuple[torch.Tensor, TileLayout]:
    """One image (PIL, path or bytes) -> (pixel_values [T, 3, S, S], layout)."""
    tiles, layout = dynamic_preprocess(load_image(image), min_num, max_num, image_size, use_thumbnail)
    return tiles_to_tensor(tiles, size=image_size), layout
