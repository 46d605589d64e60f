"""Qwen2 / Qwen2.5 decoder: the language half of InternVL3 (spec §1.6).

Pre-norm blocks (RMSNorm) with grouped-query attention (q/k/v with bias, o without), rotary position
embedding and a SwiGLU MLP. RoPE accepts float position ids, so V2PE's fractional positions (spec §5) need no
special path. The KV cache is a plain per-layer list of tensors that grows by concatenation, or a preallocated
static one. `decode_block` is a block's single-token step in functional form, with fixed shapes and no host
sync, which ivl3lab.decoding captures as a CUDA graph (and optionally compiles once for all layers).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Optional, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..config import TextConfig
from ..hooks import HookPoint
from . import ops
from .ops import Block, PackedRows, RMSNorm, attention, checkpoint_block, packed_block_mask, rms_norm


@dataclass
class KVCache:
    """Keys/values of every layer, [B, Hkv, T, D] each; the caller keeps the attention mask."""

    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer == len(self.keys):
            self.keys.append(k)
            self.values.append(v)
        else:
            self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
        return self.keys[layer], self.values[layer]


class StaticKVCache:
    """Preallocated keys/values [B, Hkv, max_len, D] per layer, written in place: no reallocation and no copy
    of the whole cache per decoding step (KVCache's concatenation costs O(length) every step).
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device):
        shape = (batch, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self._length = 0  # tokens stored; advanced after the last layer wrote its step

    @property
    def length(self) -> int:
        return self._length

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self._length, self._length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"static KV cache full: {end} tokens > max_len {self.max_len}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        if layer == len(self.keys) - 1:
            self._length = end
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class RotaryEmbedding(nn.Module):
    """cos/sin tables computed on the fly from (possibly fractional) positions, in float32."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.dim = cfg.dim_per_head
        self.register_buffer("inv_freq", self._inv_freq(cfg.rope_theta), persistent=False)

    def _inv_freq(self, base: float) -> torch.Tensor:
        return 1.0 / (base ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim))

    def _apply(self, fn, recurse=True):
        """`.to(bfloat16)` must not round the frequencies (an angle error of ~0.6 rad at position 3,400):
        after any move/cast, rebuild them in float32 on the new device."""
        super()._apply(fn, recurse)
        self.inv_freq = self._inv_freq(self.cfg.rope_theta).to(self.inv_freq.device)
        return self

    def forward(self, position_ids: torch.Tensor, max_position: Optional[int] = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, L] (int or float) -> cos, sin [B, L, D] in float32.

        max_position: every position is below it (known on the host); within max_position_embeddings it spares
        dynamic NTK's look at the largest position (a device sync, which a CUDA graph cannot hold)."""
        inv_freq = self.inv_freq
        cfg = self.cfg
        known_short = max_position is not None and max_position <= cfg.max_position_embeddings
        if cfg.rope_scaling_type == "dynamic" and not known_short:
            # Dynamic NTK: the base grows only once positions pass max_position_embeddings (as in transformers).
            seq_len = float(position_ids.max()) + 1
            if seq_len > cfg.max_position_embeddings:
                f = cfg.rope_scaling_factor
                base = cfg.rope_theta * ((f * seq_len / cfg.max_position_embeddings) - (f - 1)) ** (
                    self.dim / (self.dim - 2))
                inv_freq = self._inv_freq(base).to(inv_freq.device)
        freqs = position_ids.float()[..., None] * inv_freq  # [B, L, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [B, L, D]
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, D]; cos/sin [B, L, D]."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


class SelfAttention(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, d = cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * d, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * d, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * d, bias=True)
        self.o_proj = nn.Linear(self.num_heads * d, cfg.hidden_size, bias=False)
        self.backend = "sdpa"
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()  # [B, H(kv), L, D] pre-RoPE
        self.hook_rot_q, self.hook_rot_k = HookPoint(), HookPoint()  # after RoPE
        self.hook_pattern = HookPoint()  # [B, Hq, Lq, Lk]; computed only when hooked
        self.hook_z = HookPoint()  # [B, L, Hq, D] per-head output, before o_proj

    def forward(self, x, cos, sin, mask, causal: bool, cache: Optional[KVCache]) -> torch.Tensor:
        q = rearrange(self.q_proj(x), "b l (h d) -> b h l d", h=self.num_heads)
        k = rearrange(self.k_proj(x), "b l (h d) -> b h l d", h=self.num_kv_heads)
        v = rearrange(self.v_proj(x), "b l (h d) -> b h l d", h=self.num_kv_heads)
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        q, k = self.hook_rot_q(apply_rope(q, cos, sin)), self.hook_rot_k(apply_rope(k, cos, sin))
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, Hkv, past + L, D]
        out, _ = attention(q, k, v, backend=self.backend, mask=mask, causal=causal, pattern_hook=self.hook_pattern)
        return self.o_proj(rearrange(self.hook_z(out), "b l h d -> b l (h d)"))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.hook_post = HookPoint()  # [B, L, I] gated activation, before down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.hook_post(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class DecoderBlock(Block):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = SelfAttention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = MLP(cfg)
        self.hook_resid_pre, self.hook_attn_out, self.hook_resid_mid = HookPoint(), HookPoint(), HookPoint()
        self.hook_mlp_out, self.hook_resid_post = HookPoint(), HookPoint()  # all [B, L, H]

    def runs_eagerly(self, x, cos, sin, mask, causal, cache) -> bool:
        # the cache's layer index would make one compiled graph per layer; a layer that cannot take PackedRows'
        # kernel would build its dense mask inside the graph
        return cache is not None or (isinstance(mask, PackedRows) and self.self_attn.backend != "flash")

    def forward(self, x, cos, sin, mask, causal, cache) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.hook_attn_out(self.self_attn(self.input_layernorm(x), cos, sin, mask,
                                                                      causal, cache)))
        return self.hook_resid_post(x + self.hook_mlp_out(self.mlp(self.post_attention_layernorm(x))))


def build_attention_mask(attention_mask: Optional[torch.Tensor], q_len: int, past_len: int,
                         device: torch.device, segment_ids: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """Causal + padding (+ packing) mask, bool [B, 1, Lq, Lk] (True = may attend), or None when plain causal
    attention suffices.

    attention_mask: [B, past_len + q_len], 1 for real tokens, 0 for padding.
    segment_ids: [B, L] (no cache), which packed example a token belongs to: attention stays inside it.
    A padded query row would have no key to attend to (NaN softmax), so it is allowed to see itself; its
    output is meaningless either way and never read.
    """
    if segment_ids is None and (attention_mask is None or bool(attention_mask.all())):
        return None
    mask = causal_mask(q_len, past_len, device)[0]  # [1, Lq, Lk]
    if attention_mask is not None:
        mask = mask & attention_mask[:, None, :].bool()  # [B, Lq, Lk]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    q_pos = torch.arange(past_len, past_len + q_len, device=device)[:, None]
    diagonal = torch.arange(past_len + q_len, device=device)[None, :] == q_pos  # each query sees itself
    return (mask | diagonal)[:, None]


def causal_mask(q_len: int, past_len: int, device: torch.device) -> torch.Tensor:
    """bool [1, 1, Lq, past + Lq]: query i (at absolute position past + i) sees keys 0..past + i."""
    q_pos = torch.arange(past_len, past_len + q_len, device=device)[:, None]
    k_pos = torch.arange(past_len + q_len, device=device)[None, :]
    return (k_pos <= q_pos)[None, None]


def default_position_ids(attention_mask: Optional[torch.Tensor], q_len: int, past_len: int,
                         device: torch.device) -> torch.Tensor:
    """Positions that restart at 0 at the first real token of each (left-padded) sample."""
    if attention_mask is None:
        return torch.arange(past_len, past_len + q_len, device=device)[None]
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.clamp(min=0)[:, -q_len:]


class Qwen2(nn.Module):
    """The decoder stack (no lm_head: that belongs to the whole model, like in the checkpoints)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderBlock(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg)
        self.hook_norm_out = HookPoint()  # [B, L, H] final norm output, what lm_head reads
        self.gradient_checkpointing: Union[bool, str] = False  # False, True / "full", or "selective"

    def forward(self, inputs_embeds: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                position_ids: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None,
                segment_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """inputs_embeds [B, L, H] -> final-normed hidden states [B, L, H]."""
        if segment_ids is not None and cache is not None and cache.length:
            raise ValueError("segment_ids (packed sequences) are for training forwards, not for a KV cache")
        q_len = inputs_embeds.shape[1]
        past_len = cache.length if cache is not None else 0
        device = inputs_embeds.device
        max_position = None
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, q_len, past_len, device)
            max_position = past_len + q_len  # known on the host: spares dynamic NTK RoPE a device sync
        cos, sin = self.rotary(position_ids, max_position)
        if segment_ids is not None and self._flex_packing(cache, inputs_embeds):
            mask = packed_block_mask(segment_ids, attention_mask)  # block-sparse: examples never see each other
        elif segment_ids is not None and self._varlen_packing(attention_mask, segment_ids, inputs_embeds):
            mask = PackedRows(segment_ids, partial(build_attention_mask, attention_mask, q_len, past_len, device,
                                                   segment_ids))  # a varlen kernel, or that mask if it can't run
        else:
            mask = build_attention_mask(attention_mask, q_len, past_len, device, segment_ids)
        if mask is None and past_len > 0 and q_len > 1:
            mask = causal_mask(q_len, past_len, device)  # SDPA's is_causal assumes Lq == Lk
        causal = mask is None and q_len > 1  # a single query may see every cached key
        x = inputs_embeds
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint_block(layer, x, cos, sin, mask, causal, None, mode=self.gradient_checkpointing)
            else:
                x = layer(x, cos, sin, mask, causal, cache)
        return self.hook_norm_out(self.norm(x))

    def _packing_backend(self) -> Optional[str]:
        """The backend packed rows are made for (the first layer's), or None when a layer needs the dense
        probabilities (a listening pattern hook): then every layer takes the plain dense mask."""
        if any(layer.self_attn.hook_pattern.active for layer in self.layers):
            return None
        return self.layers[0].self_attn.backend

    def _flex_packing(self, cache, x: torch.Tensor) -> bool:
        """Packed rows go through FlexAttention when the backend is "flex", there is no cache, nothing needs the
        dense probabilities, and, off CUDA, no gradient is needed (PyTorch has no CPU backward for it; the dense
        mask computes the same there)."""
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.training)
        return cache is None and self._packing_backend() == "flex" and (x.is_cuda or not needs_grad)

    def _varlen_packing(self, attention_mask: Optional[torch.Tensor], segment_ids: torch.Tensor,
                        x: torch.Tensor) -> bool:
        """Packed rows go to a varlen kernel (flash-attn's, or PyTorch's own) when the backend is "flash", x is on
        CUDA and attention runs in half precision (autocast, or half weights), nothing needs the dense
        probabilities, and the padding is where segment_ids says (-1), so runs of equal ids are the examples.
        Elsewhere the plain dense mask, so compiled blocks stay compiled."""
        autocast = x.is_cuda and torch.is_autocast_enabled("cuda")
        attention_dtype = torch.get_autocast_dtype("cuda") if autocast else x.dtype
        return (self._packing_backend() == "flash" and ops.varlen_kernel_for(x, attention_dtype)
                and (attention_mask is None or torch.equal(attention_mask.bool(), segment_ids >= 0)))

def decode_block(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, key_mask: torch.Tensor,
                 keys: torch.Tensor, values: torch.Tensor, slot: torch.Tensor,
                 norm1: torch.Tensor, qkv_weight: torch.Tensor, qkv_bias: torch.Tensor, o_weight: torch.Tensor,
                 norm2: torch.Tensor, gate_weight: torch.Tensor, up_weight: torch.Tensor, down_weight: torch.Tensor,
                 *, num_heads: int, num_kv_heads: int, eps: float) -> torch.Tensor:
    """DecoderBlock.forward for one new token per sample, as a pure function of tensors (tests check they agree).

    Why a second form: it has fixed shapes and no host sync (the cache slot is a device tensor, attention
    covers the whole cache under `key_mask`), so a decode step made of it can be captured as a CUDA graph;
    and since the weights are arguments, one torch.compile of it serves every layer. q/k/v come from one fused
    projection. No hook points: the fast path is only taken when nothing is hooked.

    x [B, 1, H]; cos/sin [B, 1, D]; key_mask bool [B, 1, 1, max_len]; keys/values [B, Hkv, max_len, D],
    written in place at `slot` [1]. -> x [B, 1, H].
    """
    head_dim = cos.shape[-1]
    qkv = F.linear(rms_norm(x, norm1, eps), qkv_weight, qkv_bias)
    q, k, v = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    q = rearrange(q, "b l (h d) -> b h l d", h=num_heads)
    k = rearrange(k, "b l (h d) -> b h l d", h=num_kv_heads)
    v = rearrange(v, "b l (h d) -> b h l d", h=num_kv_heads)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    keys.index_copy_(2, slot, k)  # [B, Hkv, 1, D] into [B, Hkv, max_len, D]
    values.index_copy_(2, slot, v)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=key_mask, enable_gqa=num_heads != num_kv_heads)
    x = x + F.linear(rearrange(out, "b h l d -> b l (h d)"), o_weight)
    h = rms_norm(x, norm2, eps)
    return x + F.linear(F.silu(F.linear(h, gate_weight)) * F.linear(h, up_weight), down_weight)
