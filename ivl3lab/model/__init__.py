"""The InternVL3 model, one file per sub-model: vision.py, projector.py, language.py, internvl.py."""
from .internvl import InternVL3, InternVLOutput
from .language import KVCache, Qwen2
from .projector import Projector, pixel_unshuffle
from .vision import InternViT

__all__ = ["InternVL3", "InternVLOutput", "KVCache", "Qwen2", "Projector", "pixel_unshuffle", "InternViT"]
