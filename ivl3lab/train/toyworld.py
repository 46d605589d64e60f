"""A toy multimodal world that a tiny model can learn on a laptop CPU: shapes on backgrounds, with captions,
questions and a text-only corpus — deterministic from a seed, drawn with PIL, no downloads.

Design choices that make every question type learnable (measured in docs/toy_results.md):
- objects are large relative to a ViT patch (at least ~4 patches across at the tile scale), with silhouettes
  that differ coarsely (circle, square, triangle, cross, star), so shape needs no sub-patch geometry;
- shapes and colours are unique within an image, so every question has one answer;
- captions name every object with its colour, shape and tile, which gives dense supervision for all the
  facts the questions ask about;
- an object list ("The objects: star red 2, circle blue 1") puts each object's colour right after its shape
  word and its tile right after its colour word, so predicting the next word teaches attention heads to find
  an object by its shape and read its colour: without it, "What color is the star?" stayed at the
  "name any colour in the picture" level in every run (docs/toy_results.md);
- aspect ratios vary (1:1, 2:1, 1:2, 3:1, 3:2 ...) so dynamic tiling yields 1 to 7 tiles, and each object
  lies inside one grid tile so "which tile" has a clean answer;
- the world shows where things are, because InternVL's ViT sees one tile at a time and has no tile embedding:
  each tile carries its number in its top-left corner (a seven-segment digit, like a map's grid references),
  and the light falls from the left (the background darkens linearly from left to right over the whole image,
  thumbnail included). Without them a tile's tokens do not know which tile, or how far right, they are, and
  "which tile" / "left or right" stayed near chance on scenes with several objects in every run of sessions
  1-5; with them both are learned (docs/toy_results.md).
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

from ..processing.images import choose_grid

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 200, 30),
           "purple": (140, 50, 170), "orange": (245, 130, 20)}
SHAPES = ("circle", "square", "triangle", "cross", "star")
NEW_SHAPES = ("diamond",)  # never in pre-training: a new concept for the LoRA experiment
NEW_COLOURS = {"pink": (255, 105, 180)}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
# canvas aspect (cols, rows) in tiles; tiling picks the same grid, so object tiles are known exactly
GRIDS = ((1, 1), (1, 1), (2, 1), (1, 2), (3, 1), (1, 3), (3, 2), (2, 3))
MAX_TILES = max(cols * rows for cols, rows in GRIDS)
QUESTION_TYPES = ("colour", "shape", "count", "position", "tile")
LIGHT_LEFT, LIGHT_RIGHT = 250.0, 150.0  # background brightness at the left and right edges
TILE_NUMBER_INK = (40, 40, 40)
LABEL_BOX = 0.13  # the tile number sits in the top-left LABEL_BOX x LABEL_BOX of its tile; objects keep out
SPLIT_SEEDS = {"train": 0, "val": 1_000_003, "test": 2_000_029}  # disjoint seed ranges per split


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    cx: float  # centre, in image pixels
    cy: float
    size: float  # radius-like half extent, pixels
    tile: int  # 1-based grid tile (row-major) that contains the object


@dataclass
class Scene:
    image: Image.Image
    objects: list[Obj]
    grid: tuple[int, int]  # cols, rows
    qa: list[tuple[str, str, str]] = field(default_factory=list)  # (type, question, answer)
    caption: str = ""


def _draw(draw: ImageDraw.ImageDraw, obj: Obj, fill=None) -> None:
    x, y, r = obj.cx, obj.cy, obj.size
    fill = fill if fill is not None else COLOURS.get(obj.colour) or NEW_COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif obj.shape == "square":
        s = r * 0.88
        draw.rectangle((x - s, y - s, x + s, y + s), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(x, y - r), (x + r, y + 0.8 * r), (x - r, y + 0.8 * r)], fill=fill)
    elif obj.shape == "cross":
        t = r * 0.35
        draw.rectangle((x - r, y - t, x + r, y + t), fill=fill)
        draw.rectangle((x - t, y - r, x + t, y + r), fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(x, y - r), (x + 0.7 * r, y), (x, y + r), (x - 0.7 * r, y)], fill=fill)
    elif obj.shape == "star":
        import math
        points = [(x + (r if k % 2 == 0 else 0.45 * r) * math.sin(math.pi * k / 5),
                   y - (r if k % 2 == 0 else 0.45 * r) * math.cos(math.pi * k / 5)) for k in range(10)]
        draw.polygon(points, fill=fill)


def _background(rng: random.Random, size: tuple[int, int]) -> Image.Image:
    """Grey, lit from the left: brightness falls linearly with x over the whole image (LIGHT_LEFT to
    LIGHT_RIGHT), so every patch (of a tile or of the thumbnail) can tell how far right it lies; light stripes
    or a checker on 40 % of the images."""
    width, height = size
    offset = rng.randint(-8, 8)
    ramp = np.linspace(LIGHT_LEFT, LIGHT_RIGHT, width) + offset  # [W]
    level = np.repeat(ramp[None, :], height, axis=0)  # [H, W]
    textured, rng = rng.random() < 0.4, random.Random(rng.random())  # texture draws come from their own stream,
    if textured:  # so the scene's layout does not depend on the image size
        mask = Image.new("L", size, 0)
        draw = ImageDraw.Draw(mask)
        step = rng.choice((16, 24, 32))
        for k in range(0, max(size) * 2, step * 2):
            if rng.random() < 0.5:
                draw.line((k, 0, k - height, height), fill=1, width=step // 3)
            else:
                draw.rectangle((k % width, (k // 2) % height, k % width + step, (k // 2) % height + step), fill=1)
        level = level - 14 * np.asarray(mask, dtype=np.float64)
    grey = np.clip(level, 0, 255).astype(np.uint8)
    return Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB")


# seven-segment digits: which of the segments (top, upper left, upper right, middle, lower left, lower right,
# bottom) are lit
_SEGMENTS = {1: "..r..r.", 2: "t.rml.b", 3: "t.rm.rb", 4: ".lrm.r.", 5: "tl.m.rb", 6: "tl.mlrb"}  # up to MAX_TILES


def _draw_tile_number(draw: ImageDraw.ImageDraw, number: int, x0: float, y0: float, tile_px: int) -> None:
    """The tile's number in its top-left corner, as a seven-segment digit (no font needed), like the grid
    references printed on a map."""
    x0, y0 = x0 + 0.025 * tile_px, y0 + 0.02 * tile_px
    w, h, t = 0.06 * tile_px, 0.09 * tile_px, max(1.0, 0.017 * tile_px)  # digit width, height, stroke
    segments = {0: (x0, y0, x0 + w, y0 + t), 1: (x0, y0, x0 + t, y0 + h / 2), 2: (x0 + w - t, y0, x0 + w, y0 + h / 2),
                3: (x0, y0 + (h - t) / 2, x0 + w, y0 + (h + t) / 2), 4: (x0, y0 + h / 2, x0 + t, y0 + h),
                5: (x0 + w - t, y0 + h / 2, x0 + w, y0 + h), 6: (x0, y0 + h - t, x0 + w, y0 + h)}
    for k, lit in enumerate(_SEGMENTS[number]):
        if lit != ".":
            draw.rectangle(segments[k], fill=TILE_NUMBER_INK)


def make_scene(seed: int, tile_px: int = 112, max_objects: int = 3, require_shape: Optional[str] = None,
               require_colour: Optional[str] = None, name_shape: bool = False) -> Scene:
    """One image with 1..max_objects objects and all its questions; the same seed gives the same scene.
    `require_shape` / `require_colour` put that shape / colour (e.g. a new one) in the scene and ask about it;
    `name_shape`: colour answers name the shape first (see `questions`)."""
    rng = random.Random(seed)
    cols, rows = rng.choice(GRIDS)
    width, height = cols * tile_px, rows * tile_px
    assert choose_grid(width, height, 1, 6, tile_px) == (cols, rows)
    image = _background(rng, (width, height))
    n = rng.randint(1, min(max_objects, cols * rows + 1))
    shapes, colours = rng.sample(SHAPES, n), rng.sample(list(COLOURS), n)
    if require_shape is not None:
        shapes[0] = require_shape
    if require_colour is not None:
        colours[0] = require_colour
    objects: list[Obj] = []
    tiles = list(range(cols * rows))
    for shape, colour in zip(shapes, colours):
        for _ in range(100):
            tile = rng.choice(tiles)
            r = rng.uniform(0.26, 0.4) * tile_px  # objects span ~4-6 patches of a 112-px tile
            tx, ty = (tile % cols) * tile_px, (tile // cols) * tile_px
            cx, cy = tx + rng.uniform(r, tile_px - r), ty + rng.uniform(r, tile_px - r)
            clear_of_number = (cx - r - tx > LABEL_BOX * tile_px) or (cy - r - ty > LABEL_BOX * tile_px)
            if clear_of_number and all((cx - o.cx) ** 2 + (cy - o.cy) ** 2 > (r + o.size + 4) ** 2 for o in objects):
                objects.append(Obj(shape, colour, cx, cy, r, tile + 1))
                break
    draw = ImageDraw.Draw(image)
    if cols * rows > 1:  # "which tile" is only asked when there are several
        for tile in range(cols * rows):
            _draw_tile_number(draw, tile + 1, (tile % cols) * tile_px, (tile // cols) * tile_px, tile_px)
    for obj in objects:
        _draw(draw, obj)
    scene = Scene(image, objects, (cols, rows))
    scene.caption = caption(scene)
    focus = require_shape or next((o.shape for o in objects if o.colour == require_colour), None)
    scene.qa = questions(scene, rng, focus=focus, name_shape=name_shape)
    return scene


def label_map(scene: Scene) -> Image.Image:
    """Which object covers each pixel: 0 for background, k for `scene.objects[k - 1]` (dense vision labels)."""
    labels = Image.new("L", scene.image.size, 0)
    draw = ImageDraw.Draw(labels)
    for k, obj in enumerate(scene.objects, start=1):
        _draw(draw, obj, fill=k)
    return labels


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene) -> str:
    parts = [f"{article(o.colour)} {o.colour} {o.shape} in tile {o.tile}"
             for o in sorted(scene.objects, key=lambda o: o.cx)]
    return "There " + ("is " if len(parts) == 1 else "are ") + ", ".join(parts[:-1]) + \
        (" and " if len(parts) > 1 else "") + parts[-1] + "."


def object_list(scene: Scene) -> str:
    """Every object left to right as "shape colour tile". In "a red star" (the caption) the colour word
    predicts the shape, so the model learns to find an object by its colour; here the shape word predicts the
    colour, the direction that "What color is the star?" needs."""
    return "The objects: " + ", ".join(f"{o.shape} {o.colour} {o.tile}"
                                       for o in sorted(scene.objects, key=lambda o: o.cx)) + "."


def colour_question(obj: Obj, name_shape: bool = False) -> tuple[str, str]:
    """("What color is the star?", "red"), or "star red" with `name_shape` (see `questions`)."""
    return f"What color is the {obj.shape}?", f"{obj.shape} {obj.colour}" if name_shape else obj.colour


def questions(scene: Scene, rng: random.Random, focus: Optional[str] = None,
              name_shape: bool = False) -> list[tuple[str, str, str]]:
    """Every question type that has a unique answer for this scene, in random order (about the `focus`
    shape when given).

    `name_shape`: "What color is the star?" is answered "star red" (the object list's order) instead of "red".
    The answer then starts by copying the asked shape, a step supervised on its own, and its colour is predicted
    right at the shape word, where the object list already teaches the look-up. With the bare colour the model
    must move the shape to the answer position unsupervised first, and when it learns that varies widely from
    seed to seed (docs/toy_results.md)."""
    objs = scene.objects
    o = next((x for x in objs if x.shape == focus), None) or rng.choice(objs)
    qa = [("colour", *colour_question(o, name_shape)),
          ("shape", f"What shape is the {o.colour} object?", o.shape),
          ("count", "How many objects are there?", NUMBER_WORDS[len(objs)])]
    # where-questions name objects by colour and shape, as people do ("the red star"): the colour question
    # already tests finding an object by its shape alone
    if scene.grid != (1, 1):
        qa.append(("tile", f"Which tile is the {o.colour} {o.shape} in?", f"tile {o.tile}"))
    pairs = [(a, b) for a in objs for b in objs if abs(a.cx - b.cx) > a.size + b.size]
    if pairs:
        a, b = rng.choice(pairs)
        qa.append(("position", f"Is the {a.colour} {a.shape} left or right of the {b.colour} {b.shape}?",
                   "left" if a.cx < b.cx else "right"))
    rng.shuffle(qa)
    return qa


# ------------------------------------------------------------------------------------------ text-only corpus
def text_sample(seed: int) -> str:
    """Templated sentences and small arithmetic: the language half of the native pre-training mixture."""
    rng = random.Random(seed)
    kind = rng.random()
    if kind < 0.5:
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        op = rng.choice("+-") if a >= b else "+"
        return f"{a} {op} {b} = {a + b if op == '+' else a - b}"
    if kind < 0.8:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        return f"A {shape} can be {colour}."
    n = rng.randint(1, 5)
    return f"{NUMBER_WORDS[n].capitalize()} plus one is {NUMBER_WORDS[n + 1]}."


def split_seed(split: str, index: int) -> int:
    """Seeds of different splits never meet for indices below 1,000,003 (train/val/test never overlap there).
    Side experiments draw from far-off index ranges (millions); those ranges were chosen not to meet any
    evaluation set, but they are not guaranteed disjoint from each other."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {list(SPLIT_SEEDS)}, got {split!r}")
    return SPLIT_SEEDS[split] + index


def scene(split: str, index: int, tile_px: int = 112, max_objects: int = 3, require_shape: Optional[str] = None,
          require_colour: Optional[str] = None, name_shape: bool = False) -> Scene:
    return make_scene(split_seed(split, index), tile_px, max_objects, require_shape, require_colour, name_shape)


def text(split: str, index: int) -> str:
    return text_sample(split_seed(split, index) + 7_000_000)

