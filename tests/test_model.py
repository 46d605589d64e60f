"""Model behaviour beyond parity: placeholder checks, KV cache, pixel-unshuffle layout, RoPE, sampling."""
import pytest
import torch

from ivl3lab.config import PRESETS, InternVLConfig, TextConfig, VisionConfig, get_preset
from ivl3lab.generation import GenerationConfig, sample_next_token
from ivl3lab.model import InternVL3, pixel_unshuffle
from ivl3lab.model.language import RotaryEmbedding

IMG = 5


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return InternVL3.from_preset("tiny", image_token_id=IMG).eval()


def prompt(n_image_tokens, before=3, after=4):
    return torch.cat([torch.randint(20, 1000, (before,)), torch.full((n_image_tokens,), IMG),
                      torch.randint(20, 1000, (after,))])


def pixels(model, tiles):
    """Random pixel_values for `tiles` tiles at the model's tile size."""
    size = model.config.vision.image_size
    return torch.randn(tiles, 3, size, size)


def test_tiny_preset_shapes(tiny):
    cfg = tiny.config
    g = cfg.vision.image_size // cfg.vision.patch_size  # patches per side (112 px / 14 = 8 for tiny)
    assert cfg.vision.grid_size == g and cfg.num_image_token == (g // 2) ** 2  # 2x2 unshuffle: g/2 x g/2 tokens
    assert tiny.extract_features(pixels(tiny, 2)).shape == (2, cfg.num_image_token, cfg.text.hidden_size)


def test_real_presets_carry_the_spec_numbers():
    one_b = get_preset("internvl3-1b")
    assert (one_b.text.hidden_size, one_b.text.num_layers, one_b.text.num_heads, one_b.text.num_kv_heads,
            one_b.text.intermediate_size, one_b.text.vocab_size) == (896, 24, 14, 2, 4864, 151674)
    assert one_b.num_image_token == 256 and one_b.image_token_id == 151667
    big = get_preset("internvl3-78b")
    assert (big.vision.hidden_size, big.vision.num_layers, big.vision.qk_norm, big.vision.norm_type) == (
        3200, 45, True, "rms_norm")
    assert (big.text.hidden_size, big.text.num_layers, big.text.num_kv_heads) == (8192, 80, 8)
    assert set(PRESETS) >= {"tiny", "internvl3-1b", "internvl3-2b", "internvl3-8b", "internvl3-14b",
                            "internvl3-38b", "internvl3-78b"}
    with pytest.raises(KeyError, match="available"):
        get_preset("internvl3-3b")


def test_configs_are_frozen_and_validated():
    cfg = get_preset("tiny")
    with pytest.raises(Exception):
        cfg.max_dynamic_patch = 3
    with pytest.raises(ValueError, match="even"):
        InternVLConfig(vision=VisionConfig(image_size=42, patch_size=14))
    with pytest.raises(ValueError, match="attn_implementation"):
        cfg.replace(attn_implementation="xformers")
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        TextConfig(num_heads=14, num_kv_heads=4)


def test_per_sample_placeholder_mismatch_names_the_sample(tiny):
    # sample 0 has one placeholder too many, sample 1 one too few: the batch total is right
    n = tiny.config.num_image_token
    rows = [prompt(n + 1), prompt(n - 1)]
    ids = torch.stack([torch.nn.functional.pad(r, (0, n + 11 - len(r)), value=30) for r in rows])
    pv = pixels(tiny, 2)
    with pytest.raises(ValueError, match=rf"sample 0: the prompt has {n + 1} <IMG_CONTEXT> tokens"):
        tiny(ids, pv)
    with pytest.raises(ValueError, match=rf"sample 0: the prompt has {n + 1} <IMG_CONTEXT> tokens but its 1 tile"):
        tiny(ids, pv, num_tiles_per_sample=[1, 1])


def test_total_mismatch_states_both_numbers(tiny):
    n = tiny.config.num_image_token
    ids = prompt(2 * n)[None]
    with pytest.raises(ValueError, match=rf"{2 * n} <IMG_CONTEXT> tokens in total.*give {3 * n} image features"):
        tiny(ids, pixels(tiny, 3))
    with pytest.raises(ValueError, match=rf"its 3 tile\(s\) give {3 * n}"):
        tiny(ids, pixels(tiny, 3), num_tiles_per_sample=[3])


@torch.no_grad()
def test_incremental_decoding_equals_full_forward(tiny):
    n = tiny.config.num_image_token
    ids = prompt(n, after=12)[None]  # 3 + n + 12 tokens
    pv = pixels(tiny, 1)
    full = tiny(ids, pv).logits
    prefill = 3 + n + 3  # the image and 3 text tokens after it
    out = tiny(ids[:, :prefill], pv, use_cache=True)
    cache = out.past_key_values
    step_logits = [out.logits]
    for t in range(prefill, ids.shape[1], 3):  # chunks of 3 after the prefill exercise the offset causal mask
        step = tiny(ids[:, t:t + 3], past_key_values=cache, use_cache=True)
        step_logits.append(step.logits)
    assert (torch.cat(step_logits, 1) - full).abs().max() <= 1e-4


@torch.no_grad()
def test_image_flags_drop_dummy_tiles(tiny):
    ids = prompt(tiny.config.num_image_token)[None]
    pv = pixels(tiny, 2)
    with_dummy = tiny(ids, pv, image_flags=torch.tensor([1, 0])).logits
    assert torch.allclose(with_dummy, tiny(ids, pv[:1]).logits, atol=1e-5)


def _literal_pixel_shuffle(x, version):
    """The original code's four steps (spec §1.4), written out."""
    t, g, _, c = x.shape
    x = x.view(t, g, g // 2, 2 * c)
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(t, g // 2, g // 2, 4 * c)
    if version == "v2":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x.reshape(t, -1, 4 * c)


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_pixel_unshuffle_matches_the_original_steps(version):
    x = torch.randn(2, 8, 8, 3)
    assert torch.equal(pixel_unshuffle(x.reshape(2, 64, 3), version), _literal_pixel_shuffle(x, version))


def test_pixel_unshuffle_groups_2x2_neighbours():
    g = 4
    value = torch.arange(g * g, dtype=torch.float)  # patch (row, col) holds row * 4 + col
    grid = torch.stack([value, -value], dim=-1)[None]  # [1, 16, C=2]
    tokens = pixel_unshuffle(grid)  # [1, 4, 8]
    # token (0, 1) gathers patches (0,2), (0,3), (1,2), (1,3), each C wide: channel = (dy*2 + dx)*C + c
    assert tokens[0, 1].tolist() == [2.0, -2.0, 3.0, -3.0, 6.0, -6.0, 7.0, -7.0]
    # torch's pixel_unshuffle puts the channel outermost (c*4 + dy*2 + dx): not the same layout
    torch_layout = torch.nn.functional.pixel_unshuffle(grid.reshape(1, g, g, 2).permute(0, 3, 1, 2), 2)
    assert not torch.equal(tokens, torch_layout.flatten(2).transpose(1, 2))


def test_rope_accepts_fractional_positions_and_dynamic_scaling():
    rope = RotaryEmbedding(TextConfig(hidden_size=64, num_heads=4, num_kv_heads=2, max_position_embeddings=16,
                                      rope_scaling_type="dynamic", rope_scaling_factor=2.0, rope_theta=100.0))
    cos_int, _ = rope(torch.tensor([[0, 1, 2]]))
    cos_frac, _ = rope(torch.tensor([[0.0, 0.5, 1.0, 1.5, 2.0]]))
    assert torch.allclose(cos_frac[:, ::2], cos_int)
    assert not torch.allclose(cos_frac[:, 1], cos_int[:, 0])
    short, _ = rope(torch.arange(10)[None])
    long, _ = rope(torch.arange(40)[None])  # past max_position_embeddings: the base grows
    assert not torch.allclose(long[:, :10], short)


@torch.no_grad()
def test_default_positions_spare_dynamic_rope_its_host_sync():
    """Positions made by the model itself have a maximum known on the host: dynamic NTK RoPE need not read it off
    the device (a sync per forward in training); positions passed in still get looked at. Same logits."""
    import dataclasses

    config = get_preset("tiny")
    config = config.replace(text=dataclasses.replace(config.text, rope_scaling_type="dynamic",
                                                     rope_scaling_factor=2.0, max_position_embeddings=8))
    model = InternVL3(config).eval()
    seen = []
    forward = model.language.rotary.forward
    model.language.rotary.forward = lambda pos, max_position=None: seen.append(max_position) or forward(pos, max_position)
    for length in (6, 12):  # inside and beyond max_position_embeddings (the base grows there)
        ids = torch.randint(20, 1000, (2, length))
        default = model(ids).logits
        explicit = model(ids, position_ids=torch.arange(length)[None].expand(2, -1)).logits
        assert seen[-2:] == [length, None] and torch.equal(default, explicit)


def test_sampling_respects_top_k_and_top_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, -5.0]]).repeat(500, 1)
    gen = torch.Generator().manual_seed(0)
    top_k = sample_next_token(logits, GenerationConfig(do_sample=True, top_k=2), gen)
    assert set(top_k.tolist()) == {0, 1}
    top_p = sample_next_token(logits, GenerationConfig(do_sample=True, top_p=0.5), gen)
    assert set(top_p.tolist()) == {0}  # token 0 alone has p = 0.66 >= 0.5
    assert sample_next_token(logits[:1], GenerationConfig()).item() == 0
    with pytest.raises(ValueError, match="unknown generation options"):
        GenerationConfig.coerce({"max_length": 3})


@torch.no_grad()
def test_generation_stops_per_sample_and_pads(tiny):
    ids = torch.randint(20, 1000, (2, 6), generator=torch.Generator().manual_seed(1))
    free = tiny.generate(input_ids=ids, generation_config=dict(max_new_tokens=6))
    stop = int(free[0, 2])  # make sample 0's third token a stop token
    out = tiny.generate(input_ids=ids, generation_config=dict(max_new_tokens=6, eos_token_id=stop, pad_token_id=1))
    assert out[0, :3].tolist() == free[0, :3].tolist() and out[0, 3:].eq(1).all()
    if stop not in free[1].tolist():
        assert out[1].tolist() == free[1].tolist()


@torch.no_grad()
@pytest.mark.parametrize("padded", [False, True])
def test_static_cache_gives_the_same_greedy_tokens(tiny, padded):
    import ivl3lab

    n = tiny.config.num_image_token
    rows = [prompt(n, after=5), prompt(2 * n, after=9)] if padded else [prompt(n, after=5)]
    length = max(len(r) for r in rows)
    ids = torch.stack([torch.nn.functional.pad(r, (length - len(r), 0), value=0) for r in rows])
    mask = torch.stack([torch.nn.functional.pad(torch.ones(len(r), dtype=torch.long), (length - len(r), 0))
                        for r in rows])
    pv = pixels(tiny, 3 if padded else 1)
    kwargs = dict(attention_mask=mask, pixel_values=pv, generation_config=dict(max_new_tokens=12))
    plain = ivl3lab.generate(tiny, ids, static_cache=False, **kwargs)
    static = ivl3lab.generate(tiny, ids, static_cache=True, **kwargs)
    assert plain.shape == (len(rows), 12) and torch.equal(plain, static)


@torch.no_grad()
@pytest.mark.parametrize("sample", [False, True])
def test_fewer_stop_checks_give_the_same_tokens(tiny, sample):
    """Checking on the host only every k steps whether all samples stopped (fewer device syncs) returns the
    same tokens as a check every step: the extra steps are cut off."""
    import ivl3lab

    n = tiny.config.num_image_token
    rows = [prompt(n, after=5), prompt(2 * n, after=9)]
    length = max(len(r) for r in rows)
    ids = torch.stack([torch.nn.functional.pad(r, (length - len(r), 0), value=0) for r in rows])
    mask = torch.stack([torch.nn.functional.pad(torch.ones(len(r), dtype=torch.long), (length - len(r), 0))
                        for r in rows])
    kwargs = dict(attention_mask=mask, pixel_values=pixels(tiny, 3))
    free = ivl3lab.generate(tiny, ids, generation_config=dict(max_new_tokens=20), **kwargs)
    stops = [int(free[0, 3]), int(free[1, 7])]  # the rows stop at different steps
    cfg = dict(max_new_tokens=20, eos_token_id=stops, pad_token_id=0, do_sample=sample, temperature=1.5)
    runs = [ivl3lab.generate(tiny, ids, generation_config=cfg, stop_check_every=k, **kwargs,
                             generator=torch.Generator().manual_seed(3)) for k in (1, 5, 8)]
    assert runs[0].shape[1] < 20 or sample  # greedy: stopped early, so there was something to cut
    assert all(torch.equal(runs[0], r) for r in runs[1:])
