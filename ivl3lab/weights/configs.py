"""config.json <-> InternVLConfig for both checkpoint formats (spec §2.1, §2.3).

Detection is by `model_type`: `internvl_chat` (original OpenGVLab remote code) or `internvl`
(transformers-native, the `-hf` repos). Anything else, or an LLM other than Qwen2, is refused with a message
that says what was found.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

from ..config import InternVLConfig, TextConfig, VisionConfig


class UnsupportedCheckpoint(ValueError):
    pass


def detect_format(config: dict) -> str:
    model_type = config.get("model_type")
    if model_type == "internvl_chat":
        return "original"
    if model_type == "internvl":
        return "hf"
    raise UnsupportedCheckpoint(
        f"unsupported checkpoint: config.json has model_type={model_type!r} "
        f"(architectures={config.get('architectures')}); ivl3lab reads 'internvl_chat' (OpenGVLab InternVL3) "
        f"and 'internvl' (transformers-native InternVL3 -hf)")


def _pair(value) -> int:
    """transformers stores image/patch sizes as [h, w]; InternVL tiles are square."""
    if isinstance(value, (list, tuple)):
        if value[0] != value[1]:
            raise UnsupportedCheckpoint(f"non-square size {value} found; InternVL tiles are square")
        return int(value[0])
    return int(value)


def _rope(llm: dict) -> tuple[float, Optional[str], float]:
    """(theta, scaling type, factor) from either the 4.x (`rope_theta`, `rope_scaling`) or 5.x
    (`rope_parameters`) spelling."""
    params = llm.get("rope_parameters") or {}
    scaling = llm.get("rope_scaling") or params
    theta = float(llm.get("rope_theta", params.get("rope_theta", 10000.0)))
    kind = scaling.get("rope_type", scaling.get("type")) if scaling else None
    kind = None if kind in (None, "default") else kind
    if kind not in (None, "dynamic"):
        raise UnsupportedCheckpoint(f"rope scaling {kind!r} found in the LLM config; supported: none, 'dynamic'")
    return theta, kind, float(scaling.get("factor", 1.0)) if kind else 1.0


def _text_config(llm: dict) -> TextConfig:
    arch = (llm.get("architectures") or [None])[0]
    kind = llm.get("model_type")
    if kind != "qwen2" and arch != "Qwen2ForCausalLM":
        raise UnsupportedCheckpoint(
            f"unsupported language model: found model_type={kind!r}, architectures={llm.get('architectures')}; "
            f"ivl3lab implements the Qwen2/Qwen2.5 LLM of InternVL3-1B/2B/8B/14B/38B/78B (InternVL3-9B's "
            f"InternLM3 is not supported)")
    theta, scaling, factor = _rope(llm)
    heads = llm["num_attention_heads"]
    return TextConfig(
        vocab_size=llm["vocab_size"], hidden_size=llm["hidden_size"], intermediate_size=llm["intermediate_size"],
        num_layers=llm["num_hidden_layers"], num_heads=heads, num_kv_heads=llm.get("num_key_value_heads", heads),
        head_dim=llm.get("head_dim"), rope_theta=theta, rms_norm_eps=llm.get("rms_norm_eps", 1e-6),
        max_position_embeddings=llm.get("max_position_embeddings", 32768), rope_scaling_type=scaling,
        rope_scaling_factor=factor, tie_word_embeddings=bool(llm.get("tie_word_embeddings", False)),
        bos_token_id=llm.get("bos_token_id"), eos_token_id=_first(llm.get("eos_token_id")),
        pad_token_id=llm.get("pad_token_id"))


def _first(value):
    return value[0] if isinstance(value, list) and value else value


def _text_dict(t: TextConfig) -> dict[str, Any]:
    d = {
        "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "vocab_size": t.vocab_size,
        "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
        "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
        "num_key_value_heads": t.num_kv_heads, "hidden_act": "silu", "rope_theta": t.rope_theta,
        "rms_norm_eps": t.rms_norm_eps, "max_position_embeddings": t.max_position_embeddings,
        "tie_word_embeddings": t.tie_word_embeddings, "bos_token_id": t.bos_token_id,
        "eos_token_id": t.eos_token_id, "pad_token_id": t.pad_token_id, "use_sliding_window": False,
        "attention_dropout": 0.0, "use_cache": True,
        "rope_scaling": {"type": t.rope_scaling_type, "factor": t.rope_scaling_factor} if t.rope_scaling_type
        else None,
    }
    if t.head_dim is not None:
        d["head_dim"] = t.head_dim
    return d


# ----------------------------------------------------------------------------------------- original format
def from_original_config(d: dict) -> InternVLConfig:
    v = d["vision_config"]
    vision = VisionConfig(
        hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
        num_layers=v["num_hidden_layers"], num_heads=v["num_attention_heads"], patch_size=v.get("patch_size", 14),
        image_size=_pair(d.get("force_image_size") or v.get("image_size", 448)),
        qkv_bias=v.get("qkv_bias", True), qk_norm=v.get("qk_normalization", False),
        norm_type=v.get("norm_type", "rms_norm"),  # the remote class default; the 6B V1-5 config omits it
        layer_norm_eps=v.get("layer_norm_eps", 1e-6), layer_scale_init=v.get("initializer_factor", 0.1),
        drop_path_rate=v.get("drop_path_rate", 0.0), hidden_act=v.get("hidden_act", "gelu"))
    if vision.hidden_act != "gelu":
        raise UnsupportedCheckpoint(f"vision hidden_act {vision.hidden_act!r} found; InternViT uses 'gelu'")
    return InternVLConfig(
        vision=vision, text=_text_config(d["llm_config"]), downsample_ratio=d.get("downsample_ratio", 0.5),
        ps_version=d.get("ps_version", "v1"), select_layer=d.get("select_layer", -1),
        min_dynamic_patch=d.get("min_dynamic_patch", 1), max_dynamic_patch=d.get("max_dynamic_patch", 6),
        use_thumbnail=d.get("use_thumbnail", False), template=d.get("template") or "internvl2_5",
        system_message=d.get("system_message"))


def to_original_config(cfg: InternVLConfig) -> dict:
    v = cfg.vision
    return {
        "model_type": "internvl_chat", "architectures": ["InternVLChatModel"],
        "downsample_ratio": cfg.downsample_ratio, "dynamic_image_size": True, "force_image_size": v.image_size,
        "hidden_size": cfg.text.hidden_size, "max_dynamic_patch": cfg.max_dynamic_patch,
        "min_dynamic_patch": cfg.min_dynamic_patch, "pad2square": False, "ps_version": cfg.ps_version,
        "select_layer": cfg.select_layer, "template": cfg.template, "tie_word_embeddings": False,
        "use_thumbnail": cfg.use_thumbnail, "use_backbone_lora": 0, "use_llm_lora": 0,
        "system_message": cfg.system_message,
        "vision_config": {
            "model_type": "intern_vit_6b", "architectures": ["InternVisionModel"],
            "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads, "patch_size": v.patch_size,
            "image_size": v.image_size, "qkv_bias": v.qkv_bias, "qk_normalization": v.qk_norm,
            "norm_type": v.norm_type, "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act,
            "initializer_factor": v.layer_scale_init, "drop_path_rate": v.drop_path_rate, "dropout": 0.0,
            "attention_dropout": 0.0, "num_channels": 3, "use_flash_attn": False,
        },
        "llm_config": _text_dict(cfg.text),
    }


# ------------------------------------------------------------------------------------ transformers format
def from_hf_config(d: dict) -> InternVLConfig:
    v = d["vision_config"]
    if d.get("vision_feature_select_strategy", "default") != "default":
        raise UnsupportedCheckpoint(f"vision_feature_select_strategy="
                                    f"{d['vision_feature_select_strategy']!r} found; InternVL3 drops CLS ('default')")
    if d.get("projector_hidden_act", "gelu") != "gelu":
        raise UnsupportedCheckpoint(f"projector_hidden_act={d['projector_hidden_act']!r} found; expected 'gelu'")
    vision = VisionConfig(
        hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
        num_layers=v["num_hidden_layers"], num_heads=v["num_attention_heads"],
        patch_size=_pair(v.get("patch_size", 14)), image_size=_pair(v.get("image_size", 448)),
        qkv_bias=v.get("attention_bias", False), qk_norm=v.get("use_qk_norm", False),
        norm_type=v.get("norm_type", "layer_norm"), layer_norm_eps=v.get("layer_norm_eps", 1e-6),
        layer_scale_init=v.get("layer_scale_init_value", 0.1), drop_path_rate=v.get("drop_path_rate", 0.0),
        hidden_act=v.get("hidden_act", "gelu"))
    text = _text_config(d["text_config"])
    if "tie_word_embeddings" in d:  # transformers reads the top-level flag
        text = dataclasses.replace(text, tie_word_embeddings=bool(d["tie_word_embeddings"]))
    layer = d.get("vision_feature_layer", -1)
    return InternVLConfig(vision=vision, text=text, downsample_ratio=d.get("downsample_ratio", 0.5),
                          ps_version="v2", select_layer=layer, image_token_id=d.get("image_token_id", 151667))


def to_hf_config(cfg: InternVLConfig) -> dict:
    v, t = cfg.vision, cfg.text
    return {
        "model_type": "internvl", "architectures": ["InternVLForConditionalGeneration"],
        "image_token_id": cfg.image_token_id, "image_seq_length": cfg.num_image_token,
        "downsample_ratio": cfg.downsample_ratio, "projector_hidden_act": "gelu",
        "vision_feature_layer": cfg.select_layer, "vision_feature_select_strategy": "default",
        "tie_word_embeddings": t.tie_word_embeddings,
        "vision_config": {
            "model_type": "internvl_vision", "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads,
            "image_size": [v.image_size, v.image_size], "patch_size": [v.patch_size, v.patch_size],
            "attention_bias": v.qkv_bias, "use_qk_norm": v.qk_norm, "norm_type": v.norm_type,
            "layer_norm_eps": v.layer_norm_eps, "layer_scale_init_value": v.layer_scale_init,
            "hidden_act": v.hidden_act, "use_mean_pooling": True, "use_absolute_position_embeddings": True,
            "attention_dropout": 0.0, "projection_dropout": 0.0, "hidden_dropout_prob": 0.0,
            "drop_path_rate": v.drop_path_rate,
        },
        "text_config": _text_dict(t),
    }
