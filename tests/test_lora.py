"""LoRA per tower with peft: targeting, report, save/load, merge, disabling adapters."""
import pytest
import torch

import ivl3lab
from ivl3lab.train.lora import adapters_disabled, apply_lora, load_adapter, lora_report, target_pattern


@pytest.fixture()
def tiny():
    model, processor = ivl3lab.build("tiny", seed=0)
    inputs = processor("What is it?", images=ivl3lab.SAMPLE_IMAGE)
    return model, (inputs["input_ids"], inputs["pixel_values"])


def adapted(peft_model):
    return sorted(name.removeprefix("base_model.model.") for name, m in peft_model.named_modules() if hasattr(m, "lora_A"))


def randomize_lora(peft_model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def test_presets_stay_in_their_tower(tiny):
    model, _ = tiny
    names = adapted(apply_lora(model, "projector"))
    assert names == ["projector.fc1", "projector.fc2"]  # not vision.layers.*.mlp.fc1
    model2, _ = ivl3lab.build("tiny", seed=0)
    names = adapted(apply_lora(model2, modules={"vision": ["qkv"], "language": ["q_proj", "v_proj"]}))
    assert all(n.startswith("vision.") and n.endswith("attn.qkv") or n.endswith(("q_proj", "v_proj")) for n in names)
    assert sum(n.startswith("language.") for n in names) == 2 * model2.config.text.num_layers
    with pytest.raises(ValueError, match="projector has no modules named"):
        target_pattern({"projector": ["q_proj"]})


def test_trainable_report_per_tower(tiny):
    model, _ = tiny
    peft_model = apply_lora(model, "language_attention", r=4)
    report = lora_report(peft_model)
    assert report["vision"][0] == 0 and report["projector"][0] == 0
    cfg = model.config.text
    d = cfg.dim_per_head
    per_layer = 4 * (cfg.hidden_size + cfg.num_heads * d) + 4 * (cfg.hidden_size + cfg.num_kv_heads * d) * 2 \
        + 4 * (cfg.num_heads * d + cfg.hidden_size)
    assert report["language"][0] == per_layer * cfg.num_layers


@torch.no_grad()
def test_save_load_merge_and_disable(tiny, tmp_path):
    model, args = tiny
    base_logits = model(*args).logits
    peft_model = apply_lora(model, "all", r=4)
    randomize_lora(peft_model)
    adapter_logits = peft_model(*args).logits
    assert not torch.allclose(adapter_logits, base_logits, atol=1e-4)
    with adapters_disabled(peft_model):
        assert torch.equal(peft_model(*args).logits, base_logits)
    peft_model.save_pretrained(tmp_path)
    fresh, _ = ivl3lab.build("tiny", seed=0)
    reloaded = load_adapter(fresh, tmp_path)
    assert torch.equal(reloaded(*args).logits, adapter_logits)
    merged = reloaded.merge_and_unload()
    assert isinstance(merged, ivl3lab.InternVL3)
    assert (merged(*args).logits - adapter_logits).abs().max() <= 1e-5
    assert list(ivl3lab.hook_points(merged)) == list(ivl3lab.hook_points(fresh))
