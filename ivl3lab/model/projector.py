"""Pixel-unshuffle (InternVL's "pixel_shuffle", spec §1.4) and the MLP projector `mlp1` (spec §1.5).

Pixel-unshuffle trades resolution for channels: every 2x2 group of neighbouring ViT patches becomes one LLM
token of 4C channels, so a 448-px tile (32x32 patches) costs 256 LLM tokens instead of 1024.
Output token (i, j) = concat(x[2i, 2j], x[2i, 2j+1], x[2i+1, 2j], x[2i+1, 2j+1]) — channel index
(dy*2 + dx)*C + c. This is NOT torch.nn.functional.pixel_unshuffle, whose channel order is c*4 + dy*2 + dx.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..hooks import HookPoint


def pixel_unshuffle(features: torch.Tensor, version: str = "v2") -> torch.Tensor:
    """[T, N, C] patch features (N = g*g, row-major, CLS already dropped) -> [T, N/4, 4C] tokens.

    'v2' (InternVL3) orders tokens row-major over the (g/2)x(g/2) grid; 'v1' (older checkpoints) returns the
    same token contents with the grid transposed (column-major).
    """
    g = int(features.shape[1] ** 0.5)
    if g * g != features.shape[1] or g % 2:
        raise ValueError(f"pixel_unshuffle needs an even square patch grid, got {features.shape[1]} patches")
    order = "t i j (dy dx c)" if version == "v2" else "t j i (dy dx c)"
    tokens = rearrange(features, f"t (i dy j dx) c -> {order}", dy=2, dx=2, i=g // 2, j=g // 2)
    return rearrange(tokens, "t a b c -> t (a b) c")  # [T, (g/2)^2, 4C]


class Projector(nn.Module):
    """mlp1: LayerNorm(4C, eps 1e-5) -> Linear(4C, H) -> exact GELU -> Linear(H, H)."""

    def __init__(self, vision_hidden: int, text_hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * vision_hidden, eps=1e-5)
        self.fc1 = nn.Linear(4 * vision_hidden, text_hidden)
        self.fc2 = nn.Linear(text_hidden, text_hidden)
        self.hook_unshuffled = HookPoint()  # [T, n, 4C] pixel-unshuffled ViT tokens
        self.hook_out = HookPoint()  # [T, n, H] image tokens in the LLM's embedding space

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hook_unshuffled(x)
        return self.hook_out(self.fc2(F.gelu(self.fc1(self.norm(x)))))
