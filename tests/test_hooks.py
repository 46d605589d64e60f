"""Hook points: names (snapshot), no-op invariance, edits, attention patterns, removal, generation."""
from pathlib import Path

import pytest
import torch

import ivl3lab
from ivl3lab.hooks import hook_points, hooks, run_with_cache, run_with_hooks

SNAPSHOT = Path(__file__).parent / "data" / "hook_names_tiny.txt"


@pytest.fixture(scope="module")
def tiny():
    model, processor = ivl3lab.build("tiny", seed=0)
    inputs = processor("What is in the image?", images=ivl3lab.SAMPLE_IMAGE)
    return model, processor, inputs


def run(model, inputs, **kw):
    return model(inputs["input_ids"], inputs["pixel_values"], attention_mask=inputs["attention_mask"], **kw)


def test_hook_names_snapshot(tiny):
    """Hook names are an API (docs/hooks.md): changing one must be deliberate — update the snapshot and docs."""
    names = list(hook_points(tiny[0]))
    assert names == SNAPSHOT.read_text().split()
    docs = (Path(__file__).parent.parent / "docs" / "hooks.md").read_text()
    generic = {n.replace(".0.", ".{i}.") for n in names if ".1." not in n and ".2." not in n and ".3." not in n}
    missing = [n for n in generic if f"`{n}`" not in docs]
    assert not missing, f"hook points missing from docs/hooks.md: {missing}"


@torch.no_grad()
def test_noop_hooks_leave_logits_bit_identical(tiny):
    model, _, inputs = tiny
    ref = run(model, inputs).logits
    noop = [(lambda name: not name.endswith("hook_pattern"), lambda t, hook: None)]
    assert torch.equal(run_with_hooks(model, inputs["input_ids"], inputs["pixel_values"],
                                      attention_mask=inputs["attention_mask"], fwd_hooks=noop).logits, ref)
    identity_edit = [(lambda name: not name.endswith("hook_pattern"), lambda t, hook: t.clone())]
    with hooks(model, identity_edit):
        assert torch.equal(run(model, inputs).logits, ref)


@torch.no_grad()
def test_editing_hooks_change_the_output(tiny):
    model, _, inputs = tiny
    ref = run(model, inputs).logits
    zero_head = lambda z, hook: z.index_fill(2, torch.tensor([1]), 0.0)  # noqa: E731  head 1 of [B, L, H, D]
    with hooks(model, [("language.layers.2.self_attn.hook_z", zero_head)]):
        edited = run(model, inputs).logits
    assert not torch.allclose(edited, ref)
    assert torch.equal(run(model, inputs).logits, ref)  # removed on exit


def test_hooks_are_removed_after_an_exception(tiny):
    model, _, inputs = tiny

    def boom(t, hook):
        raise RuntimeError("inside a hook")

    with pytest.raises(RuntimeError, match="inside a hook"):
        with hooks(model, [("language.layers.0.hook_resid_pre", boom)]):
            run(model, inputs)
    assert not any(p.active for p in hook_points(model).values())
    with pytest.raises(KeyError, match="no hook point matches"):
        with hooks(model, [("language.layers.99.hook_resid_pre", boom)]):
            pass


@torch.no_grad()
def test_patterns_sum_to_one_and_keep_the_fast_outputs(tiny):
    model, _, inputs = tiny
    ref = run(model, inputs).logits
    out, cache = run_with_cache(model, inputs["input_ids"], inputs["pixel_values"],
                                attention_mask=inputs["attention_mask"], names_filter=r".*hook_pattern")
    assert (out.logits - ref).abs().max() <= 1e-4
    lm = cache["language.layers.1.self_attn.hook_pattern"]
    L = inputs["input_ids"].shape[1]
    assert lm.shape == (1, model.config.text.num_heads, L, L)
    assert torch.allclose(lm.sum(-1), torch.ones(()), atol=1e-5)
    assert lm.triu(1).abs().max() == 0  # causal
    vis = cache["vision.layers.0.attn.hook_pattern"]
    tiles, tokens = inputs["pixel_values"].shape[0], 1 + model.config.vision.grid_size ** 2
    assert vis.shape == (tiles, model.config.vision.num_heads, tokens, tokens)  # per tile, CLS included
    assert torch.allclose(vis.sum(-1), torch.ones(()), atol=1e-5)


@torch.no_grad()
def test_pattern_slices_match_the_full_pattern(tiny):
    model, processor, inputs = tiny
    args = (inputs["input_ids"], inputs["pixel_values"])
    name = "language.layers.3.self_attn.hook_pattern"
    _, full = run_with_cache(model, *args, names_filter=name)
    image_keys = (inputs["input_ids"][0] == processor.image_token_id).nonzero().flatten()
    _, sliced = run_with_cache(model, *args, names_filter=name, pattern_queries=[-1], pattern_keys=image_keys)
    assert sliced[name].shape == (1, model.config.text.num_heads, 1, len(image_keys))
    assert torch.allclose(sliced[name], full[name][:, :, -1:, image_keys], atol=1e-6)

    def edit(p, hook):
        return p * 0
    with pytest.raises(ValueError, match="cannot edit the pattern"):
        with hooks(model, [(name, edit)], pattern_queries=[-1]):
            model(*args)


@torch.no_grad()
def test_editing_the_pattern_is_an_intervention(tiny):
    model, _, inputs = tiny
    ref = run(model, inputs).logits

    def uniform(p, hook):
        mask = p > 0
        return mask / mask.sum(-1, keepdim=True)
    with hooks(model, [("language.layers.0.self_attn.hook_pattern", uniform)]):
        edited = run(model, inputs).logits
    assert not torch.allclose(edited, ref, atol=1e-3)


@torch.no_grad()
def test_hooks_fire_on_every_decoding_step(tiny):
    model, processor, inputs = tiny
    seen = []
    with hooks(model, [("hook_logits", lambda t, hook: seen.append(t.shape[1]))]):
        tokens = ivl3lab.generate(model, inputs["input_ids"], pixel_values=inputs["pixel_values"],
                                  generation_config=dict(max_new_tokens=5))
    assert tokens.shape[1] == 5
    assert seen == [1] * 5  # prefill keeps only the last position's logits, then one per step
