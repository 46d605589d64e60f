"""`build(preset)`: a model with random weights plus a matching processor, in one call.

The `tiny` preset comes with the tokenizer shipped in the package, so it runs offline anywhere. Real-size
presets need their tokenizer (pass `tokenizer=` a directory or a hub id); without it the processor is None.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from .config import get_preset
from .model import InternVL3

SAMPLE_IMAGE = Path(__file__).resolve().parent / "assets" / "sample.png"  # 640x400, five coloured shapes
TOY_MODEL = Path(__file__).resolve().parent / "assets" / "toy_model"  # the trained toy checkpoint (tiny preset)
TOY_SFT_MODEL = TOY_MODEL.with_name("toy_model_sft")  # the same after the step-by-step reasoning SFT


def load_toy(device: Union[str, torch.device] = "cpu", dtype: Optional[torch.dtype] = torch.float32,
             variant: str = "pretrained"):
    """The `tiny` model trained on the toy world (shipped with the package; how it was made and what it
    scores: docs/toy_results.md) -> (model, processor). variant "sft": after the reasoning SFT that the
    preference-optimisation and test-time-scaling notebooks start from (docs/mpo.md)."""
    from .weights import load_pretrained

    paths = {"pretrained": (TOY_MODEL, "python -m ivl3lab.train.pretrain --out runs/toy"),
             "sft": (TOY_SFT_MODEL, "python -m ivl3lab.train.mpo_toy sft --out runs/sft")}
    if variant not in paths:
        raise ValueError(f"variant must be one of {sorted(paths)}, got {variant!r}")
    path, command = paths[variant]
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no trained toy checkpoint at {path}; make one with `{command}` "
                                f"(docs/toy_results.md)")
    return load_pretrained(path, dtype=dtype, device=device)


def build(preset: str = "tiny", seed: int = 0, dtype: Optional[torch.dtype] = None,
          device: Union[str, torch.device] = "cpu", tokenizer=None, **config_changes):
    """-> (model in eval mode, processor or None). Weights are random (seeded)."""
    from .processing import Processor, load_tiny_tokenizer, load_tokenizer

    config = get_preset(preset)
    if tokenizer is None and preset == "tiny":
        tokenizer = load_tiny_tokenizer()
    elif isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    processor = None
    if tokenizer is not None:
        processor = Processor.from_config(config, tokenizer)
        config_changes.setdefault("image_token_id", processor.image_token_id)
    config = config.replace(**config_changes) if config_changes else config
    torch.manual_seed(seed)
    with torch.device(device):
        model = InternVL3(config)
    if dtype is not None:
        model = model.to(dtype)
    if processor is not None:
        processor = Processor.from_config(config, processor.tokenizer)
    return model.eval(), processor
