"""The fixed-shape decode step (captured as a CUDA graph on CUDA) gives the plain path's tokens; it is chosen
only when nothing needs the Python-level forward. On CPU the step runs eagerly: the same code, uncaptured."""
import dataclasses

import pytest
import torch
from helpers import left_pad

import ivl3lab
from ivl3lab import decoding
from ivl3lab.config import get_preset
from ivl3lab.model import InternVL3
from ivl3lab.model.language import RotaryEmbedding

IMG = 5


@pytest.fixture(scope="module")
def model():
    """tiny preset with dynamic-NTK RoPE (as the real presets) and weights that give varied greedy tokens."""
    torch.manual_seed(0)
    text = dataclasses.replace(get_preset("tiny").text, rope_scaling_type="dynamic", rope_scaling_factor=2.0)
    m = InternVL3.from_preset("tiny", image_token_id=IMG, text=text).eval()
    with torch.no_grad():  # the 0.02 init gives one token forever; larger weights make every step count
        for p in m.parameters():
            p.mul_(8)
    return m


def batch(model, tiles=(1, 2), after=(5, 9), seed=0):
    """Left-padded prompts with images: ids, attention mask, pixel values, tiles per sample."""
    gen = torch.Generator().manual_seed(seed)
    n = model.config.num_image_token
    rows = [torch.cat([torch.randint(20, 1000, (3,), generator=gen), torch.full((t * n,), IMG),
                       torch.randint(20, 1000, (a,), generator=gen)]) for t, a in zip(tiles, after)]
    ids, mask = left_pad(rows)
    size = model.config.vision.image_size
    return ids, mask, torch.randn(sum(tiles), 3, size, size, generator=gen), list(tiles)


def run(model, ids, mask, pv, tiles, cfg, **options):
    return ivl3lab.generate(model, ids, attention_mask=mask, pixel_values=pv, num_tiles_per_sample=tiles,
                            generation_config=cfg, generator=torch.Generator().manual_seed(7), **options)


@torch.no_grad()
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("sample", [False, True])
def test_fixed_step_gives_the_plain_tokens(model, padded, sample):
    ids, mask, pv, tiles = batch(model, (1, 2) if padded else (1, 1), (5, 9) if padded else (5, 5))
    assert bool(mask.all()) != padded
    cfg = dict(max_new_tokens=24, do_sample=sample, temperature=1.3)
    plain = run(model, ids, mask, pv, tiles, cfg, cuda_graph=False)
    fixed = run(model, ids, mask, pv, tiles, cfg, cuda_graph=True)
    assert plain.shape == (2, 24) and len(set(plain.flatten().tolist())) > 5  # varied: a wrong step shows
    assert torch.equal(plain, fixed)


@torch.no_grad()
def test_fixed_step_stops_per_sample_like_the_plain_path(model):
    ids, mask, pv, tiles = batch(model)
    free = run(model, ids, mask, pv, tiles, dict(max_new_tokens=20), cuda_graph=False)
    cfg = dict(max_new_tokens=20, eos_token_id=[int(free[0, 3]), int(free[1, 6])], pad_token_id=1)
    plain = run(model, ids, mask, pv, tiles, cfg, cuda_graph=False)
    fixed = run(model, ids, mask, pv, tiles, cfg, cuda_graph=True)
    assert plain.shape[1] < 20 and torch.equal(plain, fixed)


@torch.no_grad()
def test_a_cached_decoder_is_reused_and_forgets_the_last_prompt(model):
    cfg = dict(max_new_tokens=10)
    long = batch(model, (2, 2), (9, 9), seed=1)
    run(model, *long, cfg, cuda_graph=True)
    decoder = decoding._DECODERS[model][1]
    short = batch(model, (1, 1), (4, 2), seed=2)  # fits the same cache: its stale slots must stay masked
    fixed = run(model, *short, cfg, cuda_graph=True)
    assert decoding._DECODERS[model][1] is decoder
    assert torch.equal(fixed, run(model, *short, cfg, cuda_graph=False))
    one = batch(model, (1,), (4,), seed=2)  # another batch size: another decoder
    run(model, *one, cfg, cuda_graph=True)
    assert decoding._DECODERS[model][1] is not decoder and decoding._DECODERS[model][1].batch == 1


@torch.no_grad()
def test_one_compilation_serves_every_layer_and_gives_the_plain_tokens(model):
    """The block is compiled whole (fullgraph) and, since the weights are arguments, once for all layers.
    A counting backend (aot_eager underneath) sees every compilation without inductor's minutes on CPU."""
    from torch._dynamo.backends.common import aot_autograd

    compiled_graphs = []

    def counting(graph, example_inputs):
        compiled_graphs.append(graph)
        return aot_autograd(fw_compiler=lambda gm, _: gm)(graph, example_inputs)

    torch._dynamo.reset()
    ids, mask, pv, tiles = batch(model)
    cfg = dict(max_new_tokens=8)
    compiled = run(model, ids, mask, pv, tiles, cfg, cuda_graph=True, compile_step=counting)
    assert model.config.text.num_layers > 1 and len(compiled_graphs) == 1
    assert torch.equal(compiled, run(model, ids, mask, pv, tiles, cfg, cuda_graph=False))


@torch.no_grad()
def test_the_fused_projection_follows_weight_updates(model):
    """q/k/v are fused into a copy: an in-place update (an optimizer step) between calls must reach it."""
    ids, mask, pv, tiles = batch(model)
    cfg = dict(max_new_tokens=12)
    before = run(model, ids, mask, pv, tiles, cfg, cuda_graph=True)
    weight = model.language.layers[0].self_attn.k_proj.weight
    saved = weight.clone()
    try:
        weight.add_(torch.randn_like(weight))
        after = run(model, ids, mask, pv, tiles, cfg, cuda_graph=True)
        assert not torch.equal(after, before)
        assert torch.equal(after, run(model, ids, mask, pv, tiles, cfg, cuda_graph=False))
    finally:
        weight.copy_(saved)


@torch.no_grad()
def test_the_fast_path_is_refused_when_the_forward_must_run_in_python(model):
    ids, mask, pv, tiles = batch(model)
    assert decoding.fast_path_blocker(model) is None
    handle = model.language.layers[0].mlp.hook_post.add_hook(lambda x, hook: x)
    try:
        assert "language.layers.0.mlp.hook_post" in decoding.fast_path_blocker(model)
        with pytest.raises(ValueError, match="hook_post"):
            run(model, ids, mask, pv, tiles, dict(max_new_tokens=2), cuda_graph=True)
    finally:
        handle.remove()
    model.train()
    try:
        assert "training" in decoding.fast_path_blocker(model)
    finally:
        model.eval()


def test_peft_adapters_block_the_fast_path():
    from ivl3lab.train.lora import apply_lora

    torch.manual_seed(0)
    peft_model = apply_lora(InternVL3.from_preset("tiny", image_token_id=IMG).eval(), "language")
    assert "peft adapter" in decoding.fast_path_blocker(peft_model.base_model.model)


@torch.no_grad()
def test_auto_decodes_plainly_off_cuda(model):
    decoding._DECODERS.pop(model, None)
    ids, mask, pv, tiles = batch(model)
    run(model, ids, mask, pv, tiles, dict(max_new_tokens=3))
    assert model not in decoding._DECODERS


def test_rotary_with_a_known_bound_needs_no_look_at_the_positions(model):
    rotary = RotaryEmbedding(model.config.text)
    short = torch.arange(40.0)[None]
    assert all(torch.equal(a, b) for a, b in zip(rotary(short), rotary(short, max_position=64)))
    far = torch.tensor([[float(model.config.text.max_position_embeddings + 100)]])
    # beyond max_position_embeddings dynamic NTK changes the base: a bound that says so keeps the look
    assert all(torch.equal(a, b) for a, b in zip(rotary(far), rotary(far, max_position=10**6)))
    assert not torch.equal(rotary(far)[0], rotary(far, max_position=64)[0])  # a (wrong) short bound skips it


@torch.no_grad()
def test_two_interleaved_generations_do_not_share_a_decoder(model):
    """Two streams advanced in turn (zip of two stream_chat calls, say) each need their own cache and state."""
    first, second = batch(model, seed=4), batch(model, seed=5)
    cfg = dict(max_new_tokens=10)
    streams = [ivl3lab.iter_tokens(model, ids, mask, pv, cfg, tiles, cuda_graph=True)
               for ids, mask, pv, tiles in (first, second)]
    steps = list(zip(*streams))  # one step of the first, one of the second, ...
    for k, prompt in enumerate((first, second)):
        interleaved = torch.stack([s[k] for s in steps], dim=1)
        assert torch.equal(interleaved, run(model, *prompt, cfg, cuda_graph=False))
    assert not decoding._DECODERS[model][1].in_use  # released when the streams ended


@torch.no_grad()
def test_a_move_or_cast_that_rebuilds_buffers_gets_a_new_decoder(model):
    """`.to()` rebuilds RoPE's inv_freq (a buffer) even when no parameter moves: a captured graph would read
    the freed one, so the cache key covers buffers too."""
    ids, mask, pv, tiles = batch(model)
    run(model, ids, mask, pv, tiles, dict(max_new_tokens=3), cuda_graph=True)
    decoder = decoding._DECODERS[model][1]
    model.float()  # already float32: parameters stay, inv_freq is rebuilt
    run(model, ids, mask, pv, tiles, dict(max_new_tokens=3), cuda_graph=True)
    assert decoding._DECODERS[model][1] is not decoder


@torch.no_grad()
def test_compile_past_its_recompile_limit_falls_back_to_the_plain_block(model):
    """With fixed shapes each (batch, cache length) is one compilation; past torch's limit the decoder warns
    and runs the uncompiled block instead of failing."""
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    backend = aot_autograd(fw_compiler=lambda gm, _: gm)
    cfg = dict(max_new_tokens=6)
    two, one = batch(model, seed=6), batch(model, (1,), (4,), seed=7)
    with torch._dynamo.config.patch(recompile_limit=1):  # (monkeypatching the attribute breaks the config)
        run(model, *two, cfg, cuda_graph=True, compile_step=backend)
        with pytest.warns(UserWarning, match="recompile limit"):
            compiled = run(model, *one, cfg, cuda_graph=True, compile_step=backend)
    assert torch.equal(compiled, run(model, *one, cfg, cuda_graph=False))
    torch._dynamo.reset()


def test_dynamic_rope_past_its_bound_blocks_the_fast_path(model):
    limit = model.config.text.max_position_embeddings
    assert decoding.fast_path_blocker(model, needed_len=limit) is None
    assert "max_position_embeddings" in decoding.fast_path_blocker(model, needed_len=limit + 1)


@torch.no_grad()
def test_a_failed_capture_falls_back_to_the_uncaptured_step(model, monkeypatch):
    """If some op of the step cannot be captured (a GPU/driver/library combination we never saw), decoding
    warns and goes on uncaptured, with the same logits, instead of failing."""
    ids, mask, pv, tiles = batch(model)
    captured = decoding.FixedStepDecoder(model, batch=2, max_len=128, capture=True)
    reference = decoding.FixedStepDecoder(model, batch=2, max_len=128, capture=False)

    def cannot_capture(_model):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(captured, "_capture_graph", cannot_capture)
    first = captured.prefill(model, ids, mask, pv, tiles)
    assert torch.equal(first, reference.prefill(model, ids, mask, pv, tiles))
    token = first.argmax(-1)
    with pytest.warns(UserWarning, match="uncaptured"):
        second = captured.step(model, token)
    assert not captured.capture and torch.equal(second, reference.step(model, token))
    token = second.argmax(-1)
    assert torch.equal(captured.step(model, token), reference.step(model, token))
