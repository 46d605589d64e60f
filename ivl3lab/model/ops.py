"""Small pieces shared by the vision and language towers: RMSNorm, stochastic depth, the compilable block base,
activation checkpointing, attention backends.

The attention function is the one place where the backend choice lives:
- `sdpa`  (default) torch.nn.functional.scaled_dot_product_attention: fast, never materialises probabilities;
- `eager` explicit softmax(QK^T)V: slower, but the probabilities exist as a tensor (hooks, attention maps);
- `flash` flash-attn's kernel when the package is installed and the tensors are fp16/bf16 on CUDA; packed
          training rows go through a varlen kernel (`PackedRows`), one causal run per example: flash-attn's,
          or without the package PyTorch's own (`torch.nn.attention.varlen`, torch >= 2.10);
- `flex`  PyTorch's FlexAttention for packed training rows: a block-sparse mask skips the blocks where one
          packed example would look at another (the varlen saving, with no extra package); compiled on CUDA.
          Where nothing is packed it is `sdpa`.
All compute the same function; tests check they agree within tolerance.
"""
from __future__ import annotations

import importlib.util
import inspect
import warnings
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _torch_module
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_HAS_FLASH = importlib.util.find_spec("flash_attn") is not None


def _find_torch_varlen():
    """PyTorch's varlen flash kernel and the keywords this torch's version takes, or None (torch < 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


_TORCH_VARLEN = _find_torch_varlen()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight, normalised in float32, scaled in x's dtype (as Qwen2 does)."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in float32 (as InternViT-6B and Qwen2 do)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample while training; identity in eval()."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        # a comparison with rand rather than bernoulli_(keep): torch.compile then keeps `p` symbolic, so blocks with
        # different rates (linear in depth) share one compiled graph instead of one each; float32 rand, since in
        # bf16 `keep` would be rounded to a multiple of 1/256
        mask = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) < keep  # float32: exact rates
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


_COMPILED_BLOCKS: dict = {}  # (block class, options) -> torch.compile'd unbound forward, shared by every instance


class Block(nn.Module):
    """Base of the ViT and LLM blocks: a block can run a torch.compile'd forward (`compile_forward`).

    Why not `nn.Module.compile`: compiled code skips the forward hooks of the modules inside it, silently. Here a
    block runs eagerly whenever any module in it (hook points included) or a global module hook is hooked, and
    compiled otherwise. So under FSDP2, whose hooks sit on each block, blocks run eagerly. The unbound `forward` is
    compiled once per class and options, so one compilation serves every layer of a tower (the weights are inputs
    of the graph, not constants).
    """

    compile_options: Optional[dict] = None

    def compile_forward(self, options: Optional[dict] = None) -> None:
        """Run compiled with `torch.compile(**options)` from now on; None: eager again."""
        self.compile_options = None if options is None else dict(options)
        # plain attributes, not submodules: what `__call__` needs on every call, worked out once
        self.__dict__["_all_modules"] = tuple(self.modules())
        self.__dict__["_compile_key"] = None if options is None else (type(self), repr(sorted(options.items())))

    def _hooked(self) -> bool:
        if _torch_module._global_forward_hooks or _torch_module._global_forward_pre_hooks:
            return True
        return any(m._forward_hooks or m._forward_pre_hooks for m in self.__dict__["_all_modules"])

    def runs_eagerly(self, *args, **kwargs) -> bool:
        """Calls that must not go through the compiled graph (subclasses say which)."""
        return False

    def __call__(self, *args, **kwargs):
        if (self.compile_options is None or torch.compiler.is_compiling() or self._hooked()
                or self.runs_eagerly(*args, **kwargs)):
            return super().__call__(*args, **kwargs)
        key = self.__dict__["_compile_key"]
        if key not in _COMPILED_BLOCKS:
            _COMPILED_BLOCKS[key] = torch.compile(type(self).forward, **self.compile_options)
        return _COMPILED_BLOCKS[key](self, *args, **kwargs)


def _op_set(*names: str) -> frozenset:
    return frozenset(getattr(torch.ops.aten, n).default for n in names if hasattr(torch.ops.aten, n))


# Kept by selective checkpointing: the matrix products and attention kernels, the ops whose recomputation costs
# most per byte saved. Everything else in a block (norms, RoPE, activations, casts) is recomputed.
_SELECTIVE_SAVE = _op_set("mm", "addmm", "bmm", "_scaled_dot_product_flash_attention",
                          "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                          "_scaled_dot_product_flash_attention_for_cpu", "_flash_attention_forward")
if _TORCH_VARLEN is not None and hasattr(torch.ops.torch_attn, "_varlen_attn"):
    _SELECTIVE_SAVE |= {torch.ops.torch_attn._varlen_attn.default}  # PyTorch's varlen kernel (packed rows)


def _selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SELECTIVE_SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_block(block: nn.Module, *args, mode="full"):
    """Run `block` under activation checkpointing. "full" (or True): keep only its inputs and recompute the block in
    the backward pass (least memory); "selective": keep the outputs of its matrix products and SDPA's attention
    kernels and recompute only the elementwise work (norms, RoPE, activations, casts): less memory than no
    checkpointing, much less recomputation than "full" (FlexAttention's and flash-attn's outputs are recomputed;
    PyTorch's varlen kernel's are kept)."""
    if mode == "selective":
        return checkpoint(block, *args, use_reentrant=False,
                          context_fn=partial(create_selective_checkpoint_contexts, _selective_policy))
    if mode is not True and mode != "full":
        raise ValueError(f"checkpointing mode must be 'full' or 'selective', got {mode!r}")
    return checkpoint(block, *args, use_reentrant=False)


def packed_block_mask(segment_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None):
    """FlexAttention BlockMask for packed rows, segment_ids [B, L] (-1 = padding), attention_mask [B, L] (0 =
    padding) or None: causal attention inside each example, never to padding. A padding position sees only
    itself (its output is never read; the dense mask lets it see earlier padding too, equally unread)."""
    from torch.nn.attention.flex_attention import create_block_mask

    real = segment_ids >= 0 if attention_mask is None else (segment_ids >= 0) & attention_mask.bool()

    def inside_example(b, h, q, k):
        return ((segment_ids[b, q] == segment_ids[b, k]) & real[b, q] & real[b, k] & (k <= q)) | (q == k)

    batch, length = segment_ids.shape
    return create_block_mask(inside_example, B=batch, H=None, Q_LEN=length, KV_LEN=length,
                             device=segment_ids.device)


class PackedRows:
    """Packed rows for a varlen kernel: the flattened [B * L] tokens cut into runs, one per packed example and one
    per row's padding tail, each attending causally within itself (cu_seqlens, int32).

    Made only where a varlen kernel could run (`Qwen2._varlen_packing`: CUDA, half-precision attention, flash-attn
    or torch >= 2.10; elsewhere the plain dense mask). Compiled blocks take it as an argument, so its two shapes
    are bucketed to keep the number of graphs small: the runs are padded with empty ones to a power of two, and
    the longest run (a host integer the kernel needs) is rounded up to a power of two; both only add thread
    blocks that exit at once. Where the kernel still cannot run (a layer with another backend), `attention`
    uses the equivalent dense mask, made on first use by `dense` (never on the varlen path: at B x L x L it is
    what varlen avoids)."""

    def __init__(self, segment_ids: torch.Tensor, dense_mask):
        batch, length = segment_ids.shape
        flat = segment_ids.flatten()  # [B * L]
        starts = torch.ones_like(flat, dtype=torch.bool)
        starts[1:] = flat[1:] != flat[:-1]
        starts[::length] = True  # a run never crosses rows
        bounds = torch.cat([starts.nonzero().flatten(), flat.new_tensor([flat.numel()])])  # [runs + 1]
        runs = bounds.numel() - 1
        empty = (1 << (runs - 1).bit_length()) - runs  # empty runs (start = end = all tokens) up to a power of two
        self.cu_seqlens = torch.cat([bounds, bounds[-1:].expand(empty)]).to(torch.int32)  # [2^k + 1]
        longest = int(bounds.diff().max())  # a host sync (nonzero was one too): the kernel needs it on the host
        self.max_len = min(1 << (longest - 1).bit_length(), flat.numel())
        self._dense_mask, self._dense = dense_mask, None

    def dense(self) -> torch.Tensor:
        if self._dense is None:
            self._dense = self._dense_mask()
        return self._dense


def _varlen(q, k, v, rows: PackedRows, scale):
    """q [B, Hq, L, D], k/v [B, Hkv, L, D] -> [B, L, Hq, D]: flash-attn's varlen kernel, or PyTorch's."""
    batch, heads, length, dim = q.shape

    def tokens(x):  # [B, H, L, D] -> [B * L, H, D]
        return x.transpose(1, 2).reshape(batch * length, x.shape[1], dim)

    q, k, v = tokens(q), tokens(k), tokens(v)
    if _HAS_FLASH:  # groups the query heads itself (GQA)
        from flash_attn import flash_attn_varlen_func

        out = flash_attn_varlen_func(q, k, v, rows.cu_seqlens, rows.cu_seqlens, rows.max_len, rows.max_len,
                                     softmax_scale=scale, causal=True)
    else:
        out = _torch_varlen_causal(q, k, v, rows.cu_seqlens, rows.max_len, scale)
    return out.view(batch, length, heads, dim)


def _torch_varlen_causal(q, k, v, cu_seqlens, max_len: int, scale: float):
    """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D] with torch's varlen_attn, whose keywords changed between
    releases: 2.10 takes `is_causal` and no scale or GQA flag; 2.11 `window_size=(-1, 0)` and `scale`, still no
    GQA flag; later ones also `enable_gqa`. Without the flag the key/value heads are repeated (query head h uses
    key/value head h // (Hq / Hkv), as in grouped-query attention)."""
    kernel, keywords = _TORCH_VARLEN
    options = {"window_size": (-1, 0)} if "window_size" in keywords else {"is_causal": True}
    if "scale" in keywords:
        options["scale"] = scale
    elif scale != q.shape[-1] ** -0.5:  # the kernel's own scale is 1/sqrt(D)
        q = q * (scale * q.shape[-1] ** 0.5)
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in keywords:
            options["enable_gqa"] = True
        else:
            k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    return kernel(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, **options)


_COMPILED_FLEX = None


def _flex_attention(q, k, v, block_mask, scale):
    """Compiled on CUDA (the fused kernel); eagerly elsewhere, where it is a reference implementation."""
    global _COMPILED_FLEX
    from torch.nn.attention.flex_attention import flex_attention

    gqa = q.shape[1] != k.shape[1]
    if q.is_cuda:
        if _COMPILED_FLEX is None:
            _COMPILED_FLEX = torch.compile(flex_attention, dynamic=False)
        return _COMPILED_FLEX(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    with warnings.catch_warnings():  # "called without torch.compile": intended off CUDA
        warnings.simplefilter("ignore", UserWarning)
        return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)


def varlen_kernel_for(x: torch.Tensor, attention_dtype: torch.dtype) -> bool:
    """A varlen kernel (flash-attn's or PyTorch's) can run for x's device and the dtype attention will see: both
    are flash-attention 2 kernels, which need an Ampere or newer GPU (sm80+) and fp16/bf16."""
    return ((_HAS_FLASH or _TORCH_VARLEN is not None) and x.is_cuda
            and attention_dtype in (torch.float16, torch.bfloat16)
            and torch.cuda.get_device_capability(x.device) >= (8, 0))


def flash_available(*tensors: torch.Tensor) -> bool:
    return _HAS_FLASH and all(t.is_cuda and t.dtype in (torch.float16, torch.bfloat16) for t in tensors)


def attention(
    q: torch.Tensor,  # [B, Hq, Lq, D]
    k: torch.Tensor,  # [B, Hkv, Lk, D]
    v: torch.Tensor,  # [B, Hkv, Lk, D]
    *,
    backend: str = "sdpa",
    mask=None,  # bool [B, 1, Lq, Lk], True = may attend; None = no mask; a flex BlockMask (backend "flex"); or
    # PackedRows (backend "flash")
    causal: bool = False,  # only used when mask is None
    scale: Optional[float] = None,
    pattern_hook=None,  # a HookPoint: when it has hooks, the probabilities are computed and passed through it
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Returns (output [B, Lq, Hq, D], probabilities [B, Hq, Lq, Lk] or None).

    Probabilities exist only on the eager path: backend "eager", or a pattern hook that is listening. A hook
    that returns a tensor replaces the probabilities (an intervention). With `pattern_hook.query_index` set,
    the output comes from the fast backend and only those query rows of the pattern are computed (read-only).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    listening = pattern_hook is not None and pattern_hook.active
    if isinstance(mask, PackedRows):  # made only where the kernel runs (varlen_kernel_for, for this dtype)
        if backend == "flash" and not listening:
            return _varlen(q, k, v, mask, scale), None
        mask = mask.dense()
    if listening and pattern_hook.query_index is not None:
        out, _ = attention(q, k, v, backend=backend, mask=mask, causal=causal, scale=scale)
        rows = pattern_hook.query_index.to(q.device)
        probs = _probabilities(q, k, _full_mask(q, k, mask, causal), scale, rows)
        if pattern_hook(probs) is not probs:
            raise ValueError(f"{pattern_hook.name}: a pattern hook cannot edit the pattern when only some query "
                             f"rows are computed (pattern_queries); drop pattern_queries to intervene")
        return out, probs
    if type(mask).__name__ == "BlockMask":  # only Qwen2 makes one: backend "flex", packed rows, nothing hooked
        return _flex_attention(q, k, v, mask, scale).transpose(1, 2), None
    if listening or backend == "eager":
        probs = _probabilities(q, k, _full_mask(q, k, mask, causal), scale)
        if listening:
            probs = pattern_hook(probs)
        v = _repeat_kv(v, q.shape[1] // v.shape[1])
        return torch.matmul(probs, v).transpose(1, 2), probs  # [B, Lq, Hq, D]

    if backend == "flash" and mask is None and flash_available(q, k, v):
        from flash_attn import flash_attn_func

        # flash-attn wants [B, L, H, D]; its causal mask is aligned bottom-right, which is what a decode
        # step with a KV cache needs (Lq < Lk).
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                              softmax_scale=scale, causal=causal)
        return out, None
    if backend == "flash" and not torch.compiler.is_compiling():  # once per place (Python's default filter); in
        # a compiled block it would break the graph
        warnings.warn("flash attention needs flash-attn, CUDA fp16/bf16 tensors and no padding mask; "
                      "falling back to sdpa where that does not hold", stacklevel=2)
    if backend not in ("sdpa", "flash", "flex"):  # flex without a block mask: nothing packed, plain SDPA
        raise ValueError(f"unknown attention backend {backend!r}")
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                         scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2), None


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)  # [B, Hkv, L, D] -> [B, Hq, L, D]


def _full_mask(q, k, mask, causal) -> Optional[torch.Tensor]:
    """The explicit bool mask [.., Lq, Lk] (causal aligned to the last key), or None for full attention."""
    if mask is not None or not causal:
        return mask
    lq, lk = q.shape[-2], k.shape[-2]
    return torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq)


def _probabilities(q, k, mask, scale, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(q k^T * scale) over the keys, in float32, cast back; only query `rows` if given."""
    if rows is not None:
        q = q[:, :, rows]
        mask = None if mask is None else mask[..., rows, :]
    k = _repeat_kv(k, q.shape[1] // k.shape[1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # [B, Hq, Lq, Lk]
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)
