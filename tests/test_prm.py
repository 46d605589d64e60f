"""Process reward scoring: step splitting, one-pass step scores P("+"), response score, Best-of-N choice."""
import torch

import ivl3lab
from ivl3lab.train.data import chat_example
from ivl3lab.train.prm import PRM_SYSTEM, best_of_n, prm_turns, response_score, split_steps, step_scores


def test_split_steps_and_merge_beyond_max():
    assert split_steps("a\n\nb\n\n\n\nc\n") == ["a", "b", "c"]
    twenty = "\n\n".join(f"s{i}" for i in range(20))
    merged = split_steps(twenty, max_steps=16)  # ceil(20 / 16) = 2 steps per group
    assert len(merged) == 10 and merged[0] == "s0\n\ns1"


@torch.no_grad()
def test_step_scores_in_one_pass_match_a_manual_softmax():
    model, processor = ivl3lab.build("tiny", seed=0)
    response = "There is a red circle.\n\nIt is in tile 1.\n\nFinal answer: one"
    scores = step_scores(model, processor, "How many objects?", response, image=ivl3lab.SAMPLE_IMAGE)
    assert scores.shape == (3,) and bool(((scores > 0) & (scores < 1)).all())
    example = chat_example(processor, prm_turns("How many objects?", split_steps(response)), image=ivl3lab.SAMPLE_IMAGE,
                           system_message=PRM_SYSTEM)
    logits = model(torch.tensor([example.input_ids]), example.pixel_values).logits[0]
    plus, minus = processor.tokenizer.convert_tokens_to_ids("+"), processor.tokenizer.convert_tokens_to_ids("-")
    positions = [i - 1 for i, t in enumerate(example.input_ids) if t == plus and example.labels[i] == plus]
    manual = logits[positions][:, [plus, minus]].softmax(-1)[:, 0]
    assert torch.allclose(scores, manual, atol=1e-6)
    assert abs(response_score(scores) - float(manual.mean())) < 1e-6


def test_best_of_n_takes_the_first_of_ties():
    assert best_of_n([0.2, 0.9, 0.9, 0.1]) == 1
    assert best_of_n([0.5]) == 0
