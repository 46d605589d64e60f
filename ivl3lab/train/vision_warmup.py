"""A short vision pre-training for the toy model, standing in for InternViT's own pre-training.

InternVL3's native multimodal pre-training starts from a pre-trained InternViT (and a pre-trained LLM), not
from random weights. The toy mirrors that: before the one-stage multimodal run, the tiny ViT learns to
recognise toy objects by itself — **dense** shape and colour labels, one per patch (background or the shape /
colour of the object under the patch centre), on the real tiles and thumbnails of multi-object scenes, with two
throwaway linear heads.

Why dense: the LLM answers "What color is the star?" by finding the tokens of the star and reading their colour,
so every image token must carry *both* facts of its own object. An earlier warm-up classified mean-pooled
single-object tiles; shape became readable but, in scenes with two or three objects, colour questions fell to
0.44 (docs/toy_results.md) — the pooled objective never asked a token to bind its object's shape to its colour.

Two more per-patch targets say *where* a patch is: the number printed in its tile, and its x over the whole
image (read from the light, which falls from the left). The ViT sees one tile at a time, so this is the only way
a token of the named object can carry which tile it is in and how far right it lies, which "which tile" and
"left or right of" need (toyworld's module docstring).

An optional target gives the ViT a sense of number: each tile's first token learns how many objects the tile
shows, so the thumbnail's first token is trained to carry the image's count, meant to make "How many objects?"
one lookup for the LLM (not probed; with it, count reached 90 % within notebook 06's 5 minutes: docs/toy_results.md).
"""
from __future__ import annotations

import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..processing.images import dynamic_preprocess, tiles_to_tensor
from .loop import warmup_cosine
from .toyworld import COLOURS, MAX_TILES, NUMBER_WORDS, SHAPES, label_map, make_scene

SEED_BASE = 10_000_000  # its own seed range: never the train/val/test scenes of the multimodal stage
TEST_SEED = 99_000_000


def object_grid(scene, tile_px: int, side: int, max_tiles: int = 6):
    """The scene's tiles exactly as the model sees them (grid tiles row-major, thumbnail last) and, per tile, a
    side x side grid of the object under each cell's centre: 0 is background, k is scene.objects[k - 1].
    side = S / patch gives one cell per ViT patch, S / patch / 2 one per LLM image token.

    Returns (PIL tiles, object indices [T, side * side])."""
    tiles, layout = dynamic_preprocess(scene.image, 1, max_tiles, tile_px, use_thumbnail=True)
    labels = label_map(scene)
    if labels.size != (layout.cols * tile_px, layout.rows * tile_px):
        raise ValueError(f"toy scenes are drawn at their tile grid's size; got {labels.size} for {layout}")
    # the same cuts as dynamic_preprocess, but NEAREST so object ids are never blended
    label_tiles = [labels.crop(((k % layout.cols) * tile_px, (k // layout.cols) * tile_px,
                                (k % layout.cols + 1) * tile_px, (k // layout.cols + 1) * tile_px))
                   for k in range(layout.cols * layout.rows)]
    if layout.has_thumbnail:
        label_tiles.append(labels.resize((tile_px, tile_px), Image.NEAREST))
    # resizing a tile to side x side with NEAREST samples each cell near its centre
    objects = torch.stack([torch.from_numpy(np.asarray(t.resize((side, side), Image.NEAREST), dtype=np.int64)).flatten()
                           for t in label_tiles])  # [T, side * side]
    return tiles, objects


X_BINS = 8  # the warm-up's "how far right" target: the patch centre's x over the image width, in eighths


def where_labels(scene, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile (grid tiles row-major, thumbnail last) and per cell of a side x side grid: the number printed in
    the tile (0-based; -100 where none can be read: the thumbnail, single-tile images) and the cell's x bin
    over the whole image (0..X_BINS-1; the thumbnail spans the whole width). Returns two [T, side * side]."""
    cols, rows = scene.grid
    column_in_tile = (torch.arange(side * side) % side + 0.5) / side  # [side*side], 0..1 across one tile
    numbers, xs = [], []
    for k in range(cols * rows):
        numbers.append(torch.full((side * side,), k if cols * rows > 1 else -100))
        xs.append(((k % cols + column_in_tile) / cols * X_BINS).long())
    if cols * rows > 1:  # the thumbnail: the whole image squeezed into one tile
        numbers.append(torch.full((side * side,), -100))
        xs.append((column_in_tile * X_BINS).long())
    return torch.stack(numbers), torch.stack(xs)


def count_labels(scene, side: int) -> torch.Tensor:
    """Per tile (grid tiles row-major, thumbnail last): how many objects that tile shows, on the top-left 2x2
    cells only (the tile's first LLM token after pixel-unshuffle, around the printed tile number); -100
    elsewhere, so the other tokens keep their capacity for their own object. Every object lies inside one
    grid tile and the thumbnail shows them all, so the thumbnail's (or a single tile's) first token can carry
    the whole image's count. Returns [T, side * side]."""
    cols, rows = scene.grid
    per_tile = [sum(o.tile == k + 1 for o in scene.objects) for k in range(cols * rows)]
    if cols * rows > 1:
        per_tile.append(len(scene.objects))
    labels = torch.full((len(per_tile), side, side), -100)
    labels[:, :2, :2] = torch.tensor(per_tile)[:, None, None]
    return labels.flatten(1)  # [T, side*side]


def patch_labels(scene, tile_px: int, patch: int, max_tiles: int = 6):
    """Tiles of one scene exactly as the model sees them, with per-patch labels.

    Returns (pixel_values [T, 3, S, S], shape ids [T, g*g], colour ids [T, g*g]) with g = S / patch; 0 is
    background, k > 0 is SHAPES[k - 1] / list(COLOURS)[k - 1]."""
    tiles, objects = object_grid(scene, tile_px, tile_px // patch, max_tiles)  # [T, g*g] object index per patch
    shape_of = torch.tensor([0] + [SHAPES.index(o.shape) + 1 for o in scene.objects])
    colour_of = torch.tensor([0] + [list(COLOURS).index(o.colour) + 1 for o in scene.objects])
    return tiles_to_tensor(tiles), shape_of[objects], colour_of[objects]  # [T, 3, S, S], [T, g*g], [T, g*g]


def scene_tiles(start: int, n: int, tile_px: int, patch: int, max_objects: int = 3):
    """At least n tiles from consecutive warm-up scenes, with their per-patch labels; returns (x, labels, next),
    labels = {"shape", "colour", "tile", "x", "count"}, each [n, g*g] (see patch_labels, where_labels and
    count_labels)."""
    xs, labels, index = [], {"shape": [], "colour": [], "tile": [], "x": [], "count": []}, start
    while sum(len(x) for x in xs) < n:
        s = make_scene(SEED_BASE + index, tile_px, max_objects=max_objects)
        index += 1
        x, shape, colour = patch_labels(s, tile_px, patch)
        tile, column = where_labels(s, tile_px // patch)
        xs.append(x)
        for name, value in zip(labels, (shape, colour, tile, column, count_labels(s, tile_px // patch))):
            labels[name].append(value)
    return torch.cat(xs)[:n], {name: torch.cat(v)[:n] for name, v in labels.items()}, index


def _foreground_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    foreground = labels > 0
    return ((logits.argmax(-1) == labels) & foreground).sum().item() / max(int(foreground.sum()), 1)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    known = labels != -100
    return ((logits.argmax(-1) == labels) & known).sum().item() / max(int(known.sum()), 1)


def warm_up_vision(model, steps: int = 300, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                   log_every: int = 50, max_objects: int = 3, background_weight: float = 0.1,
                   position_weight: float = 1.0, count_weight: float = 0.0, warmup_steps: int = 0,
                   min_lr_ratio: float = 1.0) -> list[dict]:
    """Train `model.vision` (only) on dense labels; returns the log. The heads are dropped.

    Per patch: shape and colour of the object under it (background weighted down), and, with `position_weight`,
    where it is: the number printed in its tile and its x bin over the whole image (where_labels). The ViT sees
    one tile at a time, so those two come only from what the toy world draws (tile numbers, the light falling
    from the left); the LLM then finds them in the named object's tokens for "which tile" and "left or right".
    With `count_weight`, each tile's first token also learns how many objects the tile shows (count_labels): a
    pre-trained encoder's sense of number, which the thumbnail's first token learns for the whole image.
    The learning rate is constant by default; `warmup_steps` and `min_lr_ratio` < 1 give a linear warmup and a
    cosine decay instead (with a higher `lr`, notebook 06's 700 warm-up steps learn the shapes nearly as well as
    its 1,200 constant-rate steps did: docs/toy_results.md).
    Logged shape/colour accuracies are over object patches of held-out scenes (background patches are easy and
    excluded); tile and x accuracies over all patches that have them."""
    torch.manual_seed(seed)
    random.seed(seed)
    vision = model.vision.train()
    cfg = model.config.vision
    device = next(vision.parameters()).device
    heads = torch.nn.ModuleDict({"shape": torch.nn.Linear(cfg.hidden_size, len(SHAPES) + 1),
                                 "colour": torch.nn.Linear(cfg.hidden_size, len(COLOURS) + 1),
                                 "tile": torch.nn.Linear(cfg.hidden_size, MAX_TILES),
                                 "x": torch.nn.Linear(cfg.hidden_size, X_BINS)})
    if count_weight:  # only then: without it the warm-up draws the same random numbers as before the head existed
        heads["count"] = torch.nn.Linear(cfg.hidden_size, len(NUMBER_WORDS))
    heads.to(device)
    params = list(vision.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    test_x, test_labels, _ = scene_tiles(TEST_SEED, 128, cfg.image_size, cfg.patch_size, max_objects)
    index, log, start = seed * 1_000_000, [], time.perf_counter()
    weight = torch.ones(max(len(SHAPES), len(COLOURS)) + 1, device=device)
    weight[0] = background_weight  # background patches are most patches, and the easy ones
    for step in range(1, steps + 1):
        for group in optimizer.param_groups:
            group["lr"] = lr * warmup_cosine(step - 1, steps, warmup_steps, min_lr_ratio)
        x, labels, index = scene_tiles(index, batch_size, cfg.image_size, cfg.patch_size, max_objects)
        labels = {name: value.flatten().to(device) for name, value in labels.items()}
        features = vision(x.to(device))[:, 1:].flatten(0, 1)  # [B*g*g, C]: patch tokens, as the projector sees them
        loss = F.cross_entropy(heads["shape"](features), labels["shape"], weight=weight[:len(SHAPES) + 1]) + \
            F.cross_entropy(heads["colour"](features), labels["colour"], weight=weight[:len(COLOURS) + 1])
        if position_weight:
            loss = loss + position_weight * (F.cross_entropy(heads["tile"](features), labels["tile"]) +
                                             F.cross_entropy(heads["x"](features), labels["x"]))
        if count_weight:
            loss = loss + count_weight * F.cross_entropy(heads["count"](features), labels["count"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % log_every == 0 or step == steps:
            with torch.no_grad():
                features = vision.eval()(test_x.to(device))[:, 1:].cpu()
                vision.train()
                heads.cpu()
                entry = {"step": step, "loss": loss.item(),
                         "vision_acc_shape": _foreground_accuracy(heads["shape"](features), test_labels["shape"]),
                         "vision_acc_colour": _foreground_accuracy(heads["colour"](features), test_labels["colour"]),
                         "vision_acc_tile": _accuracy(heads["tile"](features), test_labels["tile"]),
                         "vision_acc_x": _accuracy(heads["x"](features), test_labels["x"]),
                         "time": time.perf_counter() - start}
                if count_weight:
                    entry["vision_acc_count"] = _accuracy(heads["count"](features), test_labels["count"])
                heads.to(device)
            log.append(entry)
    vision.zero_grad(set_to_none=True)  # leave no warm-up gradient behind for the next optimizer
    model.eval()
    return log
