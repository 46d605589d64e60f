"""Pictures of per-image-token scores: heatmaps over the original image with the tiles stitched back in
place and the thumbnail beside it. Any score works: attention, ablation effect, attribution, lens probability.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .tokenmap import TokenMap


def image_score_maps(token_map: TokenMap, scores, image: int = 0) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Scores in token order ([n_image_tokens] over the whole sample) -> (grid map [rows*side, cols*side] with
    every grid tile in its place, thumbnail map [side, side] or None)."""
    scores = torch.as_tensor(scores, dtype=torch.float32).detach().cpu().flatten()
    if len(scores) != len(token_map):
        raise ValueError(f"got {len(scores)} scores for {len(token_map)} image tokens")
    layout, side = token_map.layouts[image], token_map.side
    grid = np.zeros((layout.rows * side, layout.cols * side), dtype=np.float32)
    thumb = np.zeros((side, side), dtype=np.float32) if layout.has_thumbnail else None
    for score, token in zip(scores.tolist(), token_map.tokens):
        if token.image != image:
            continue
        if token.thumbnail:
            thumb[token.row, token.col] = score
        else:
            r, c = divmod(token.tile, layout.cols)
            grid[r * side + token.row, c * side + token.col] = score
    return grid, thumb


def plot_image_scores(picture, token_map: TokenMap, scores, image: int = 0, title: str = "", cmap: str = "magma",
                      alpha: float = 0.6, axes=None, colorbar: bool = True):
    """Heatmap of per-token scores over the original image (tiles stitched), thumbnail's map beside it.

    `picture` is the original PIL image (or an array); returns the matplotlib figure.
    """
    import matplotlib.pyplot as plt

    grid, thumb = image_score_maps(token_map, scores, image)
    layout = token_map.layouts[image]
    w, h = layout.image_width, layout.image_height
    vmin, vmax = _limits(grid, thumb)
    if axes is None:
        ncols = 2 if thumb is not None else 1
        fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 0.5 + 5 * h / w), squeeze=False,
                                 gridspec_kw={"width_ratios": [1] * ncols})
        axes = axes[0]
    fig = axes[0].figure
    axes[0].imshow(np.asarray(picture), extent=(0, w, h, 0))
    shown = axes[0].imshow(grid, extent=(0, w, h, 0), cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax,
                           interpolation="nearest")
    for col in range(1, layout.cols):
        axes[0].axvline(col * w / layout.cols, color="white", lw=0.8, ls="--")
    for row in range(1, layout.rows):
        axes[0].axhline(row * h / layout.rows, color="white", lw=0.8, ls="--")
    axes[0].set_title(title or f"{layout.cols}x{layout.rows} tiles")
    axes[0].axis("off")
    if thumb is not None and len(axes) > 1:
        axes[1].imshow(np.asarray(picture), extent=(0, w, h, 0))
        axes[1].imshow(thumb, extent=(0, w, h, 0), cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax,
                       interpolation="nearest")
        axes[1].set_title("thumbnail tile")
        axes[1].axis("off")
    if colorbar:
        fig.colorbar(shown, ax=list(axes), shrink=0.8)
    return fig


def _limits(grid: np.ndarray, thumb: Optional[np.ndarray]) -> tuple[float, float]:
    values = grid if thumb is None else np.concatenate([grid.ravel(), thumb.ravel()])
    lo, hi = float(values.min()), float(values.max())
    if lo < 0 < hi:  # signed scores (ablation effects, attributions): symmetric around 0
        bound = max(-lo, hi)
        return -bound, bound
    return lo, hi if hi > lo else lo + 1e-12
