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
