"""`make demo` / `python -m ivl3lab.demo`: one image through the whole InternVL3 pipeline on the tiny preset.

Tiles a bundled sample image, prints the tile grid and the token accounting, runs a forward pass and a short
generation. The weights are random, so the answer is gibberish: that is expected until a trained toy
checkpoint ships (the pre-training issue).
"""
from __future__ import annotations

import argparse
import time
import torch

from .build import SAMPLE_IMAGE as SAMPLE
from .build import build


def draw_grid(layout) -> str:
    """The tile grid as text: tile indices in their place, the thumbnail named beside it."""
    width = 6
    border = "+" + "+".join("-" * width for _ in range(layout.cols)) + "+"
    lines = [border]
    for row in range(layout.rows):
        cells = [f"{row * layout.cols + col:^{width}}" for col in range(layout.cols)]
        lines += ["|" + "|".join(cells) + "|", border]
    if layout.has_thumbnail:
        lines.append(f"+ thumbnail = tile {layout.num_tiles - 1} (the whole image at one tile's size)")
    return "\n".join("    " + line for line in lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=str(SAMPLE))
    parser.add_argument("--question", default="What is in the image?")
    parser.add_argument("--max-new-tokens", type=int, default=12)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    model, processor = build("tiny", seed=0)
    cfg = model.config
    count = lambda module: sum(p.numel() for p in module.parameters()) / 1e6  # noqa: E731
    print(f"ivl3lab demo: preset 'tiny' with RANDOM weights (they stay random until the toy pre-training "
          f"lands), so the answer below is noise.")
    print(f"model: {count(model):.2f} M parameters = vision {count(model.vision):.2f} M + projector "
          f"{count(model.projector):.2f} M + language {count(model.language):.2f} M + lm_head {count(model.lm_head):.2f} M")

    pixel_values, layout = processor.load_image(args.image)
    print(f"\nimage: {args.image} ({layout.image_width}x{layout.image_height} px)")
    print(f"tiling: aspect {layout.image_width / layout.image_height:.2f} -> grid {layout.cols} cols x {layout.rows} rows"
          f"{' + thumbnail' if layout.has_thumbnail else ''} = {layout.num_tiles} tiles of {cfg.vision.image_size} px "
          f"(max {cfg.max_dynamic_patch})")
    print(draw_grid(layout))

    g = cfg.vision.grid_size
    per_tile = cfg.num_image_token
    inputs = processor(args.question, images=args.image)
    ids = inputs["input_ids"]
    n_image = int((ids == processor.image_token_id).sum())
    print(f"\ntokens: each tile is {g}x{g} ViT patches of {cfg.vision.patch_size} px -> 2x2 pixel-unshuffle -> "
          f"{per_tile} LLM tokens")
    print(f"        {layout.num_tiles} tiles x {per_tile} = {n_image} <IMG_CONTEXT> tokens between <img> and </img>; "
          f"the prompt (system message + question) adds {ids.shape[1] - n_image} more: {ids.shape[1]} in total")
    print(f"pixel_values: {tuple(pixel_values.shape)}")

    with torch.no_grad():
        start = time.perf_counter()
        out = model(ids, pixel_values, attention_mask=inputs["attention_mask"])
        forward_ms = (time.perf_counter() - start) * 1e3
    print(f"\nforward: logits {tuple(out.logits.shape)} in {forward_ms:.0f} ms")

    start = time.perf_counter()
    answer = model.chat(processor, pixel_values, args.question, dict(max_new_tokens=args.max_new_tokens))
    gen_ms = (time.perf_counter() - start) * 1e3
    print(f"generate: {args.max_new_tokens} new tokens max in {gen_ms:.0f} ms")
    print(f"Q: {args.question}\nA (random weights): {answer!r}")


if __name__ == "__main__":
    main()
