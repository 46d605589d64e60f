"""captum attribution: IG completeness, aggregation order, LIG through the projector / a ViT layer / the merged
LLM input, feature ablation against a hand-made ablation, region masks on a multi-tile image."""
import pytest
import torch
from PIL import Image

import ivl3lab
from ivl3lab.interp.attribution import (block_sum, feature_ablation, feature_mask, integrated_gradients,
                                         layer_integrated_gradients, make_baseline, region_mask)
from ivl3lab.interp.probe import Probe
from ivl3lab.processing.images import tiles_to_tensor

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    return ivl3lab.build("tiny")


@pytest.fixture(scope="module")
def one_tile(tiny):
    """A 200x200 crop of the sample (the red circle), as one tile (max_num=1)."""
    crop = Image.open(ivl3lab.SAMPLE_IMAGE).convert("RGB").crop((0, 0, 200, 200))
    probe = Probe.build(tiny[1], "What colour is the shape?", crop, "red", max_num=1)
    assert probe.pixel_values.shape[0] == 1
    return probe


@pytest.fixture(scope="module")
def three_tiles(tiny):
    """The 640x400 sample with at most 2 tiles -> a 2x1 grid + thumbnail."""
    probe = Probe.build(tiny[1], "What is in the image?", Image.open(ivl3lab.SAMPLE_IMAGE), "shapes", max_num=2)
    assert probe.pixel_values.shape[0] == 3
    return probe


@pytest.mark.parametrize("baseline,n_steps", [("black", 128), ("blur", 16)])
def test_integrated_gradients_completeness(tiny, one_tile, baseline, n_steps):
    model, _ = tiny
    a = integrated_gradients(model, one_tile, baseline=baseline, n_steps=n_steps, internal_batch_size=32)
    with torch.no_grad():  # f(input) - f(baseline), recomputed independently of the helper
        base = make_baseline(one_tile.pixel_values, baseline)
        gap = float(one_tile.score(model) - one_tile.score(model, pixel_values=base))
    assert gap != 0 and a.score - a.baseline_score == pytest.approx(gap, abs=1e-5)
    assert float(a.pixels.sum()) == pytest.approx(gap, rel=0.05)
    assert abs(a.delta) <= 0.05 * abs(gap) and a.relative_error <= 0.05  # captum's convergence delta
    # aggregation keeps the total: pixels -> patches -> tokens -> tiles
    total = float(a.pixels.sum())
    for part in (a.patches, a.tokens, a.tiles):
        assert float(part.sum()) == pytest.approx(total, rel=1e-4, abs=1e-6)
    g, n = model.config.vision.grid_size, model.config.num_image_token
    assert a.patches.shape == (1, g, g) and a.tokens.shape == (1, n)


def test_baselines_live_in_normalised_space(one_tile):
    pv = one_tile.pixel_values
    size = pv.shape[-1]
    black = tiles_to_tensor([Image.new("RGB", (size, size), "black")])
    assert torch.allclose(make_baseline(pv, "black"), black, atol=1e-6)
    assert not torch.equal(make_baseline(pv, "zeros"), black)  # zeros = the mean colour, not black
    flat = black.clone()
    assert torch.allclose(make_baseline(flat, "blur"), flat, atol=1e-5)  # blurring a flat image changes nothing
    blurred = make_baseline(pv, "blur")
    assert blurred.shape == pv.shape and (blurred - pv).abs().mean() > 0.01
    assert torch.equal(make_baseline(pv, torch.zeros(3, 1, 1)), torch.zeros_like(pv))


def test_token_blocks_follow_the_token_map(three_tiles):
    """Feature ids of the 'token' mask = the token's index in the token map; block_sum agrees."""
    tmap = three_tiles.token_map
    size, token_px = three_tiles.pixel_values.shape[-1], 28  # one token reads 2x2 ViT patches of 14 px
    ids = feature_mask(three_tiles, "token")
    for t, y, x in [(0, 0, 0), (1, 30, 60), (2, size - 1, 5), (2, 50, size - 12)]:
        token = tmap.tokens[int(ids[t, y, x])]
        assert (token.tile, token.row, token.col) == (t, y // token_px, x // token_px)
        one_hot = torch.zeros(3, size, size)
        one_hot[t, y, x] = 1.0
        assert int(block_sum(one_hot, token_px).flatten().argmax()) == int(ids[t, y, x])
    assert torch.equal(feature_mask(three_tiles, "tile")[:, 0, 0], torch.arange(3))


def test_lig_projector_equals_lig_on_merged_llm_input(tiny, one_tile):
    """The projector output is exactly what is written into the <IMG_CONTEXT> positions, so LIG there and on
    hook_inputs_embeds agree; text positions do not depend on the image and get exactly 0."""
    model, _ = tiny
    proj = layer_integrated_gradients(model, one_tile, model.projector, n_steps=64, internal_batch_size=32)
    merged = layer_integrated_gradients(model, one_tile, model.hook_inputs_embeds, n_steps=64, internal_batch_size=32)
    gap = proj.score - proj.baseline_score
    assert proj.tokens.shape == (1, model.config.num_image_token) and abs(proj.delta) <= 0.05 * abs(gap)
    assert torch.allclose(proj.tokens, merged.tokens, atol=1e-5)
    text = torch.ones(one_tile.input_ids.shape[1], dtype=torch.bool)
    text[one_tile.image_positions] = False
    assert merged.positions.shape == (one_tile.input_ids.shape[1],) and torch.all(merged.positions[text] == 0)


def test_lig_vision_layer_per_patch(tiny, one_tile):
    model, _ = tiny
    a = layer_integrated_gradients(model, one_tile, model.vision.layers[1], baseline="zeros", n_steps=32,
                                   internal_batch_size=32)
    g = model.config.vision.grid_size
    assert a.patches.shape == (1, g, g) and torch.allclose(a.tokens, block_sum(a.patches, 2).flatten(1))
    assert abs(a.delta) <= 0.05 * abs(a.score - a.baseline_score)
    assert a.method == "LIG vision.layers.1"


def test_feature_ablation_matches_a_hand_made_ablation(tiny, one_tile):
    model, _ = tiny
    a = feature_ablation(model, one_tile, mask="token", perturbations_per_eval=16)
    assert a.features.shape == (model.config.num_image_token,) and torch.allclose(a.features, a.tokens.flatten())
    k = int(a.features.abs().argmax())
    side, px = model.config.vision.grid_size // 2, 28  # tokens per tile side; 28 px per token
    row, col = divmod(k, side)
    ablated = one_tile.pixel_values.clone()
    ablated[:, :, px * row:px * row + px, px * col:px * col + px] = make_baseline(ablated, "black")[:, :, :px, :px]
    with torch.no_grad():
        effect = float(one_tile.score(model) - one_tile.score(model, pixel_values=ablated))
    # batched (captum) vs single forward in float32: log-probs of magnitude ~5 agree to ~1e-6 each
    assert effect != 0 and float(a.features[k]) == pytest.approx(effect, rel=1e-4, abs=1e-5)


def test_region_masks_cover_grid_tiles_and_thumbnail(tiny, three_tiles):
    """Left half of a 640x400 image in a 2x1 grid = all of tile 0, none of tile 1, the left half of the thumbnail."""
    ids = region_mask(three_tiles, [(0, 0, 320, 400)])
    assert torch.all(ids[0] == 0) and torch.all(ids[1] == 1)
    half = three_tiles.pixel_values.shape[-1] // 2
    assert torch.all(ids[2, :, :half] == 0) and torch.all(ids[2, :, half:] == 1)
    model, _ = tiny
    by_tile = feature_ablation(model, three_tiles, mask="tile", baseline="zeros")
    ablated = three_tiles.pixel_values.clone()
    ablated[2] = 0.0
    with torch.no_grad():
        effect = float(three_tiles.score(model) - three_tiles.score(model, pixel_values=ablated))
    assert by_tile.tiles.shape == (3,) and float(by_tile.tiles[2]) == pytest.approx(effect, rel=1e-4, abs=1e-6)
    by_region = feature_ablation(model, three_tiles, mask=[(0, 0, 320, 400)], baseline="zeros")
    assert by_region.features.shape == (2,) and by_region.tiles is None
    n = model.config.num_image_token
    assert torch.allclose(by_region.tokens[0], by_region.features[0].expand(n))  # tile 0 is all region 0
