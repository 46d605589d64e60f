"""The language-modelling loss, with the three weightings InternVL uses (spec §6), and the sums that make
gradient accumulation exact.

Per token i of a sample with n supervised tokens, weight w_i = 1 (token averaging), 1/n (sample averaging)
or 1/sqrt(n) (square averaging, InternVL2.5/3). loss = sum_i w_i CE_i / sum_i w_i, where the sums run over the
whole optimizer step (all micro-batches, all ranks) — so each micro-batch returns its two sums and the loop
divides by the step's total weight, never by a per-micro-batch mean.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

IGNORE = -100
REDUCTIONS = ("token", "sample", "square")


def token_weights(labels: torch.Tensor, segment_ids: Optional[torch.Tensor] = None,
                  reduction: str = "token") -> torch.Tensor:
    """Weights [B, L-1] for the shifted targets labels[:, 1:] (0 where nothing is supervised)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"loss reduction must be one of {REDUCTIONS}, got {reduction!r}")
    targets = labels[:, 1:]
    valid = targets != IGNORE
    if segment_ids is not None:  # never predict a packed example's first token from the previous example
        valid = valid & (segment_ids[:, 1:] == segment_ids[:, :-1])
    weights = valid.float()
    if reduction == "token":
        return weights
    seg = segment_ids[:, 1:] if segment_ids is not None else torch.zeros_like(targets)
    seg = seg.clamp(min=0)
    counts = torch.zeros(targets.shape[0], int(seg.max()) + 1, device=labels.device)
    counts.scatter_add_(1, seg, weights)  # supervised tokens per (row, example)
    n = counts.gather(1, seg).clamp(min=1)
    return weights / (n if reduction == "sample" else n.sqrt())


def loss_sums(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_i w_i CE_i, sum_i w_i) for one micro-batch; logits [B, L, V] in any dtype (CE in float32)."""
    targets = labels[:, 1:].clamp(min=0)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), reduction="none")
    return (ce * weights.flatten()).sum(), weights.sum()


def chunked_loss_sums(hidden: torch.Tensor, lm_head: torch.nn.Module, labels: torch.Tensor,
                      weights: torch.Tensor, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Same sums as `loss_sums(lm_head(hidden), ...)` without materialising the [B, L, V] logits: the
    151,674-wide projection and its cross-entropy run `chunk` positions at a time, each chunk recomputed in
    the backward pass (activation checkpointing), so peak memory holds one chunk of logits. Only positions
    with a loss weight go through the projection at all: image tokens and prompts (a third to most of an
    SFT batch) cost nothing there."""
    from torch.utils.checkpoint import checkpoint

    w = weights.flatten()
    keep = w.nonzero().squeeze(1)  # one host sync per batch, for the shape
    h = hidden[:, :-1].flatten(0, 1)[keep]  # [N, H], supervised positions that predict a next token
    targets = labels[:, 1:].flatten()[keep].clamp(min=0)
    w = w[keep]
    if keep.numel() == 0:  # a zero that still reaches every parameter (DDP expects a gradient for each)
        return (hidden.sum() + lm_head.weight.sum()).float() * 0.0, weights.sum()
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk):
        piece = slice(start, start + chunk)
        total = total + checkpoint(_chunk_ce, h[piece], lm_head.weight, targets[piece], w[piece],
                                   use_reentrant=False)
    return total, weights.sum()


def _chunk_ce(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    logits = (h @ weight.t()).float()  # [chunk, V]
    return (F.cross_entropy(logits, targets, reduction="none") * w).sum()


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, segment_ids: Optional[torch.Tensor] = None,
            reduction: str = "token") -> torch.Tensor:
    """The loss of one batch on its own (evaluation, simple loops)."""
    total, weight = loss_sums(logits, labels, token_weights(labels, segment_ids, reduction))
    return total / weight.clamp(min=1e-12)
