"""Why a toy model misses a question type: accuracy by number of objects, and which question token's attention
picks out the asked-about object.

    python scripts/toy_diagnostics.py                      # the shipped toy model
    python scripts/toy_diagnostics.py runs/toy/model --scenes 200

Two reports (docs/toy_results.md reads them):
- exact match per question type, split by how many objects the scene has. With one object, "What color is the
  star?" can be answered by naming any colour in the image; only scenes with two or more objects test whether
  the model finds the object the question names.
- selective attention: for every token from `</img>` up to the one that predicts the answer (the question and
  the template tokens around it), LLM layer and head, the attention mass on the image tokens of the asked-about
  object ("target") against the other objects' tokens ("other"), averaged over questions about scenes with two
  or more objects. A head that finds the named object puts its mass on the target and
  almost none on the others. Listed are the rows whose target mass is at least `--min-target` and at least
  three times the other mass.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ivl3lab.hooks import run_with_cache  # noqa: E402
from ivl3lab.train.data import IGNORE, chat_example, collate  # noqa: E402
from ivl3lab.train.toy import exact_match  # noqa: E402
from ivl3lab.train.toyworld import scene  # noqa: E402
from ivl3lab.train.vision_warmup import object_grid  # noqa: E402

FIRST_SCENE = 500_000  # validation-split scene indices: far from the ones the training evaluations use


def token_objects(s, tile_px: int, max_tiles: int, patch: int) -> np.ndarray:
    """For each image token of the scene (tiles row-major, thumbnail last), the object under its centre
    (0 = background, k = s.objects[k - 1]); `patch` is the ViT patch size, and a token merges 2x2 patches."""
    return object_grid(s, tile_px, tile_px // patch // 2, max_tiles)[1].flatten().numpy()


def target_object(s, kind: str, question: str) -> int:
    """1-based index of the object a question asks about (the first one named, for left/right)."""
    words = question.rstrip("?").split()
    if kind == "colour":  # "What color is the star?"
        return next(k for k, o in enumerate(s.objects, 1) if o.shape == words[-1])
    colours = {o.colour: k for k, o in enumerate(s.objects, 1)}
    return next(colours[w] for w in words if w in colours)  # named by colour (+ shape), the first one named


def token_label(tokenizer, token_id: int) -> str:
    text = tokenizer.decode([token_id])
    return text.strip() or text.encode("unicode_escape").decode()  # a newline shows as \n, not as a blank


def accuracy_by_objects(model, processor, scenes) -> dict[str, float]:
    items = []
    for s in scenes:
        for kind, question, answer in s.qa:
            group = f"{kind}, {'1 object' if len(s.objects) == 1 else '2+ objects'}"
            items.append((group, chat_example(processor, [(question, answer)], image=s.image)))
    return exact_match(model, items, processor.pad_token_id)


@torch.no_grad()
def selective_attention(model, processor, scenes, kinds=("colour", "shape", "tile", "position")):
    """{(kind, offset, token, layer, head): [target mass, other mass, questions]} over multi-object scenes;
    offset counts question tokens back from the answer (-1 = the token that predicts it), so a template
    token that occurs twice (a newline) is two rows."""
    config = model.config
    image_id, layers = config.image_token_id, config.text.num_layers
    sums = defaultdict(lambda: np.zeros(3))
    for s in scenes:
        if len(s.objects) < 2:
            continue
        objects = token_objects(s, config.vision.image_size, config.max_dynamic_patch, config.vision.patch_size)
        for kind, question, answer in s.qa:
            if kind not in kinds:
                continue
            example = chat_example(processor, [(question, answer)], image=s.image)
            batch = collate([example], processor.pad_token_id)
            ids = batch.input_ids[0]
            image_pos = (ids == image_id).nonzero().flatten()
            assert len(image_pos) == len(objects), (len(image_pos), len(objects))
            answer_at = next(k for k, label in enumerate(example.labels) if label != IGNORE)
            queries = list(range(int(image_pos[-1]) + 1, answer_at))  # question tokens up to the answer's
            _, cache = run_with_cache(model, **batch.model_inputs(), pattern_queries=queries, pattern_keys=image_pos,
                                      names_filter=lambda n: n.startswith("language.") and n.endswith("hook_pattern"))
            target = target_object(s, kind, question)
            is_target, is_other = objects == target, (objects != target) & (objects > 0)
            for layer in range(layers):
                pattern = cache[f"language.layers.{layer}.self_attn.hook_pattern"][0].numpy()  # [H, Q, image]
                for q, position in enumerate(queries):
                    token = token_label(processor.tokenizer, int(ids[position]))
                    offset = position - answer_at
                    for head, row in enumerate(pattern[:, q]):
                        sums[(kind, offset, token, layer, head)] += (row[is_target].sum(), row[is_other].sum(), 1)
    return sums


def selective_heads(sums, min_target: float = 0.15) -> dict[str, list[str]]:
    """kind -> "'token'(offset) L<layer>H<head> target/other" for the rows whose mean target mass is at least
    `min_target` and at least three times the other objects' mass."""
    found = defaultdict(list)
    for (kind, offset, token, layer, head), (target, other, n) in sorted(sums.items()):
        if target / n >= min_target and target >= 3 * other:
            found[kind].append(f"'{token}'({offset}) L{layer}H{head} {target / n:.2f}/{other / n:.2f}")
    return found


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", help="a checkpoint directory (default: the shipped toy model)")
    ap.add_argument("--scenes", type=int, default=200)
    ap.add_argument("--attention-scenes", type=int, default=60)
    ap.add_argument("--min-target", type=float, default=0.15)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import ivl3lab

    if args.model:
        model, processor = ivl3lab.load_pretrained(args.model, dtype=torch.float32)
    else:
        model, processor = ivl3lab.load_toy()
    model = model.float().eval()
    scenes = [scene("val", FIRST_SCENE + i, model.config.vision.image_size) for i in range(args.scenes)]
    print("exact match by number of objects (validation scenes):")
    for group, value in sorted(accuracy_by_objects(model, processor, scenes).items()):
        print(f"  {group[4:]:<26} {value:.2f}")
    print("\nselective attention on the asked-about object (question token, layer, head: target / other mass):")
    found = selective_heads(selective_attention(model, processor, scenes[:args.attention_scenes]), args.min_target)
    for kind in ("colour", "shape", "tile", "position"):
        print(f"  {kind:<9}", "; ".join(found[kind]) if found[kind] else "no token selects the named object")


if __name__ == "__main__":
    main()
