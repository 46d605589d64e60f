"""LoRA with peft, per tower: presets whose target patterns are anchored to a tower, so a plain name like
`fc1` (both the ViT MLP and the projector have one) or `q_proj` can never silently adapt another tower.

    peft_model = apply_lora(model, towers=("language",), r=8)          # LLM attention + MLP
    peft_model = apply_lora(model, modules={"vision": ["qkv"], "language": ["q_proj", "v_proj"]})
    with adapters_disabled(peft_model): ...                              # the frozen reference model, for free
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional, Sequence

from torch import nn

from .sft import TOWERS, tower_of, trainable_report

# module names (last path component) per tower, and where they live
TOWER_MODULES = {
    "vision": ("qkv", "proj", "fc1", "fc2"),
    "projector": ("fc1", "fc2"),
    "language": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
TOWER_PATHS = {
    "vision": r"vision\.layers\.\d+\.(?:attn|mlp)\.",
    "projector": r"projector\.",
    "language": r"language\.layers\.\d+\.(?:self_attn|mlp)\.",
}
PRESETS = {
    "language": {"language": TOWER_MODULES["language"]},
    "language_attention": {"language": ("q_proj", "k_proj", "v_proj", "o_proj")},
    "language_mlp": {"language": ("gate_proj", "up_proj", "down_proj")},
    "vision": {"vision": TOWER_MODULES["vision"]},
    "projector": {"projector": TOWER_MODULES["projector"]},
    "all": dict(TOWER_MODULES),
}


def target_pattern(modules: dict[str, Sequence[str]]) -> str:
    """A regex (peft full-matches it against module names) that only reaches the named towers."""
    parts = []
    for tower, names in modules.items():
        if tower not in TOWERS:
            raise ValueError(f"unknown tower {tower!r}; towers: {TOWERS}")
        unknown = sorted(set(names) - set(TOWER_MODULES[tower]))
        if unknown:
            raise ValueError(f"{tower} has no modules named {unknown}; it has {TOWER_MODULES[tower]}")
        parts.append(f"{TOWER_PATHS[tower]}(?:{'|'.join(names)})")
    return "|".join(f"(?:{p})" for p in parts)


def lora_config(preset: str = "language", modules: Optional[dict] = None, r: int = 8, alpha: int = 16,
                dropout: float = 0.0, **kwargs):
    from peft import LoraConfig

    modules = modules or PRESETS[preset]
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_pattern(modules), **kwargs)


def apply_lora(model: nn.Module, preset: str = "language", modules: Optional[dict] = None, r: int = 8,
               alpha: int = 16, dropout: float = 0.0, **kwargs):
    """Wrap with peft LoRA; checks that only the intended towers were adapted (raises, naming the others)."""
    from peft import get_peft_model

    modules = modules or PRESETS[preset]
    peft_model = get_peft_model(model, lora_config(preset, modules, r, alpha, dropout, **kwargs))
    hit = {tower_of(name) for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    stray = sorted(hit - set(modules))
    if stray:
        raise RuntimeError(f"LoRA reached towers {stray} that were not asked for ({sorted(modules)})")
    return peft_model


def lora_report(peft_model: nn.Module) -> dict[str, tuple[int, int]]:
    """tower -> (trainable, total) parameters, LoRA weights counted in their tower."""
    return trainable_report(peft_model)


@contextlib.contextmanager
def adapters_disabled(peft_model) -> Iterator[nn.Module]:
    """The base model's behaviour (adapters off) inside the block: the reference policy for DPO/MPO."""
    with peft_model.disable_adapter():
        yield peft_model


def load_adapter(model: nn.Module, directory, is_trainable: bool = False):
    """Adapters saved with `peft_model.save_pretrained(directory)` onto a fresh base model."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(directory), is_trainable=is_trainable)
