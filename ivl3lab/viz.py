"""Pictures of the input pipeline (matplotlib): how an image becomes tiles, patches and LLM tokens.

Only processing objects are needed (an image, its TileLayout, pixel_values): no model.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .processing.images import IMAGENET_MEAN, IMAGENET_STD, TileLayout


def denormalize(pixel_values: torch.Tensor) -> np.ndarray:
    """[T, 3, S, S] normalised tiles -> [T, S, S, 3] floats in 0..1 for imshow."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    x = pixel_values.detach().float().cpu() * std + mean
    return x.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def show_tiles(image, layout: TileLayout, pixel_values: torch.Tensor, patch_size: Optional[int] = None):
    """Left: the original image with the tile grid drawn on it. Right: the tiles as the ViT sees them, in
    their grid places, and the thumbnail. With `patch_size`, tile 0 also shows its ViT patches and the 2x2
    groups that pixel-unshuffle merges into one LLM token. Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    tiles = denormalize(pixel_values)
    extra = int(layout.has_thumbnail)
    fig = plt.figure(figsize=(4 + 2 * (layout.cols + extra), 3.2 + 0.3 * layout.rows))
    grid = fig.add_gridspec(layout.rows, layout.cols + extra + 2)
    ax = fig.add_subplot(grid[:, :2])
    ax.imshow(np.asarray(image))
    for k in range(layout.cols * layout.rows):
        left, top, right, bottom = layout.tile_box(k)
        ax.add_patch(Rectangle((left, top), right - left, bottom - top, fill=False, color="yellow", lw=1.5))
        ax.text((left + right) / 2, (top + bottom) / 2, str(k), color="yellow", ha="center", va="center", fontsize=14)
    ax.set_title(f"original {layout.image_width}x{layout.image_height}\n-> {layout.cols}x{layout.rows} grid")
    ax.axis("off")
    for k in range(layout.cols * layout.rows):
        tile_ax = fig.add_subplot(grid[k // layout.cols, 2 + k % layout.cols])
        tile_ax.imshow(tiles[k])
        tile_ax.set_title(f"tile {k}", fontsize=9)
        tile_ax.axis("off")
        if patch_size and k == 0:
            _draw_patches(tile_ax, layout.tile_size, patch_size)
    if layout.has_thumbnail:
        thumb_ax = fig.add_subplot(grid[0, 2 + layout.cols])
        thumb_ax.imshow(tiles[-1])
        thumb_ax.set_title(f"tile {layout.num_tiles - 1}\n(thumbnail)", fontsize=9)
        thumb_ax.axis("off")
    fig.tight_layout()
    return fig


def _draw_patches(ax, tile_size: int, patch_size: int) -> None:
    """Thin lines every ViT patch, thick lines every 2x2 group (= one LLM token after pixel-unshuffle)."""
    for edge in range(0, tile_size + 1, patch_size):
        thick = (edge // patch_size) % 2 == 0
        ax.axhline(edge - 0.5, color="white", lw=0.9 if thick else 0.2)
        ax.axvline(edge - 0.5, color="white", lw=0.9 if thick else 0.2)
