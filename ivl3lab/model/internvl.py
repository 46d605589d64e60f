"""InternVL3 = InternViT -> pixel-unshuffle -> projector -> Qwen2 (spec §1.7).

`forward` is pure: image tiles become LLM embeddings that overwrite the `<IMG_CONTEXT>` placeholder positions,
sample by sample and in order, then the decoder runs. Chat, generation and checkpoint I/O live outside the
module (ivl3lab.generation, ivl3lab.weights); the thin methods at the bottom only forward to them so the
familiar `model.chat(...)` API works.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..config import InternVLConfig, get_preset
from ..hooks import HookPoint
from .language import KVCache, Qwen2
from .ops import RMSNorm
from .projector import Projector, pixel_unshuffle
from .vision import InternViT


@dataclass
class InternVLOutput:
    logits: Optional[torch.Tensor]  # [B, L, V] (or the last `logits_to_keep` positions; None if not computed)
    past_key_values: Optional[KVCache] = None
    hidden_states: Optional[torch.Tensor] = None  # final-normed LLM hidden states [B, L, H]


class InternVL3(nn.Module):
    def __init__(self, config: InternVLConfig):
        super().__init__()
        self.config = config
        self.vision = InternViT(config.vision)
        self.projector = Projector(config.vision.hidden_size, config.text.hidden_size)
        self.language = Qwen2(config.text)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        if config.text.tie_word_embeddings:
            self.lm_head.weight = self.language.embed_tokens.weight
        self.hook_vision_out = HookPoint()  # [T, P, C] selected ViT layer, CLS dropped
        self.hook_inputs_embeds = HookPoint()  # [B, L, H] LLM input, image features written in
        self.hook_logits = HookPoint()  # [B, L, V]
        self.init_weights()
        self.set_attn_implementation(config.attn_implementation)

    @classmethod
    def from_preset(cls, name: str, **changes) -> "InternVL3":
        """Random weights in the shape of a named preset (`tiny`, `internvl3-1b`, ...)."""
        return cls(get_preset(name).replace(**changes) if changes else get_preset(name))

    # ----------------------------------------------------------------------------------------------- setup
    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Truncation-free normal init for training from scratch (checkpoints overwrite all of it)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                # the patch embedding keeps PyTorch's fan-in init: with normal(0.02) on its 3*14*14 inputs a
                # from-scratch ViT learned toy shapes to 42 % in 200 steps, against 66 % (88 % at 300) with fan-in
                module.reset_parameters()
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=std)
            elif isinstance(module, (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        emb = self.vision.embeddings
        nn.init.normal_(emb.class_embedding, std=std)
        nn.init.normal_(emb.position_embedding, std=std)
        for block in self.vision.layers:
            block.ls1.fill_(self.config.vision.layer_scale_init)
            block.ls2.fill_(self.config.vision.layer_scale_init)

    def set_attn_implementation(self, backend: str) -> "InternVL3":
        """Switch every attention layer (vision and language) to `sdpa`, `eager` or `flash`."""
        self.config = self.config.replace(attn_implementation=backend)  # validates the name
        for module in self.modules():
            if hasattr(module, "backend"):
                module.backend = backend
        return self

    def set_gradient_checkpointing(self, enabled: Union[bool, str] = True) -> "InternVL3":
        """Recompute each ViT/LLM block in the backward pass instead of storing its activations (training).
        True / "full": recompute whole blocks; "selective": keep matmul and attention outputs, recompute the rest."""
        if enabled not in (True, False, "full", "selective"):
            raise ValueError(f"gradient checkpointing must be True, False, 'full' or 'selective', got {enabled!r}")
        self.vision.gradient_checkpointing = self.language.gradient_checkpointing = enabled
        return self

    def compile_blocks(self, enabled: bool = True, **options) -> "InternVL3":
        """torch.compile every ViT and LLM block (`options` go to torch.compile; enabled=False: eager again).

        Why blocks, not the whole model: the elementwise work around the matrix products (norms, RoPE, GELU/SwiGLU,
        layer scale, autocast copies) fuses into a few kernels, one compilation serves all layers of a tower, and
        the data-dependent code between the towers (placeholder checks, feature merge) stays eager. A block with a hook
        on any module in it runs eagerly, so hooks keep working (compiled code would skip them silently), and so does
        a step with a KV cache (its layer index would make one graph per layer).
        `mode="reduce-overhead"` replays the blocks as CUDA graphs: call `torch.compiler.cudagraph_mark_step_begin()`
        before each forward pass, and under gradient accumulation give every trainable parameter a .grad tensor
        first (the Trainer's `compile="graphs"` does both); measured in docs/benchmarks.md.
        """
        for block in (*self.vision.layers, *self.language.layers):
            block.compile_forward(options if enabled else None)
        return self

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def num_image_token(self) -> int:
        return self.config.num_image_token

    # ------------------------------------------------------------------------------------------ the model
    def extract_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles [T, 3, S, S] -> LLM-ready image embeddings [T, (S/28)^2, H]."""
        hidden = self.vision(pixel_values, select_layer=self.config.select_layer)  # [T, 1 + P, C]
        patches = self.hook_vision_out(hidden[:, 1:])  # drop CLS -> [T, P, C]
        tokens = pixel_unshuffle(patches, self.config.ps_version)  # [T, P/4, 4C]
        return self.projector(tokens)  # [T, P/4, H]

    def merge_image_features(self, input_ids: torch.Tensor, inputs_embeds: torch.Tensor,
                             image_features: torch.Tensor,
                             num_tiles_per_sample: Optional[Sequence[int]] = None) -> torch.Tensor:
        """Write image features [T, n, H] into the `<IMG_CONTEXT>` positions of inputs_embeds [B, L, H].

        Checked per sample (transformers only checks the batch total, so one extra placeholder in sample 0
        and one missing in sample 1 would silently shift features across samples).
        """
        n = image_features.shape[1]
        is_image = input_ids == self.config.image_token_id  # [B, L]
        counts = is_image.sum(dim=1).tolist()
        if num_tiles_per_sample is not None:
            if len(num_tiles_per_sample) != len(counts):
                raise ValueError(f"num_tiles_per_sample has {len(num_tiles_per_sample)} entries for a batch of "
                                 f"{len(counts)} samples")
            for b, (count, tiles) in enumerate(zip(counts, num_tiles_per_sample)):
                if count != tiles * n:
                    raise ValueError(f"sample {b}: the prompt has {count} <IMG_CONTEXT> tokens but its {tiles} "
                                     f"tile(s) give {tiles * n} image features ({n} per tile)")
        for b, count in enumerate(counts):
            if count % n:
                raise ValueError(f"sample {b}: the prompt has {count} <IMG_CONTEXT> tokens, which is not a whole "
                                 f"number of tiles ({n} tokens per tile)")
        total_features = image_features.shape[0] * n
        if sum(counts) != total_features:
            raise ValueError(f"the prompts have {sum(counts)} <IMG_CONTEXT> tokens in total (per sample: {counts}) "
                             f"but pixel_values give {total_features} image features "
                             f"({image_features.shape[0]} tiles x {n})")
        features = image_features.reshape(-1, image_features.shape[-1]).to(inputs_embeds.dtype)
        return inputs_embeds.masked_scatter(is_image[..., None], features)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,  # [B, L]
        pixel_values: Optional[torch.Tensor] = None,  # [T, 3, S, S], all tiles of the batch in prompt order
        attention_mask: Optional[torch.Tensor] = None,  # [B, past + L], 0 = padding
        position_ids: Optional[torch.Tensor] = None,  # [B, L], int or float (V2PE)
        past_key_values: Optional[KVCache] = None,
        use_cache: bool = False,
        inputs_embeds: Optional[torch.Tensor] = None,
        image_flags: Optional[torch.Tensor] = None,  # [T], 0 = dummy tile (text-only sample while training)
        image_features: Optional[torch.Tensor] = None,  # precomputed `extract_features` output
        num_tiles_per_sample: Optional[Sequence[int]] = None,
        segment_ids: Optional[torch.Tensor] = None,  # [B, L] packed-example index (-1 = padding); pass position_ids too
        logits_to_keep: int = 0,
        compute_logits: bool = True,  # False: skip lm_head (a chunked loss applies it piece by piece)
    ) -> InternVLOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.language.embed_tokens(input_ids)
        if pixel_values is not None and image_features is not None:
            raise ValueError("pass pixel_values or image_features, not both")
        if pixel_values is not None:
            image_features = self.extract_features(pixel_values)
            if image_flags is not None:
                # Dummy tiles still ran through the ViT (keeps every parameter in the graph), then are dropped;
                # `+ 0 * sum` keeps their gradient path alive for DDP when every tile is a dummy.
                keep = image_flags.bool()
                image_features = image_features[keep] + 0.0 * image_features[~keep].sum()
        if image_features is not None:
            if input_ids is None:
                raise ValueError("input_ids are needed to locate the <IMG_CONTEXT> positions")
            inputs_embeds = self.merge_image_features(input_ids, inputs_embeds, image_features, num_tiles_per_sample)

        inputs_embeds = self.hook_inputs_embeds(inputs_embeds)
        cache = past_key_values if past_key_values is not None else (KVCache() if use_cache else None)
        hidden = self.language(inputs_embeds, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                               segment_ids=segment_ids)
        logits = None
        if compute_logits:
            logits = self.hook_logits(self.lm_head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden))
        return InternVLOutput(logits=logits, past_key_values=cache, hidden_states=hidden)

    # ------------------------------------------------------------ familiar API, implemented elsewhere
    def chat(self, processor, pixel_values, question, generation_config=None, history=None,
             return_history=False, num_patches_list=None, **kwargs):
        from ..generation import chat
        return chat(self, processor, pixel_values, question, generation_config, history=history,
                    return_history=return_history, num_patches_list=num_patches_list, **kwargs)

    def stream_chat(self, processor, pixel_values, question, generation_config=None, history=None,
                    num_patches_list=None):
        from ..generation import stream_chat
        return stream_chat(self, processor, pixel_values, question, generation_config, history=history,
                           num_patches_list=num_patches_list)

    def batch_chat(self, processor, pixel_values, questions, generation_config=None, num_patches_list=None,
                   **kwargs):
        from ..generation import batch_chat
        return batch_chat(self, processor, pixel_values, questions, generation_config,
                          num_patches_list=num_patches_list, **kwargs)

    def generate(self, pixel_values=None, input_ids=None, attention_mask=None, generation_config=None, **kwargs):
        """New token ids only, [B, T_new] (like the original InternVL `generate`)."""
        from ..generation import generate
        return generate(self, input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                        generation_config=generation_config, **kwargs)

    def save_pretrained(self, directory, format: str = "original", processor=None, **kwargs):
        from ..weights import save_pretrained
        return save_pretrained(self, directory, format=format, processor=processor, **kwargs)
