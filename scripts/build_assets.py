"""Regenerate the bundled assets, deterministically (same bytes on every run):

    python scripts/build_assets.py

- ivl3lab/assets/tiny_tokenizer/  the 1024-token byte-level BPE (see ivl3lab/processing/tokenizer.py)
- ivl3lab/assets/sample.png       a 640x400 drawing of coloured shapes, for tutorials and tests
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing the package

from ivl3lab.processing.tokenizer import (  # noqa: E402
    TINY_TOKENIZER_DIR, build_tiny_tokenizer, wrap_for_transformers,
)

SAMPLE_PATH = ROOT / "ivl3lab" / "assets" / "sample.png"

# What sample.png shows (kept here so tutorials can quote it): 5 shapes on a light gray background.
SAMPLE_SHAPES = (
    ("red", "circle", "top left"),
    ("blue", "square", "top middle"),
    ("green", "triangle", "top right"),
    ("yellow", "star", "bottom left"),
    ("purple", "diamond", "bottom right"),
)


def _star(cx: float, cy: float, r_out: float, r_in: float) -> list[tuple[float, float]]:
    points = []
    for k in range(10):  # alternate outer and inner vertices, starting at the top
        r = r_out if k % 2 == 0 else r_in
        angle = -math.pi / 2 + k * math.pi / 5
        points.append((cx + r * math.cos(angle), cy + r * math.sin(angle)))
    return points


def draw_sample() -> Image.Image:
    image = Image.new("RGB", (640, 400), (235, 235, 235))
    draw = ImageDraw.Draw(image)
    draw.ellipse((50, 40, 170, 160), fill=(220, 30, 30))  # red circle
    draw.rectangle((260, 40, 380, 160), fill=(30, 60, 220))  # blue square
    draw.polygon([(530, 40), (470, 160), (590, 160)], fill=(30, 170, 60))  # green triangle
    draw.polygon(_star(160, 290, 80, 32), fill=(240, 210, 20))  # yellow star
    draw.polygon([(480, 210), (560, 290), (480, 370), (400, 290)], fill=(140, 40, 170))  # purple diamond
    return image


def main() -> None:
    TINY_TOKENIZER_DIR.mkdir(parents=True, exist_ok=True)
    wrap_for_transformers(build_tiny_tokenizer()).save_pretrained(str(TINY_TOKENIZER_DIR))
    draw_sample().save(SAMPLE_PATH, optimize=True)
    print(f"wrote {TINY_TOKENIZER_DIR} and {SAMPLE_PATH} ({SAMPLE_PATH.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
