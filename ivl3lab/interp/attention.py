"""Attention maps: text->image attention in the LLM, per-tile InternViT patterns, and attention rollout.

Patterns are the expensive activations (H x L x Lk per layer), so nothing here asks for more than it keeps:
only the hooked layers materialise a pattern, only the chosen query rows are computed (`pattern_queries`)
and only the image-key columns are kept (`pattern_keys`). The other layers run the fast attention kernel.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from ..hooks import hooks, run_with_cache
from .probe import Probe

Queries = Union[str, int, Sequence[int], torch.Tensor]
LM_PATTERN = "language.layers.{}.self_attn.hook_pattern"
VIT_PATTERN = "vision.layers.{}.attn.hook_pattern"


# ------------------------------------------------------------------------------------------------- inputs
def unpack(model, inputs) -> dict:
    """A Probe or a processor output (one sample) -> tensors on the model's device + bookkeeping."""
    if isinstance(inputs, Probe):
        ids, mask, pixels, answer_len = inputs.input_ids, inputs.attention_mask, inputs.pixel_values, inputs.answer_len
    else:
        ids, mask, pixels, answer_len = inputs["input_ids"], inputs.get("attention_mask"), inputs.get("pixel_values"), 0
    if ids.shape[0] != 1:
        raise ValueError(f"attention maps are drawn for one sample at a time, got a batch of {ids.shape[0]}")
    device, dtype = model.device, model.dtype
    return dict(input_ids=ids.to(device), attention_mask=None if mask is None else mask.to(device),
                pixel_values=None if pixels is None else pixels.to(device, dtype), answer_len=answer_len,
                image_positions=(ids[0] == model.config.image_token_id).nonzero().flatten())


def query_positions(queries: Queries, input_ids: torch.Tensor, image_positions: torch.Tensor,
                    answer_len: int = 0) -> torch.Tensor:
    """Resolve a query choice to absolute positions [Q].

    "last": the last position (with processor inputs: the one that predicts the reply's first token);
    "answer": the positions that predict a Probe's answer tokens; "text": every non-image position after the
    first image token (earlier text cannot see the image: causal mask); or explicit positions (negative ok).
    """
    length = input_ids.shape[-1]
    if isinstance(queries, str):
        if queries == "last":
            return torch.tensor([length - 1])
        if queries == "answer":
            if not answer_len:
                raise ValueError('queries="answer" needs a Probe (it knows where the answer is)')
            return torch.arange(length - answer_len - 1, length - 1)
        if queries == "text":
            if len(image_positions) == 0:
                raise ValueError("the input has no image tokens")
            text = torch.ones(length, dtype=torch.bool)
            text[image_positions] = False
            text[: int(image_positions[0])] = False
            return text.nonzero().flatten()
        raise ValueError(f'queries must be "last", "answer", "text" or positions, got {queries!r}')
    positions = torch.as_tensor(queries, dtype=torch.long).flatten()
    return positions % length


def _reduce(x: torch.Tensor, how: Optional[str], dim: int) -> torch.Tensor:
    if how is None:
        return x
    if how == "mean":
        return x.mean(dim)
    if how == "max":
        return x.amax(dim)
    raise ValueError(f'reduction must be "mean", "max" or None, got {how!r}')


# --------------------------------------------------------------------------------------- LLM: text -> image
@torch.no_grad()
def text_image_patterns(model, inputs, layers: Optional[Sequence[int]] = None, queries: Queries = "last",
                        keys: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Raw slices of the LLM patterns: [layers, heads, Q, K] (query rows x image-key columns, float32, cpu).

    Only `layers` switch to materialised attention, only the Q rows are computed and only the K image columns
    (or the given `keys` positions) are kept, so memory grows with layers x heads x Q x K, not L^2.
    """
    x = unpack(model, inputs)
    layers = list(range(model.config.text.num_layers)) if layers is None else [int(i) for i in layers]
    rows = query_positions(queries, x["input_ids"], x["image_positions"], x["answer_len"])
    cols = x["image_positions"] if keys is None else torch.as_tensor(keys, dtype=torch.long)
    names = [LM_PATTERN.format(i) for i in layers]
    _, cache = run_with_cache(model, x["input_ids"], x["pixel_values"], attention_mask=x["attention_mask"],
                              names_filter=names, pattern_queries=rows, pattern_keys=cols, dtype=torch.float32,
                              logits_to_keep=1)  # nobody reads the logits: keep one row
    return torch.stack([cache[n][0] for n in names])  # [layers, H, Q, K]


def text_to_image_attention(model, inputs, layers: Optional[Sequence[int]] = None,
                            heads: Optional[Sequence[int]] = None, queries: Queries = "last",
                            reduce_heads: Optional[str] = "mean", reduce_layers: Optional[str] = "mean",
                            normalize: bool = False) -> torch.Tensor:
    """Attention from text queries to every image token, one score per image token (in token-map order).

    Queries are always averaged. Shape: [n_image] with both reductions; [layers, n_image] with
    reduce_layers=None; [heads, n_image] with reduce_heads=None; [layers, heads, n_image] with neither.
    normalize=True rescales each (layer, head, query) row to sum to 1 over the image: it shows *where* in the
    image a head looks and hides *how much* it looks at the image at all (often little: attention sinks).
    """
    patterns = text_image_patterns(model, inputs, layers, queries)  # [layers, H, Q, K]
    if heads is not None:
        patterns = patterns[:, torch.as_tensor(heads, dtype=torch.long)]
    if normalize:
        patterns = patterns / patterns.sum(-1, keepdim=True).clamp_min(1e-12)
    scores = patterns.mean(2)  # [layers, H, K]
    scores = _reduce(scores, reduce_heads, 1)
    return _reduce(scores, reduce_layers, 0)


def image_attention_mass(model, inputs, queries: Queries = "last") -> torch.Tensor:
    """How much of each head's attention goes to the image at all: [layers, heads] (mean over queries)."""
    return text_image_patterns(model, inputs, None, queries).sum(-1).mean(-1)


# ----------------------------------------------------------------------------------------- InternViT
@torch.no_grad()
def vision_attention(model, pixel_values: torch.Tensor, layer: int, head: Union[int, str, None] = None
                     ) -> torch.Tensor:
    """Per-tile InternViT pattern of one layer, CLS included: [T, H, N, N] (head=None), [T, N, N] for one head
    or head="mean". Only the blocks up to `layer` run; the LLM does not run at all."""
    layer = layer % model.config.vision.num_layers
    saved = {}
    with hooks(model, [(VIT_PATTERN.format(layer), lambda p, hook: saved.setdefault("p", p.detach().float().cpu()))]):
        model.vision(pixel_values.to(model.device, model.dtype), select_layer=layer + 1)
    pattern = saved["p"]
    if head is None:
        return pattern
    return pattern.mean(1) if head == "mean" else pattern[:, int(head)]


def rollout_step(acc: Optional[torch.Tensor], pattern: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """One layer of attention rollout (Abnar & Zuidema 2020). pattern [T, N, N] (heads already fused).

    The residual connection carries the token itself forward, so the effective mixing is
    residual * I + (1 - residual) * A (rows still sum to 1); layers compose by matrix product, later on the
    left: rollout_l = A~_l @ rollout_{l-1}.
    """
    eye = torch.eye(pattern.shape[-1], dtype=pattern.dtype, device=pattern.device)
    mixed = residual * eye + (1 - residual) * pattern
    mixed = mixed / mixed.sum(-1, keepdim=True)
    return mixed if acc is None else mixed @ acc


@torch.no_grad()
def vision_rollout(model, pixel_values: torch.Tensor, layers: Optional[int] = None, head_fusion: str = "mean",
                   residual: float = 0.5) -> torch.Tensor:
    """Attention rollout through the first `layers` InternViT blocks (default: those that feed the LLM).

    Returns [T, N, N]: row i = how much token i's final state draws on each input token, per tile. Heads are
    fused ("mean" or "max") inside the hook, so only one [T, N, N] product is kept, never every layer's
    [T, H, N, N] pattern.
    """
    n = model.config.vision.num_layers
    stop = model.config.select_layer % (n + 1) if layers is None else int(layers)
    if not 1 <= stop <= n:
        raise ValueError(f"rollout needs 1..{n} layers, got {stop}")
    state = {"acc": None}

    def fold(pattern, hook):
        fused = _reduce(pattern.float(), head_fusion, 1)  # [T, N, N]
        state["acc"] = rollout_step(state["acc"], fused, residual)

    names = [VIT_PATTERN.format(i) for i in range(stop)]
    with hooks(model, [(names, fold)]):
        model.vision(pixel_values.to(model.device, model.dtype), select_layer=stop)
    return state["acc"].cpu()


def rollout_patch_scores(rollout: torch.Tensor, source: str = "cls") -> torch.Tensor:
    """[T, N, N] rollout -> [T, P] patch scores. source="cls": the CLS row (the classic picture; but InternVL
    drops CLS before the projector); "patches": the mean over patch rows (what the tokens the LLM reads draw on)."""
    if source == "cls":
        return rollout[:, 0, 1:]
    if source == "patches":
        return rollout[:, 1:, 1:].mean(1)
    raise ValueError(f'source must be "cls" or "patches", got {source!r}')


def patches_to_tokens(patch_scores: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """[T, g*g] patch scores -> [T, (g/2)^2] LLM-token scores: each token merges a 2x2 patch group
    (pixel-unshuffle), row-major, so flattening over tiles gives token-map order for one image."""
    t, p = patch_scores.shape
    g = int(round(p ** 0.5))
    grid = patch_scores.reshape(t, g // 2, 2, g // 2, 2)
    merged = grid.sum((2, 4)) if reduce == "sum" else grid.mean((2, 4))
    return merged.reshape(t, -1)


__all__ = ["text_image_patterns", "text_to_image_attention", "image_attention_mass", "vision_attention",
           "vision_rollout", "rollout_step", "rollout_patch_scores", "patches_to_tokens", "query_positions",
           "unpack"]
