"""Training mechanics: loss weightings, packing, accumulation, exact resume, atomic checkpoints, NaN stop,
freezing, V2PE, the toy world and its evaluation."""
import inspect
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import ivl3lab
from ivl3lab.train import data as D
from ivl3lab.train.loop import NonFiniteLoss, Trainer, TrainConfig, lr_factor, save_checkpoint
from ivl3lab.train.losses import lm_loss, loss_sums, token_weights
from ivl3lab.train.sft import set_trainable, trainable_report
from ivl3lab.train.toy import ToyData, eval_items, exact_match
from ivl3lab.train.toyworld import QUESTION_TYPES, label_map, scene
from ivl3lab.train.v2pe import v2pe_position_ids


@pytest.fixture(scope="module")
def tiny():
    return ivl3lab.build("tiny", seed=0, system_message="Answer.")


def small_data(processor, **kw):
    return ToyData(processor, batch_size=4, max_objects=2, **kw)


# ------------------------------------------------------------------------------------------------ losses
def test_loss_weightings_closed_form():
    # one row, two packed samples: sample 0 has 1 supervised token, sample 1 has 4
    labels = torch.tensor([[-100, 5, -100, -100, 6, 7, 8, 9]])
    seg = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]])
    w_token = token_weights(labels, seg, "token")[0]
    assert w_token.tolist() == [1, 0, 0, 1, 1, 1, 1]
    w_sample = token_weights(labels, seg, "sample")[0]
    assert torch.allclose(w_sample, torch.tensor([1, 0, 0, .25, .25, .25, .25]))
    w_square = token_weights(labels, seg, "square")[0]
    assert torch.allclose(w_square, torch.tensor([1, 0, 0, .5, .5, .5, .5]))
    logits = torch.randn(1, 8, 12)
    ce = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:].clamp(min=0), reduction="none")
    expected = (ce * w_square).sum() / w_square.sum()
    assert torch.allclose(lm_loss(logits, labels, seg, "square"), expected)


def test_packing_never_predicts_across_examples():
    labels = torch.tensor([[1, 2, 3, 4, 5, 6]])  # two text examples, fully supervised
    seg = torch.tensor([[0, 0, 0, 1, 1, 1]])
    assert token_weights(labels, seg)[0].tolist() == [1, 1, 0, 1, 1]  # token 3 (first of example 1) is skipped


@torch.no_grad()
def test_packed_rows_equal_separate_examples(tiny):
    model, processor = tiny
    data = small_data(processor, text_ratio=0.5)
    examples = [data.example(i) for i in range(4)]
    packed = D.pack([examples], processor.pad_token_id)
    out = model(**packed.model_inputs()).logits[0]
    start = 0
    for e in examples:
        alone = model(**D.collate([e], processor.pad_token_id).model_inputs()).logits[0]
        assert (out[start:start + len(e.input_ids)] - alone).abs().max() < 1e-4
        start += len(e.input_ids)


def test_chat_example_supervises_answers_only(tiny):
    _, processor = tiny
    example = D.chat_example(processor, [("What color?", "red"), ("How many?", "two")], image=ivl3lab.SAMPLE_IMAGE)
    supervised = [t for t, label in zip(example.input_ids, example.labels) if label != -100]
    text = processor.tokenizer.decode(supervised)
    assert text == "red<|im_end|>two<|im_end|>"
    assert processor.image_token_id not in supervised


# ------------------------------------------------------------------------------------------------ the loop
def fresh(seed=0):
    torch.manual_seed(seed)
    return ivl3lab.build("tiny", seed=seed, system_message="Answer.")[0].train()


def test_gradient_accumulation_equals_one_big_batch(tiny):
    """Same global batch in 1 or 2 micro-batches (different token counts each): same loss, same gradient."""
    _, processor = tiny
    results = []
    for accum in (1, 2):
        model = fresh()
        data = small_data(processor, grad_accum=accum, text_ratio=0.5)
        trainer = Trainer(model, TrainConfig(steps=1, grad_accum=accum, clip_grad=1e9), data.batches)
        grads = []
        trainer.optimizer.step = lambda: grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        record = trainer.train_step()
        results.append((record["loss"], grads[0]))
    (loss1, grad1), (loss2, grad2) = results
    assert loss1 == pytest.approx(loss2, abs=1e-6)
    assert (grad1 - grad2).abs().max() <= 1e-6 * grad1.abs().max()


def test_lr_schedule_warmup_and_cosine():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0) and lr_factor(100, cfg) == pytest.approx(0.1)
    assert lr_factor(55, cfg) == pytest.approx(0.55)


def test_interrupted_and_resumed_run_reproduces_the_losses(tiny, tmp_path):
    _, processor = tiny
    data = small_data(processor)
    cfg = TrainConfig(steps=6, warmup_steps=2, ckpt_every=3)
    straight = Trainer(fresh(), cfg, data.batches, out_dir=tmp_path / "a")
    straight.fit(progress=False)
    first = Trainer(fresh(), TrainConfig(steps=3, warmup_steps=2, ckpt_every=3), data.batches, out_dir=tmp_path / "b")
    first.fit(progress=False)
    torch.manual_seed(1234)  # disturb every RNG: resume must restore them
    resumed = Trainer(fresh(seed=99), cfg, data.batches, out_dir=tmp_path / "b")
    assert resumed.resume() and resumed.step == 3
    resumed.fit(progress=False)
    losses = [h["loss"] for h in first.history + resumed.history]
    assert losses == pytest.approx([h["loss"] for h in straight.history], abs=1e-6)


def test_a_kill_while_saving_keeps_the_last_good_checkpoint(tiny, tmp_path, monkeypatch):
    model = fresh()
    trainer = Trainer(model, TrainConfig(steps=1), small_data(tiny[1]).batches, out_dir=tmp_path)
    save_checkpoint(tmp_path, 1, model, trainer.optimizer, {})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed during torch.save")
    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, 2, model, trainer.optimizer, {})
    monkeypatch.undo()
    assert (tmp_path / "latest").read_text() == "step-0000001"
    again = Trainer(fresh(), TrainConfig(steps=1), small_data(tiny[1]).batches, out_dir=tmp_path)
    assert again.resume() and again.step == 1


def test_non_finite_loss_stops_clearly_and_changes_nothing(tiny, tmp_path):
    model = fresh()
    before = [p.detach().clone() for p in model.parameters()]

    def nan_loss(forward, batch, weights):
        total, weight = loss_sums(forward(**batch.model_inputs()).logits, batch.labels, weights)
        return total * float("nan"), weight, {}
    trainer = Trainer(model, TrainConfig(steps=3), small_data(tiny[1]).batches, out_dir=tmp_path, loss_fn=nan_loss)
    with pytest.raises(NonFiniteLoss, match="non-finite loss .* at step 0"):
        trainer.fit(progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not (tmp_path / "latest").exists()


def test_freeze_toggles_and_report(tiny):
    model = fresh()
    set_trainable(model, vision=False, projector=True, language=False, vision_last_n=1)
    report = trainable_report(model)
    assert report["language"][0] == 0 and report["projector"][0] == report["projector"][1]
    last = sum(p.numel() for p in model.vision.layers[-1].parameters())
    assert report["vision"][0] == last
    set_trainable(model, vision=False, projector=False, language=False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Trainer(model, TrainConfig(steps=1), small_data(tiny[1]).batches)


def test_per_component_learning_rates(tiny):
    trainer = Trainer(fresh(), TrainConfig(lr=1e-3, lr_vision=1e-5), small_data(tiny[1]).batches)
    lrs = {g["name"]: g["base_lr"] for g in trainer.optimizer.param_groups}
    assert lrs == {"vision": 1e-5, "projector": 1e-3, "language": 1e-3}


# ------------------------------------------------------------------------------------------------ V2PE
def test_v2pe_delta_one_is_standard_and_the_spec_example():
    ids = torch.tensor([[7, 3] + [5] * 256 + [4, 8]])  # A <img> [256 visual] </img> B
    standard = v2pe_position_ids(ids, image_token_id=5, delta=1.0)
    assert torch.equal(standard, torch.arange(260, dtype=torch.float)[None])
    quarter = v2pe_position_ids(ids, image_token_id=5, delta=0.25)[0]
    assert quarter[:3].tolist() == [0, 1, 1.25] and quarter[257].item() == 65.0
    assert quarter[258].item() == 66 and quarter[259].item() == 67


@torch.no_grad()
def test_v2pe_delta_one_gives_the_same_logits(tiny):
    model, processor = tiny
    inputs = processor("What?", images=ivl3lab.SAMPLE_IMAGE)
    positions = v2pe_position_ids(inputs["input_ids"], processor.image_token_id, 1.0)
    a = model(inputs["input_ids"], inputs["pixel_values"]).logits
    b = model(inputs["input_ids"], inputs["pixel_values"], position_ids=positions).logits
    assert torch.equal(a, b)
    c = model(inputs["input_ids"], inputs["pixel_values"],
              position_ids=v2pe_position_ids(inputs["input_ids"], processor.image_token_id, 1 / 16)).logits
    assert not torch.allclose(a, c)


# ------------------------------------------------------------------------------------------------ toy world
def test_toy_world_is_deterministic_and_splits_differ():
    a, b = scene("train", 5), scene("train", 5)
    assert a.caption == b.caption and a.image.tobytes() == b.image.tobytes()
    assert scene("val", 5).caption != a.caption or scene("val", 5).image.tobytes() != a.image.tobytes()
    tiles = {scene("train", i).grid for i in range(60)}
    assert {(1, 1), (2, 1), (3, 2)} <= tiles
    kinds = {kind for i in range(60) for kind, _, _ in scene("train", i).qa}
    assert kinds == set(QUESTION_TYPES)


def test_toy_answers_are_consistent_with_the_drawing():
    for i in range(40):
        s = scene("test", i)
        cols, rows = s.grid
        tile_w, tile_h = s.image.width / cols, s.image.height / rows
        for o in s.objects:  # the object's box lies inside its tile
            col, row = (o.tile - 1) % cols, (o.tile - 1) // cols
            assert col * tile_w <= o.cx - o.size and o.cx + o.size <= (col + 1) * tile_w
            assert row * tile_h <= o.cy - o.size and o.cy + o.size <= (row + 1) * tile_h
            r, g, b = s.image.getpixel((int(o.cx), int(o.cy + o.size * 0.1)))
            assert (r, g, b) != s.image.getpixel((1, 1))  # the centre is painted
        for kind, question, answer in s.qa:
            if kind == "count":
                assert answer == ["zero", "one", "two", "three", "four"][len(s.objects)]


@torch.no_grad()
def test_exact_match_equals_greedy_decoding(tiny):
    model, processor = tiny
    items = eval_items(processor, per_type=2, max_objects=2)
    scores = exact_match(model, items, processor.pad_token_id)
    for kind, example in items[:4]:
        prompt_len = next(i for i, label in enumerate(example.labels) if label != -100)
        answer = [t for t, label in zip(example.input_ids, example.labels) if label != -100]
        ids = torch.tensor([example.input_ids[:prompt_len]])
        generated = ivl3lab.generate(model, ids, pixel_values=example.pixel_values,
                                     generation_config=dict(max_new_tokens=len(answer)))
        single = exact_match(model, [(kind, example)], processor.pad_token_id)[f"acc_{kind}"]
        assert single == float(generated[0].tolist() == answer)
    assert set(scores) == {f"acc_{t}" for t in QUESTION_TYPES}


def test_chunked_loss_equals_plain_loss_and_gradients(tiny):
    _, processor = tiny
    batch = small_data(processor, text_ratio=0.3).batches(0, 0)
    from ivl3lab.train.losses import chunked_loss_sums
    results = []
    for chunked in (False, True):
        model = fresh()
        weights = token_weights(batch.labels, None, "square")
        if chunked:
            out = model(**batch.model_inputs(), compute_logits=False)
            assert out.logits is None
            total, weight = chunked_loss_sums(out.hidden_states, model.lm_head, batch.labels, weights, chunk=37)
        else:
            total, weight = loss_sums(model(**batch.model_inputs()).logits, batch.labels, weights)
        (total / weight).backward()
        results.append((float((total / weight).detach()), torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-5)
    assert (results[0][1] - results[1][1]).abs().max() <= 1e-5


def test_chunked_loss_skips_unsupervised_positions_and_survives_none(monkeypatch):
    """Only supervised positions go through the projection (counted); with none, the loss is a zero that still
    reaches every parameter (DDP needs a gradient for each)."""
    from ivl3lab.train import losses

    projected = []
    ce_grad = losses._ce_grad
    monkeypatch.setattr(losses, "_ce_grad", lambda logits, *rest: projected.append(logits.shape[0]) or ce_grad(logits, *rest))
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11, bias=False)
    labels = torch.randint(0, 11, (2, 6))
    labels[0, 1:4] = -100
    total, n = losses.chunked_loss_sums(hidden, head, labels, token_weights(labels), chunk=4)
    assert n == 2 * 5 - 3 and projected == [4, 3]  # 10 predicting positions, 3 of them without a label
    assert total.item() == pytest.approx(loss_sums(head(hidden), labels, token_weights(labels))[0].item(), rel=1e-6)
    none = torch.full_like(labels, -100)
    total, n = losses.chunked_loss_sums(hidden, head, none, token_weights(none))
    (total / n.clamp(min=1)).backward()
    assert total.item() == 0 and head.weight.grad is not None and hidden.grad is not None


def test_chunked_loss_masks_vocabulary_padding_and_follows_autocast():
    """The fused linear + cross-entropy: padded vocabulary columns (added on CUDA for aligned matrix products)
    change nothing; under autocast its products run in the autocast dtype, like nn.Linear's; a frozen head gets
    no gradient while the hidden states still do."""
    from ivl3lab.train import losses

    gen = torch.Generator().manual_seed(0)
    logits, targets, w = torch.randn(5, 16, generator=gen), torch.tensor([0, 3, 10, 7, 10]), torch.rand(5, generator=gen)
    loss, grad = losses._ce_grad(logits[:, :11].contiguous(), targets, w, 11)
    padded_loss, padded_grad = losses._ce_grad(logits, targets, w, 11)  # columns 11..15 are padding
    assert padded_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    assert torch.allclose(padded_grad[:, :11], grad, atol=1e-7) and padded_grad[:, 11:].abs().max() == 0

    hidden = torch.randn(2, 7, 8, generator=gen, requires_grad=True)
    head = torch.nn.Linear(8, 13, bias=False)
    labels = torch.randint(0, 13, (2, 7), generator=gen)
    weights = token_weights(labels)
    exact = loss_sums(head(hidden), labels, weights)[0]
    with torch.autocast("cpu", torch.bfloat16):
        reference = loss_sums(head(hidden), labels, weights)[0]  # bf16 logits, float32 cross-entropy
        fused = losses.chunked_loss_sums(hidden, head, labels, weights, chunk=5)[0]
    assert abs(fused.item() - reference.item()) < abs(exact.item() - reference.item()) / 10  # bf16 products, not fp32
    head.weight.requires_grad_(False)
    losses.chunked_loss_sums(hidden, head, labels, weights, chunk=5)[0].backward()
    exact_grad = torch.autograd.grad(loss_sums(head(hidden), labels, weights)[0], hidden)[0]
    assert head.weight.grad is None and torch.allclose(hidden.grad, exact_grad, atol=1e-6)


def test_chunked_loss_with_a_padded_vocabulary_equals_the_plain_loss(monkeypatch):
    """The CUDA path pads the LM head's rows (aligned products); forced here on CPU: same loss, same gradients."""
    from ivl3lab.train import losses

    monkeypatch.setattr(losses, "_vocab_padding", lambda vocab, h: (-vocab) % 8)  # 11 -> 16 rows
    hidden = torch.randn(2, 6, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11, bias=False)
    labels = torch.randint(0, 11, (2, 6))
    weights = token_weights(labels, None, "square")
    total, n = losses.chunked_loss_sums(hidden, head, labels, weights, chunk=4)
    (total / n).backward()
    fused = (hidden.grad.clone(), head.weight.grad.clone())
    hidden.grad, head.weight.grad = None, None
    reference, n_ref = loss_sums(head(hidden), labels, weights)
    (reference / n_ref).backward()
    assert total.item() == pytest.approx(reference.item(), rel=1e-6) and head.weight.grad.shape == (11, 8)
    assert torch.allclose(fused[0], hidden.grad, atol=1e-6) and torch.allclose(fused[1], head.weight.grad, atol=1e-6)


class CountMatmuls(TorchDispatchMode):
    """Counts the matrix products dispatched inside the `with` block."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
        return func(*args, **(kwargs or {}))


def test_chunked_loss_makes_gradients_only_when_asked_and_never_recomputes():
    """3 matrix products per chunk with gradients (logits, d hidden, d weight) and none in the backward pass;
    1 per chunk under torch.no_grad (a validation loss); the same value either way."""
    from ivl3lab.train import losses

    hidden = torch.randn(2, 6, 8, requires_grad=True)
    head = torch.nn.Linear(8, 11, bias=False)
    labels = torch.randint(0, 11, (2, 6))
    weights = token_weights(labels)
    with CountMatmuls() as forward:
        total = losses.chunked_loss_sums(hidden, head, labels, weights, chunk=4)[0]  # 10 positions: 3 chunks
    with CountMatmuls() as backward:
        total.backward()
    with torch.no_grad(), CountMatmuls() as evaluation:
        same = losses.chunked_loss_sums(hidden, head, labels, weights, chunk=4)[0]
    assert (forward.count, backward.count, evaluation.count) == (9, 0, 3)
    assert same.item() == pytest.approx(total.item(), rel=1e-6) and hidden.grad is not None


@pytest.mark.parametrize("packed", [False, True])
def test_checkpointing_modes_give_the_same_gradients_and_selective_recomputes_no_matmul(tiny, packed):
    """Full and selective activation checkpointing change only what is stored: the gradients are those of no
    checkpointing. Full recomputes every block's matrix products in the backward pass; selective keeps them."""
    _, processor = tiny
    batch = small_data(processor, pack_tokens=512 if packed else 0).batches(0, 0)
    assert (batch.segment_ids is not None) == packed
    grads, backward_matmuls = {}, {}
    for mode in (False, "full", "selective"):
        model = fresh().set_gradient_checkpointing(mode)
        loss = lm_loss(model(**batch.model_inputs()).logits, batch.labels, batch.segment_ids)
        with CountMatmuls() as counter:
            loss.backward()
        grads[mode] = torch.cat([p.grad.flatten() for p in model.parameters()])
        backward_matmuls[mode] = counter.count
    for mode in ("full", "selective"):
        assert (grads[mode] - grads[False]).abs().max() <= 1e-6, mode
    assert backward_matmuls["selective"] == backward_matmuls[False] < backward_matmuls["full"]
    with pytest.raises(ValueError, match="selective"):
        fresh().set_gradient_checkpointing("some")


def test_flex_attention_on_packed_rows_matches_the_dense_mask(tiny, monkeypatch):
    """Backend "flex": packed rows through FlexAttention's block-sparse mask give the dense-mask logits. It is
    used without gradients on CPU (PyTorch has no CPU backward for it; training there takes the dense mask,
    same gradients) and never when a pattern hook needs the probabilities."""
    from ivl3lab.model import ops

    _, processor = tiny
    batch = small_data(processor, pack_tokens=512).batches(0, 0)
    assert (batch.segment_ids == -1).any() and int(batch.segment_ids.max()) >= 1  # padding and 2+ examples a row
    calls = []
    flex = ops._flex_attention
    monkeypatch.setattr(ops, "_flex_attention", lambda *a: calls.append(1) or flex(*a))
    model = fresh().eval()
    with torch.no_grad():
        dense = model(**batch.model_inputs()).logits
        model.set_attn_implementation("flex")
        packed = model(**batch.model_inputs()).logits
        assert len(calls) == model.config.text.num_layers
        real = batch.segment_ids >= 0
        assert (packed - dense)[real].abs().max() <= 1e-5
        with ivl3lab.hooks(model, [("language.layers.0.self_attn.hook_pattern", lambda x, hook: None)]):
            hooked = model(**batch.model_inputs()).logits
        assert len(calls) == model.config.text.num_layers and (hooked - dense)[real].abs().max() <= 1e-5
    # CPU training with "flex": the dense-mask fallback (flex's own backward is CUDA-only and not tested here)
    grads, flex_calls = [], len(calls)
    for backend in ("sdpa", "flex"):
        model = fresh().set_attn_implementation(backend)
        lm_loss(model(**batch.model_inputs()).logits, batch.labels, batch.segment_ids).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert len(calls) == flex_calls and torch.equal(grads[0], grads[1])


def test_flash_varlen_on_packed_rows_matches_the_dense_mask(tiny, monkeypatch):
    """Backend "flash" sends packed rows to flash-attn's varlen kernel: one causal run per example and per padding
    tail, over the flattened tokens. flash-attn cannot run here (CUDA only, no wheel), so a stand-in written from
    its documented contract (q/k/v [tokens, heads, dim], int32 cu_seqlens, GQA by head groups) checks our side:
    the runs, the reshapes, the logits and gradients of the dense mask. Without the kernel, the dense mask."""
    import sys
    import types

    from ivl3lab.model import ops

    def varlen_reference(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
        assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and max_q == max_k >= int(cu_q.diff().max())
        assert q.shape[0] == k.shape[0] == int(cu_q[-1]) and causal
        calls.append((cu_q.tolist(), max_q))
        return runs_reference(q, k, v, cu_q, softmax_scale, q.shape[1] != k.shape[1])

    def dense_reference(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):  # the ViT's calls
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, scale=softmax_scale)
        return out.transpose(1, 2)

    _, processor = tiny
    batch = small_data(processor, pack_tokens=512).batches(0, 0)
    segments = batch.segment_ids
    assert (segments == -1).any() and int(segments.max()) >= 1  # padding and 2+ examples a row
    expected, longest = expected_runs(segments)
    calls = []
    results = {}
    for backend in ("sdpa", "flash"):
        model = fresh().set_attn_implementation(backend)
        if backend == "flash":
            monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(
                flash_attn_func=dense_reference, flash_attn_varlen_func=varlen_reference))
            monkeypatch.setattr(ops, "_HAS_FLASH", True)
            monkeypatch.setattr(ops, "flash_available", lambda *tensors: True)
            monkeypatch.setattr(ops, "varlen_kernel_for", lambda x, dtype: True)  # as on CUDA in bf16
        logits = model(**batch.model_inputs()).logits
        lm_loss(logits, batch.labels, segments).backward()
        results[backend] = logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])
    assert len(calls) == model.config.text.num_layers and calls[0] == (expected, longest)
    # compiled blocks take it (`test_torch_varlen_...`), unless the layer's backend would need the dense mask
    rows = ops.PackedRows(segments, None)
    assert not model.language.layers[0].runs_eagerly(None, None, None, rows, False, None)
    model.set_attn_implementation("sdpa")
    assert model.language.layers[0].runs_eagerly(None, None, None, rows, False, None)
    model.set_attn_implementation("flash")
    real = segments >= 0
    assert (results["flash"][0] - results["sdpa"][0])[real].abs().max() <= 1e-5
    assert (results["flash"][1] - results["sdpa"][1]).abs().max() <= 1e-5
    hook = [("language.layers.0.self_attn.hook_pattern", lambda x, hook: None)]
    with ivl3lab.hooks(model, hook), pytest.warns(UserWarning, match="flash"):
        hooked = model(**batch.model_inputs()).logits  # a listening pattern hook: the dense mask in every layer
    assert len(calls) == model.config.text.num_layers and (hooked - results["sdpa"][0])[real].abs().max() <= 1e-5
    layers = model.config.text.num_layers
    model.language.layers[1].self_attn.backend = "sdpa"  # one layer that cannot take the kernel: its dense mask
    fallback = model(**batch.model_inputs()).logits
    assert len(calls) == 2 * layers - 1 and (fallback - results["sdpa"][0])[real].abs().max() <= 1e-5
    model.language.layers[1].self_attn.backend = "flash"
    built = []
    monkeypatch.setattr(ops.PackedRows, "__init__", lambda self, *a: built.append(1) or None)
    monkeypatch.setattr(ops, "varlen_kernel_for", lambda x, dtype: False)
    with pytest.warns(UserWarning, match="flash"):  # no kernel for CPU / fp32: the dense mask, no PackedRows
        plain = model(**batch.model_inputs()).logits
    assert not built and (plain - results["sdpa"][0])[real].abs().max() <= 1e-5


def runs_reference(q, k, v, cu_seqlens, scale, gqa):
    """Causal attention within each run of cu_seqlens (q/k/v [tokens, heads, dim]), one SDPA call per run."""
    runs = []
    for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        q_, k_, v_ = (x[a:b].transpose(0, 1) for x in (q, k, v))  # [H, n, D]
        runs.append(F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, scale=scale,
                                                   enable_gqa=gqa).transpose(0, 1))
    return torch.cat(runs)


def expected_runs(segments):
    """The cu_seqlens a packed batch is cut into (each row's examples, then its padding tail; padded with empty
    runs to a power of two) and the longest run rounded up to a power of two."""
    bounds = [0]
    for row in segments.tolist():
        for s in sorted(set(row), key=row.index):
            bounds.append(bounds[-1] + row.count(s))
    runs = len(bounds) - 1
    slots = 1
    while slots < runs:
        slots *= 2
    longest = max(b - a for a, b in zip(bounds, bounds[1:]))
    rounded = 1
    while rounded < longest:
        rounded *= 2
    return bounds + [bounds[-1]] * (slots - runs), min(rounded, segments.numel())


def test_torch_varlen_kernel_on_packed_rows_and_in_compiled_blocks(tiny, monkeypatch):
    """Without flash-attn, backend "flash" sends packed rows to PyTorch's own varlen kernel (torch >= 2.10, CUDA
    only), whose keywords changed between releases. Stand-ins for both forms (2.10: `is_causal`, no scale, no
    GQA; later: `window_size`, `scale`, `enable_gqa`), written from their docstrings, check our side: the runs
    and the GQA handling, the dense mask's logits and gradients, and compiled blocks taking the packed rows
    (a traceable stand-in) with the eager logits."""
    from test_compile import counting_backend

    from ivl3lab.model import ops

    def old_style(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None):
        assert is_causal and query.shape[1] == key.shape[1]  # GQA repeated for it
        calls.append((cu_seq_q.tolist(), max_q))
        return runs_reference(query, key, value, cu_seq_q, None, False)

    def mid_style(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                  window_size=(-1, -1)):  # torch 2.11, the one the H100 runs used
        assert tuple(window_size) == (-1, 0) and query.shape[1] == key.shape[1] and scale is not None
        calls.append((cu_seq_q.tolist(), max_q))
        return runs_reference(query, key, value, cu_seq_q, scale, False)

    def new_style(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                  window_size=(-1, -1), enable_gqa=False):
        assert tuple(window_size) == (-1, 0) and enable_gqa == (query.shape[1] != key.shape[1])
        assert scale == query.shape[-1] ** -0.5 and cu_seq_q.dtype == torch.int32 and cu_seq_k is cu_seq_q
        if torch.compiler.is_compiling():  # traceable: the runs as a mask
            tokens = torch.arange(query.shape[0])
            run = torch.searchsorted(cu_seq_q[1:], tokens, right=True)  # [T] which run each token is in
            mask = (run[:, None] == run[None, :]) & (tokens[None, :] <= tokens[:, None])
            return F.scaled_dot_product_attention(query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),
                                                  attn_mask=mask, scale=scale, enable_gqa=enable_gqa).transpose(0, 1)
        calls.append((cu_seq_q.tolist(), max_q))
        return runs_reference(query, key, value, cu_seq_q, scale, enable_gqa)

    _, processor = tiny
    batch = small_data(processor, pack_tokens=512).batches(0, 0)
    real = batch.segment_ids >= 0
    expected = expected_runs(batch.segment_ids)
    assert len(set(expected[0])) < len(expected[0])  # empty runs pad this batch's runs to a power of two

    def run(model):
        model.zero_grad(set_to_none=True)
        logits = model(**batch.model_inputs()).logits
        lm_loss(logits, batch.labels, batch.segment_ids).backward()
        return logits.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    reference = run(fresh())
    monkeypatch.setattr(ops, "_HAS_FLASH", False)
    monkeypatch.setattr(ops, "varlen_kernel_for", lambda x, dtype: True)  # as on CUDA in bf16
    for kernel in (old_style, mid_style, new_style):
        calls = []
        keywords = frozenset(inspect.signature(kernel).parameters)
        monkeypatch.setattr(ops, "_TORCH_VARLEN", (kernel, keywords))
        model = fresh().set_attn_implementation("flash")
        logits, grads = run(model)
        layers = model.config.text.num_layers
        assert calls == [expected] * layers, kernel.__name__
        assert (logits - reference[0])[real].abs().max() <= 1e-5
        assert (grads - reference[1]).abs().max() <= 1e-5
    graphs, calls = [], []
    model.compile_blocks(backend=counting_backend(graphs))
    compiled, _ = run(model)
    assert not calls and len(graphs) == 2  # the LLM blocks ran the compiled graph (and the ViT's)
    assert (compiled - logits)[real].abs().max() <= 1e-5
    model.compile_blocks(False)
    # a scale other than 1/sqrt(D) (Qwen2 never asks for one): passed on, or folded into q where it cannot be
    q, k, v = torch.randn(9, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    want = runs_reference(q, k, v, cu, 0.3, True)
    for kernel in (old_style, mid_style):
        monkeypatch.setattr(ops, "_TORCH_VARLEN", (kernel, frozenset(inspect.signature(kernel).parameters)))
        assert (ops._torch_varlen_causal(q, k, v, cu, 8, 0.3) - want).abs().max() <= 1e-5, kernel.__name__


def test_vision_warmup_trains_only_the_vision_tower():
    from ivl3lab.train.vision_warmup import warm_up_vision

    model = fresh()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    log = warm_up_vision(model, steps=3, batch_size=4, log_every=3)
    assert log[-1]["step"] == 3 and 0 <= log[-1]["vision_acc_shape"] <= 1
    assert 0 <= log[-1]["vision_acc_tile"] <= 1 and 0 <= log[-1]["vision_acc_x"] <= 1  # the where-targets
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("vision.") for n in changed)


def test_concept_data_and_evaluator(tiny):
    from ivl3lab.train.concept import ConceptData, concept_items, make_concept_evaluator
    from ivl3lab.train.toyworld import COLOURS

    model, processor = tiny
    assert "pink" not in COLOURS  # never drawn during pre-training
    items = concept_items(processor, "pink", n=4)
    assert len(items) == 4 and all(kind in ("new_colour", "new_shape") for kind, _ in items)
    for _, example in items:
        answer = processor.tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label != -100])
        question = processor.tokenizer.decode(example.input_ids)
        assert "pink" in answer or "pink object" in question
    batch = ConceptData(processor, "pink", batch_size=2).batches(0, 0)
    assert batch.input_ids.shape[0] == 2
    scores = make_concept_evaluator(processor, "pink", n_new=4, per_type=1)(model)
    assert {"acc_new", "acc_original", "acc_colour"} <= set(scores)


def test_dense_vision_labels_match_the_drawn_objects():
    from ivl3lab.train.toyworld import COLOURS, SHAPES, label_map, make_scene
    from ivl3lab.train.vision_warmup import patch_labels

    s = next(make_scene(seed) for seed in range(100) if make_scene(seed).grid == (3, 1)
             and len(make_scene(seed).objects) >= 2)
    labels = label_map(s)
    for k, obj in enumerate(s.objects, start=1):
        assert labels.getpixel((int(obj.cx), int(obj.cy))) == k  # every object's centre carries its id
    x, shapes, colours = patch_labels(s, 112, 14)
    assert x.shape == (4, 3, 112, 112) and shapes.shape == colours.shape == (4, 64)  # 3 tiles + thumbnail
    for obj in s.objects:  # the patch under the centre, in the object's own tile
        col, row = int(obj.cx % 112) // 14, int(obj.cy % 112) // 14
        assert shapes[obj.tile - 1, row * 8 + col] == SHAPES.index(obj.shape) + 1
        assert colours[obj.tile - 1, row * 8 + col] == list(COLOURS).index(obj.colour) + 1
    in_thumbnail = set(shapes[3].unique().tolist()) - {0}
    assert in_thumbnail <= {SHAPES.index(o.shape) + 1 for o in s.objects} and in_thumbnail


def test_tiles_carry_their_number_and_the_light_falls_from_the_left():
    """What lets a ViT that sees one tile at a time say where a tile is: its number printed in the top-left
    corner (kept clear of objects) and a background that darkens from left to right over the whole image."""
    from ivl3lab.train.toyworld import LABEL_BOX, TILE_NUMBER_INK

    numbered = single = 0
    for i in range(40):
        s = scene("test", i)
        cols, rows = s.grid
        pixels = np.asarray(s.image)
        for k in range(cols * rows):
            x0, y0, box = (k % cols) * 112, (k // cols) * 112, int(LABEL_BOX * 112)
            corner = pixels[y0:y0 + box, x0:x0 + box]
            ink = (corner == TILE_NUMBER_INK).all(-1).sum()
            assert (ink > 10) == (cols * rows > 1), (i, k, ink)
            numbered += cols * rows > 1
            single += cols * rows == 1
        for o in s.objects:  # objects keep out of the number's box
            tx, ty = (o.tile - 1) % cols * 112, (o.tile - 1) // cols * 112
            assert o.cx - o.size - tx > LABEL_BOX * 112 or o.cy - o.size - ty > LABEL_BOX * 112
        mask = np.asarray(label_map(s)) == 0  # background pixels
        grey = pixels[..., 0].astype(float)
        left = grey[:, :s.image.width // 4][mask[:, :s.image.width // 4]].mean()
        right = grey[:, -s.image.width // 4:][mask[:, -s.image.width // 4:]].mean()
        assert left > right + 40, (i, left, right)
    assert numbered and single
    # the same digits, so the same pixels, wherever the tile is: the seven-segment "1" differs from the "2"
    s = next(scene("test", i) for i in range(40) if scene("test", i).grid == (2, 1))
    pixels = np.asarray(s.image)
    ones, twos = [(pixels[y:y + 14, x:x + 14] == TILE_NUMBER_INK).all(-1) for x, y in ((0, 0), (112, 0))]
    assert ones.sum() and twos.sum() and not np.array_equal(ones, twos)


def test_where_labels_number_the_tiles_and_bin_x_over_the_whole_image():
    from ivl3lab.train.vision_warmup import X_BINS, where_labels

    s = next(scene("train", i) for i in range(40) if scene("train", i).grid == (3, 2))
    numbers, xs = where_labels(s, 8)
    assert numbers.shape == xs.shape == (7, 64)  # 6 tiles + thumbnail
    assert numbers[:6, 0].tolist() == list(range(6)) and (numbers[6] == -100).all()
    assert (numbers[:6] == numbers[:6, :1]).all()  # every patch of a tile carries its number
    row = xs[:, :8]  # the first row of patches of every tile
    assert row[0].tolist() == sorted(row[0].tolist()) and row[1, 0] >= row[0, -1]  # left to right
    assert row[0, 0] == 0 and row[2, -1] == X_BINS - 1 and row[3].tolist() == row[0].tolist()  # tile 4 under 1
    assert row[6].tolist() == [int((c + 0.5) / 8 * X_BINS) for c in range(8)]  # the thumbnail spans the width
    single = next(s for s in (scene("train", i) for i in range(40)) if s.grid == (1, 1))
    numbers, xs = where_labels(single, 8)
    assert numbers.shape == (1, 64) and (numbers == -100).all() and xs[0, :8].tolist() == list(range(8))


def test_count_labels_say_how_many_objects_each_tile_shows():
    from ivl3lab.train.vision_warmup import count_labels

    s = next(s for s in (scene("train", i) for i in range(200)) if s.grid == (3, 2) and len(s.objects) >= 2)
    counts = count_labels(s, 8).view(7, 8, 8)  # 6 tiles + thumbnail, 8 x 8 patches
    corner = counts[:, :2, :2]  # the patches of each tile's first LLM token (2 x 2 pixel-unshuffle)
    assert (corner == corner[:, :1, :1]).all() and (counts[:, 2:] == -100).all() and (counts[:, :, 2:] == -100).all()
    assert corner[:6, 0, 0].tolist() == [sum(o.tile == k for o in s.objects) for k in range(1, 7)]
    assert corner[6, 0, 0] == len(s.objects) == corner[:6, 0, 0].sum()  # the thumbnail shows them all
    from ivl3lab.model.projector import pixel_unshuffle  # the model's own grouping: labelled = its first token

    tokens = pixel_unshuffle(count_labels(s, 8)[..., None].float())  # [7, 16, 4]: 2x2 groups per LLM token
    assert (tokens[:, 0] == corner[:, :1, :1].reshape(7, 1)).all() and (tokens[:, 1:] == -100).all()
    single = next(s for s in (scene("train", i) for i in range(40)) if s.grid == (1, 1))
    assert count_labels(single, 8)[0, [0, 1, 8, 9]].tolist() == [len(single.objects)] * 4


def test_vision_warmup_count_head_is_optional_and_off_changes_nothing():
    """Off by default (the shipped checkpoint's command does not ask for it): the default equals an explicit 0;
    on, it trains the ViT differently and logs its accuracy."""
    from ivl3lab.train.vision_warmup import warm_up_vision

    a, b, c = fresh(), fresh(), fresh()
    warm_up_vision(a, steps=2, batch_size=4, log_every=2)
    warm_up_vision(b, steps=2, batch_size=4, log_every=2, count_weight=0.0)
    log = warm_up_vision(c, steps=2, batch_size=4, log_every=2, count_weight=1.0)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    assert 0 <= log[-1]["vision_acc_count"] <= 1


def test_vision_warmup_learning_rate_schedule(monkeypatch):
    """Constant by default; with warmup_steps / min_lr_ratio, each step's rate is lr * warmup_cosine(step)."""
    from ivl3lab.train import vision_warmup
    from ivl3lab.train.loop import warmup_cosine

    rates = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    vision_warmup.warm_up_vision(fresh(), steps=4, batch_size=2, lr=2e-3, log_every=4)
    assert rates == [2e-3] * 4
    rates.clear()
    vision_warmup.warm_up_vision(fresh(), steps=5, batch_size=2, lr=2e-3, log_every=5, warmup_steps=2,
                                 min_lr_ratio=0.1)
    assert rates == pytest.approx([2e-3 * warmup_cosine(i, 5, 2, 0.1) for i in range(5)])
    assert rates[:3] == pytest.approx([1e-3, 2e-3, 2e-3]) and rates[2] > rates[3] > rates[4] > 2e-4


def test_scene_layout_does_not_depend_on_the_tile_size():
    small, large = scene("test", 3, tile_px=112), scene("test", 3, tile_px=448)
    assert small.grid == large.grid and small.qa == large.qa
    for a, b in zip(small.objects, large.objects):
        assert (a.shape, a.colour, a.tile) == (b.shape, b.colour, b.tile)
        assert b.cx == pytest.approx(4 * a.cx) and b.size == pytest.approx(4 * a.size)


def test_every_question_type_is_asked_first_somewhere():
    """Evaluation asks one question right after the image: training must put every type there too."""
    first = {scene("train", i).qa[0][0] for i in range(200)}
    assert first == set(QUESTION_TYPES)


def test_multi_image_examples_and_v2pe_positions(tiny):
    """Several images in one conversation use the official "Image-k: <image>" prompt; V2PE with delta = 1 is
    the ordinary model, and a smaller delta compresses only the image tokens' positions."""
    from ivl3lab.train.v2pe_toy import MultiImageData, multi_image_example, with_positions

    model, processor = tiny
    example = multi_image_example(processor, "test", 3, num_images=3)
    text = processor.tokenizer.decode(example.input_ids)
    assert all(f"Image-{k}: <img>" in text for k in (1, 2, 3)) and "How many objects are in image" in text
    tiles = [processor.load_image(scene("test", 3_000_000 + 3 * 32 + k).image)[1].num_tiles for k in range(3)]
    assert example.num_tiles == sum(tiles)
    batch = D.collate([example], processor.pad_token_id)
    with torch.no_grad():
        plain = model(**batch.model_inputs()).logits
        v2pe = model(**with_positions(batch, processor.image_token_id, 1.0).model_inputs()).logits
    assert torch.allclose(plain, v2pe, atol=1e-5)
    squeezed = with_positions(D.collate([example], processor.pad_token_id), processor.image_token_id, 1 / 16)
    assert squeezed.position_ids[0, -1] < batch.position_ids[0, -1] - sum(tiles) * 16 * 0.9
    train = MultiImageData(processor, "random", batch_size=2).batches(0, 0)
    assert train.position_ids.dtype == torch.float32 and train.position_ids.shape == train.input_ids.shape


def test_training_starts_from_clean_gradients(tiny):
    """Gradients left on the parameters by earlier work (e.g. the vision warm-up) must not join step 1."""
    _, processor = tiny

    def first_update(dirty):
        model = fresh()
        if dirty:
            for p in model.parameters():
                p.grad = torch.ones_like(p)
        Trainer(model, TrainConfig(steps=1, warmup_steps=1), small_data(processor).batches).fit(progress=False)
        return torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.equal(first_update(False), first_update(True))


def test_object_list_puts_colour_after_shape_and_tile_after_colour():
    """The order is the point: the shape word must predict the colour (finding an object by its shape)."""
    from ivl3lab.train.toyworld import object_list

    assert object_list(scene("train", 0)) == "The objects: cross yellow 2, triangle blue 5."
    for i in range(30):
        s = scene("train", i)
        items = object_list(s).removeprefix("The objects: ").rstrip(".").split(", ")
        named = [next(o for o in s.objects if o.shape == item.split()[0]) for item in items]
        assert len(named) == len(s.objects) and all(a.cx < b.cx for a, b in zip(named, named[1:]))  # left to right
        assert all(item.split()[1:] == [o.colour, str(o.tile)] for item, o in zip(items, named))


def test_toy_conversations_carry_the_object_list_unless_turned_off(tiny):
    from ivl3lab.train.toyworld import object_list

    _, processor = tiny
    for listing in (True, False):
        data = small_data(processor, listing=listing, text_ratio=0.0)
        for index in range(4):
            example = data.example(index)
            supervised = processor.tokenizer.decode([t for t, label in zip(example.input_ids, example.labels)
                                                     if label != D.IGNORE])
            s = scene("train", index, max_objects=2)
            assert (object_list(s) in supervised) == listing
            assert s.caption in supervised


def test_name_shape_changes_only_the_colour_answers_in_training_and_evaluation(tiny):
    """"What color is the star?" -> "star red": the scene, the other answers and the random draws stay the same."""
    from ivl3lab.train.toyworld import SHAPES

    _, processor = tiny
    for i in range(20):
        plain, named = scene("train", i), scene("train", i, name_shape=True)
        assert plain.image.tobytes() == named.image.tobytes() and plain.caption == named.caption
        for (kind, q, a), (kind2, q2, a2) in zip(plain.qa, named.qa):
            shape = q.removeprefix("What color is the ").rstrip("?")
            assert (kind, q) == (kind2, q2) and a2 == (f"{shape} {a}" if kind == "colour" else a)
    example = small_data(processor, name_shape=True, text_ratio=0.0).example(0)
    supervised = processor.tokenizer.decode([t for t, label in zip(example.input_ids, example.labels)
                                             if label != D.IGNORE])
    colour_qa = next(qa for qa in scene("train", 0, max_objects=2, name_shape=True).qa if qa[0] == "colour")
    assert f"{colour_qa[2]}<|im_end|>" in supervised and len(colour_qa[2].split()) == 2
    items = dict(eval_items(processor, per_type=1, question_types=("colour",), name_shape=True))
    answer = processor.tokenizer.decode([t for t, label in zip(items["colour"].input_ids, items["colour"].labels)
                                         if label != D.IGNORE])
    assert answer.removesuffix("<|im_end|>").split()[0] in SHAPES


def test_every_colour_asks_about_each_object_once(tiny):
    from ivl3lab.train.toyworld import colour_question

    _, processor = tiny
    for name_shape in (False, True):
        data = small_data(processor, every_colour=True, name_shape=name_shape, text_ratio=0.0)
        plain = small_data(processor, name_shape=name_shape, text_ratio=0.0)
        for index in range(6):
            text = processor.tokenizer.decode(data.example(index).input_ids)
            s = scene("train", index, max_objects=2)
            for o in s.objects:
                question, answer = colour_question(o, name_shape)
                assert text.count(question) == 1 and f"{question}<|im_end|>\n<|im_start|>assistant\n{answer}<" in text
            asked = sum(processor.tokenizer.decode(plain.example(index).input_ids).count(colour_question(o)[0])
                        for o in s.objects)
            assert asked == 1  # without the option: one colour question per scene


def test_pretrain_cli_passes_the_gpu_speed_options_to_the_model_and_trainer(tmp_path, monkeypatch):
    """--attn, --compile and --loss-chunk reach the model and the Trainer (what the GPU benchmarks time)."""
    from ivl3lab.train import pretrain

    seen = {}

    class Stop(Exception):
        pass

    def recording_trainer(model, cfg, batches, **kwargs):
        seen.update(backend=model.language.layers[0].self_attn.backend, compile=cfg.compile, chunk=cfg.loss_chunk)
        raise Stop

    monkeypatch.setattr(pretrain, "Trainer", recording_trainer)
    args = ["--out", str(tmp_path), "--device", "cpu", "--vision-warmup-steps", "0", "--eval-every", "0"]
    for extra, expected in (([], ("sdpa", False, 0)),
                            (["--attn", "flash", "--compile", "graphs", "--loss-chunk", "1024"], ("flash", "graphs", 1024))):
        with pytest.raises(Stop):
            pretrain.main([*args, *extra])
        assert (seen["backend"], seen["compile"], seen["chunk"]) == expected
    with pytest.raises(SystemExit):
        pretrain.parse_args([*args, "--compile", "fast"])


def test_pretrain_freezes_the_warmed_up_vit_and_resumes_only_with_the_same_settings(tmp_path, monkeypatch):
    """After the warm-up the multimodal stage trains the projector and the LLM only (--freeze-vision, the
    default); --no-freeze-vision trains all three. A resumed run keeps its ViT frozen, and a resume that asks
    for other settings (or an old run without recorded settings) stops with a message that names the flags."""
    from ivl3lab.train import pretrain

    warmed = {}
    real_warm_up = pretrain.warm_up_vision

    def recording_warm_up(model, **kwargs):
        log = real_warm_up(model, **kwargs)
        warmed[len(warmed)] = {k: v.clone() for k, v in model.vision.state_dict().items()}
        return log

    def vision_unchanged(run, out):
        after, _ = ivl3lab.load_pretrained(out / "model")
        return all(torch.equal(v, after.vision.state_dict()[k]) for k, v in warmed[run].items())

    monkeypatch.setattr(pretrain, "warm_up_vision", recording_warm_up)
    args = ["--batch-size", "2", "--warmup", "1", "--eval-every", "0", "--ckpt-every", "1", "--no-progress",
            "--max-objects", "2", "--vision-warmup-steps", "1", "--device", "cpu"]
    frozen, trained = tmp_path / "frozen", tmp_path / "trained"
    pretrain.main(["--out", str(frozen), "--steps", "2", *args])
    pretrain.main(["--out", str(trained), "--steps", "2", *args, "--no-freeze-vision"])
    assert vision_unchanged(0, frozen) and not vision_unchanged(1, trained)
    history = pretrain.main(["--out", str(frozen), "--steps", "3", *args])  # resumes at step 2
    assert [r["step"] for r in history] == [3] and vision_unchanged(0, frozen)
    with pytest.raises(SystemExit, match="--no-freeze-vision"):
        pretrain.main(["--out", str(trained), "--steps", "3", *args])
    with pytest.raises(SystemExit, match="`--vision-warmup-steps 1 --listing`"):
        pretrain.main(["--out", str(frozen), "--steps", "4", *args, "--no-listing"])
    (trained / pretrain.SETTINGS).unlink()  # as if made before the settings were recorded
    with pytest.raises(SystemExit, match="--no-freeze-vision --no-listing"):
        pretrain.main(["--out", str(trained), "--steps", "3", *args, "--no-freeze-vision"])
