"""Training examples: conversations and plain text -> token ids + labels, batches, and sequence packing.

Labels are -100 wherever no loss is taken: system and user turns, the assistant prefix, image tokens, the
newline after `<|im_end|>` (spec §7). A text-only example is supervised on every token.
Packing puts several examples in one row: positions restart at 0 for each, and `segment_ids` keep attention
inside each example (block-diagonal causal mask).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..processing.template import IMAGE_PLACEHOLDER, expand_image_placeholders, render_conversation

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    pixel_values: Optional[torch.Tensor]  # [T, 3, S, S] or None
    kind: str = ""  # free-form tag, e.g. "caption", "qa", "text"

    @property
    def num_tiles(self) -> int:
        return 0 if self.pixel_values is None else self.pixel_values.shape[0]

    @property
    def num_supervised(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def chat_example(processor, turns: Sequence[tuple[str, str]], image=None, system_message: Optional[str] = None,
                 max_num: Optional[int] = None, kind: str = "chat") -> Example:
    """(question, answer) turns about one image, several, or none: the first question gets the `<image>`
    placeholder (several images: "Image-1: <image>\nImage-2: <image>\n...", the official multi-image prompt)."""
    pixel_values, num_patches = None, []
    images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
    if images:
        loaded = [processor.load_image(im, max_num) for im in images]
        pixel_values = torch.cat([pv for pv, _ in loaded])  # [sum of tiles, 3, S, S]
        num_patches = [layout.num_tiles for _, layout in loaded]
    messages = []
    for k, (question, answer) in enumerate(turns):
        if k == 0 and images and IMAGE_PLACEHOLDER not in question:
            prefix = IMAGE_PLACEHOLDER if len(images) == 1 else \
                "\n".join(f"Image-{i}: {IMAGE_PLACEHOLDER}" for i in range(1, len(images) + 1))
            question = f"{prefix}\n{question}"
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    system = processor.system_message if system_message is None else system_message
    ids: list[int] = []
    labels: list[int] = []
    remaining = list(num_patches)
    for text, supervised in render_conversation(messages, system):
        if IMAGE_PLACEHOLDER in text:
            count = text.count(IMAGE_PLACEHOLDER)
            text = expand_image_placeholders(text, remaining[:count], processor.num_image_token)
            remaining = remaining[count:]
        piece = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if supervised else [IGNORE] * len(piece)
    return Example(ids, labels, pixel_values, kind)


def text_example(processor, text: str, kind: str = "text") -> Example:
    """Plain text for the language half of the mixture: every token supervised, ended by `<|im_end|>`."""
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"] + [processor.im_end_id]
    return Example(ids, list(ids), None, kind)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L]
    labels: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    pixel_values: Optional[torch.Tensor]  # [T, 3, S, S]
    num_tiles_per_sample: list[int]
    position_ids: Optional[torch.Tensor] = None  # [B, L], restarting per packed example
    segment_ids: Optional[torch.Tensor] = None  # [B, L], example index inside the row, -1 on padding
    image_flags: Optional[torch.Tensor] = None  # [T]
    ref_logps: Optional[torch.Tensor] = None  # [B] precomputed reference log-probs (preference training)

    def to(self, device) -> "Batch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.attention_mask), move(self.pixel_values),
                     self.num_tiles_per_sample, move(self.position_ids), move(self.segment_ids),
                     move(self.image_flags), move(self.ref_logps))

    def model_inputs(self) -> dict:
        return dict(input_ids=self.input_ids, pixel_values=self.pixel_values, attention_mask=self.attention_mask,
                    position_ids=self.position_ids, segment_ids=self.segment_ids,
                    num_tiles_per_sample=self.num_tiles_per_sample, image_flags=self.image_flags)


def example_range(batch_size: int, grad_accum: int, step: int, micro: int, rank: int = 0, world: int = 1) -> range:
    """Which examples (a running index) make micro-batch `micro` of optimizer step `step` on `rank`: a pure
    function of its arguments, so resuming replays the same data and any world size sees the same global batch."""
    per_rank = batch_size // grad_accum // world
    if per_rank * grad_accum * world != batch_size:
        raise ValueError(f"batch_size {batch_size} must divide by grad_accum x world ({grad_accum} x {world})")
    start = ((step * grad_accum + micro) * world + rank) * per_rank
    return range(start, start + per_rank)


def epoch_shuffled(position: int, n: int, key: str) -> int:
    """Item at `position` of an endless stream over n items, reshuffled every epoch (seeded by key + epoch)."""
    epoch, offset = divmod(position, n)
    order = list(range(n))
    random.Random(f"{key}{epoch}").shuffle(order)
    return order[offset]


def collate(examples: Sequence[Example], pad_id: int, max_len: Optional[int] = None) -> Batch:
    """One example per row, right-padded (training needs no left padding: nothing is generated)."""
    return pack([[e] for e in examples], pad_id, max_len)


def pack(rows: Sequence[Sequence[Example]], pad_id: int, max_len: Optional[int] = None) -> Batch:
    """Several examples per row: concatenated, positions restarting per example, attention kept inside each."""
    lengths = [sum(len(e.input_ids) for e in row) for row in rows]
    width = max(lengths)
    if max_len is not None and width > max_len:
        raise ValueError(f"a row holds {width} tokens, more than max_len={max_len}; make examples shorter or "
                         f"pack fewer per row (an image's tokens are never cut)")
    shape = (len(rows), width)
    ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    segments = torch.full(shape, -1, dtype=torch.long)
    pixels, tiles = [], []
    for r, row in enumerate(rows):
        start = 0
        for s, example in enumerate(row):
            n = len(example.input_ids)
            ids[r, start:start + n] = torch.tensor(example.input_ids)
            labels[r, start:start + n] = torch.tensor(example.labels)
            positions[r, start:start + n] = torch.arange(n)
            segments[r, start:start + n] = s
            start += n
            if example.pixel_values is not None:
                pixels.append(example.pixel_values)
        mask[r, :start] = 1
        tiles.append(sum(e.num_tiles for e in row))
    packed = any(len(row) > 1 for row in rows)
    return Batch(ids, labels, mask, torch.cat(pixels) if pixels else None, tiles,
                 position_ids=positions if packed else None, segment_ids=segments if packed else None)


def greedy_pack(examples: Sequence[Example], max_tokens: int) -> list[list[Example]]:
    """First-fit packing into rows of at most max_tokens, in order (deterministic)."""
    rows: list[list[Example]] = []
    sizes: list[int] = []
    for example in examples:
        n = len(example.input_ids)
        if n > max_tokens:
            raise ValueError(f"an example of {n} tokens does not fit max_tokens={max_tokens}")
        for r, size in enumerate(sizes):
            if size + n <= max_tokens:
                rows[r].append(example)
                sizes[r] += n
                break
        else:
            rows.append([example])
            sizes.append(n)
    return rows
