"""`make demo` / `python -m ivl3lab.demo`: one image through the whole InternVL3 pipeline on the tiny preset.

Tiles a bundled sample image, prints the tile grid and the token accounting, runs a forward pass and a short
generation. The weights are random, so the answer is gibberish: that is expected until a trained toy
checkpoint ships (the pre-training issue).
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
import torch

from .build import SAMPLE_IMAGE as SAMPLE
from .build import TOY_MODEL, build, load_toy
from .processing import load_image


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
    parser.add_argument("--image", default=None, help="default: a freshly generated toy scene")
    parser.add_argument("--question", default=None, help="default: the scene's own questions")
    parser.add_argument("--seed", type=int, default=None, help="which held-out toy scene (default: random)")
    parser.add_argument("--random-weights", action="store_true", help="use the untrained tiny preset")
    parser.add_argument("--out", default="outputs/demo_attention.png", help="where the attention heatmap goes")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    trained = not args.random_weights and (TOY_MODEL / "config.json").exists()
    model, processor = load_toy() if trained else build("tiny", seed=0)
    cfg = model.config
    count = lambda module: sum(p.numel() for p in module.parameters()) / 1e6  # noqa: E731
    print("ivl3lab demo: the tiny preset, " + ("pre-trained on the toy world (docs/toy_results.md)." if trained else
          "with RANDOM weights (no trained toy checkpoint found), so the answers below are noise."))
    print(f"model: {count(model):.2f} M parameters = vision {count(model.vision):.2f} M + projector "
          f"{count(model.projector):.2f} M + language {count(model.language):.2f} M + lm_head {count(model.lm_head):.2f} M")

    scene = None
    if args.image is None:
        from .train.toyworld import scene as toy_scene

        index = args.seed if args.seed is not None else random.randrange(10_000)
        scene = toy_scene("test", 90_000 + index, tile_px=cfg.vision.image_size)
        image, source = scene.image, f"held-out toy scene {90_000 + index}: {scene.caption}"
    else:
        image, source = load_image(args.image), args.image
    pixel_values, layout = processor.load_image(image)
    print(f"\nimage: {source} ({layout.image_width}x{layout.image_height} px)")
    print(f"tiling: aspect {layout.image_width / layout.image_height:.2f} -> grid {layout.cols} cols x {layout.rows} rows"
          f"{' + thumbnail' if layout.has_thumbnail else ''} = {layout.num_tiles} tiles of {cfg.vision.image_size} px "
          f"(max {cfg.max_dynamic_patch})")
    print(draw_grid(layout))

    questions = [(args.question, None)] if args.question or scene is None else [(q, a) for _, q, a in scene.qa]
    question = questions[0][0] or "What is in the image?"
    g, per_tile = cfg.vision.grid_size, cfg.num_image_token
    inputs = processor(question, images=image, return_layouts=True)
    ids = inputs["input_ids"]
    n_image = int((ids == processor.image_token_id).sum())
    print(f"\ntokens: each tile is {g}x{g} ViT patches of {cfg.vision.patch_size} px -> 2x2 pixel-unshuffle -> "
          f"{per_tile} LLM tokens")
    print(f"        {layout.num_tiles} tiles x {per_tile} = {n_image} <IMG_CONTEXT> tokens between <img> and </img>; "
          f"the prompt adds {ids.shape[1] - n_image} more: {ids.shape[1]} in total")
    with torch.no_grad():
        start = time.perf_counter()
        out = model(ids, pixel_values, attention_mask=inputs["attention_mask"])
        forward_ms = (time.perf_counter() - start) * 1e3
    print(f"forward: logits {tuple(out.logits.shape)} in {forward_ms:.0f} ms\n")

    for q, truth in questions:
        q = q or "What is in the image?"
        start = time.perf_counter()
        answer = model.chat(processor, pixel_values, q, dict(max_new_tokens=args.max_new_tokens))
        ms = (time.perf_counter() - start) * 1e3
        verdict = "" if truth is None else ("  (right)" if answer == truth else f"  (truth: {truth})")
        print(f"Q: {q}\nA: {answer}{verdict}   [{ms:.0f} ms]")

    path = write_attention_png(model, processor, image, question, args.out)
    print(f"\nattention of the answer position over the image (all layers and heads): {path}")


def write_attention_png(model, processor, image, question: str, out: str) -> Path:
    """Text->image attention of the last prompt token, drawn over the image with tiles stitched."""
    import matplotlib

    matplotlib.use("Agg")
    from .interp import Probe, plot_image_scores, text_to_image_attention

    probe = Probe.build(processor, question, image, answer=" ")
    scores = text_to_image_attention(model, probe, queries=[probe.prompt_len - 1], normalize=True)
    fig = plot_image_scores(image, probe.token_map, scores, title=f"attention: {question}")
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80, bbox_inches="tight")
    return path


if __name__ == "__main__":
    main()
