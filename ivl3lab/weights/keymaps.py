"""Declarative, strict key maps between ivl3lab's parameter names and the two checkpoint formats.

One table per format. Each rule maps one of our names to one of theirs, or — for InternViT's fused `qkv` —
to three of theirs (transformers splits it into q_proj/k_proj/v_proj along dim 0). Patterns use `{i}` for
a layer index, `{p}` for `weight|bias` and `{rest}` for any suffix. A key that no rule matches is an error.

Original OpenGVLab format (`internvl_chat`, spec §2.2) and transformers-native (`internvl`, spec §2.3).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Rule:
    ours: str
    theirs: tuple[str, ...]  # one name = rename; three names = our tensor split in 3 along dim 0


def _rule(ours: str, *theirs: str) -> Rule:
    return Rule(ours, theirs)


ORIGINAL = (
    _rule("vision.embeddings.{rest}", "vision_model.embeddings.{rest}"),
    _rule("vision.layers.{i}.{rest}", "vision_model.encoder.layers.{i}.{rest}"),
    _rule("projector.norm.{p}", "mlp1.0.{p}"),
    _rule("projector.fc1.{p}", "mlp1.1.{p}"),
    _rule("projector.fc2.{p}", "mlp1.3.{p}"),  # mlp1.2 is the GELU
    _rule("language.{rest}", "language_model.model.{rest}"),
    _rule("lm_head.weight", "language_model.lm_head.weight"),
)

# Names as transformers (5.x) writes them to disk; its in-memory `model.`-prefixed names are accepted on load.
_V = "vision_tower."
_VL = _V + "encoder.layer.{i}."
HF = (
    _rule("vision.embeddings.class_embedding", _V + "embeddings.cls_token"),
    _rule("vision.embeddings.position_embedding", _V + "embeddings.position_embeddings"),
    _rule("vision.embeddings.patch_embedding.{p}", _V + "embeddings.patch_embeddings.projection.{p}"),
    _rule("vision.layers.{i}.norm1.{p}", _VL + "layernorm_before.{p}"),
    _rule("vision.layers.{i}.norm2.{p}", _VL + "layernorm_after.{p}"),
    _rule("vision.layers.{i}.ls1", _VL + "lambda_1"),
    _rule("vision.layers.{i}.ls2", _VL + "lambda_2"),
    _rule("vision.layers.{i}.attn.qkv.{p}", _VL + "attention.q_proj.{p}", _VL + "attention.k_proj.{p}",
          _VL + "attention.v_proj.{p}"),
    _rule("vision.layers.{i}.attn.q_norm.weight", _VL + "attention.q_norm.weight"),
    _rule("vision.layers.{i}.attn.k_norm.weight", _VL + "attention.k_norm.weight"),
    _rule("vision.layers.{i}.attn.proj.{p}", _VL + "attention.projection_layer.{p}"),
    _rule("vision.layers.{i}.mlp.{rest}", _VL + "mlp.{rest}"),
    _rule("projector.norm.{p}", "multi_modal_projector.layer_norm.{p}"),
    _rule("projector.fc1.{p}", "multi_modal_projector.linear_1.{p}"),
    _rule("projector.fc2.{p}", "multi_modal_projector.linear_2.{p}"),
    _rule("language.{rest}", "language_model.model.{rest}"),
    _rule("lm_head.weight", "language_model.lm_head.weight"),
)

# transformers' in-memory layout (what `model.state_dict()` of InternVLForConditionalGeneration gives):
# (in-memory prefix, on-disk prefix).
HF_MEMORY_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


def _swap_prefix(key: str, pairs, src: int) -> str:
    for pair in pairs:
        if key.startswith(pair[src]):
            return pair[1 - src] + key[len(pair[src]):]
    return key


TABLES = {"original": ORIGINAL, "hf": HF}


@functools.lru_cache(maxsize=None)
def _regex(pattern: str) -> re.Pattern:
    out = re.escape(pattern)
    out = out.replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", r"(?P<p>weight|bias)")
    return re.compile("^" + out.replace(r"\{rest\}", r"(?P<rest>.+)") + "$")


def _fill(pattern: str, groups: dict) -> str:
    return pattern.format(**groups)


class KeyMapError(ValueError):
    pass


def to_format(state_dict: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """Our state dict -> the named format's state dict."""
    out: dict[str, torch.Tensor] = {}
    unmapped = []
    for key, tensor in state_dict.items():
        for rule in TABLES[fmt]:
            m = _regex(rule.ours).match(key)
            if m:
                names = [_fill(t, m.groupdict()) for t in rule.theirs]
                parts = tensor.chunk(len(names), dim=0) if len(names) > 1 else (tensor,)
                out.update({name: part.contiguous() for name, part in zip(names, parts)})
                break
        else:
            unmapped.append(key)
    if unmapped:
        raise KeyMapError(f"no {fmt} name for these ivl3lab parameters: {unmapped}")
    return out


def normalize_hf_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' in-memory names -> its on-disk names (on-disk names pass through)."""
    return {_swap_prefix(k, HF_MEMORY_PREFIXES, 0): v for k, v in state_dict.items()}


def to_transformers_memory(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> the names `InternVLForConditionalGeneration.state_dict()` uses in memory
    (for `load_state_dict` on a transformers model built in-process, e.g. side-by-side benchmarks)."""
    return {_swap_prefix(k, HF_MEMORY_PREFIXES, 1): v for k, v in to_format(state_dict, "hf").items()}


def from_format(state_dict: dict[str, torch.Tensor], fmt: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The named format's state dict -> (our state dict, their keys that no rule knows)."""
    if fmt == "hf":
        state_dict = normalize_hf_layout(state_dict)
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[int, torch.Tensor]] = {}  # fused targets waiting for all their parts
    unexpected = []
    for key, tensor in state_dict.items():
        for rule in TABLES[fmt]:
            match = next(((n, m) for n, t in enumerate(rule.theirs) if (m := _regex(t).match(key))), None)
            if match:
                part, m = match
                ours = _fill(rule.ours, m.groupdict())
                if len(rule.theirs) == 1:
                    out[ours] = tensor
                else:
                    pending.setdefault(ours, {})[part] = tensor
                    if len(pending[ours]) == len(rule.theirs):
                        parts = pending.pop(ours)
                        out[ours] = torch.cat([parts[n] for n in range(len(rule.theirs))], dim=0)
                break
        else:
            unexpected.append(key)
    for ours, parts in pending.items():  # a fused tensor with some parts missing
        unexpected.append(f"{ours} (only parts {sorted(parts)} of the fused q/k/v found)")
    return out, unexpected


def check_state_dict(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor],
                     unexpected: list[str], fmt: str, tied: tuple[str, ...] = ()) -> None:
    """Strict: missing, unexpected and mis-shaped keys all raise, listing every offender."""
    missing = sorted(set(expected) - set(found) - set(tied))
    extra = sorted(set(found) - set(expected)) + unexpected
    shapes = [f"{k}: checkpoint {tuple(found[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(found)) if found[k].shape != expected[k].shape]
    if missing or extra or shapes:
        lines = [f"checkpoint ({fmt} format) does not match the model:"]
        if missing:
            lines.append(f"  missing ({len(missing)}): {missing}")
        if extra:
            lines.append(f"  unexpected ({len(extra)}): {extra}")
        if shapes:
            lines.append(f"  wrong shape ({len(shapes)}): {shapes}")
        raise KeyMapError("\n".join(lines))
