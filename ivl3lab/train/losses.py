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
from torch.autograd.function import once_differentiable

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
    151,674-wide projection and its cross-entropy run `chunk` positions at a time, and each chunk's gradients
    are computed right there (a fused linear + cross-entropy), so peak memory holds one chunk of logits and the
    backward pass recomputes nothing. Only positions with a loss weight go through the projection at all: image
    tokens and prompts (a third to most of an SFT batch) cost nothing there."""
    w = weights.flatten()
    keep = w.nonzero().squeeze(1)  # one host sync per batch, for the shape
    h = hidden[:, :-1].flatten(0, 1)[keep]  # [N, H], supervised positions that predict a next token
    targets = labels[:, 1:].flatten()[keep].clamp(min=0)
    w = w[keep]
    if keep.numel() == 0:  # a zero that still reaches every parameter (DDP expects a gradient for each)
        return (hidden.sum() + lm_head.weight.sum()).float() * 0.0, weights.sum()
    # gradients only where they will be asked for (not under torch.no_grad, e.g. a validation loss)
    return _LinearCrossEntropy.apply(h, lm_head.weight, targets, w, chunk, torch.is_grad_enabled()), weights.sum()


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i CE(h_i W^T, t_i) for h [N, H], W [V, H]; the gradients are made chunk by chunk in the forward
    pass and only scaled in the backward pass (the loss is a scalar), so no chunk of logits is ever recomputed.

    Matrix products run in the autocast dtype when autocast is on (as nn.Linear would), the softmax in float32.
    On CUDA the vocabulary is padded to a multiple of 64 rows: 151,674 is not a multiple of 8, and unaligned
    rows push cuBLAS onto slower kernels; the padded columns are masked out of the softmax.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, w, chunk: int, grad_enabled: bool):
        device = h.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
        vocab = weight.shape[0]
        pad = _vocab_padding(vocab, h)
        need_h, need_w = (grad_enabled and needed for needed in ctx.needs_input_grad[:2])
        with torch.autocast(device, enabled=False):
            w_mat = weight.to(dtype)
            if pad:
                w_mat = F.pad(w_mat, (0, 0, 0, pad))  # [V + pad, H]
            h = h.to(dtype)
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros(w_mat.shape, dtype=torch.float32, device=h.device) if need_w else None
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            core = _compiled_ce_grad() if h.is_cuda else _ce_grad
            for start in range(0, h.shape[0], chunk):
                piece = slice(start, start + chunk)
                loss, grad_logits = core(h[piece] @ w_mat.t(), targets[piece], w[piece], vocab)  # [n, V + pad]
                total += loss
                if need_h:
                    grad_h[piece] = grad_logits @ w_mat
                if need_w:
                    grad_w += (grad_logits.t() @ h[piece]).float()
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w[:vocab].to(weight.dtype))
        return total

    @staticmethod
    @once_differentiable  # the gradients are constants made in the forward pass: no second derivatives
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        # out of place: a second backward pass (retain_graph=True) must see the same saved gradients
        return (None if grad_h is None else grad_h * grad_total.to(grad_h.dtype),
                None if grad_w is None else grad_w * grad_total, None, None, None, None)


def _vocab_padding(vocab: int, h: torch.Tensor) -> int:
    """Rows to add to the LM head so that the chunk's products are aligned (on CUDA, to a multiple of 64)."""
    return (-vocab) % 64 if h.is_cuda else 0


def _ce_grad(logits: torch.Tensor, targets: torch.Tensor, w: torch.Tensor, vocab: int):
    """(sum_i w_i CE_i, w_i (softmax_i - onehot_i)) from logits [n, V'] whose columns from `vocab` on are padding;
    float32 math, the gradient in the logits' dtype."""
    x = logits.float()
    columns = torch.arange(x.shape[1], device=x.device)
    if x.shape[1] > vocab:
        x = x.masked_fill(columns >= vocab, float("-inf"))
    lse = torch.logsumexp(x, dim=-1, keepdim=True)  # [n, 1]
    loss = ((lse.squeeze(1) - x.gather(1, targets[:, None]).squeeze(1)) * w).sum()
    hit = (columns == targets[:, None]).to(x.dtype)  # one-hot [n, V']
    return loss, ((torch.exp(x - lse) - hit) * w[:, None]).to(logits.dtype)


_COMPILED_CE = None


def _compiled_ce_grad():
    """`_ce_grad` fused into two kernels by torch.compile (on CUDA; eager it makes several passes over the chunk)."""
    global _COMPILED_CE
    if _COMPILED_CE is None:
        _COMPILED_CE = torch.compile(_ce_grad)
    return _COMPILED_CE


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, segment_ids: Optional[torch.Tensor] = None,
            reduction: str = "token") -> torch.Tensor:
    """The loss of one batch on its own (evaluation, simple loops)."""
    total, weight = loss_sums(logits, labels, token_weights(labels, segment_ids, reduction))
    return total / weight.clamp(min=1e-12)
