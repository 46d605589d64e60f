"""torch.compile (CPU): the whole model gives the eager logits; compiled blocks (`compile_blocks`) train like eager,
share one graph per tower, and keep hooks working; the Trainer's compile options train the same."""
import dataclasses

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

import ivl3lab
from ivl3lab.config import get_preset
from ivl3lab.model.internvl import InternVL3
from ivl3lab.train.loop import Trainer, TrainConfig
from ivl3lab.train.losses import chunked_loss_sums, token_weights
from ivl3lab.train.toy import ToyData


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every compiled variant of a block shares the block's code object, and dynamo stops compiling one after
    8 variants (its recompile limit): tests that ran before (other backends, shapes, options) must not use them up."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def counting_backend(graphs: list):
    """aot_eager (the same ops, no code generation) that records every graph dynamo hands it."""
    def backend(gm, example_inputs):
        graphs.append(gm)
        return aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward))(gm, example_inputs)
    return backend


def tiny_inputs(config, batch=2, text=12):
    gen = torch.Generator().manual_seed(1)
    n = config.num_image_token
    ids = torch.randint(100, 1000, (batch, 4 + n + text), generator=gen)
    ids[:, 4:4 + n] = config.image_token_id
    pixels = torch.randn(batch, 3, config.vision.image_size, config.vision.image_size, generator=gen)
    return ids, pixels, ids.masked_fill(ids == config.image_token_id, -100)


def loss_and_grads(model, ids, pixels, labels):
    model.zero_grad(set_to_none=True)
    out = model(ids, pixel_values=pixels, compute_logits=False)
    total, n = chunked_loss_sums(out.hidden_states, model.lm_head, labels, token_weights(labels), chunk=16)
    (total / n).backward()
    return float(total / n), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@torch.no_grad()
def test_inductor_forward_matches_eager():
    model, processor = ivl3lab.build("tiny", seed=0)
    inputs = processor("What is it?", images=ivl3lab.SAMPLE_IMAGE)
    eager = model(inputs["input_ids"], inputs["pixel_values"]).logits
    compiled = torch.compile(model)(inputs["input_ids"], inputs["pixel_values"]).logits
    assert (compiled - eager).abs().max() <= 1e-4


def test_compiled_blocks_train_like_eager_with_one_graph_per_tower():
    torch.manual_seed(0)
    model = InternVL3.from_preset("tiny").train()
    batch = tiny_inputs(model.config)
    loss, grads = loss_and_grads(model, *batch)
    graphs = []
    model.compile_blocks(backend=counting_backend(graphs))
    same_loss, same_grads = loss_and_grads(model, *batch)
    assert len(model.vision.layers) > 1 and len(model.language.layers) > 1
    assert len(graphs) == 2  # one for every ViT block, one for every LLM block: the weights are graph inputs
    assert same_loss == pytest.approx(loss, abs=1e-6) and (same_grads - grads).abs().max() <= 1e-6
    model.compile_blocks()  # inductor: generated kernels, fused elementwise work
    fused_loss, fused_grads = loss_and_grads(model, *batch)
    assert fused_loss == pytest.approx(loss, abs=1e-5) and (fused_grads - grads).abs().max() <= 1e-5
    model.compile_blocks(False)
    assert all(block.compile_options is None for block in (*model.vision.layers, *model.language.layers))


@torch.no_grad()
def test_hooks_inside_compiled_blocks_still_fire_and_edit():
    """Compiled code would skip the hooks of the hook points inside it; a hooked block runs eagerly instead."""
    torch.manual_seed(0)
    model = InternVL3.from_preset("tiny").eval()
    ids, pixels, _ = tiny_inputs(model.config)
    plain = model(ids, pixel_values=pixels).logits

    def hooked_run():
        seen = []
        handles = [model.language.layers[1].mlp.hook_post.add_hook(lambda t, hook: seen.append(t.clone())),
                   model.vision.layers[0].hook_attn_out.add_hook(lambda t, hook: t * 0)]
        try:
            return model(ids, pixel_values=pixels).logits, seen
        finally:
            for handle in handles:
                handle.remove()

    eager_logits, eager_seen = hooked_run()
    model.compile_blocks(backend=counting_backend([]))
    model(ids, pixel_values=pixels)  # compiled before the hooks exist
    compiled_logits, compiled_seen = hooked_run()
    assert len(compiled_seen) == 1 and torch.equal(compiled_seen[0], eager_seen[0])
    assert torch.equal(compiled_logits, eager_logits) and not torch.allclose(eager_logits, plain)
    assert (model(ids, pixel_values=pixels).logits - plain).abs().max() <= 1e-6  # hooks gone: compiled again

    # hooks on any module inside a block count, not only hook points (e.g. a probe on one projection)
    seen = []
    handle = model.language.layers[1].mlp.down_proj.register_forward_hook(lambda m, args, out: seen.append(out))
    model(ids, pixel_values=pixels)
    handle.remove()
    assert len(seen) == 1


def test_compiled_blocks_leave_kv_cache_steps_eager():
    """A cached step would bake each layer's index into its own graph (one per layer, past the recompile limit)."""
    torch.manual_seed(0)
    model = InternVL3.from_preset("tiny").eval()
    ids, pixels, _ = tiny_inputs(model.config, batch=1)
    graphs = []
    model.compile_blocks(backend=counting_backend(graphs))
    with torch.no_grad():
        model(ids, pixel_values=pixels)
        compiled = len(graphs)
        out = model(ids, pixel_values=pixels, use_cache=True)
        model(ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)
    assert compiled == 2 and len(graphs) == compiled


def test_drop_path_keeps_its_rate_in_bfloat16():
    from ivl3lab.model.ops import DropPath

    torch.manual_seed(0)
    drop = DropPath(0.002).train()  # a bf16 draw would round 1 - p to a multiple of 1/256 (dropping 0.0039)
    kept = drop(torch.ones(400_000, 1, dtype=torch.bfloat16))
    assert (kept == 0).float().mean().item() == pytest.approx(0.002, abs=4e-4)


def test_drop_path_rates_share_one_compiled_graph():
    """Stochastic depth grows linearly with depth; its rate must not be baked into the graph (one per layer)."""
    config = get_preset("tiny")
    config = config.replace(vision=dataclasses.replace(config.vision, drop_path_rate=0.1))
    model = InternVL3(config).train()
    rates = {block.drop_path.p for block in model.vision.layers}
    assert len(rates) == len(model.vision.layers) > 2
    graphs = []
    model.compile_blocks(backend=counting_backend(graphs))
    loss_and_grads(model, *tiny_inputs(config))
    assert len(graphs) == 3  # ViT blocks at rate 0 and at rate > 0, and the LLM blocks


def test_trainer_compile_options():
    model, processor = ivl3lab.build("tiny", seed=0, system_message="Answer.")
    data = ToyData(processor, batch_size=2, max_objects=1, text_ratio=0.0)
    Trainer(model.train(), TrainConfig(steps=1, compile=True), data.batches)
    assert all(b.compile_options == {} for b in (*model.vision.layers, *model.language.layers))
    model.compile_blocks(False).compile_blocks(mode="max-autotune-no-cudagraphs")  # the user's own options stay
    for option in (False, True, "model"):
        Trainer(model, TrainConfig(steps=1, compile=option), data.batches)
        assert all(b.compile_options == {"mode": "max-autotune-no-cudagraphs"}
                   for b in (*model.vision.layers, *model.language.layers))
    model.compile_blocks(False)
    Trainer(model, TrainConfig(steps=1, compile="graphs"), data.batches)
    assert all(b.compile_options == {"mode": "reduce-overhead"} for b in (*model.vision.layers, *model.language.layers))
    with pytest.raises(ValueError, match="compile must be"):
        Trainer(model, TrainConfig(steps=1, compile="fast"), data.batches)


def test_trainer_graphs_option_accumulates_into_its_own_gradients():
    """compile="graphs" (CUDA graphs on CUDA; checked there by benchmarks/check_train_compile.py): a new graph step
    before each micro-batch, and .grad tensors that exist before the first backward pass and are zeroed, not
    dropped, by the step, so that accumulation never keeps a graph's output buffer. Trains like eager."""
    losses, graphs = [], []
    for option in (False, "graphs"):
        model, processor = ivl3lab.build("tiny", seed=0, system_message="Answer.")
        data = ToyData(processor, batch_size=4, max_objects=1, text_ratio=0.0)
        if option:
            model.compile_blocks(backend=counting_backend(graphs))  # aot_eager: kept by the Trainer
        cfg = TrainConfig(steps=2, warmup_steps=1, grad_accum=2, compile=option)
        trainer = Trainer(model.train(), cfg, data.batches)
        trainer.fit(progress=False)
        losses.append([h["loss"] for h in trainer.history])
        if option:  # zeroed, not dropped (the ViT layers after the one InternVL reads get no gradient: None)
            assert all(p.grad is not None and not p.grad.any() for p in model.language.parameters())
        else:
            assert all(p.grad is None for p in model.parameters())
    assert graphs and losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_trainer_graphs_option_leaves_unreached_parameters_alone():
    """On text-only steps no gradient reaches the ViT: with its own .grad tensors the loop must still hand AdamW
    None there (as eager does), or weight decay and momentum would move a tower the data never touched. Also:
    blocks set to CUDA graphs by compile_blocks count as graphs; with gradient checkpointing they are refused."""
    model, processor = ivl3lab.build("tiny", seed=0, system_message="Answer.")
    data = ToyData(processor, batch_size=4, max_objects=1, text_ratio=1.0)
    vision = {k: v.clone() for k, v in model.vision.state_dict().items()}
    language = {k: v.clone() for k, v in model.language.state_dict().items()}
    model.compile_blocks(mode="reduce-overhead")  # graphs set by the user, not by the Trainer's option
    assert Trainer(model.train(), TrainConfig(steps=1), data.batches).graphs
    model.compile_blocks(False).compile_blocks(backend=counting_backend([]))  # aot_eager, kept by the Trainer
    cfg = TrainConfig(steps=3, warmup_steps=1, grad_accum=2, weight_decay=0.1, compile="graphs")
    trainer = Trainer(model, cfg, data.batches)
    trainer.fit(progress=False)
    assert all(torch.equal(v, model.vision.state_dict()[k]) for k, v in vision.items())
    assert not all(torch.equal(v, model.language.state_dict()[k]) for k, v in language.items())
    assert all(p.grad is None for p in model.vision.parameters())
    with pytest.raises(ValueError, match="gradient checkpointing"):
        Trainer(model, TrainConfig(steps=1, compile="graphs", gradient_checkpointing=True), data.batches)


@pytest.mark.parametrize("compile_", ["blocks", "model"])
def test_compiled_training_matches_eager(compile_):
    from torch._dynamo.utils import counters

    losses = []
    graphs_before = counters["stats"]["unique_graphs"]
    for option in (False, compile_):
        model, processor = ivl3lab.build("tiny", seed=0, system_message="Answer.")
        data = ToyData(processor, batch_size=2, max_objects=1, text_ratio=0.0)
        trainer = Trainer(model.train(), TrainConfig(steps=2, warmup_steps=1, compile=option), data.batches)
        if option == "model":  # inductor's whole-model backward takes minutes on 2 CPU cores; aot_eager, same capture
            trainer.forward = torch.compile(trainer.model, backend="aot_eager")
        trainer.fit(progress=False)
        losses.append([h["loss"] for h in trainer.history])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    assert counters["stats"]["unique_graphs"] > graphs_before  # something was compiled, not all eager
