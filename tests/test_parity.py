"""Parity with transformers' InternVLForConditionalGeneration on tiny random configs (float32, CPU).

Our model is always obtained by *loading what transformers saved* (so the config parser and the key map are
under test too), and the reverse direction loads what we save into transformers.
"""
import pytest
import torch
from helpers import IMAGE_SIZE, image_prompt, left_pad, make_hf_model
from transformers import InternVLForConditionalGeneration

from ivl3lab.model.language import apply_rope
from ivl3lab.model.projector import pixel_unshuffle
from ivl3lab.weights import load_pretrained, save_pretrained

TOL = 1e-4


def load_ours(hf_model, tmp_path_factory):
    directory = tmp_path_factory.mktemp("hf_ckpt")
    hf_model.save_pretrained(directory)
    model, _ = load_pretrained(directory, with_processor=False)
    return model


@pytest.fixture(scope="module", params=["300m", "6b"])
def pair(request, tmp_path_factory):
    hf = make_hf_model(request.param, seed=3 if request.param == "6b" else 2)
    return hf, load_ours(hf, tmp_path_factory)


def pixels(tiles, seed=0):
    return torch.randn(tiles, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------ components
@torch.no_grad()
def test_patch_embedding_and_position(pair):
    hf, ours = pair
    pv = pixels(2)
    ref = hf.model.vision_tower.embeddings(pv)
    assert max_diff(ours.vision.embeddings(pv), ref) <= 1e-5


@torch.no_grad()
def test_one_vision_layer(pair):
    hf, ours = pair
    x = torch.randn(2, 65, hf.config.vision_config.hidden_size)
    ref = hf.model.vision_tower.encoder.layer[0](x)
    ref = ref[0] if isinstance(ref, tuple) else ref
    assert max_diff(ours.vision.layers[0](x), ref) <= 1e-5


@torch.no_grad()
def test_unshuffle_and_projector(pair):
    hf, ours = pair
    feats = torch.randn(3, 64, hf.config.vision_config.hidden_size)  # 8x8 patches
    ref = hf.model.pixel_shuffle(feats.reshape(3, 8, 8, -1)).reshape(3, 16, -1)
    assert torch.equal(pixel_unshuffle(feats), ref)
    assert max_diff(ours.projector(pixel_unshuffle(feats)), hf.model.multi_modal_projector(ref)) <= 1e-5


@torch.no_grad()
def test_whole_image_features(pair):
    hf, ours = pair
    pv = pixels(3)
    ref = hf.model.get_image_features(pixel_values=pv, vision_feature_layer=-1,
                                      vision_feature_select_strategy="default").pooler_output
    assert max_diff(ours.extract_features(pv), ref) <= 1e-5


@torch.no_grad()
def test_one_decoder_layer_and_rope(pair):
    hf, ours = pair
    lm = hf.model.language_model
    x = torch.randn(2, 10, 64)
    pos = torch.arange(10)[None].expand(2, -1)
    cos_ref, sin_ref = lm.rotary_emb(x, pos)
    cos, sin = ours.language.rotary(pos)
    assert max_diff(cos, cos_ref) <= 1e-6 and max_diff(sin, sin_ref) <= 1e-6
    q = torch.randn(2, 4, 10, 16)
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb
    q_ref, _ = apply_rotary_pos_emb(q, q, cos_ref, sin_ref)
    assert max_diff(apply_rope(q, cos, sin), q_ref) <= 1e-6
    mask = torch.full((10, 10), float("-inf")).triu(1)[None, None].expand(2, 1, -1, -1)
    ref = lm.layers[0](x, attention_mask=mask, position_ids=pos, position_embeddings=(cos_ref, sin_ref))
    ref = ref[0] if isinstance(ref, tuple) else ref
    out = ours.language.layers[0](x, cos, sin, None, True, None)
    assert max_diff(out, ref) <= 1e-5


# ------------------------------------------------------------------------------------------ whole model
@torch.no_grad()
def test_one_image_three_tiles(pair):
    hf, ours = pair
    ids = image_prompt([3])[None]
    pv = pixels(3)
    ref = hf(input_ids=ids, pixel_values=pv).logits
    assert max_diff(ours(ids, pv).logits, ref) <= TOL


@torch.no_grad()
def test_text_only(pair):
    hf, ours = pair
    ids = torch.randint(20, 1000, (2, 23), generator=torch.Generator().manual_seed(4))
    assert max_diff(ours(ids).logits, hf(input_ids=ids).logits) <= TOL


@torch.no_grad()
def test_batch_different_tiles_left_padding(pair):
    hf, ours = pair
    rows = [image_prompt([1], seed=1), image_prompt([3], seed=2)]
    ids, mask = left_pad(rows)
    pv = torch.cat([pixels(1, seed=1), pixels(3, seed=2)])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # what generation uses; passed explicitly to transformers
    ref = hf(input_ids=ids, pixel_values=pv, attention_mask=mask, position_ids=position_ids).logits
    out = ours(ids, pv, attention_mask=mask, num_tiles_per_sample=[1, 3]).logits
    real = mask.bool()
    assert max_diff(out[real], ref[real]) <= TOL
    # and each padded sample equals the same sample run alone
    alone = ours(rows[0][None], pixels(1, seed=1)).logits[0]
    assert max_diff(out[0, real[0]], alone) <= TOL


@torch.no_grad()
def test_greedy_generation_identical(pair):
    hf, ours = pair
    ids = image_prompt([3], seed=5)[None]
    pv = pixels(3, seed=5)
    ref = hf.generate(input_ids=ids, pixel_values=pv, max_new_tokens=16, do_sample=False, eos_token_id=None,
                      pad_token_id=0)[:, ids.shape[1]:]
    out = ours.generate(pixel_values=pv, input_ids=ids, generation_config=dict(max_new_tokens=16))
    assert out.shape == (1, 16)
    assert out.tolist() == ref.tolist()


@torch.no_grad()
def test_batched_greedy_generation_matches_single(pair):
    _, ours = pair
    rows = [image_prompt([1], seed=1), image_prompt([3], seed=2)]
    ids, mask = left_pad(rows)
    pv = torch.cat([pixels(1, seed=1), pixels(3, seed=2)])
    batch = ours.generate(pixel_values=pv, input_ids=ids, attention_mask=mask, generation_config=dict(max_new_tokens=8))
    first = ours.generate(pixel_values=pixels(1, seed=1), input_ids=rows[0][None], generation_config=dict(max_new_tokens=8))
    second = ours.generate(pixel_values=pixels(3, seed=2), input_ids=rows[1][None], generation_config=dict(max_new_tokens=8))
    assert batch.tolist() == [first[0].tolist(), second[0].tolist()]


# ------------------------------------------------------------------------------------------ the other direction
@torch.no_grad()
def test_transformers_loads_what_we_save_hf(pair, tmp_path):
    hf, ours = pair
    save_pretrained(ours, tmp_path, format="hf")
    theirs = InternVLForConditionalGeneration.from_pretrained(tmp_path).eval()
    ids = image_prompt([3], seed=7)[None]
    pv = pixels(3, seed=7)
    assert max_diff(theirs(input_ids=ids, pixel_values=pv).logits, ours(ids, pv).logits) <= TOL
    assert max_diff(theirs(input_ids=ids, pixel_values=pv).logits, hf(input_ids=ids, pixel_values=pv).logits) <= TOL


@torch.no_grad()
def test_backends_agree(pair):
    _, ours = pair
    ids = image_prompt([3], seed=8)[None]
    pv = pixels(3, seed=8)
    ref = ours(ids, pv).logits
    try:
        ours.set_attn_implementation("eager")
        eager = ours(ids, pv).logits
        ours.set_attn_implementation("flash")  # falls back to sdpa on CPU, with a warning
        with pytest.warns(UserWarning, match="flash"):
            flash = ours(ids, pv).logits
    finally:
        ours.set_attn_implementation("sdpa")
    assert max_diff(eager, ref) <= TOL
    assert max_diff(flash, ref) <= TOL
