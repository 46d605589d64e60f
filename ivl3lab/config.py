"""Configs for InternVL3: frozen dataclasses with named presets.

One architecture family (InternViT -> pixel-unshuffle -> MLP projector -> Qwen2.5): a new size is a preset,
not a branch. Configs are frozen so a model never changes shape behind your back; use
`dataclasses.replace` (or `InternVLConfig.replace`) to derive a variant.

Values for the released sizes come from `shared/spec/internvl3.md` §1.2 and §1.6.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

ATTN_BACKENDS = ("sdpa", "eager", "flash", "flex")


@dataclass(frozen=True)
class VisionConfig:
    """InternViT. The 300M and 6B encoders differ only in these fields."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_layers: int = 24
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 448  # one tile is image_size x image_size pixels
    qkv_bias: bool = True
    qk_norm: bool = False  # 6B: RMSNorm over the full hidden dim of q and k, before the head split
    norm_type: str = "layer_norm"  # or "rms_norm" (6B)
    layer_norm_eps: float = 1e-6
    layer_scale_init: float = 0.1  # ls1/ls2 init; real values come from the checkpoint
    drop_path_rate: float = 0.0  # stochastic depth, linear over depth, inactive in eval()
    hidden_act: str = "gelu"

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"norm_type must be 'layer_norm' or 'rms_norm', got {self.norm_type!r}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        """Patches per side of one tile (32 for 448/14)."""
        return self.image_size // self.patch_size


@dataclass(frozen=True)
class TextConfig:
    """Qwen2 / Qwen2.5 decoder."""

    vocab_size: int = 151674
    hidden_size: int = 896
    intermediate_size: int = 4864
    num_layers: int = 24
    num_heads: int = 14
    num_kv_heads: int = 2
    head_dim: Optional[int] = None  # defaults to hidden_size // num_heads
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    rope_scaling_type: Optional[str] = None  # None or "dynamic" (NTK, only active beyond max_position_embeddings)
    rope_scaling_factor: float = 1.0
    tie_word_embeddings: bool = False
    bos_token_id: Optional[int] = 151643
    eos_token_id: Optional[int] = 151643  # the LLM's eos (<|endoftext|>), NOT the chat stop token <|im_end|>
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.rope_scaling_type not in (None, "dynamic"):
            raise ValueError(f"unsupported rope scaling {self.rope_scaling_type!r} (supported: None, 'dynamic')")

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


@dataclass(frozen=True)
class InternVLConfig:
    """The whole model plus the image/prompt settings that travel with a checkpoint."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    downsample_ratio: float = 0.5  # pixel-unshuffle: 2x2 patches -> 1 token
    ps_version: str = "v2"
    select_layer: int = -1  # which ViT hidden state feeds the projector (-1 = last)
    image_token_id: int = 151667  # <IMG_CONTEXT>; always re-derived from the tokenizer when one is loaded
    min_dynamic_patch: int = 1
    max_dynamic_patch: int = 12
    use_thumbnail: bool = True
    template: str = "internvl2_5"
    system_message: Optional[str] = None  # None -> the template's default system message
    attn_implementation: str = "sdpa"

    def __post_init__(self):
        if self.ps_version not in ("v1", "v2"):
            raise ValueError(f"ps_version must be 'v1' or 'v2', got {self.ps_version!r}")
        if self.attn_implementation not in ATTN_BACKENDS:
            raise ValueError(f"attn_implementation must be one of {ATTN_BACKENDS}, got {self.attn_implementation!r}")
        if self.downsample_ratio != 0.5:
            raise ValueError(f"only downsample_ratio 0.5 (2x2 pixel-unshuffle) is supported, got {self.downsample_ratio}")
        if self.vision.grid_size % 2:
            raise ValueError(
                f"the patch grid ({self.vision.grid_size} per side) must be even for the 2x2 pixel-unshuffle: "
                f"use an image_size that is a multiple of {2 * self.vision.patch_size}")

    @property
    def num_image_token(self) -> int:
        """LLM tokens per tile: (448/14)^2 * 0.5^2 = 256 for the released models."""
        return int(self.vision.grid_size ** 2 * self.downsample_ratio ** 2)

    def replace(self, **changes) -> "InternVLConfig":
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------------------------
# Presets. Vision towers: InternViT-300M-448px-V2_5 and InternViT-6B-448px-V2_5 (spec §1.2).

VIT_300M = VisionConfig()
VIT_6B = VisionConfig(hidden_size=3200, intermediate_size=12800, num_layers=45, num_heads=25,
                      qkv_bias=False, qk_norm=True, norm_type="rms_norm")

_QWEN_DYNAMIC = dict(rope_scaling_type="dynamic", rope_scaling_factor=2.0)

PRESETS: dict[str, InternVLConfig] = {
    "internvl3-1b": InternVLConfig(VIT_300M, TextConfig(hidden_size=896, intermediate_size=4864, num_layers=24,
                                                        num_heads=14, num_kv_heads=2, **_QWEN_DYNAMIC)),
    "internvl3-2b": InternVLConfig(VIT_300M, TextConfig(hidden_size=1536, intermediate_size=8960, num_layers=28,
                                                        num_heads=12, num_kv_heads=2, **_QWEN_DYNAMIC)),
    "internvl3-8b": InternVLConfig(VIT_300M, TextConfig(hidden_size=3584, intermediate_size=18944, num_layers=28,
                                                        num_heads=28, num_kv_heads=4, **_QWEN_DYNAMIC)),
    "internvl3-14b": InternVLConfig(VIT_300M, TextConfig(hidden_size=5120, intermediate_size=13824, num_layers=48,
                                                         num_heads=40, num_kv_heads=8, **_QWEN_DYNAMIC)),
    "internvl3-38b": InternVLConfig(VIT_6B, TextConfig(hidden_size=5120, intermediate_size=27648, num_layers=64,
                                                       num_heads=40, num_kv_heads=8, **_QWEN_DYNAMIC)),
    "internvl3-78b": InternVLConfig(VIT_6B, TextConfig(hidden_size=8192, intermediate_size=29568, num_layers=80,
                                                       num_heads=64, num_kv_heads=8, **_QWEN_DYNAMIC)),
    # `tiny`: every mechanism of the real model (tiles, thumbnail, 2x2 unshuffle, GQA, q/k/v bias, layer
    # scale) at a size that trains on a laptop CPU. 112-px tiles keep 8x8 patches -> 16 tokens per tile.
    # Layer scale starts at 1.0, not the released 0.1: trained from scratch, a ViT probe learned toy shapes
    # to 88 % in 300 steps with 1.0 against 55 % with 0.1 (docs/toy_results.md).
    # vocab_size matches the tokenizer shipped in ivl3lab/assets/tiny_tokenizer.
    "tiny": InternVLConfig(
        VisionConfig(hidden_size=64, intermediate_size=256, num_layers=4, num_heads=4, image_size=112,
                     layer_scale_init=1.0),
        TextConfig(vocab_size=1024, hidden_size=128, intermediate_size=384, num_layers=4, num_heads=4,
                   num_kv_heads=2, rope_theta=10_000.0, max_position_embeddings=8192, tie_word_embeddings=False,
                   bos_token_id=None, eos_token_id=None, pad_token_id=None),
        image_token_id=5,  # <IMG_CONTEXT> in the tiny tokenizer (checked by tests/test_processor.py)
        max_dynamic_patch=6,
    ),
}


def get_preset(name: str) -> InternVLConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise KeyError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}") from None
