"""InternViT: the vision encoder of InternVL3 (300M and 6B share this code; spec §1.1).

pixels [T, 3, S, S] -> Conv2d patches (14 px) -> prepend CLS -> + learned position embedding (bicubically
resized to the patch grid) -> N pre-norm blocks with layer scale -> hidden states [T, 1 + (S/14)^2, C].
There is no final norm: the last block's output is what the projector sees.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..config import VisionConfig
from ..hooks import HookPoint
from .ops import Block, DropPath, RMSNorm, attention, checkpoint_block


def make_norm(cfg: VisionConfig) -> nn.Module:
    if cfg.norm_type == "rms_norm":
        return RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
    return nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(3, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, 1 + cfg.grid_size ** 2, cfg.hidden_size))

    def patch_position_embedding(self, rows: int, cols: int) -> torch.Tensor:
        """Position embeddings of the patches for a rows x cols grid (bicubic, align_corners=False, in fp32)."""
        pos = self.position_embedding[:, 1:]  # [1, g*g, C]
        g = self.cfg.grid_size
        if (rows, cols) == (g, g):
            return pos
        grid = rearrange(pos.float(), "1 (h w) c -> 1 c h w", h=g)
        grid = F.interpolate(grid, size=(rows, cols), mode="bicubic", align_corners=False)
        return rearrange(grid, "1 c h w -> 1 (h w) c").to(pos.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))  # [T, C, rows, cols]
        rows, cols = patches.shape[-2:]
        patches = rearrange(patches, "t c h w -> t (h w) c")  # row-major patch order
        cls = self.class_embedding.expand(patches.shape[0], -1, -1).to(patches.dtype)
        pos = torch.cat([self.position_embedding[:, :1], self.patch_position_embedding(rows, cols)], dim=1)
        return torch.cat([cls, patches], dim=1) + pos.to(patches.dtype)  # [T, 1 + rows*cols, C]


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.qkv_bias)
        # QK-norm (6B): over the full hidden dim, i.e. all heads jointly, before the head split.
        self.q_norm = RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.qk_norm else nn.Identity()
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.backend = "sdpa"
        self.hook_q, self.hook_k, self.hook_v = HookPoint(), HookPoint(), HookPoint()  # [T, H, N, D]
        self.hook_pattern = HookPoint()  # [T, H, N, N], per tile; computed only when hooked
        self.hook_z = HookPoint()  # [T, N, H, D] per-head output, before `proj`

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)  # 3 x [T, N, C]; the "3" is outermost in the fused weight
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (rearrange(t, "t n (h d) -> t h n d", h=self.num_heads) for t in (q, k, v))
        q, k, v = self.hook_q(q), self.hook_k(k), self.hook_v(v)
        out, _ = attention(q, k, v, backend=self.backend, pattern_hook=self.hook_pattern)  # [T, N, H, D]
        return self.proj(rearrange(self.hook_z(out), "t n h d -> t n (h d)"))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.hook_post = HookPoint()  # [T, N, I] after the activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.hook_post(F.gelu(self.fc1(x))))  # exact (erf) GELU


class VisionBlock(Block):
    """x += drop_path(ls1 * attn(norm1(x))); x += drop_path(ls2 * mlp(norm2(x)))."""

    def __init__(self, cfg: VisionConfig, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = make_norm(cfg)
        self.attn = VisionAttention(cfg)
        self.ls1 = nn.Parameter(torch.full((cfg.hidden_size,), cfg.layer_scale_init))
        self.norm2 = make_norm(cfg)
        self.mlp = VisionMLP(cfg)
        self.ls2 = nn.Parameter(torch.full((cfg.hidden_size,), cfg.layer_scale_init))
        self.drop_path = DropPath(drop_path)
        # residual stream [T, N, C]; *_out are the layer-scaled terms added to it
        self.hook_resid_pre, self.hook_attn_out, self.hook_resid_mid = HookPoint(), HookPoint(), HookPoint()
        self.hook_mlp_out, self.hook_resid_post = HookPoint(), HookPoint()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.drop_path(self.hook_attn_out(self.attn(self.norm1(x)) * self.ls1)))
        return self.hook_resid_post(x + self.drop_path(self.hook_mlp_out(self.mlp(self.norm2(x)) * self.ls2)))


class InternViT(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        n = cfg.num_layers
        rates = [cfg.drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # linear in depth, 0 at the bottom
        self.layers = nn.ModuleList(VisionBlock(cfg, rate) for rate in rates)
        self.hook_embed = HookPoint()  # [T, 1 + P, C] CLS + patches + positions
        self.gradient_checkpointing: Union[bool, str] = False  # False, True / "full", or "selective"

    def forward(self, pixel_values: torch.Tensor, select_layer: int = -1) -> torch.Tensor:
        """Hidden state `select_layer` ([T, 1 + P, C]); index 0 = embeddings, -1 = last block.

        Only the blocks needed for `select_layer` are run.
        """
        n = len(self.layers)
        stop = select_layer % (n + 1)  # number of blocks to run
        x = self.hook_embed(self.embeddings(pixel_values))
        for layer in self.layers[:stop]:
            if self.gradient_checkpointing and self.training:
                x = checkpoint_block(layer, x, mode=self.gradient_checkpointing)
            else:
                x = layer(x)
        return x
