"""The toy task end to end: examples from the toy world, deterministic batches, and exact-match evaluation.

Pre-training mixture (native multimodal, one stage): text-only samples and image-text samples at a
configurable ratio (the paper uses about 1:3). An image-text sample is one conversation about one scene: the
caption, the object list and every question of the scene, in random order (all answers supervised) —
several facts per image per step.
"""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

import torch

from .data import Batch, Example, chat_example, collate, example_range, greedy_pack, pack, text_example
from .toyworld import QUESTION_TYPES, colour_question, object_list, scene, text


@dataclass
class ToyData:
    processor: object
    split: str = "train"
    text_ratio: float = 0.25  # share of text-only samples (1:3 = 0.25)
    batch_size: int = 32  # examples per optimizer step, over all ranks and micro-batches
    grad_accum: int = 1
    tile_px: int = 112
    max_objects: int = 3
    caption: bool = True
    listing: bool = True  # the object list: what teaches finding an object by its shape (toyworld.object_list)
    question_types: tuple = QUESTION_TYPES
    pack_tokens: int = 0  # > 0: pack each micro-batch into rows of at most this many tokens
    name_shape: bool = False  # colour answers name the shape first, "star red" (toyworld.questions)
    every_colour: bool = False  # also ask the colour of every other object, each in a turn of its own
    seed: int = 0

    def example(self, index: int) -> Example:
        rng = random.Random(f"{self.seed}/{self.split}/{index}")  # str seeds are stable across processes
        if rng.random() < self.text_ratio:
            return text_example(self.processor, text(self.split, index))
        s = scene(self.split, index, self.tile_px, self.max_objects, name_shape=self.name_shape)
        turns = [(q, a) for kind, q, a in s.qa if kind in self.question_types]
        if self.every_colour and "colour" in self.question_types:  # more look-ups by shape per image
            asked = {q for q, _ in turns}
            for question, answer in (colour_question(o, self.name_shape) for o in s.objects):
                if question not in asked:
                    turns.insert(rng.randint(0, len(turns)), (question, answer))
        if self.caption:  # anywhere in the conversation: evaluation asks a question right after the image
            turns.insert(rng.randint(0, len(turns)), ("Describe the image.", s.caption))
        if self.listing:
            turns.insert(rng.randint(0, len(turns)), ("List the objects.", object_list(s)))
        return chat_example(self.processor, turns, image=s.image, kind="image")

    def batches(self, step: int, micro: int, rank: int = 0, world: int = 1) -> Batch:
        """The examples of (step, micro-batch, rank): a pure function of its arguments (exact resume, DDP)."""
        examples = [self.example(i) for i in example_range(self.batch_size, self.grad_accum, step, micro, rank, world)]
        pad = self.processor.pad_token_id
        if self.pack_tokens:
            return pack(greedy_pack(examples, self.pack_tokens), pad)
        return collate(examples, pad)


def eval_items(processor, split: str = "val", per_type: int = 100, tile_px: int = 112, max_objects: int = 3,
               question_types=QUESTION_TYPES, name_shape: bool = False) -> list[tuple[str, Example]]:
    """(type, example) with one question each, `per_type` of every type, from scenes of `split`."""
    return eval_items_from(processor, split, 0, per_type, tile_px, max_objects, question_types, name_shape)


def eval_items_from(processor, split: str, start: int, per_type: int = 100, tile_px: int = 112,
                    max_objects: int = 3, question_types=QUESTION_TYPES,
                    name_shape: bool = False) -> list[tuple[str, Example]]:
    """Like `eval_items`, from scene index `start` on (a fresh set, disjoint from the usual one)."""
    items, counts, index = [], defaultdict(int), start
    while any(counts[t] < per_type for t in question_types):
        s = scene(split, index, tile_px, max_objects, name_shape=name_shape)
        index += 1
        for kind, question, answer in s.qa:
            if kind in question_types and counts[kind] < per_type:
                counts[kind] += 1
                items.append((kind, chat_example(processor, [(question, answer)], image=s.image, kind=kind)))
    return items


@torch.no_grad()
def exact_match(model, items: list[tuple[str, Example]], pad_id: int, batch_size: int = 32) -> dict[str, float]:
    """Accuracy per question type: the answer (and its `<|im_end|>`) is right iff greedy decoding reproduces it.

    Computed teacher-forced (argmax at every answer position equals the target): identical to greedy decoding,
    since a greedy decode that is right up to a token sees exactly the teacher-forced prefix.
    """
    hits, totals = defaultdict(int), defaultdict(int)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        batch = collate([e for _, e in chunk], pad_id).to(device)
        logits = model(**batch.model_inputs()).logits
        predicted = logits[:, :-1].argmax(-1)
        targets = batch.labels[:, 1:]
        supervised = targets != -100
        correct = ((predicted == targets) | ~supervised).all(-1)
        for (kind, _), ok in zip(chunk, correct.tolist()):
            hits[kind] += ok
            totals[kind] += 1
    model.train(was_training)
    return {f"acc_{k}": hits[k] / totals[k] for k in totals}


def text_eval_items(processor, split: str = "val", n: int = 64) -> list[Example]:
    return [text_example(processor, text(split, i)) for i in range(n)]


@torch.no_grad()
def text_loss(model, examples: list[Example], pad_id: int, batch_size: int = 32) -> float:
    from .losses import lm_loss

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start:start + batch_size], pad_id).to(device)
        logits = model(**batch.model_inputs()).logits
        n = int((batch.labels[:, 1:] != -100).sum())
        total += float(lm_loss(logits, batch.labels)) * n
        count += n
    return total / max(count, 1)


def make_evaluator(processor, per_type: int = 100, split: str = "val", tile_px: int = 112,
                   max_objects: int = 3, question_types=QUESTION_TYPES, text_n: int = 64, name_shape: bool = False):
    """A Trainer `evaluate` callback: accuracy per question type + text-only validation loss."""
    items = eval_items(processor, split, per_type, tile_px, max_objects, question_types, name_shape)
    texts = text_eval_items(processor, split, text_n)
    pad = processor.pad_token_id

    def evaluate(model, step: Optional[int] = None) -> dict:
        return {**exact_match(model, items, pad), "text_val_loss": text_loss(model, texts, pad)}
    return evaluate
