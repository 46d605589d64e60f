"""MPO: closed-form terms, DPO as a special case, delta's update rule and checkpointing, accumulation."""
import copy

import pytest
import torch
import torch.nn.functional as F

import ivl3lab
from ivl3lab.train.loop import Trainer, TrainConfig
from ivl3lab.train.mpo import (MPOConfig, MPOObjective, RunningMean, mpo_terms, preference_batch,
                               reference_from_model, sequence_logps)

PC, PR = torch.tensor([-5.0, -9.0]), torch.tensor([-7.0, -8.0])  # policy log p(chosen), log p(rejected)
RC, RR = torch.tensor([-6.0, -8.5]), torch.tensor([-6.5, -8.0])  # reference
LENS = torch.tensor([4, 6])


def sig(x):
    return 1 / (1 + torch.exp(-x))


def test_each_term_matches_its_formula():
    cfg = MPOConfig(beta=0.5)
    t = mpo_terms(PC, PR, RC, RR, LENS, delta=0.2, cfg=cfg)
    rc, rr = 0.5 * (PC - RC), 0.5 * (PR - RR)
    assert torch.allclose(t["loss_pref"], -torch.log(sig(rc - rr)))
    assert torch.allclose(t["loss_quality"], -torch.log(sig(rc - 0.2)) - torch.log(sig(-(rr - 0.2))))
    assert torch.allclose(t["loss_gen"], -PC / LENS)
    assert torch.allclose(t["loss"], 0.8 * t["loss_pref"] + 0.2 * t["loss_quality"] + 1.0 * t["loss_gen"])
    assert t["accuracy"].tolist() == [1.0, 0.0]
    token = mpo_terms(PC, PR, RC, RR, LENS, 0.2, MPOConfig(beta=0.5, gen_norm="token"))["loss_gen"]
    assert torch.allclose(token, torch.full((2,), 14.0 / 10))


def test_without_the_quality_and_generation_terms_it_is_dpo():
    t = mpo_terms(PC, PR, RC, RR, LENS, delta=3.0, cfg=MPOConfig(w_pref=1.0, w_quality=0.0, w_gen=0.0))
    dpo = -F.logsigmoid(0.1 * ((PC - RC) - (PR - RR)))
    assert torch.allclose(t["loss"], dpo)


def test_delta_is_a_count_weighted_running_mean():
    mean = RunningMean()
    mean.update(torch.tensor([1.0, 3.0]))
    assert mean.mean == pytest.approx(2.0)
    mean.update(torch.tensor([6.0, 6.0, 6.0, 6.0]))
    assert mean.mean == pytest.approx((1 + 3 + 24) / 6)
    restored = RunningMean()
    restored.load_state_dict(mean.state_dict())
    assert restored.update(torch.tensor([0.0])) == pytest.approx(mean.update(torch.tensor([0.0])))


@pytest.fixture(scope="module")
def setup():
    model, processor = ivl3lab.build("tiny", seed=0, system_message="Answer.")
    items = [("What color is the circle?", ivl3lab.SAMPLE_IMAGE, "red", "blue"),
             ("How many objects are there?", None, "five", "two"),
             ("What shape is the blue object?", ivl3lab.SAMPLE_IMAGE, "square", "circle"),
             ("2 + 3 =", None, "5", "6")]
    return model, processor, items


def run(setup, accum, steps=2, out_dir=None, resume=False):
    model, processor, items = setup
    policy, ref = copy.deepcopy(model).train(), copy.deepcopy(model).eval()
    objective = MPOObjective(MPOConfig(), reference=reference_from_model(ref))
    per_micro = len(items) // accum

    def batches(step, micro, rank, world):
        return preference_batch(processor, items[micro * per_micro:(micro + 1) * per_micro])
    trainer = Trainer(policy, TrainConfig(steps=steps, grad_accum=accum, lr=1e-2, warmup_steps=1, clip_grad=1e9),
                      batches, out_dir=out_dir, loss_fn=objective, weights_fn=objective.weights,
                      on_step_end=objective.on_step_end, stateful={"mpo": objective})
    if resume:
        trainer.resume()
    trainer.fit(progress=False)
    return trainer, objective, policy


def test_shared_forward_scores_chosen_and_rejected(setup):
    model, processor, items = setup
    batch = preference_batch(processor, items[:2])
    logps, lengths = sequence_logps(model(**batch.model_inputs()).logits, batch.labels)
    alone = preference_batch(processor, items[:1])
    logps1, _ = sequence_logps(model(**alone.model_inputs()).logits, alone.labels)
    assert torch.allclose(logps[[0, 2]], logps1, atol=1e-4)
    n = lambda text: len(processor.tokenizer(text, add_special_tokens=False)["input_ids"]) + 1  # noqa: E731  + <|im_end|>
    assert lengths.tolist() == [n("red"), n("five"), n("blue"), n("two")]


def test_accumulation_gives_the_same_update_and_delta(setup):
    (t1, o1, p1), (t2, o2, p2) = run(setup, accum=1), run(setup, accum=2)
    assert [h["loss"] for h in t1.history] == pytest.approx([h["loss"] for h in t2.history], abs=1e-5)
    assert o1.delta.mean == pytest.approx(o2.delta.mean, abs=1e-6) and o1.delta.count == o2.delta.count == 16
    diff = max((a - b).abs().max().item() for a, b in zip(p1.parameters(), p2.parameters()))
    assert diff < 1e-4
    for key in ("loss_pref", "loss_quality", "loss_gen", "reward_chosen", "reward_rejected", "margin", "accuracy", "delta"):
        assert key in t1.history[-1]


def test_delta_updates_once_per_step_and_survives_resume(setup, tmp_path):
    straight, objective, _ = run(setup, accum=2, steps=3)
    assert objective.delta.count == pytest.approx(3 * 8)  # 8 rewards per step, whatever the micro-batches
    first, first_obj, _ = run(setup, accum=2, steps=2, out_dir=tmp_path)
    resumed, resumed_obj, _ = run(setup, accum=2, steps=3, out_dir=tmp_path, resume=True)
    assert resumed_obj.delta.mean == pytest.approx(objective.delta.mean, abs=1e-6)
    losses = [h["loss"] for h in first.history + resumed.history]
    assert losses == pytest.approx([h["loss"] for h in straight.history], abs=1e-5)


def test_delta_is_frozen_outside_training_steps(setup):
    model, processor, items = setup
    objective = MPOObjective(MPOConfig(), reference=reference_from_model(model))
    batch = preference_batch(processor, items[:2])
    with torch.no_grad():
        objective(model, batch, objective.weights(batch))  # an evaluation pass
    objective.pending.clear()  # what an evaluation loop does: no on_step_end, nothing folded in
    assert objective.delta.count < 1e-12 and objective.delta.mean == 0.0


def test_reference_from_disabled_adapters_equals_the_base_model(setup):
    from ivl3lab.train.lora import apply_lora
    from ivl3lab.train.mpo import precompute_reference, reference_from_adapters

    model, processor, items = setup
    base = copy.deepcopy(model)
    peft_model = apply_lora(copy.deepcopy(model), "language", r=4, init_lora_weights=False)  # non-zero adapter
    batch = preference_batch(processor, items[:2])
    with torch.no_grad():
        from_adapters = reference_from_adapters(peft_model)(batch)
        from_copy = reference_from_model(base)(batch)
        with_adapters = sequence_logps(peft_model(**batch.model_inputs()).logits, batch.labels)[0]
    assert torch.allclose(from_adapters, from_copy, atol=1e-5)
    assert not torch.allclose(with_adapters, from_copy, atol=1e-3)
    stored = precompute_reference(base, preference_batch(processor, items[:2]))
    assert torch.allclose(stored.ref_logps, from_copy)
    objective = MPOObjective(MPOConfig())  # no reference callable: uses batch.ref_logps
    total, weight, metrics = objective(base, stored, objective.weights(stored))
    assert weight == 2 and abs(metrics["reward_chosen"]) < 1e-6  # policy == reference -> zero rewards
