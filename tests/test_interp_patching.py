"""Activation patching: the identities that pin the metric down (clean into clean, full residual, whole input),
agreement between batched sweeps and single patches, and clear errors for mismatched or undecidable inputs."""
import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

import ivl3lab
from ivl3lab.interp.ablation import score_batch
from ivl3lab.interp.patching import (baseline_scores, layer_point, normalised_recovery, patch, patch_layers,
                                     patch_positions, patch_score, plot_layer_position, plot_recovery)
from ivl3lab.interp.probe import Probe

matplotlib.use("Agg")
torch.set_num_threads(1)
QUESTION, ANSWER = "What colour is the circle?", "red"


def recoloured(image: Image.Image, box=(50, 40, 170, 160)) -> Image.Image:
    """The sample with the red circle turned blue (R and B swapped inside its box): same size, same layout."""
    pixels = np.array(image)
    left, top, right, bottom = box
    pixels[top:bottom, left:right] = pixels[top:bottom, left:right, ::-1]
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def tiny():
    model, processor = ivl3lab.build("tiny", seed=0)
    image = Image.open(ivl3lab.SAMPLE_IMAGE).convert("RGB")
    clean = Probe.build(processor, QUESTION, image, ANSWER)
    corrupted = Probe.build(processor, QUESTION, recoloured(image), ANSWER)
    return model, processor, clean, corrupted


def test_patching_a_run_into_itself_is_the_identity(tiny):
    model, _, clean, corrupted = tiny
    clean_score, corrupted_score = baseline_scores(model, clean, corrupted)
    for point in ["hook_inputs_embeds", "language.layers.2.hook_resid_pre", "language.layers.1.hook_mlp_out"]:
        same_clean = patch_score(model, clean, clean, point)
        same_corrupted = patch_score(model, corrupted, corrupted, point)
        assert same_clean == clean_score and same_corrupted == corrupted_score  # bit-identical
        assert normalised_recovery(same_clean, clean_score, corrupted_score).item() == 1.0  # clean into clean: 100 %
        assert normalised_recovery(same_corrupted, clean_score, corrupted_score).item() == 0.0  # corrupted: 0 %


def test_patching_everything_the_image_changes_recovers_100_percent(tiny):
    model, _, clean, corrupted = tiny
    assert patch(model, clean, corrupted, "hook_inputs_embeds") == 1.0  # the image enters only there
    assert patch(model, clean, corrupted, "projector.hook_out") == 1.0
    for layer in range(model.config.text.num_layers):  # a full residual stream decides everything after it
        assert patch(model, clean, corrupted, layer_point("resid_pre", layer), positions="all") == 1.0


@torch.no_grad()
def test_layer_sweep_matches_single_patches(tiny):
    model, _, clean, corrupted = tiny
    full = patch_layers(model, clean, corrupted, kinds=["resid_pre", "resid_post"], positions="all", progress=False)
    assert torch.allclose(torch.stack(list(full.values())), torch.ones(()), atol=1e-4)
    curves = patch_layers(model, clean, corrupted, batch_size=5, progress=False)  # batches mix kinds and layers
    assert set(curves) == {"resid_pre", "attn_out", "mlp_out"}
    assert curves["resid_pre"][0].item() == pytest.approx(1.0, abs=1e-4)  # layer 0 input = embeddings
    for kind, layer in [("attn_out", 1), ("mlp_out", 2), ("resid_pre", 3)]:
        single = patch(model, clean, corrupted, layer_point(kind, layer))
        assert curves[kind][layer].item() == pytest.approx(single, abs=1e-3)


@torch.no_grad()
def test_position_resolved_patching_by_tile(tiny):
    model, _, clean, corrupted = tiny
    recovery, scopes = patch_positions(model, clean, corrupted, unit="tile", progress=False)
    assert recovery.shape == (model.config.text.num_layers, 7) and [s.tile for s in scopes] == list(range(7))
    # only tile 0 (top left) and the thumbnail see the recoloured circle: at the first layer the other tiles'
    # residuals are identical in both runs, so patching them recovers nothing
    assert torch.allclose(recovery[0, 1:6], torch.zeros(5), atol=1e-3)
    single = patch(model, clean, corrupted, layer_point("resid_pre", 2), positions=scopes[6].positions(clean.token_map))
    assert recovery[2, 6].item() == pytest.approx(single, abs=1e-3)
    groups, group_scopes = patch_positions(model, clean, corrupted, unit="group", layers=[0], progress=False)
    n_groups = 7 * model.config.num_image_token // 4  # 2x2 token groups over the 7 tiles
    assert groups.shape == (1, n_groups) and len(group_scopes) == n_groups


def test_undefined_recovery_and_mismatched_inputs_raise(tiny):
    model, processor, clean, corrupted = tiny
    assert torch.isnan(normalised_recovery(torch.tensor([0.5, 1.0]), 2.0, 2.0)).all()  # NaN policy
    with pytest.raises(ValueError, match="undefined"):
        patch(model, clean, clean, "hook_inputs_embeds")
    square = Probe.build(processor, QUESTION, Image.new("RGB", (100, 100), "white"), ANSWER)  # one tile
    with pytest.raises(ValueError, match=r"clean has 3x2 grid \+ thumbnail \(7 tiles\) and corrupted has 1x1 grid"):
        patch_layers(model, clean, square)
    other_prompt = Probe.build(processor, "Which shape is red?", recoloured(Image.open(ivl3lab.SAMPLE_IMAGE)), ANSWER)
    with pytest.raises(ValueError, match="same prompt"):
        patch(model, clean, other_prompt, "hook_inputs_embeds")
    assert score_batch(model, clean).shape == (1,)


def test_plots_return_figures(tiny):
    fig = plot_recovery({"resid_pre": torch.tensor([1.0, 0.5, 0.2]), "attn_out": torch.tensor([0.1, 0.3, 0.0])})
    assert len(fig.axes[0].lines) >= 2
    fig = plot_layer_position(torch.rand(4, 7))
    assert fig.axes[0].images[0].get_array().shape == (4, 7)
