"""Variable Visual Position Encoding (V2PE, spec §5): visual tokens advance the position by delta <= 1.

Text tokens (including `<img>` and `</img>`) advance by 1; the tokens of one image advance by delta each, so
a 13-tile image costs 3,328 x delta positions instead of 3,328. After an image the position is rounded up, and
`</img>` continues from there. delta = 1 reproduces the ordinary positions exactly. During training delta is
drawn per image from {1, 1/2, 1/4, ..., 1/256}; RoPE takes the float positions as they are.
"""
from __future__ import annotations

import math
import random
from typing import Optional, Sequence, Union

import torch

DELTAS = tuple(1 / 2 ** k for k in range(9))  # 1, 1/2, ..., 1/256


def image_runs(ids: torch.Tensor, image_token_id: int) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of image tokens in a 1-D id sequence (one run per image)."""
    is_image = (ids == image_token_id).tolist()
    runs, start = [], None
    for i, flag in enumerate(is_image + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append((start, i))
            start = None
    return runs


def v2pe_position_ids(input_ids: torch.Tensor, image_token_id: int,
                      delta: Union[float, Sequence[float], str] = 1.0,
                      attention_mask: Optional[torch.Tensor] = None,
                      rng: Optional[random.Random] = None) -> torch.Tensor:
    """Float positions [B, L]. `delta`: one value, one value per image (in order), or "random" (training)."""
    rows = []
    for b, ids in enumerate(input_ids):
        valid = attention_mask[b].bool() if attention_mask is not None else torch.ones_like(ids, dtype=torch.bool)
        runs = image_runs(torch.where(valid, ids, torch.full_like(ids, -1)), image_token_id)
        if delta == "random":
            rng = rng or random.Random(0)
            deltas = [rng.choice(DELTAS) for _ in runs]
        elif isinstance(delta, (int, float)):
            deltas = [float(delta)] * len(runs)
        else:
            deltas = [float(d) for d in delta]
            if len(deltas) != len(runs):
                raise ValueError(f"sample {b} has {len(runs)} images but {len(deltas)} deltas were given")
        step = torch.ones(len(ids), dtype=torch.float64)  # increment that leads INTO each token
        step[~valid] = 0.0
        jump_after = {}
        for (start, end), d in zip(runs, deltas):
            step[start:end] = d
            jump_after[end] = True
        pos = torch.zeros(len(ids), dtype=torch.float64)
        current = -1.0
        first = int(valid.nonzero()[0]) if valid.any() else 0
        for i in range(len(ids)):
            if i < first:
                continue
            if i in jump_after:  # back to integer positions after an image
                current = math.ceil(current - 1e-9)
            current += float(step[i]) if i > first else 1.0
            pos[i] = current
        rows.append(pos)
    return torch.stack(rows).float()
