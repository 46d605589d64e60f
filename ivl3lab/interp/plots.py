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


# ------------------------------------------------------------------------------- attention pictures
def plot_attention_grid(scores, token_map: TokenMap, picture=None, layers=None, heads=None, image: int = 0,
                        tile=None, cmap: str = "magma", alpha: float = 0.7, cell: float = 1.6):
    """Small multiples: one heatmap per (layer, head) of scores [layers, heads, n_image_tokens].

    Each cell shows the stitched grid tiles (tile=None), one tile (an index) or the thumbnail
    (tile="thumbnail"). One colour scale for all cells, so heads are comparable; one colourbar.
    Returns the figure (layers x heads cells + 1 colourbar axis).
    """
    import matplotlib.pyplot as plt

    scores = torch.as_tensor(scores, dtype=torch.float32)
    n_layers, n_heads = scores.shape[:2]
    layers = list(range(n_layers)) if layers is None else list(layers)
    heads = list(range(n_heads)) if heads is None else list(heads)
    layout = token_map.layouts[image]
    maps = [[_cell_map(token_map, scores[i, j], image, tile) for j in range(n_heads)] for i in range(n_layers)]
    values = np.stack([m for row in maps for m in row])
    vmin, vmax = _limits(values, None)
    w, h = layout.image_width, layout.image_height
    left, top, right, bottom = (0, 0, w, h) if tile in (None, "thumbnail") else layout.tile_box(int(tile))
    aspect = (bottom - top) / (right - left)
    fig, axes = plt.subplots(n_layers, n_heads, figsize=(cell * n_heads + 1, cell * aspect * n_layers + 0.6),
                             squeeze=False)
    for i in range(n_layers):
        for j in range(n_heads):
            ax = axes[i, j]
            if picture is not None:
                ax.imshow(np.asarray(picture), extent=(0, w, h, 0))
            shown = ax.imshow(maps[i][j], extent=(left, right, bottom, top), cmap=cmap, vmin=vmin, vmax=vmax,
                              alpha=alpha if picture is not None else 1.0, interpolation="nearest")
            ax.set_xlim(left, right), ax.set_ylim(bottom, top)
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(f"head {heads[j]}", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"layer {layers[i]}", fontsize=8)
    fig.colorbar(shown, ax=axes.ravel().tolist(), shrink=0.6)
    return fig


def _cell_map(token_map: TokenMap, scores, image: int, tile) -> np.ndarray:
    grid, thumb = image_score_maps(token_map, scores, image)
    if tile is None:
        return grid
    if tile == "thumbnail":
        if thumb is None:
            raise ValueError("this image has no thumbnail tile")
        return thumb
    return token_map.tile_grid(scores, image, int(tile)).numpy()


def plot_tile_maps(picture, layout, maps, title: str = "", cmap: str = "magma", alpha: float = 0.6,
                   colorbar: bool = True):
    """Per-tile maps [num_tiles, s, s] of ONE image at any resolution (e.g. ViT patches) over the picture:
    grid tiles stitched in place, the thumbnail's map beside it. Returns the figure."""
    import matplotlib.pyplot as plt

    maps = torch.as_tensor(maps, dtype=torch.float32).numpy()
    s = maps.shape[-1]
    grid = np.zeros((layout.rows * s, layout.cols * s), dtype=np.float32)
    for k in range(layout.rows * layout.cols):
        r, c = divmod(k, layout.cols)
        grid[r * s:(r + 1) * s, c * s:(c + 1) * s] = maps[k]
    thumb = maps[-1] if layout.has_thumbnail else None
    vmin, vmax = _limits(grid, thumb)
    w, h = layout.image_width, layout.image_height
    panels = [(grid, title or f"{layout.cols}x{layout.rows} tiles")]
    if thumb is not None:
        panels.append((thumb, "thumbnail tile"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.5 + 5 * h / w), squeeze=False)
    for ax, (values, name) in zip(axes[0], panels):
        ax.imshow(np.asarray(picture), extent=(0, w, h, 0))
        shown = ax.imshow(values, extent=(0, w, h, 0), cmap=cmap, alpha=alpha, vmin=vmin, vmax=vmax,
                          interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    for col in range(1, layout.cols):
        axes[0, 0].axvline(col * w / layout.cols, color="white", lw=0.8, ls="--")
    for row in range(1, layout.rows):
        axes[0, 0].axhline(row * h / layout.rows, color="white", lw=0.8, ls="--")
    if colorbar:
        fig.colorbar(shown, ax=list(axes[0]), shrink=0.8)
    return fig


def plot_rollout(picture, token_map: TokenMap, patch_scores, image: int = 0, resolution: str = "patch",
                 title: str = "InternViT attention rollout"):
    """Rollout patch scores [T_all, P] (all tiles of the prompt, e.g. `rollout_patch_scores(...)`) over one
    image: at ViT-patch resolution, or summed per 2x2 group = per LLM image token (resolution="token")."""
    from .attention import patches_to_tokens

    patch_scores = torch.as_tensor(patch_scores, dtype=torch.float32)
    first = sum(layout.num_tiles for layout in token_map.layouts[:image])
    layout = token_map.layouts[image]
    tiles = patch_scores[first:first + layout.num_tiles]  # [num_tiles, P]
    if resolution == "token":
        tokens = patches_to_tokens(patch_scores).flatten()  # [T_all * n]: token-map order
        return plot_image_scores(picture, token_map, tokens, image, title=title)
    g = int(round(tiles.shape[1] ** 0.5))
    return plot_tile_maps(picture, layout, tiles.reshape(-1, g, g), title=title)


def plot_layer_curve(values, ax=None, xlabel: str = "layer", ylabel: str = "", title: str = "",
                     labels=None):
    """Line plot over layers: values [layers] (one line) or [layers, k] (one thin line per column, labelled
    "head k" unless `labels` are given, plus their mean in bold). Returns the figure."""
    import matplotlib.pyplot as plt

    values = torch.as_tensor(values, dtype=torch.float32)
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 3))
    x = np.arange(values.shape[0])
    if values.ndim == 1:
        ax.plot(x, values.numpy(), marker="o")
    else:
        for k in range(values.shape[1]):
            ax.plot(x, values[:, k].numpy(), lw=0.8, alpha=0.6, label=f"head {k}" if labels is None else labels[k])
        ax.plot(x, values.mean(1).numpy(), lw=2.5, color="black", label="mean")
        ax.legend(fontsize=7, ncol=2)
    ax.set_xticks(x)
    ax.set_xlabel(xlabel), ax.set_ylabel(ylabel), ax.set_title(title)
    ax.grid(alpha=0.3)
    return ax.figure
