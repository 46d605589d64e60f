"""Builders for the transformers reference model used by the parity tests."""
import torch
from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig, Qwen2Config

IMAGE_TOKEN_ID = 5  # <IMG_CONTEXT> in ivl3lab's tiny tokenizer
IMAGE_SIZE = 112  # 8x8 patches -> 16 LLM tokens per tile: fast, and still exercises the 2x2 unshuffle
TOKENS_PER_TILE = (IMAGE_SIZE // 14) ** 2 // 4


def make_hf_config(style: str = "300m", tie: bool = False) -> InternVLConfig:
    six_b = style == "6b"
    vision = InternVLVisionConfig(
        hidden_size=48 if six_b else 32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        image_size=IMAGE_SIZE, patch_size=14, attention_bias=not six_b, use_qk_norm=six_b,
        norm_type="rms_norm" if six_b else "layer_norm", layer_norm_eps=1e-6)
    text = Qwen2Config(vocab_size=1024, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0,
                       max_position_embeddings=4096, tie_word_embeddings=tie)
    return InternVLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                          image_seq_length=TOKENS_PER_TILE, tie_word_embeddings=tie)


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Non-trivial weights: norms away from 1, biases and layer scales away from 0, so no term is invisible."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if p.ndim == 1 and ("norm" in name or "lambda" in name) and not name.endswith("bias"):
            p.copy_(1.0 + 0.3 * noise if "norm" in name else 0.5 * noise)
        elif p.ndim == 1:
            p.copy_(0.3 * noise)
        else:
            p.copy_(noise * (1.0 / p.shape[-1] ** 0.5 if p.ndim == 2 else 0.1))
    return model


def make_hf_model(style: str = "300m", seed: int = 0, tie: bool = False) -> InternVLForConditionalGeneration:
    model = InternVLForConditionalGeneration(make_hf_config(style, tie))
    return randomize_(model, seed).eval()


def image_prompt(tiles_per_image, text_before=4, text_after=5, seed=0, start=20):
    """ids [L]: text, then for each image <IMG_CONTEXT> x tiles*TOKENS_PER_TILE, then text."""
    gen = torch.Generator().manual_seed(seed)
    parts = [torch.randint(start, 1000, (text_before,), generator=gen)]
    for tiles in tiles_per_image:
        parts.append(torch.full((tiles * TOKENS_PER_TILE,), IMAGE_TOKEN_ID))
        parts.append(torch.randint(start, 1000, (2,), generator=gen))
    parts.append(torch.randint(start, 1000, (text_after,), generator=gen))
    return torch.cat(parts)


def left_pad(rows, pad_id=0):
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), pad_id)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    return ids, mask
