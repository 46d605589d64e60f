"""The shipped toy checkpoint loads and still scores what docs/toy_results.md reports, on a fresh held-out set."""
import json

import pytest
import torch

import ivl3lab
from ivl3lab.train.toy import eval_items_from, exact_match

RESULTS = ivl3lab.TOY_MODEL / "results.json"


@pytest.mark.skipif(not RESULTS.exists(), reason="no toy checkpoint shipped yet")
def test_shipped_toy_model_scores_as_documented():
    shipped = json.loads(RESULTS.read_text())
    model, processor = ivl3lab.load_toy()
    assert model.config.vision.image_size == ivl3lab.get_preset("tiny").vision.image_size
    items = eval_items_from(processor, "test", 400_000, per_type=60, tile_px=model.config.vision.image_size)
    with torch.no_grad():
        scores = exact_match(model, items, processor.pad_token_id)
    for kind, documented in shipped["accuracy"].items():
        # 60 fresh questions per type: allow ~2.5 standard errors of sampling noise, never a collapse
        assert scores[kind] >= documented - 0.16, (kind, scores[kind], documented)
    assert scores["acc_count"] >= 0.9


SFT_RESULTS = ivl3lab.TOY_SFT_MODEL / "results.json"


@pytest.mark.skipif(not SFT_RESULTS.exists(), reason="no SFT'd toy checkpoint shipped yet")
def test_shipped_sft_toy_model_answers_step_by_step_as_documented():
    from ivl3lab.train.prm import split_steps
    from ivl3lab.train.reasoning import accuracy, final_answer, reasoning_items, sample_responses

    shipped = json.loads(SFT_RESULTS.read_text())
    model, processor = ivl3lab.load_toy(variant="sft")
    items = reasoning_items("test", 60, start=400_000, tile_px=model.config.vision.image_size)
    responses = sample_responses(model, processor, items[:8], 1, temperature=0.0)
    for (response,) in responses:  # the format: object steps, blank lines, a final answer line
        assert len(split_steps(response)) >= 2 and final_answer(response) is not None, response
    # 60 fresh questions: ~2.5 standard errors of sampling noise below the documented accuracy
    assert accuracy(model, processor, items) >= shipped["reasoning_accuracy"] - 0.16
