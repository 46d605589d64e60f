"""LoRA via peft: hook names survive wrapping, adapter on/off comparison is exact upstream and non-zero downstream."""
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from PIL import Image  # noqa: E402

import ivl3lab  # noqa: E402
from ivl3lab.interp.adapters import TARGETS, compare_with_adapter, plot_adapter_differences  # noqa: E402
from ivl3lab.interp.probe import Probe  # noqa: E402

torch.set_num_threads(1)
SNAPSHOT = Path(__file__).parent / "data" / "hook_names_tiny.txt"
LANGUAGE_QV = r"language\.layers\.\d+\.self_attn\.(q_proj|v_proj)"


@pytest.fixture(scope="module")
def plain():
    return ivl3lab.build("tiny")


@pytest.fixture(scope="module")
def lora():
    """get_peft_model edits the model in place, so wrap a second copy. init_lora_weights=False makes lora_B
    random instead of zero, so the adapter changes something right away."""
    model, _ = ivl3lab.build("tiny")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=LANGUAGE_QV, init_lora_weights=False)
    return get_peft_model(model, config)


@pytest.fixture(scope="module")
def probe(plain):
    return Probe.build(plain[1], "What colour?", Image.new("RGB", (200, 200), "red"), "red")


def test_hook_names_are_the_same_on_a_peft_model(plain, lora):
    names = list(ivl3lab.hook_points(plain[0]))
    assert list(ivl3lab.hook_points(lora)) == names == SNAPSHOT.read_text().split()
    adapted = [n for n, _ in lora.named_modules() if n.endswith("lora_A")]
    assert len(adapted) == 2 * plain[0].config.text.num_layers  # q and v of every LLM layer, nothing in the ViT


def test_disabled_adapter_is_the_base_model(plain, lora, probe):
    with torch.no_grad():
        base = probe.score(plain[0])
        with lora.disable_adapter():
            off = probe.score(lora)
        on = probe.score(lora)
    assert torch.equal(off, base) and not torch.equal(on, base)


def test_compare_is_zero_upstream_and_nonzero_after_the_adapter(lora, probe):
    names = [r"vision\.layers\.\d+\.hook_resid_post", "projector.hook_out", "hook_inputs_embeds",
             r"language\.layers\.\d+\.hook_resid_(pre|post)", "hook_logits"]
    comparison = compare_with_adapter(lora, probe, lambda n: any(re.fullmatch(p, n) for p in names))
    upstream = [n for n in comparison.max_abs if n.startswith(("vision.", "projector.", "hook_inputs_embeds"))]
    upstream.append("language.layers.0.hook_resid_pre")
    assert len(upstream) == 4 + 3 and all(comparison.max_abs[n] == 0.0 for n in upstream)
    downstream = [n for n in comparison.max_abs if n.endswith("hook_resid_post") and n.startswith("language.")]
    downstream.append("hook_logits")
    assert len(downstream) == 5 and all(comparison.max_abs[n] > 0 and comparison.rel_norm[n] > 0 for n in downstream)
    assert sorted(comparison.changed()) == sorted(n for n in comparison.max_abs if n not in upstream)
    assert not torch.equal(comparison.output_with, comparison.output_without)
    with torch.no_grad():  # the adapter is enabled again afterwards
        assert torch.equal(probe.score(lora), comparison.output_with)


def test_compare_attention_patterns_with_a_slice(lora, probe):
    run = lambda m: m(probe.input_ids, probe.pixel_values)  # noqa: E731
    keys = probe.image_positions  # LLM sequence positions: they index the language pattern's keys
    comparison = compare_with_adapter(lora, run, ["language.layers.0.self_attn.hook_pattern"],
                                      pattern_queries=[-1], pattern_keys=keys)
    pattern = comparison.with_adapter["language.layers.0.self_attn.hook_pattern"]
    assert pattern.shape[-2:] == (1, len(keys))  # last query x image keys only
    assert comparison.max_abs["language.layers.0.self_attn.hook_pattern"] > 0  # q_proj is adapted in layer 0
    # the ViT pattern's keys are CLS + the patches of one tile, not LLM positions: slice it with its own keys
    patch_keys = torch.arange(1, 1 + lora.config.vision.grid_size ** 2)
    vision = compare_with_adapter(lora, run, ["vision.layers.0.attn.hook_pattern"], pattern_queries=[-1],
                                  pattern_keys=patch_keys)
    assert vision.with_adapter["vision.layers.0.attn.hook_pattern"].shape[-2:] == (1, len(patch_keys))
    assert vision.max_abs["vision.layers.0.attn.hook_pattern"] == 0.0


def test_plot_and_targets(lora, plain, probe):
    comparison = compare_with_adapter(lora, probe, r"language\.layers\.\d+\.hook_(attn_out|resid_post)|hook_logits")
    fig = plot_adapter_differences(comparison)
    assert len(fig.axes[0].lines) == 2 and len(fig.axes) == 2  # two per-layer series + the bar for hook_logits
    plt.close(fig)
    with pytest.raises(TypeError, match="peft"):
        compare_with_adapter(plain[0], probe, "hook_logits")
    modules = [n for n, _ in plain[0].named_modules()]
    for key, pattern in TARGETS.items():
        hits = [n for n in modules if re.fullmatch(pattern, n)]
        assert hits and all(n.startswith(key.split("_")[0]) for n in hits), key
