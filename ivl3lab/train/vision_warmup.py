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
"""
from __future__ import annotations

import random
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..processing.images import dynamic_preprocess, tiles_to_tensor
from .toyworld import COLOURS, SHAPES, label_map, make_scene

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


def patch_labels(scene, tile_px: int, patch: int, max_tiles: int = 6):
    """Tiles of one scene exactly as the model sees them, with per-patch labels.

    Returns (pixel_values [T, 3, S, S], shape ids [T, g*g], colour ids [T, g*g]) with g = S / patch; 0 is
    background, k > 0 is SHAPES[k - 1] / list(COLOURS)[k - 1]."""
    tiles, objects = object_grid(scene, tile_px, tile_px // patch, max_tiles)  # [T, g*g] object index per patch
    shape_of = torch.tensor([0] + [SHAPES.index(o.shape) + 1 for o in scene.objects])
    colour_of = torch.tensor([0] + [list(COLOURS).index(o.colour) + 1 for o in scene.objects])
    return tiles_to_tensor(tiles), shape_of[objects], colour_of[objects]  # [T, 3, S, S], [T, g*g], [T, g*g]


def scene_tiles(start: int, n: int, tile_px: int, patch: int, max_objects: int = 3):
    """At least n tiles (with their labels) from consecutive warm-up scenes; returns (x, shapes, colours, next)."""
    xs, shapes, colours, index = [], [], [], start
    while sum(len(x) for x in xs) < n:
        s = make_scene(SEED_BASE + index, tile_px, max_objects=max_objects)
        index += 1
        x, shape, colour = patch_labels(s, tile_px, patch)
        xs.append(x), shapes.append(shape), colours.append(colour)
    return torch.cat(xs)[:n], torch.cat(shapes)[:n], torch.cat(colours)[:n], index


def _foreground_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    foreground = labels > 0
    return ((logits.argmax(-1) == labels) & foreground).sum().item() / max(int(foreground.sum()), 1)


def warm_up_vision(model, steps: int = 300, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                   log_every: int = 50, max_objects: int = 3, background_weight: float = 0.1,
                   position_weight: float = 0.0) -> list[dict]:
    """Train `model.vision` (only) on dense shape + colour labels; returns the log. The heads are dropped.

    Logged accuracies are over object patches of held-out scenes (background patches are easy and excluded)."""
    torch.manual_seed(seed)
    random.seed(seed)
    vision = model.vision.train()
    cfg = model.config.vision
    device = next(vision.parameters()).device
    grid = cfg.image_size // cfg.patch_size
    heads = torch.nn.ModuleDict({"shape": torch.nn.Linear(cfg.hidden_size, len(SHAPES) + 1),
                                 "colour": torch.nn.Linear(cfg.hidden_size, len(COLOURS) + 1),
                                 "column": torch.nn.Linear(cfg.hidden_size, grid)}).to(device)
    column = torch.arange(grid * grid, device=device) % grid  # [g*g]: each patch's column, left to right
    params = list(vision.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    test_x, test_shape, test_colour, _ = scene_tiles(TEST_SEED, 128, cfg.image_size, cfg.patch_size, max_objects)
    index, log, start = seed * 1_000_000, [], time.perf_counter()
    for step in range(1, steps + 1):
        x, shape, colour, index = scene_tiles(index, batch_size, cfg.image_size, cfg.patch_size, max_objects)
        features = vision(x.to(device))[:, 1:]  # [B, g*g, C]: the patch tokens, as the projector sees them
        weight = torch.ones(max(len(SHAPES), len(COLOURS)) + 1, device=device)
        weight[0] = background_weight  # background patches are most patches, and the easy ones
        loss = F.cross_entropy(heads["shape"](features).flatten(0, 1), shape.flatten().to(device),
                               weight=weight[:len(SHAPES) + 1]) + \
            F.cross_entropy(heads["colour"](features).flatten(0, 1), colour.flatten().to(device),
                            weight=weight[:len(COLOURS) + 1])
        if position_weight:  # keep "where in the tile" readable from every token (left/right questions)
            loss = loss + position_weight * F.cross_entropy(heads["column"](features).flatten(0, 1),
                                                            column.repeat(len(features)))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % log_every == 0 or step == steps:
            with torch.no_grad():
                features = vision.eval()(test_x.to(device))[:, 1:].cpu()
                vision.train()
                acc_shape = _foreground_accuracy(heads["shape"].cpu()(features), test_shape)
                acc_colour = _foreground_accuracy(heads["colour"].cpu()(features), test_colour)
                heads.to(device)
            log.append({"step": step, "loss": loss.item(), "vision_acc_shape": acc_shape,
                        "vision_acc_colour": acc_colour, "time": time.perf_counter() - start})
    vision.zero_grad(set_to_none=True)  # leave no warm-up gradient behind for the next optimizer
    model.eval()
    return log
