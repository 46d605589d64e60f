"""ivl3lab: learn, probe and adapt InternVL3.

The public API — notebooks and tutorials use only these names:

    model, processor = ivl3lab.build("tiny")                       # random weights, offline
    model, processor = ivl3lab.load_pretrained("OpenGVLab/InternVL3-1B", dtype=torch.bfloat16, device="cuda")
    pixel_values, layout = processor.load_image("photo.jpg")
    model.chat(processor, pixel_values, "Describe the image.", dict(max_new_tokens=64))
    ivl3lab.save_pretrained(model, "out/", format="hf", processor=processor)
"""
from .build import SAMPLE_IMAGE, TOY_MODEL, TOY_SFT_MODEL, build, load_toy
from .config import PRESETS, InternVLConfig, TextConfig, VisionConfig, get_preset
from .hooks import ActivationCache, HookPoint, hook_points, hooks, run_with_cache, run_with_hooks
from .generation import GenerationConfig, batch_chat, chat, generate, iter_tokens, stream_chat
from .model import InternVL3, InternVLOutput, KVCache, pixel_unshuffle
from .processing import (Processor, TileLayout, dynamic_preprocess, load_image, load_tiny_tokenizer, load_tokenizer,
                         process_image, render_prompt)
from .weights import UnsupportedCheckpoint, load_pretrained, save_pretrained

__version__ = "0.1.0"

__all__ = [
    "build", "load_toy", "SAMPLE_IMAGE", "TOY_MODEL", "TOY_SFT_MODEL",
    "load_pretrained", "save_pretrained", "UnsupportedCheckpoint",
    "InternVL3", "InternVLOutput", "KVCache", "pixel_unshuffle",
    "InternVLConfig", "VisionConfig", "TextConfig", "PRESETS", "get_preset",
    "Processor", "TileLayout", "dynamic_preprocess", "process_image", "load_image", "load_tokenizer",
    "load_tiny_tokenizer", "render_prompt",
    "HookPoint", "ActivationCache", "hook_points", "hooks", "run_with_cache", "run_with_hooks",
    "GenerationConfig", "generate", "iter_tokens", "chat", "stream_chat", "batch_chat",
]
