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

from ..generation import GenerationConfig, generate
from .data import Example, chat_example
from .toyworld import Scene, scene

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
    return f"There is {'an' if obj.colour[0] in 'aeiou' else 'a'} {obj.colour} {obj.shape} in tile {obj.tile}."


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
    cfg = GenerationConfig.coerce(generation_config, eos_token_id=processor.im_end_id,
                                  pad_token_id=processor.pad_token_id)
    outputs: list[str] = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        prompts, tiles, pixels = [], [], []
        for question, pixel_values, prefix in chunk:
            n = 0 if pixel_values is None else pixel_values.shape[0]
            if n and "<image>" not in question:
                question = "<image>\n" + question
            prompts.append(processor.build_prompt(question, num_patches_list=[n] if n else []) + prefix)
            tiles.append(n)
            if n:
                pixels.append(pixel_values)
        enc = processor.tokenize(prompts, num_tiles_per_sample=tiles, padding_side="left")
        pv = torch.cat(pixels).to(model.device, model.dtype) if pixels else None
        tokens = generate(model, enc["input_ids"].to(model.device), enc["attention_mask"].to(model.device),
                          pv, cfg, num_tiles_per_sample=tiles, generator=generator)
        outputs += [processor.decode(row) for row in tokens]
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

    def example(self, index: int) -> Example:
        from .toy import ToyData

        rng = random.Random(f"sft/{self.seed}/{index}")
        if rng.random() < self.qa_ratio:
            return ToyData(self.processor, tile_px=self.tile_px, max_objects=self.max_objects,
                           text_ratio=0.0, seed=self.seed).example(5_000_000 + index)
        item = reasoning_item("train", 6_000_000 + index, self.tile_px, self.max_objects)
        return reasoning_example(self.processor, item)

    def batches(self, step: int, micro: int, rank: int = 0, world: int = 1):
        from .data import collate

        per_rank = self.batch_size // self.grad_accum // world
        if per_rank * self.grad_accum * world != self.batch_size:
            raise ValueError(f"batch_size {self.batch_size} must divide by grad_accum x world "
                             f"({self.grad_accum} x {world})")
        start = ((step * self.grad_accum + micro) * world + rank) * per_rank
        return collate([self.example(i) for i in range(start, start + per_rank)], self.processor.pad_token_id)


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
