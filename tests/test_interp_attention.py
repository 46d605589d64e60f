"""Attention maps, rollout, logit lens, the explorer and their pictures (tiny preset, random weights)."""
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import ivl3lab  # noqa: E402
from ivl3lab.hooks import run_with_cache  # noqa: E402
from ivl3lab.interp.attention import (image_attention_mass, patches_to_tokens, query_positions,  # noqa: E402
                                      rollout_patch_scores, rollout_step, text_image_patterns,
                                      text_to_image_attention, vision_attention, vision_rollout)
from ivl3lab.interp.lens import logit_lens, plot_lens  # noqa: E402
from ivl3lab.interp.plots import (image_score_maps, plot_attention_grid, plot_layer_curve,  # noqa: E402
                                  plot_rollout)
from ivl3lab.interp.probe import Probe  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    model, processor = ivl3lab.build("tiny", seed=0)
    picture = Image.open(ivl3lab.SAMPLE_IMAGE).convert("RGB")
    probe = Probe.build(processor, "What is in the image?", picture, "a red circle")
    return model, processor, picture, probe


@pytest.fixture(scope="module")
def full_patterns(tiny):
    """Every LLM layer's full pattern [layers, H, L, L] (the slow, memory-hungry reference)."""
    model, _, _, probe = tiny
    _, cache = run_with_cache(model, probe.input_ids, probe.pixel_values, attention_mask=probe.attention_mask,
                              names_filter=r"language\.layers\.\d+\.self_attn\.hook_pattern")
    return cache.stack(r"language\.layers\.\d+\.self_attn\.hook_pattern")[:, 0]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def test_query_choices(tiny):
    _, _, _, probe = tiny
    ids, image = probe.input_ids, probe.image_positions
    assert query_positions("last", ids, image).tolist() == [ids.shape[1] - 1]
    answer = query_positions("answer", ids, image, probe.answer_len)
    assert answer.tolist() == list(range(probe.prompt_len - 1, ids.shape[1] - 1))  # they predict the answer
    text = query_positions("text", ids, image)
    assert not set(text.tolist()) & set(image.tolist()) and int(text.min()) > int(image.min())
    assert query_positions([-1, 3], ids, image).tolist() == [ids.shape[1] - 1, 3]


@torch.no_grad()
def test_sliced_text_to_image_attention_equals_the_full_pattern(tiny, full_patterns):
    model, _, _, probe = tiny
    rows, cols = query_positions("text", probe.input_ids, probe.image_positions), probe.image_positions
    sliced = text_image_patterns(model, probe, layers=[1, 3], queries="text")
    assert sliced.shape == (2, model.config.text.num_heads, len(rows), len(cols))
    reference = full_patterns[[1, 3]][:, :, rows][..., cols]
    torch.testing.assert_close(sliced, reference, atol=1e-6, rtol=0)
    per_head = text_to_image_attention(model, probe, queries="text", reduce_heads=None, reduce_layers=None)
    torch.testing.assert_close(per_head, full_patterns[:, :, rows][..., cols].mean(2), atol=1e-6, rtol=0)
    pooled = text_to_image_attention(model, probe, queries="text", heads=[0, 2], reduce_heads="max")
    torch.testing.assert_close(pooled, per_head[:, [0, 2]].amax(1).mean(0))


@torch.no_grad()
def test_image_attention_is_the_mass_not_on_text(tiny, full_patterns):
    model, _, _, probe = tiny
    query = probe.prompt_len - 1
    scores = text_to_image_attention(model, probe, queries=[query], reduce_heads=None, reduce_layers=None)
    assert scores.min() >= 0 and scores.sum(-1).max() <= 1 + 1e-6
    not_image = torch.ones(probe.input_ids.shape[1], dtype=torch.bool)
    not_image[probe.image_positions] = False
    elsewhere = full_patterns[:, :, query][..., not_image].sum(-1)  # [layers, H]
    torch.testing.assert_close(scores.sum(-1), 1 - elsewhere, atol=1e-5, rtol=0)
    torch.testing.assert_close(image_attention_mass(model, probe, queries=[query]), scores.sum(-1))
    normalized = text_to_image_attention(model, probe, queries=[query], reduce_heads=None, normalize=True)
    torch.testing.assert_close(normalized.sum(-1), torch.ones(model.config.text.num_heads))


@torch.no_grad()
def test_vision_attention_per_tile(tiny):
    model, _, _, probe = tiny
    pattern = vision_attention(model, probe.pixel_values, layer=2)
    n = 1 + model.config.vision.grid_size ** 2
    assert pattern.shape == (probe.pixel_values.shape[0], model.config.vision.num_heads, n, n)
    torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))
    assert torch.equal(vision_attention(model, probe.pixel_values, 2, head=1), pattern[:, 1])


def test_rollout_rules():
    eye = torch.eye(5).expand(2, 5, 5)
    acc = None
    for _ in range(3):
        acc = rollout_step(acc, eye)
    assert torch.equal(acc, eye)  # nobody mixes: every token only draws on itself
    assert rollout_patch_scores(acc).abs().sum() == 0
    uniform = torch.full((2, 5, 5), 0.2)
    acc = rollout_step(rollout_step(None, uniform), uniform)
    scores = rollout_patch_scores(acc)
    torch.testing.assert_close(scores, torch.full_like(scores, float(scores[0, 0])))  # symmetric: all equal
    a, b = torch.rand(2, 1, 5, 5).softmax(-1)
    ordered = rollout_step(rollout_step(None, a), b)
    mix = lambda p: 0.5 * p + 0.5 * torch.eye(5)  # noqa: E731
    torch.testing.assert_close(ordered, mix(b) @ mix(a))  # later layers multiply on the left
    assert not torch.allclose(ordered, mix(a) @ mix(b))


@torch.no_grad()
def test_vision_rollout_composes_the_layers(tiny):
    model, _, _, probe = tiny
    rollout = vision_rollout(model, probe.pixel_values)
    torch.testing.assert_close(rollout.sum(-1), torch.ones(rollout.shape[:-1]))
    acc = None
    for layer in range(model.config.vision.num_layers):
        acc = rollout_step(acc, vision_attention(model, probe.pixel_values, layer, head="mean"))
    torch.testing.assert_close(rollout, acc)
    assert rollout_patch_scores(rollout, "patches").shape == (probe.pixel_values.shape[0],
                                                                 model.config.vision.grid_size ** 2)


def test_patches_merge_into_their_token(tiny):
    model, _, _, probe = tiny
    g = model.config.vision.grid_size  # patch (5, 6) exists for any grid of 8 or more patches per side
    scores = torch.zeros(1, g * g)
    scores[0, 5 * g + 6] = 1.0  # patch (row 5, col 6) -> token (2, 3)
    tokens = patches_to_tokens(scores).reshape(g // 2, g // 2)
    assert tokens[2, 3] == 1 and tokens.sum() == 1
    assert (5, 6) in probe.token_map.tokens[2 * (g // 2) + 3].patches()  # agrees with the token map


@torch.no_grad()
def test_logit_lens_last_layer_is_the_model_output(tiny):
    model, processor, _, probe = tiny
    length = probe.input_ids.shape[1]
    lens = logit_lens(model, probe, positions="all", token=" red", tokenizer=processor.tokenizer, chunk=length)
    probs = model(probe.input_ids, probe.pixel_values, attention_mask=probe.attention_mask).logits[0].softmax(-1)
    assert lens.layers == ["embed"] + list(range(model.config.text.num_layers))
    assert torch.equal(lens.token_probs[-1], probs[:, lens.token])  # at every position, text and image
    assert torch.equal(lens.top_probs[-1, :, 0], probs.max(-1).values)
    assert torch.equal(lens.top_ids[-1, :, 0], probs.argmax(-1))
    chunked = logit_lens(model, probe, positions="all", token=lens.token, chunk=100)
    torch.testing.assert_close(chunked.token_probs, lens.token_probs, atol=1e-7, rtol=1e-5)
    assert not torch.allclose(lens.token_probs[0], lens.token_probs[-1])  # the layers do differ
    text = logit_lens(model, probe, positions="text", top_k=3)
    assert len(text.top_tokens(processor.tokenizer)) == len(text.layers) and "embed" in text.table(processor.tokenizer)


@torch.no_grad()
def test_lens_image_map_has_the_tile_grid_shape(tiny):
    model, processor, _, probe = tiny
    lens = logit_lens(model, probe, positions="image", token="a", tokenizer=processor.tokenizer)
    scores = lens.image_scores(probe.token_map, layer=1)
    assert scores.shape == (len(probe.token_map),)
    grid, thumb = image_score_maps(probe.token_map, scores)
    layout, side = probe.token_map.layouts[0], probe.token_map.side
    assert grid.shape == (layout.rows * side, layout.cols * side) and thumb.shape == (side, side)
    assert grid[0, 0] == lens.token_probs[2, 0]  # row 2 = output of layer 1; first token = tile 0, (0, 0)
    with pytest.raises(ValueError, match="not decoded"):
        logit_lens(model, probe, positions="text", token="a", tokenizer=processor.tokenizer).image_scores(
            probe.token_map)


def test_explorer_renders_headlessly_and_follows_the_widgets(tiny):
    pytest.importorskip("ipywidgets")
    from ivl3lab.interp.explorer import AttentionExplorer

    model, processor, picture, probe = tiny
    explorer = AttentionExplorer(model, processor, probe, picture)
    fig = explorer.render(layer=1, head=2, query="answer")
    assert len(fig.axes) == 3  # stitched grid, thumbnail, colourbar
    explorer.widget  # builds the UI and draws the first state
    first, drawn = explorer.scores.clone(), explorer.figure
    explorer.controls["layer"].value = 3
    assert explorer.figure is not drawn and not torch.equal(explorer.scores, first)
    explorer.controls["head"].value = 0
    torch.testing.assert_close(explorer.scores, text_to_image_attention(model, probe, layers=[3], heads=[0]))
    explorer.controls["score"].value = "lens p(token)"
    torch.testing.assert_close(explorer.scores, explorer.lens.token_probs[3])
    assert "lens" in explorer.figure.axes[0].get_title()


@torch.no_grad()
def test_plots_have_the_expected_axes(tiny):
    model, processor, picture, probe = tiny
    scores = text_to_image_attention(model, probe, layers=[0, 2], heads=[0, 1, 3], reduce_heads=None,
                                     reduce_layers=None)
    assert len(plot_attention_grid(scores, probe.token_map, picture, layers=[0, 2]).axes) == 2 * 3 + 1
    assert len(plot_attention_grid(scores, probe.token_map, None, tile="thumbnail").axes) == 7
    assert len(plot_attention_grid(scores[:1, :1], probe.token_map, picture, tile=4).axes) == 2
    patch_scores = rollout_patch_scores(vision_rollout(model, probe.pixel_values))
    assert len(plot_rollout(picture, probe.token_map, patch_scores).axes) == 3
    assert len(plot_rollout(picture, probe.token_map, patch_scores, resolution="token").axes) == 3
    assert len(plot_layer_curve(image_attention_mass(model, probe)).axes) == 1
    lens = logit_lens(model, probe, positions="answer")
    assert len(plot_lens(lens, processor.tokenizer).axes) == 2
