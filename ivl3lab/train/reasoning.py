"""A reasoning-style toy task for preference optimization and test-time scaling.

"What color is the star? Reason step by step." is answered in steps separated by blank lines — one step per
object, left to right, then a final answer line:

    There is a blue circle in tile 1.

    There is a red star in tile 2.

    Answer: red

It is the colour question that the toy model finds hardest (it has to bind a shape to a colour in a scene with
several objects), answered by first writing the objects down, so the binding happens in text. Each step is a
checkable fact, which is what a process reward model scores, and the final line is what majority voting and
exact-match accuracy read.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from PIL import Image

from ..generation import GenerationConfig, batch_chat
from .data import Example, chat_example, collate, example_range
from .toyworld import Scene, article, scene

REASON_SUFFIX = "Reason step by step."
ANSWER_PREFIX = "Answer: "


@dataclass
class ReasoningItem:
    question: str
    image: Image.Image
    answer: str  # the ground-truth final answer (a colour word)
    response: str  # a correct step-by-step response
    split: str = ""
    index: int = -1  # scene index inside its split


def object_step(obj) -> str:
    return f"There is {article(obj.colour)} {obj.colour} {obj.shape} in tile {obj.tile}."


def gold_response(s: Scene, shape: str) -> str:
    target = next(o for o in s.objects if o.shape == shape)
    steps = [object_step(o) for o in sorted(s.objects, key=lambda o: o.cx)]
    return "\n\n".join(steps + [ANSWER_PREFIX + target.colour])


def final_answer(response: str) -> Optional[str]:
    """The word after the last "Answer:", or None when the response never gives one."""
    found = re.findall(r"Answer:\s*([A-Za-z]+)", response)
    return found[-1].lower() if found else None


def is_correct(response: str, answer: str) -> bool:
    return final_answer(response) == answer


def reasoning_item(split: str, index: int, tile_px: int = 112, max_objects: int = 3,
                   min_objects: int = 1) -> Optional[ReasoningItem]:
    """The item of one scene (about a shape chosen by the scene's seed), or None if it has too few objects."""
    s = scene(split, index, tile_px, max_objects)
    if len(s.objects) < min_objects:
        return None
    target = random.Random(f"reasoning/{split}/{index}").choice(s.objects)
    question = f"What color is the {target.shape}? {REASON_SUFFIX}"
    return ReasoningItem(question, s.image, target.colour, gold_response(s, target.shape), split, index)


def reasoning_items(split: str, n: int, start: int = 0, tile_px: int = 112, max_objects: int = 3,
                    min_objects: int = 2) -> list[ReasoningItem]:
    """n items from consecutive scenes of `split` (by default only scenes with 2+ objects: the hard ones)."""
    items, index = [], start
    while len(items) < n:
        item = reasoning_item(split, index, tile_px, max_objects, min_objects)
        index += 1
        if item is not None:
            items.append(item)
    return items


def reasoning_example(processor, item: ReasoningItem, response: Optional[str] = None) -> Example:
    return chat_example(processor, [(item.question, response or item.response)], image=item.image,
                        kind="reasoning")


# ---------------------------------------------------------------------------------------------- sampling
@torch.no_grad()
def complete(model, processor, requests: Sequence[tuple[str, Optional[torch.Tensor], str]],
             generation_config=None, generator: Optional[torch.Generator] = None,
             batch_size: int = 64) -> list[str]:
    """Continue assistant answers: each request is (question, pixel_values or None, answer prefix).

    The prompt is the chat template up to the assistant turn plus the prefix; an image is given with its
    pixel_values, or left out (Dropout-NTP continues a truncated answer *without* the image). Returns only
    the continuations, left-padded batches of `batch_size`."""
    outputs: list[str] = []
    for start in range(0, len(requests), batch_size):
        questions, pixels, prefixes = zip(*requests[start:start + batch_size])
        tiles = [0 if pv is None else pv.shape[0] for pv in pixels]
        present = [pv for pv in pixels if pv is not None]
        outputs += batch_chat(model, processor, torch.cat(present) if present else None, list(questions),
                              generation_config, num_patches_list=tiles, generator=generator,
                              answer_prefixes=list(prefixes))
    return outputs


def sample_responses(model, processor, items: Sequence[ReasoningItem], n: int, temperature: float = 1.0,
                     seed: int = 0, max_new_tokens: int = 64, batch_size: int = 64) -> list[list[str]]:
    """n sampled responses per item ([len(items)][n]); temperature 0 = greedy (then n identical answers)."""
    generator = torch.Generator(device=model.device).manual_seed(seed)
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                           temperature=max(temperature, 1e-6))
    requests = []
    for item in items:
        pixel_values, _ = processor.load_image(item.image)
        requests += [(item.question, pixel_values, "")] * n
    flat = complete(model, processor, requests, cfg, generator, batch_size)
    return [flat[k * n:(k + 1) * n] for k in range(len(items))]


def accuracy(model, processor, items: Sequence[ReasoningItem], **sampling) -> float:
    """Share of items whose greedy (default) response ends in the right answer."""
    sampling.setdefault("temperature", 0.0)
    responses = sample_responses(model, processor, items, 1, **sampling)
    return sum(is_correct(r[0], item.answer) for r, item in zip(responses, items)) / max(len(items), 1)


# ---------------------------------------------------------------------------------------------- SFT data
@dataclass
class ReasoningSFTData:
    """SFT batches for the reasoning format: step-by-step answers, mixed with the pre-training conversations
    (`qa_ratio`) so the model keeps its short answers. Deterministic in (step, micro, rank): exact resume."""
    processor: object
    batch_size: int = 16
    qa_ratio: float = 0.5
    tile_px: int = 112
    max_objects: int = 3
    seed: int = 0
    grad_accum: int = 1

    def __post_init__(self):
        from .toy import ToyData

        self.conversations = ToyData(self.processor, tile_px=self.tile_px, max_objects=self.max_objects,
                                     text_ratio=0.0, seed=self.seed)

    def example(self, index: int) -> Example:
        rng = random.Random(f"sft/{self.seed}/{index}")
        if rng.random() < self.qa_ratio:
            return self.conversations.example(5_000_000 + index)
        item = reasoning_item("train", 6_000_000 + index, self.tile_px, self.max_objects)
        return reasoning_example(self.processor, item)

    def batches(self, step: int, micro: int, rank: int = 0, world: int = 1):
        indices = example_range(self.batch_size, self.grad_accum, step, micro, rank, world)
        return collate([self.example(i) for i in indices], self.processor.pad_token_id)


# ---------------------------------------------------------------------------------------------- exact step labels
_STEP = re.compile(r"There is an? (\w+) (\w+) in tile (\d+)\.")


def exact_step_labels(item: ReasoningItem, response: str, tile_px: int = 112) -> list[bool]:
    """Step labels from the toy world's ground truth instead of rollouts: an object step is "+" iff that
    object (colour, shape, tile) is in the scene, the answer step iff the final answer is right."""
    from .prm import split_steps

    objects = {(o.colour, o.shape, o.tile) for o in scene(item.split, item.index, tile_px).objects}
    labels = []
    for step in split_steps(response):
        found = _STEP.fullmatch(step.strip())
        if found:
            labels.append((found[1], found[2], int(found[3])) in objects)
        else:
            labels.append(final_answer(step) == item.answer if step.strip().startswith("Answer") else False)
    return labels
