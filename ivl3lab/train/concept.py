"""The quick LoRA experiment: teach the pre-trained toy model a concept it has never seen (a new colour word),
then check it learned it without forgetting the rest.

Training data mixes scenes that contain the new concept with ordinary scenes (so the old answers stay
rehearsed); evaluation measures exact match on questions whose answer involves the concept, and on the
original question types.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .data import Batch, chat_example, collate, example_range
from .toy import eval_items, exact_match
from .toyworld import QUESTION_TYPES, scene


@dataclass
class ConceptData:
    processor: object
    colour: str = "pink"
    new_ratio: float = 0.5  # share of training scenes that contain the new concept
    batch_size: int = 16
    tile_px: int = 112
    max_objects: int = 3

    def example(self, index: int):
        rng = random.Random(f"concept/{self.colour}/{index}")
        new = rng.random() < self.new_ratio
        s = scene("train", 50_000_000 + index, self.tile_px, self.max_objects,
                  require_colour=self.colour if new else None)
        turns = [(q, a) for _, q, a in s.qa]
        turns.insert(rng.randint(0, len(turns)), ("Describe the image.", s.caption))
        return chat_example(self.processor, turns, image=s.image)

    def batches(self, step: int, micro: int, rank: int = 0, world: int = 1) -> Batch:
        return collate([self.example(i) for i in example_range(self.batch_size, 1, step, micro, rank, world)],
                       self.processor.pad_token_id)


def concept_items(processor, colour: str = "pink", n: int = 60, tile_px: int = 112, max_objects: int = 3):
    """Held-out questions whose answer needs the new colour: "What color is the X?" -> colour, and
    "What shape is the <colour> object?"."""
    items, index = [], 0
    while len(items) < n:
        s = scene("test", 70_000_000 + index, tile_px, max_objects, require_colour=colour)
        index += 1
        for kind, question, answer in s.qa:
            if (kind == "colour" and answer == colour) or (kind == "shape" and colour in question):
                items.append((f"new_{kind}", chat_example(processor, [(question, answer)], image=s.image)))
    return items[:n]


def make_concept_evaluator(processor, colour: str = "pink", n_new: int = 60, per_type: int = 50,
                           tile_px: int = 112, max_objects: int = 3):
    """acc_new (all concept questions), acc_new_colour / acc_new_shape, and acc_<type> on the original types."""
    new = concept_items(processor, colour, n_new, tile_px, max_objects)
    old = eval_items(processor, "test", per_type, tile_px, max_objects, QUESTION_TYPES)
    pad = processor.pad_token_id

    def evaluate(model, step=None) -> dict:
        scores = {**exact_match(model, new, pad), **exact_match(model, old, pad)}
        counts = {k: sum(kind == k[4:] for kind, _ in new) for k in scores if k.startswith("acc_new_")}
        scores["acc_new"] = sum(scores[k] * c for k, c in counts.items()) / max(sum(counts.values()), 1)
        scores["acc_original"] = sum(scores[f"acc_{t}"] for t in QUESTION_TYPES) / len(QUESTION_TYPES)
        return scores
    return evaluate
