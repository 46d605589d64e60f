"""Self-generated preference data, the reasoning task, Monte-Carlo step labels, reward-model training and the
Best-of-N harness. Model behaviour is stubbed where the test is about the bookkeeping around it."""
import json
import random

import pytest
import torch

import ivl3lab
from ivl3lab.train import preference as pref
from ivl3lab.train import prm as prm_mod
from ivl3lab.train import reasoning as rsn
from ivl3lab.train.best_of_n import best_of_n_curve, choose_best, choose_majority
from ivl3lab.train.data import IGNORE
from ivl3lab.train.mpo import sequence_logps


@pytest.fixture(scope="module")
def tiny():
    return ivl3lab.build("tiny", seed=0)


@pytest.fixture(scope="module")
def items():
    return rsn.reasoning_items("val", 4)


# ------------------------------------------------------------------------------------------ reasoning task
def test_gold_responses_are_steps_with_a_final_answer(items):
    for item in items:
        steps = prm_mod.split_steps(item.response)
        assert len(steps) >= 3  # at least two objects (min_objects=2) + the answer line
        assert steps[-1] == f"Answer: {item.answer}" and rsn.final_answer(item.response) == item.answer
        assert item.question.endswith(rsn.REASON_SUFFIX)
        shape = item.question.split("the ")[1].split("?")[0]
        assert any(f"{item.answer} {shape}" in s for s in steps[:-1])  # the step that names the target object


def test_final_answer_parsing():
    assert rsn.final_answer("x\n\nAnswer: Red") == "red"
    assert rsn.final_answer("Answer: blue\n\nAnswer: green") == "green"  # the last one counts
    assert rsn.final_answer("no answer here") is None
    assert not rsn.is_correct("There is a red star.", "red")


def test_reasoning_items_are_deterministic_and_split_disjoint():
    a, b = rsn.reasoning_items("val", 3), rsn.reasoning_items("val", 3)
    assert [x.question for x in a] == [x.question for x in b] and [x.index for x in a] == [x.index for x in b]
    assert a[0].image.tobytes() == b[0].image.tobytes()
    test = rsn.reasoning_items("test", 3)
    assert all(x.image.tobytes() != t.image.tobytes() for x in a for t in test)  # other seeds, other scenes


@torch.no_grad()
def test_complete_batches_mixed_requests_like_one_at_a_time(tiny, items):
    """Requests with and without an image and with answer prefixes, left-padded together, give what each
    gives alone."""
    model, processor = tiny
    pixel_values = [processor.load_image(item.image)[0] for item in items[:3]]
    requests = [(items[0].question, pixel_values[0], ""), (items[1].question, None, "There is"),
                (items[2].question, pixel_values[2], "There is a")]
    cfg = dict(max_new_tokens=6)
    together = rsn.complete(model, processor, requests, cfg, batch_size=3)
    alone = [rsn.complete(model, processor, [r], cfg)[0] for r in requests]
    assert together == alone and len(set(alone)) > 1


@torch.no_grad()
def test_complete_continues_after_the_prefix_and_can_drop_the_image(tiny, items):
    model, processor = tiny
    item = items[0]
    pixel_values, _ = processor.load_image(item.image)
    prompt = processor.build_prompt(item.question) + "There is"  # text-only prompt with the prefix, by hand
    ids = processor.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    cfg = dict(max_new_tokens=6, eos_token_id=processor.im_end_id, pad_token_id=processor.pad_token_id)
    expected = processor.decode(ivl3lab.generation.generate(model, ids, generation_config=cfg)[0])
    assert rsn.complete(model, processor, [(item.question, None, "There is")], cfg) == [expected]
    with_image = rsn.complete(model, processor, [(item.question, pixel_values, "There is")], cfg)
    assert len(with_image) == 1  # runs with the image too (a different prompt, so no equality to assert)


# ------------------------------------------------------------------------------------------ preference data
def test_correctness_pairs_prefer_right_answers(monkeypatch, items):
    canned = [["a\n\nAnswer: " + items[0].answer, "b\n\nAnswer: wrong", "c\n\nAnswer: wrong"],
              ["Answer: " + items[1].answer] * 3,  # all right: nothing to prefer
              ["x\n\nAnswer: no", "y"] + ["Answer: " + items[2].answer]]
    monkeypatch.setattr(pref, "sample_responses", lambda model, proc, its, n, temperature, seed: canned)
    pairs, stats = pref.correctness_pairs(None, None, items[:3], n=3, max_pairs_per_item=5)
    assert stats["items_with_pairs"] == 2 and stats["pairs"] == len(pairs) == 2 + 2
    assert stats["sample_accuracy"] == pytest.approx(5 / 9)
    for item, chosen, rejected in pairs:
        assert rsn.is_correct(chosen, item.answer) and not rsn.is_correct(rejected, item.answer)


def test_dropout_ntp_rejects_the_blind_continuation(monkeypatch, tiny, items):
    model, processor = tiny
    seen = []

    def fake_complete(model, processor, requests, cfg=None, generator=None, batch_size=64):
        seen.append(requests)
        if requests[0][1] is not None:  # with the image: the full answers
            return ["a red star in tile one", "same answer here"]
        return ["blue circle", "answer here"]  # blind continuations (decode strips the leading space)
    monkeypatch.setattr(pref, "complete", fake_complete)
    pairs = pref.dropout_ntp_pairs(model, processor, [("Describe the image.", it.image) for it in items[:2]])
    assert all(request[1] is None for request in seen[1])  # the continuation never sees the image
    assert [r[2] for r in seen[1]] == ["a red star", "same"]  # truncated at half, before a space
    assert len(pairs) == 1  # "same" + " answer here" == the chosen answer: dropped
    assert pairs[0][2] == "a red star in tile one" and pairs[0][3] == "a red star blue circle"


def test_pairs_round_trip_through_jsonl(tmp_path, items):
    pairs = [(it.question, it.image, it.response, "Answer: nope") for it in items[:2]]
    pairs.append(("text only?", None, "yes", "no"))
    pref.save_pairs(tmp_path, pairs[:2], "correctness", answers=[it.answer for it in items[:2]])
    pref.save_pairs(tmp_path, pairs[2:], "dropout_ntp", append=True)
    loaded = pref.load_pairs(tmp_path)
    assert len(loaded) == 3 and loaded[0][0].answer == items[0].answer and loaded[2][0].source == "dropout_ntp"
    assert loaded[1][1].tobytes() == items[1].image.tobytes()  # PNG is lossless
    assert loaded[2][1] is None
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match="pairs.jsonl:1"):
        pref.load_pairs(tmp_path)


def test_preference_batches_are_deterministic_and_aligned(tiny, items):
    model, processor = tiny
    pairs = [(it.question, it.image, it.response, "Answer: no") for it in items]
    data = pref.PreferenceData(processor, pairs, batch_size=2, seed=3)
    assert pref.PreferenceData(processor, pairs, batch_size=2, seed=3).indices(5, 0) == data.indices(5, 0)
    seen = [i for step in range(2) for i in data.indices(step, 0)]
    assert sorted(seen) == [0, 1, 2, 3]  # one epoch covers every pair once
    batch = data.batches(1, 0)
    chosen = data.chosen_batches(1, 0)
    assert torch.equal(batch.input_ids[:2, :chosen.input_ids.shape[1]], chosen.input_ids)
    data.ref_logps = pref.precompute_reference_logps(model, data, batch_size=3)
    assert data.ref_logps.shape == (4, 2)
    batch = data.batches(1, 0)
    with torch.no_grad():  # the stored values are the model's log-probs of exactly this batch's rows
        direct = sequence_logps(model(**batch.model_inputs()).logits, batch.labels)[0]
    assert torch.allclose(batch.ref_logps, direct, atol=1e-4)
    with pytest.raises(ValueError, match="divide"):
        pref.PreferenceData(processor, pairs, batch_size=3, grad_accum=2).indices(0, 0)


def test_train_preference_logs_every_mpo_term_and_the_sft_baseline_runs(tiny, items):
    import copy
    model, processor = tiny
    pairs = [(it.question, it.image, it.response, "Answer: no") for it in items]
    for method in ("mpo", "sft"):
        m = copy.deepcopy(model)
        history = pref.train_preference(m, processor, pairs, method=method, steps=2, batch_size=2, progress=False)
        assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
        if method == "mpo":
            for key in ("loss_pref", "loss_quality", "loss_gen", "reward_chosen", "reward_rejected", "margin",
                        "accuracy", "delta"):
                assert key in history[-1]
            assert history[0]["reward_chosen"] == pytest.approx(0.0, abs=1e-5)  # starts at the reference
    with pytest.raises(ValueError, match="method"):
        pref.train_preference(model, processor, pairs, method="ppo", steps=1)


# ------------------------------------------------------------------------------------------ PRM
def test_monte_carlo_labels_follow_the_rollouts(monkeypatch, items):
    item = items[0]
    response = f"step one\n\nstep two\n\nAnswer: {item.answer}"
    wrong = "step one\n\nAnswer: nope"
    asked = []

    def fake_complete(policy, processor, requests, cfg=None, generator=None, batch_size=64):
        asked.extend(requests)
        # continuations reach the right answer only after "step two"
        return [f"Answer: {item.answer}" if prefix.endswith("step two\n\n") else "Answer: nope"
                for _, _, prefix in requests]
    monkeypatch.setattr(rsn, "complete", fake_complete)

    class Proc:
        @staticmethod
        def load_image(image):
            return torch.zeros(1, 3, 112, 112), None
    policy = torch.nn.Linear(1, 1)
    labels = prm_mod.monte_carlo_labels(policy, Proc(), [item], [[response, wrong]], rollouts=3)
    assert labels == [[[False, True, True], [False, False]]]
    assert len(asked) == 3 * (2 + 1)  # 2 rolled-out prefixes for the first response, 1 for the second


@torch.no_grad()
def test_batched_scores_equal_one_pass_scores(tiny, items):
    model, processor = tiny
    requests = [(it.question, it.image, it.response) for it in items[:3]]
    batched = prm_mod.score_responses(model, processor, requests, batch_size=2)
    for (q, image, response), scores in zip(requests, batched):
        single = prm_mod.step_scores(model, processor, q, response, image=image)
        assert torch.allclose(scores, single, atol=1e-5)
    whole = prm_mod.score_responses(model, processor, requests[:1], max_steps=1)[0]
    assert whole.shape == (1,)


def test_prm_examples_supervise_one_label_per_step(tiny, items):
    _, processor = tiny
    item = items[0]
    steps = prm_mod.split_steps(item.response)
    labels = [True] * (len(steps) - 1) + [False]
    example = prm_mod.prm_example(processor, item.question, steps, labels, item.image)
    plus, minus = (processor.tokenizer.convert_tokens_to_ids(t) for t in ("+", "-"))
    supervised = [t for t in example.labels if t != IGNORE and t in (plus, minus)]
    assert supervised == [plus] * (len(steps) - 1) + [minus]
    data = prm_mod.PRMData(processor, [(item.question, item.image, item.response, labels)], outcome=True)
    outcome = [t for t in data.example(0).labels if t in (plus, minus)]
    assert outcome == [minus]  # the ORM sees one step, labelled by the final answer
    with pytest.raises(ValueError, match="labels"):
        prm_mod.prm_example(processor, item.question, steps, labels[:1])


def test_reward_model_training_learns_the_labels(tiny, items):
    import copy
    model, processor = tiny
    model = copy.deepcopy(model)
    records = []
    for it in items:
        steps = prm_mod.split_steps(it.response)
        records.append((it.question, it.image, it.response, [True] * len(steps)))
        bad = "\n\n".join(steps[:-1] + ["Answer: wrong"])
        records.append((it.question, it.image, bad, [True] * (len(steps) - 1) + [False]))
    history = prm_mod.train_reward_model(model, processor, records, steps=40, batch_size=8, lr=3e-3,
                                         progress=False)
    assert history[-1]["loss"] < history[0]["loss"] / 3
    good, bad = prm_mod.score_responses(model, processor, [(r[0], r[1], r[2]) for r in records[:2]])
    assert good[-1] > 0.5 > bad[-1]


# ------------------------------------------------------------------------------------------ Best-of-N
def test_selectors():
    rng = random.Random(0)
    assert choose_best([0.1, 0.7, 0.7]) == 1
    assert choose_majority(["red", "blue", "red", None], rng) in (0, 2)
    assert choose_majority([None, None], rng) in (0, 1)
    assert {choose_majority(["a", "b"], random.Random(s)) for s in range(20)} == {0, 1}  # ties: random


def test_best_of_n_curve_against_hand_computed_values():
    correct = [[True, False, False, False], [False, False, False, False], [True, True, True, False]]
    answers = [["red", "blue", "blue", "green"], ["x", "y", "y", "z"], ["red", "red", "red", "blue"]]
    perfect = [[float(c) for c in row] for row in correct]
    inverse = [[1.0 - float(c) for c in row] for row in correct]
    curve = best_of_n_curve(correct, answers, {"perfect": perfect, "inverse": inverse}, ns=(1, 4), draws=200)
    mean_correct = sum(map(sum, correct)) / 12
    assert curve["random"][0] == pytest.approx(mean_correct, abs=0.03)  # N=1: an estimate over 200 draws
    assert curve["random"][1] == pytest.approx(mean_correct)  # a random pick does not scale
    assert curve["perfect"][1] == curve["oracle"][1] == pytest.approx(2 / 3)  # a perfect verifier = pass@N
    assert curve["inverse"][1] == 0.0
    assert curve["majority"][1] == pytest.approx(1 / 3)  # q0: "blue" wins (wrong), q2: "red" wins (right)
    assert curve["perfect"][0] == pytest.approx(mean_correct, abs=0.05)  # N=1: every selector is a random pick
    assert all(len(values) == 2 for values in curve.values())
    with pytest.raises(ValueError, match="N up to 8"):
        best_of_n_curve(correct, answers, {}, ns=(1, 8))


def test_exact_step_labels_check_each_step_against_the_scene(items):
    item = items[0]
    steps = prm_mod.split_steps(item.response)
    assert rsn.exact_step_labels(item, item.response) == [True] * len(steps)
    first = steps[0]
    wrong_tile = first.replace(first.split("tile ")[1], "9.")
    broken = "\n\n".join([wrong_tile, "I am not sure.", "Answer: nope"])
    assert rsn.exact_step_labels(item, broken) == [False, False, False]
