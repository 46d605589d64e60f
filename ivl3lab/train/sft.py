"""Supervised fine-tuning controls: which towers train (freeze toggles, only the last N vision layers) and a
per-tower report of trainable parameters. Conversations are built by `data.chat_example` (loss on assistant
tokens only); learning rates per component are `TrainConfig.lr_vision / lr_projector / lr_language`."""
from __future__ import annotations

from typing import Optional

from torch import nn

TOWERS = ("vision", "projector", "language")


def tower_of(name: str) -> str:
    """Which tower a parameter name belongs to (peft's `base_model.model.` prefix allowed)."""
    name = name.removeprefix("base_model.model.")
    if name.startswith("vision."):
        return "vision"
    if name.startswith("projector."):
        return "projector"
    return "language"  # language.* and lm_head


def set_trainable(model: nn.Module, vision: bool = True, projector: bool = True, language: bool = True,
                  vision_last_n: Optional[int] = None) -> nn.Module:
    """Freeze/unfreeze whole towers; `vision_last_n` unfreezes only the last N ViT blocks (embeddings frozen)."""
    flags = {"vision": vision, "projector": projector, "language": language}
    n_layers = model.config.vision.num_layers
    for name, p in model.named_parameters():
        tower = tower_of(name)
        trainable = flags[tower]
        if tower == "vision" and vision_last_n is not None:
            parts = name.split(".")
            layer = int(parts[2]) if parts[1] == "layers" else -1
            trainable = layer >= n_layers - vision_last_n
        p.requires_grad_(trainable)
    return model


def trainable_report(model: nn.Module) -> dict[str, tuple[int, int]]:
    """tower -> (trainable parameters, total parameters)."""
    report = {t: [0, 0] for t in TOWERS}
    for name, p in model.named_parameters():
        entry = report[tower_of(name)]
        entry[1] += p.numel()
        entry[0] += p.numel() if p.requires_grad else 0
    return {t: (a, b) for t, (a, b) in report.items()}
