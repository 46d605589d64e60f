"""scripts/toy_diagnostics.py: its token-to-object map lines up with the model's image tokens, it names the
object a question asks about, and a head built to find that object is reported as one."""
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

import ivl3lab
from ivl3lab.train.data import chat_example, collate
from ivl3lab.train.toyworld import scene

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "toy_diagnostics.py"


@pytest.fixture(scope="module")
def diag():
    spec = importlib.util.spec_from_file_location("toy_diagnostics", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def toy():
    model, processor = ivl3lab.load_toy()
    return model.float().eval(), processor


def multi_object_scenes(n):
    found, index = [], 0
    while len(found) < n:
        s = scene("val", 900_000 + index)
        index += 1
        if len(s.objects) >= 2 and s.grid != (1, 1):
            found.append(s)
    return found


def test_token_objects_match_the_image_tokens_and_cover_every_object(diag, toy):
    model, processor = toy
    for s in multi_object_scenes(3):
        objects = diag.token_objects(s, 112, model.config.max_dynamic_patch, model.config.vision.patch_size)
        ids = collate([chat_example(processor, [("How many objects are there?", "two")], image=s.image)],
                      processor.pad_token_id).input_ids[0]
        assert len(objects) == int((ids == model.config.image_token_id).sum())
        assert set(objects.tolist()) == set(range(len(s.objects) + 1))  # background and every object
        per_tile = processor.num_image_token
        grid_tokens = objects[:-per_tile]  # the thumbnail shrinks objects: a small one may cover no token centre
        for k, obj in enumerate(s.objects, start=1):  # grid tiles row-major: an object's tokens lie in its tile
            assert set((np.flatnonzero(grid_tokens == k) // per_tile + 1).tolist()) == {obj.tile}


def test_target_object_is_the_one_the_question_names(diag):
    for s in multi_object_scenes(5):
        for kind, question, _ in s.qa:
            if kind == "count":
                continue
            target = s.objects[diag.target_object(s, kind, question) - 1]
            if kind == "colour":
                assert question.endswith(f"the {target.shape}?")
            else:  # named by colour; for left/right the first object named
                assert f"the {target.colour} " in question
                first = min((question.index(f" {o.colour} "), o) for o in s.objects if f" {o.colour} " in question)
                assert first[1] == target


def test_a_head_that_finds_the_named_object_is_reported(diag, toy, monkeypatch):
    """Rewrite one head's pattern so the last question token attends only to the target's tokens: the report
    must list exactly that (token, layer, head) with target mass 1 and other mass 0."""
    model, processor = toy
    scenes = multi_object_scenes(2)
    real, calls = diag.run_with_cache, []

    def fake(model_, *args, pattern_queries=None, **kwargs):
        out, cache = real(model_, *args, pattern_queries=pattern_queries, **kwargs)
        s = scenes[len(calls)]  # one colour question per scene, visited in order
        calls.append(kwargs["input_ids"][0, pattern_queries[-1]])
        question = next(q for k, q, _ in s.qa if k == "colour")
        objects = torch.as_tensor(diag.token_objects(s, 112, model.config.max_dynamic_patch,
                                                     model.config.vision.patch_size))
        image_pos = (kwargs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
        pattern = cache["language.layers.2.self_attn.hook_pattern"]  # [1, H, Q, image tokens]
        assert pattern.shape[-1] == len(image_pos)
        pattern[0, 3, -1] = 0.0
        on_target = objects == diag.target_object(s, "colour", question)
        pattern[0, 3, -1, on_target] = 1.0 / int(on_target.sum())
        return out, cache

    monkeypatch.setattr(diag, "run_with_cache", fake)
    sums = diag.selective_attention(model, processor, scenes, kinds=("colour",))
    assert len(calls) == len(scenes)
    last_token = diag.token_label(processor.tokenizer, int(calls[0]))
    hits = [key for key, (target, other, n) in sums.items() if target / n > 0.99 and other == 0]
    assert hits == [("colour", -1, last_token, 2, 3)], hits
    report = diag.selective_heads(sums)["colour"]  # the report lists the planted head, and only rows that pass
    assert f"'{last_token}'(-1) L2H3 1.00/0.00" in report
    passing = {k for k, (t, o, n) in sums.items() if t / n >= 0.15 and t >= 3 * o}
    assert len(report) == len(passing) and len(passing) < len(sums)


def test_accuracy_by_objects_splits_exact_match_by_object_count(diag, toy):
    from ivl3lab.train.toy import exact_match

    model, processor = toy
    scenes = [scene("val", 910_000 + i) for i in range(12)]
    split = diag.accuracy_by_objects(model, processor, scenes)
    assert {key.split(", ")[1] for key in split} <= {"1 object", "2+ objects"}
    counts = {}
    for s in scenes:
        for kind, _, _ in s.qa:
            key = f"acc_{kind}, {'1 object' if len(s.objects) == 1 else '2+ objects'}"
            counts[key] = counts.get(key, 0) + 1
    assert set(split) == set(counts)
    items = [(kind, chat_example(processor, [(q, a)], image=s.image)) for s in scenes for kind, q, a in s.qa]
    overall = exact_match(model, items, processor.pad_token_id)
    for kind in {k for k, _ in items}:  # the per-count accuracies recombine into the overall one
        parts = [(split[key], n) for key, n in counts.items() if key.startswith(f"acc_{kind},")]
        assert abs(sum(a * n for a, n in parts) / sum(n for _, n in parts) - overall[f"acc_{kind}"]) < 1e-9
