"""VisualPRM-style process reward scoring (spec §9): steps split at blank lines, one forward pass over a
conversation whose assistant turns are pre-filled with "+", step score = P("+") from a softmax over just "+"
and "-" at the position that predicts each assistant answer, response score = the mean of step scores.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

PRM_SYSTEM = ("You are a process supervision model for visual reasoning. For each step of a solution, answer "
              "'+' if the solution is correct so far and '-' if it contains an error.")


def split_steps(response: str, max_steps: int = 16) -> list[str]:
    """Steps are separated by blank lines; more than max_steps are merged into ceil(n / max_steps)-sized groups."""
    steps = [s.strip() for s in response.split("\n\n") if s.strip()]
    if len(steps) <= max_steps:
        return steps
    size = math.ceil(len(steps) / max_steps)
    return ["\n\n".join(steps[i:i + size]) for i in range(0, len(steps), size)]


def prm_turns(question: str, steps: Sequence[str]) -> list[tuple[str, str]]:
    """The (user, assistant) turns of one scoring conversation, every assistant answer pre-filled with "+"."""
    first = f"### Question:\n{question}\n\n### Solution Process:\n{steps[0]}"
    return [(first, "+")] + [(step, "+") for step in steps[1:]]


@torch.no_grad()
def step_scores(model, processor, question: str, response: str, image=None, max_steps: int = 16) -> torch.Tensor:
    """P("+") for every step of `response`, [n_steps], from ONE forward pass."""
    from .data import chat_example

    steps = split_steps(response, max_steps)
    if not steps:
        raise ValueError("the response has no steps to score")
    example = chat_example(processor, prm_turns(question, steps), image=image, system_message=PRM_SYSTEM)
    plus, minus = (processor.tokenizer.convert_tokens_to_ids(t) for t in ("+", "-"))
    ids = torch.tensor([example.input_ids], device=model.device)
    # the pre-filled "+" of each assistant turn is supervised; the position before it predicts it
    answer_positions = [i for i, label in enumerate(example.labels) if label == plus]
    if len(answer_positions) != len(steps):
        raise ValueError(f"found {len(answer_positions)} pre-filled answers for {len(steps)} steps")
    pv = None if example.pixel_values is None else example.pixel_values.to(model.device, model.dtype)
    logits = model(ids, pv).logits[0]  # [L, V]
    pair = logits[[p - 1 for p in answer_positions]][:, [plus, minus]].float()  # [n_steps, 2]
    return pair.softmax(-1)[:, 0]


def response_score(scores: torch.Tensor) -> float:
    return float(scores.mean())


def best_of_n(scores: Sequence[float]) -> int:
    """Index of the highest-scoring candidate (ties: the first)."""
    best: Optional[int] = None
    for i, s in enumerate(scores):
        if best is None or s > scores[best]:
            best = i
    if best is None:
        raise ValueError("no candidates")
    return best
