"""A short vision pre-training for the toy model, standing in for InternViT's own pre-training.

InternVL3's native multimodal pre-training starts from a pre-trained InternViT (and a pre-trained LLM), not
from random weights. The toy mirrors that: before the one-stage multimodal run, the tiny ViT learns to
recognise toy objects by itself — shape and colour classification of single-object tiles from mean-pooled
patch features, with two throwaway linear heads. Measured (docs/toy_results.md): without it, shape questions
stayed near chance for the first ~900 multimodal steps; with it, the multimodal stage only has to learn to
read the features.
"""
from __future__ import annotations

import random
import time

import torch
import torch.nn.functional as F

from ..processing.images import process_image
from .toyworld import COLOURS, SHAPES, make_scene

SEED_BASE = 10_000_000  # its own seed range: never the train/val/test scenes of the multimodal stage


def object_tiles(start: int, n: int, tile_px: int):
    """n single-object, single-tile scenes -> (pixel_values [n, 3, S, S], shape ids [n], colour ids [n], next)."""
    pixels, shapes, colours, index = [], [], [], start
    while len(pixels) < n:
        s = make_scene(SEED_BASE + index, tile_px, max_objects=1)
        index += 1
        if s.grid != (1, 1):
            continue
        pixels.append(process_image(s.image, tile_px, 1, 1, False)[0])
        shapes.append(SHAPES.index(s.objects[0].shape))
        colours.append(list(COLOURS).index(s.objects[0].colour))
    return torch.cat(pixels), torch.tensor(shapes), torch.tensor(colours), index


def warm_up_vision(model, steps: int = 300, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                   log_every: int = 50) -> list[dict]:
    """Train `model.vision` (only) on shape + colour classification; returns the log. The heads are dropped."""
    torch.manual_seed(seed)
    random.seed(seed)
    vision = model.vision.train()
    width = model.config.vision.hidden_size
    device = next(vision.parameters()).device
    heads = torch.nn.ModuleDict({"shape": torch.nn.Linear(width, len(SHAPES)),
                                 "colour": torch.nn.Linear(width, len(COLOURS))}).to(device)
    params = list(vision.parameters()) + list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    test_x, test_shape, test_colour, _ = object_tiles(99_000_000, 200, model.config.vision.image_size)
    index, log, start = seed * 1_000_000, [], time.perf_counter()
    for step in range(1, steps + 1):
        x, shape, colour, index = object_tiles(index, batch_size, model.config.vision.image_size)
        pooled = vision(x.to(device))[:, 1:].mean(1)  # [B, C]: patch tokens, as the projector sees them
        loss = F.cross_entropy(heads["shape"](pooled), shape.to(device)) + \
            F.cross_entropy(heads["colour"](pooled), colour.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % log_every == 0 or step == steps:
            with torch.no_grad():
                pooled = vision.eval()(test_x.to(device))[:, 1:].mean(1)
                vision.train()
                acc_shape = (heads["shape"](pooled).argmax(-1).cpu() == test_shape).float().mean().item()
                acc_colour = (heads["colour"](pooled).argmax(-1).cpu() == test_colour).float().mean().item()
            log.append({"step": step, "loss": loss.item(), "vision_acc_shape": acc_shape,
                        "vision_acc_colour": acc_colour, "time": time.perf_counter() - start})
    model.eval()
    return log
