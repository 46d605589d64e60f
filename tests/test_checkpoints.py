"""Checkpoint formats: the original OpenGVLab layout checked against the spec's key map (written out again
here, independently of ivl3lab's tables), round trips, sharding, legacy prefixes and strict errors."""
import json
import re

import pytest
import torch
from helpers import IMAGE_SIZE, image_prompt, make_hf_model
from safetensors.torch import load_file, save_file
from transformers import InternVLForConditionalGeneration

from ivl3lab.weights import KeyMapError, UnsupportedCheckpoint, load_pretrained, save_pretrained

# spec §2.3: the converter's regex substitutions, applied in order to keys starting with vision_model
SPEC_VISION_RENAMES = [
    (r"vision_model", "model.vision_tower"), (r"layers", "layer"), (r"class_embedding", "cls_token"),
    (r"position_embedding", "position_embeddings"), (r"patch_embedding", "patch_embeddings.projection"),
    (r"ls(\d+)", r"lambda_\1"), (r"attn\.proj", "attention.projection_layer"), (r"attn", "attention"),
    (r"norm1", "layernorm_before"), (r"norm2", "layernorm_after"),
]
SPEC_OTHER = [(r"^mlp1\.0\.", "model.multi_modal_projector.layer_norm."),
              (r"^mlp1\.1\.", "model.multi_modal_projector.linear_1."),
              (r"^mlp1\.3\.", "model.multi_modal_projector.linear_2."),
              (r"^language_model\.model\.", "model.language_model."),
              (r"^language_model\.lm_head\.", "lm_head.")]


def spec_original_to_hf(state):
    out = {}
    for key, t in state.items():
        if key.startswith("vision_model"):
            for pattern, repl in SPEC_VISION_RENAMES:
                key = re.sub(pattern, repl, key)
            if ".attention.qkv." in key:
                for name, part in zip(("q_proj", "k_proj", "v_proj"), t.chunk(3, dim=0)):
                    out[key.replace("qkv", name)] = part
                continue
        else:
            for pattern, repl in SPEC_OTHER:
                key = re.sub(pattern, repl, key)
        out[key] = t
    return out


def spec_hf_to_original(state):
    out, fused = {}, {}
    for key, t in state.items():
        m = re.match(r"model\.vision_tower\.encoder\.layer\.(\d+)\.attention\.([qkv])_proj\.(weight|bias)", key)
        if m:
            fused.setdefault((m[1], m[3]), {})[m[2]] = t
            continue
        key = (key.replace("model.vision_tower.embeddings.cls_token", "vision_model.embeddings.class_embedding")
               .replace("model.vision_tower.embeddings.position_embeddings", "vision_model.embeddings.position_embedding")
               .replace("model.vision_tower.embeddings.patch_embeddings.projection", "vision_model.embeddings.patch_embedding")
               .replace("model.vision_tower.encoder.layer.", "vision_model.encoder.layers.")
               .replace("lambda_", "ls").replace("attention.projection_layer", "attn.proj")
               .replace("attention.q_norm", "attn.q_norm").replace("attention.k_norm", "attn.k_norm")
               .replace("layernorm_before", "norm1").replace("layernorm_after", "norm2")
               .replace("model.multi_modal_projector.layer_norm", "mlp1.0")
               .replace("model.multi_modal_projector.linear_1", "mlp1.1")
               .replace("model.multi_modal_projector.linear_2", "mlp1.3")
               .replace("model.language_model.", "language_model.model."))
        out["language_model.lm_head.weight" if key == "lm_head.weight" else key] = t
    for (layer, p), parts in fused.items():
        out[f"vision_model.encoder.layers.{layer}.attn.qkv.{p}"] = torch.cat([parts[c] for c in "qkv"])
    return out


def original_config(hf_config):
    """An original-format config.json as the released repos write it (spec §2.1), for the tiny sizes."""
    v, t = hf_config.vision_config, hf_config.text_config
    return {
        "architectures": ["InternVLChatModel"], "model_type": "internvl_chat", "downsample_ratio": 0.5,
        "dynamic_image_size": True, "force_image_size": IMAGE_SIZE, "max_dynamic_patch": 12, "min_dynamic_patch": 1,
        "ps_version": "v2", "select_layer": -1, "template": "internvl2_5", "use_thumbnail": True,
        "tie_word_embeddings": False, "system_message": None,
        "vision_config": {"model_type": "intern_vit_6b", "hidden_size": v.hidden_size,
                          "intermediate_size": v.intermediate_size, "num_hidden_layers": v.num_hidden_layers,
                          "num_attention_heads": v.num_attention_heads, "patch_size": 14, "image_size": IMAGE_SIZE,
                          "qkv_bias": v.attention_bias, "qk_normalization": v.use_qk_norm, "norm_type": v.norm_type,
                          "layer_norm_eps": 1e-6, "hidden_act": "gelu", "initializer_factor": 0.1,
                          "drop_path_rate": 0.1, "use_flash_attn": True},
        "llm_config": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": t.vocab_size,
                       "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
                       "num_hidden_layers": t.num_hidden_layers, "num_attention_heads": t.num_attention_heads,
                       "num_key_value_heads": t.num_key_value_heads, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
                       "max_position_embeddings": 4096, "tie_word_embeddings": False, "bos_token_id": 0,
                       "eos_token_id": 0, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
    }


def inputs(tiles=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return image_prompt([tiles], seed=seed)[None], torch.randn(tiles, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)


@pytest.fixture(scope="module", params=["300m", "6b"])
def hf(request):
    return make_hf_model(request.param, seed=11)


@torch.no_grad()
def test_original_checkpoint_built_from_spec_loads_with_parity(hf, tmp_path):
    save_file(spec_hf_to_original(hf.state_dict()), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(original_config(hf.config)))
    ours, _ = load_pretrained(tmp_path, with_processor=False)
    assert not ours.training  # drop_path_rate 0.1 in the config: eval() is what makes it inactive
    ids, pv = inputs()
    ours_cfg = ours.config
    assert (ours_cfg.ps_version, ours_cfg.max_dynamic_patch, ours_cfg.use_thumbnail) == ("v2", 12, True)
    ours = ours  # image_token_id comes from the tokenizer in real use; the test prompt uses id 5
    ours.config = ours_cfg.replace(image_token_id=5)
    assert (ours(ids, pv).logits - hf(input_ids=ids, pixel_values=pv).logits).abs().max() <= 1e-4


@torch.no_grad()
def test_our_original_save_matches_the_spec_key_map(hf, tmp_path):
    src = tmp_path / "hf"
    hf.save_pretrained(src)
    ours, _ = load_pretrained(src, with_processor=False)
    save_pretrained(ours, tmp_path / "orig", format="original")
    saved = load_file(tmp_path / "orig" / "model.safetensors")
    assert all(k.startswith(("vision_model.", "mlp1.", "language_model.")) for k in saved)
    reference = InternVLForConditionalGeneration(hf.config).eval()
    reference.load_state_dict(spec_original_to_hf(saved), strict=True)
    ids, pv = inputs(seed=1)
    assert (reference(input_ids=ids, pixel_values=pv).logits - hf(input_ids=ids, pixel_values=pv).logits).abs().max() == 0
    # and the original format round-trips through ivl3lab
    again, _ = load_pretrained(tmp_path / "orig", with_processor=False)
    again.config = again.config.replace(image_token_id=5)
    assert torch.equal(again(ids, pv).logits, ours(ids, pv).logits)


@torch.no_grad()
@pytest.mark.parametrize("fmt", ["original", "hf"])
def test_sharded_round_trip_and_dtype(hf, tmp_path, fmt):
    src = tmp_path / "src"
    hf.save_pretrained(src)
    ours, _ = load_pretrained(src, with_processor=False)
    save_pretrained(ours, tmp_path / "out", format=fmt, max_shard_size=200_000)
    shards = sorted(p.name for p in (tmp_path / "out").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "out" / "model.safetensors.index.json").exists()
    again, _ = load_pretrained(tmp_path / "out", with_processor=False)
    for (k, a), b in zip(ours.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k
    half, _ = load_pretrained(tmp_path / "out", with_processor=False, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and half.vision.layers[0].ls1.dtype == torch.bfloat16


@torch.no_grad()
def test_both_hf_layouts_and_tied_embeddings(tmp_path):
    """transformers writes `language_model.model.*` / `vision_tower.*` to disk but holds `model.*` in memory:
    both load. Tied embeddings store no lm_head."""
    hf = make_hf_model("300m", seed=5, tie=True)
    hf.save_pretrained(tmp_path / "tied")
    ours, _ = load_pretrained(tmp_path / "tied", with_processor=False)
    assert ours.lm_head.weight is ours.language.embed_tokens.weight
    ids, pv = inputs(seed=2)
    ref = hf(input_ids=ids, pixel_values=pv).logits
    assert (ours(ids, pv).logits - ref).abs().max() <= 1e-4
    memory = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    assert any(k.startswith("model.language_model.") for k in memory)
    (tmp_path / "memory").mkdir()
    save_file(memory, tmp_path / "memory" / "model.safetensors")
    (tmp_path / "memory" / "config.json").write_text((tmp_path / "tied" / "config.json").read_text())
    again, _ = load_pretrained(tmp_path / "memory", with_processor=False)
    assert (again(ids, pv).logits - ref).abs().max() <= 1e-4
    save_pretrained(again, tmp_path / "ours", format="hf")
    assert set(load_file(tmp_path / "ours" / "model.safetensors")) == set(load_file(tmp_path / "tied" / "model.safetensors"))


def _broken_copy(hf, tmp_path, edit):
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    edit(state)
    save_file(state, tmp_path / "model.safetensors")


def test_missing_unexpected_and_misshaped_keys_are_listed(hf, tmp_path):
    def edit(state):
        state.pop("language_model.model.norm.weight")
        state["model.extra.weight"] = torch.zeros(2)
        state["multi_modal_projector.linear_2.bias"] = torch.zeros(3)
    _broken_copy(hf, tmp_path, edit)
    with pytest.raises(KeyMapError) as err:
        load_pretrained(tmp_path, with_processor=False)
    msg = str(err.value)
    assert "language.norm.weight" in msg and "model.extra.weight" in msg
    assert "projector.fc2.bias" in msg and "(3,)" in msg and "(64,)" in msg


def test_partial_fused_qkv_is_reported(hf, tmp_path):
    _broken_copy(hf, tmp_path, lambda s: s.pop("vision_tower.encoder.layer.1.attention.k_proj.weight"))
    with pytest.raises(KeyMapError, match=r"vision.layers.1.attn.qkv.weight"):
        load_pretrained(tmp_path, with_processor=False)


def test_unsupported_checkpoints_say_what_was_found(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava", "architectures": ["Llava"]}))
    with pytest.raises(UnsupportedCheckpoint, match="model_type='llava'"):
        load_pretrained(tmp_path, with_processor=False)
    cfg = original_config(make_hf_model("300m").config)
    cfg["llm_config"] = {"architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedCheckpoint, match="InternLM2ForCausalLM"):
        load_pretrained(tmp_path, with_processor=False)
    (tmp_path / "config.json").write_text(json.dumps(original_config(make_hf_model("300m").config)))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_pretrained(tmp_path, with_processor=False)


def test_not_a_directory_nor_repo_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local directory nor a hub repo id"):
        load_pretrained(tmp_path / "nope", with_processor=False)


def test_hub_repo_ids_go_through_huggingface_hub(hf, tmp_path, monkeypatch):
    """Offline stand-in for the hub: snapshot_download is asked for the repo and its files, then we load."""
    import huggingface_hub

    hf.save_pretrained(tmp_path)
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, tuple(allow_patterns)))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model, _ = load_pretrained("OpenGVLab/InternVL3-1B-hf", with_processor=False, revision="main")
    assert calls and calls[0][0] == "OpenGVLab/InternVL3-1B-hf" and "*.safetensors" in calls[0][2]
    ids, pv = inputs(seed=4)
    assert (model(ids, pv).logits - hf(input_ids=ids, pixel_values=pv).logits).abs().max() <= 1e-4

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match="could not download 'OpenGVLab/InternVL3-1B'.*no network"):
        load_pretrained("OpenGVLab/InternVL3-1B")
