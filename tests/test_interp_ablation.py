"""Ablations: identities that must hold exactly, scopes that pick the right tokens, sweeps that agree with single
ablations, and head ablation checked against an independent edit of the output projection's input."""
import matplotlib
import pytest
import torch

import ivl3lab
from ivl3lab.config import get_preset
from ivl3lab.hooks import hooks, run_with_cache
from ivl3lab.interp.ablation import (Scope, ablate, ablate_head, ablate_scopes, head_sweep, image_activations,
                                     occlusion_sweep, plot_effects, plot_matrix, replacing_hooks, unit_scopes,
                                     view_index)
from ivl3lab.interp.probe import Probe

matplotlib.use("Agg")
torch.set_num_threads(1)
CIRCLE = (50, 40, 170, 160)  # the red circle of the sample image, in original pixels
N = get_preset("tiny").num_image_token  # LLM tokens per tile


@pytest.fixture(scope="module")
def tiny():
    model, processor = ivl3lab.build("tiny", seed=0)
    probe = Probe.build(processor, "What colour is the circle?", ivl3lab.SAMPLE_IMAGE, "red")  # 3x2 + thumbnail
    return model, processor, probe


def forward(model, probe):
    return model(probe.input_ids, probe.pixel_values, attention_mask=probe.attention_mask).logits


def test_scopes_select_the_right_positions(tiny):
    model, _, probe = tiny
    tm, n = probe.token_map, model.num_image_token
    assert torch.equal(Scope().positions(tm), tm.positions)
    tile = Scope(tile=2).positions(tm)
    assert len(tile) == n and {tm[p].tile for p in tile.tolist()} == {2}
    thumb = Scope(thumbnail=True).positions(tm)
    assert len(thumb) == n and all(tm[p].thumbnail for p in thumb.tolist())
    assert all(t.thumbnail == (t.position in set(thumb.tolist())) for t in tm.tokens)
    box = Scope(box=CIRCLE).positions(tm)
    assert torch.equal(box, tm.tokens_in_box(CIRCLE)) and len(box) > 0
    left, top, right, bottom = tm.box_of(box.tolist())
    assert left >= CIRCLE[0] - 40 and right <= CIRCLE[2] + 40 and not any(tm[p].thumbnail for p in box.tolist())
    (one,) = Scope(tile=1, row=3, col=1).positions(tm).tolist()  # row != col: a swap would show
    assert (tm[one].tile, tm[one].row, tm[one].col) == (1, 3, 1)
    group = [tm[p] for p in Scope(tile=4, row=1, col=2, size=2).positions(tm).tolist()]
    assert sorted((t.row, t.col) for t in group) == [(1, 2), (1, 3), (2, 2), (2, 3)] and {t.tile for t in group} == {4}
    edge = Scope(tile=0, row=tm.side - 1, col=tm.side - 1, size=2).positions(tm)  # clipped at the tile's edge
    assert len(edge) == 1
    with pytest.raises(ValueError, match="selects no image tokens"):
        Scope(box=(1000, 1000, 1100, 1100)).positions(tm)


@pytest.mark.parametrize("unit, count", [("token", 7 * N), ("group", 7 * N // 4), ("tile", 7)])  # 3x2 + thumbnail
def test_sweep_units_partition_the_image_tokens(tiny, unit, count):
    tm = tiny[2].token_map
    scopes = unit_scopes(tm, unit)
    chosen = torch.cat([s.positions(tm) for s in scopes])
    assert len(scopes) == count and torch.equal(chosen.sort().values, tm.positions)


@torch.no_grad()
@pytest.mark.parametrize("point", ["hook_inputs_embeds", "projector.hook_out", "language.layers.1.hook_resid_post"])
def test_ablating_with_the_original_values_is_the_identity(tiny, point):
    model, _, probe = tiny
    assert ablate(model, probe, method="resample", reference=probe, point=point) == 0.0
    assert ablate(model, probe, method="mean", reference=[probe], point=point) == 0.0
    index = {point: view_index(probe, point, probe.image_positions)}
    make_hooks = replacing_hooks(index, {point: image_activations(model, probe, point)})
    with hooks(model, make_hooks([{point: torch.ones(len(probe.image_positions), dtype=torch.bool)}])):
        edited = forward(model, probe)
    assert torch.equal(edited, forward(model, probe))  # logits bit-identical


@torch.no_grad()
def test_zero_ablation_writes_zeros_and_changes_the_score(tiny):
    model, _, probe = tiny
    assert abs(ablate(model, probe, method="zero")) > 1e-3
    tile = Scope(tile=3).positions(probe.token_map)
    index = {"hook_inputs_embeds": view_index(probe, "hook_inputs_embeds", probe.image_positions)}
    values = {"hook_inputs_embeds": torch.zeros(len(probe.image_positions), model.config.text.hidden_size)}
    mask = torch.isin(probe.image_positions, tile)
    clean = run_with_cache(model, probe.input_ids, probe.pixel_values, names_filter="hook_inputs_embeds")[1]
    _, cache = run_with_cache(model, probe.input_ids, probe.pixel_values, names_filter="hook_inputs_embeds",
                              fwd_hooks=replacing_hooks(index, values)([{"hook_inputs_embeds": mask}]))
    edited, clean = cache["hook_inputs_embeds"][0], clean["hook_inputs_embeds"][0]
    untouched = torch.ones(len(edited), dtype=torch.bool)
    untouched[tile] = False
    assert edited[tile].abs().max() == 0 and torch.equal(edited[untouched], clean[untouched])


@torch.no_grad()
def test_occlusion_sweep_equals_individual_ablations(tiny):
    model, _, probe = tiny
    per_token = occlusion_sweep(model, probe, unit="tile", batch_size=4, progress=False)  # 2 batches of rows
    for tile in range(7):
        single = ablate(model, probe, Scope(tile=tile))
        values = per_token[torch.isin(probe.image_positions, Scope(tile=tile).positions(probe.token_map))]
        assert torch.allclose(values, torch.tensor(single), atol=1e-4), (tile, values[0], single)
    scopes = unit_scopes(probe.token_map, "group")[:5]
    batched = ablate_scopes(model, probe, scopes, "resample", reference=probe, progress=False)
    assert torch.allclose(batched, torch.zeros(5), atol=1e-5)  # resampling from itself changes nothing


def zero_input_slice(linear, head, head_dim, tiles=None):
    """Independent head ablation: zero the head's slice of the output projection's input."""
    def pre_hook(module, args):
        x = args[0].clone()
        rows = slice(None) if tiles is None else tiles
        x[rows, ..., head * head_dim:(head + 1) * head_dim] = 0
        return (x,)
    return linear.register_forward_pre_hook(pre_hook)


@torch.no_grad()
@pytest.mark.parametrize("tower, layer, head, tiles", [("language", 2, 1, None), ("vision", 1, 3, None),
                                                       ("vision", 3, 0, [0, 6])])
def test_head_ablation_equals_zeroing_the_output_projection_input(tiny, tower, layer, head, tiles):
    model, _, probe = tiny
    if tower == "language":
        linear, dim = model.language.layers[layer].self_attn.o_proj, model.config.text.dim_per_head
    else:
        vision = model.config.vision
        linear, dim = model.vision.layers[layer].attn.proj, vision.hidden_size // vision.num_heads
    clean = probe.score(model)
    handle = zero_input_slice(linear, head, dim, tiles)
    try:
        expected = (probe.score(model) - clean).item()
    finally:
        handle.remove()
    got = ablate_head(model, probe, layer, head, tower, tiles=tiles)
    assert abs(expected) > 1e-6 and got == pytest.approx(expected, abs=1e-5)


@torch.no_grad()
def test_head_sweep_matches_single_head_ablations(tiny):
    model, _, probe = tiny
    sweep = head_sweep(model, probe, "language", batch_size=3, progress=False)  # batches straddle layers
    assert sweep.shape == (model.config.text.num_layers, model.config.text.num_heads)
    for layer, head in [(0, 0), (1, 3), (3, 2)]:
        assert sweep[layer, head].item() == pytest.approx(ablate_head(model, probe, layer, head), abs=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("renormalize", [False, True])
def test_text_to_image_only_removes_the_image_share_of_one_head(tiny, renormalize):
    """Independent check on hook_z: the head's output at text queries becomes (pattern without image keys) @ v."""
    model, _, probe = tiny
    layer, head, seen = 1, 2, {}
    at = f"language.layers.{layer}.self_attn."
    def record(key):  # keeps the first forward's tensor; returns None, so it never edits
        return lambda t, hook: None if key in seen else seen.update({key: t.clone()})
    with hooks(model, [(at + "hook_pattern", record("pattern")), (at + "hook_v", record("v")),
                       (at + "hook_z", record("z"))]):
        forward(model, probe)
    with hooks(model, [(at + "hook_z", record("z_cut"))]):  # its first forward is the ablated one
        effect = ablate_head(model, probe, layer, head, text_to_image_only=True, renormalize=renormalize)
    is_image = torch.isin(torch.arange(probe.input_ids.shape[1]), probe.image_positions)
    text_after = ~is_image & (torch.arange(len(is_image)) > probe.image_positions.max())
    kept = seen["pattern"][0, head][text_after] * ~is_image  # [text queries, keys]
    if renormalize:
        kept = kept / kept.sum(-1, keepdim=True)
    kv = head // (model.config.text.num_heads // model.config.text.num_kv_heads)
    expected = kept @ seen["v"][0, kv]  # [text queries, D]
    z, z_cut = seen["z"][0], seen["z_cut"][0]  # [L, H, D]
    assert torch.allclose(z_cut[text_after, head], expected, atol=1e-5)
    assert not torch.allclose(z_cut[text_after, head], z[text_after, head], atol=1e-4)
    others = [h for h in range(model.config.text.num_heads) if h != head]
    assert torch.allclose(z_cut[:, others], z[:, others], atol=1e-5)
    assert torch.allclose(z_cut[~text_after, head], z[~text_after, head], atol=1e-5)  # image queries untouched
    assert effect != 0


def test_errors_are_clear(tiny):
    model, processor, probe = tiny
    with pytest.raises(ValueError, match="resample"):
        ablate(model, probe, method="resample")
    square = Probe.build(processor, "What colour is the circle?", ivl3lab.SAMPLE_IMAGE, "red", max_num=1)
    with pytest.raises(ValueError, match=r"3x2 grid \+ thumbnail \(7 tiles\).*1x1 grid \(1 tile\)"):
        ablate(model, probe, method="mean", reference=[square])
    with pytest.raises(ValueError, match="not a per-token point"):
        ablate(model, probe, point="vision.layers.0.hook_resid_post")


def test_plots_return_figures(tiny):
    fig = plot_effects({"tile 0": {"zero": -0.2, "mean": -0.1}, "thumbnail": {"zero": 0.1, "mean": 0.05}})
    assert len(fig.axes[0].patches) == 4
    fig = plot_matrix(torch.randn(4, 4), "heads")
    assert fig.axes[0].images[0].get_array().shape == (4, 4)
