"""VisualPRM-style process reward scoring (spec §9): steps split at blank lines, one forward pass over a
conversation whose assistant turns are pre-filled with "+", step score = P("+") from a softmax over just "+"
and "-" at the position that predicts each assistant answer, response score = the mean of step scores.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
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
    if not split_steps(response, max_steps):
        raise ValueError("the response has no steps to score")
    return score_responses(model, processor, [(question, image, response)], max_steps)[0]


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


# ------------------------------------------------------------------------------- batched scoring, training
def prm_example(processor, question: str, steps: Sequence[str], labels: Optional[Sequence[bool]] = None,
                image=None):
    """A PRM conversation: every step a turn, every answer "+" / "-" (all "+" when scoring)."""
    from .data import chat_example

    turns = prm_turns(question, steps)
    if labels is not None:
        if len(labels) != len(steps):
            raise ValueError(f"{len(labels)} labels for {len(steps)} steps")
        turns = [(user, "+" if ok else "-") for (user, _), ok in zip(turns, labels)]
    return chat_example(processor, turns, image=image, system_message=PRM_SYSTEM, kind="prm")


@torch.no_grad()
def score_responses(model, processor, requests: Sequence[tuple[str, object, str]], max_steps: int = 16,
                    batch_size: int = 32) -> list[torch.Tensor]:
    """P("+") for every step of each response, in batches: requests are (question, image, response).
    `max_steps=1` scores the whole response as one step (an outcome reward model)."""
    from .data import collate

    plus, minus = (processor.tokenizer.convert_tokens_to_ids(t) for t in ("+", "-"))
    device = next(model.parameters()).device
    out: list[torch.Tensor] = []
    for start in range(0, len(requests), batch_size):
        chunk = requests[start:start + batch_size]
        steps = [split_steps(r, max_steps) or [r] for _, _, r in chunk]
        examples = [prm_example(processor, q, st, image=image) for (q, image, _), st in zip(chunk, steps)]
        batch = collate(examples, processor.pad_token_id).to(device)
        logits = model(**batch.model_inputs()).logits  # [B, L, V]
        for row, example in enumerate(examples):
            # the pre-filled "+" of each assistant turn is supervised; the position before it predicts it
            positions = [i - 1 for i, label in enumerate(example.labels) if label == plus]
            if len(positions) != len(steps[row]):
                raise ValueError(f"found {len(positions)} pre-filled answers for {len(steps[row])} steps")
            pair = logits[row, positions][:, [plus, minus]].float()  # [n_steps, 2]
            out.append(pair.softmax(-1)[:, 0].cpu())
    return out


def monte_carlo_labels(policy, processor, items, responses: Sequence[Sequence[str]], rollouts: int = 4,
                       temperature: float = 1.0, seed: int = 0, max_steps: int = 16) -> list[list[list[bool]]]:
    """Step labels by Monte-Carlo rollouts (VisualPRM / Math-Shepherd): a step is "+" when at least one of
    `rollouts` continuations sampled from the policy after it reaches the right answer; the last step is "+"
    iff the response itself is right. Returns labels[item][response][step]."""
    from ..generation import GenerationConfig
    from .reasoning import complete, is_correct

    requests, where = [], []
    for i, (item, candidates) in enumerate(zip(items, responses)):
        pixel_values, _ = processor.load_image(item.image)
        for j, response in enumerate(candidates):
            steps = split_steps(response, max_steps)
            for k in range(1, len(steps)):  # prefixes that end after step k (the last step needs no rollout)
                prefix = "\n\n".join(steps[:k]) + "\n\n"
                requests += [(item.question, pixel_values, prefix)] * rollouts
                where.append((i, j, k - 1, prefix))
    cfg = GenerationConfig(max_new_tokens=64, do_sample=True, temperature=temperature)
    generator = torch.Generator(device=next(policy.parameters()).device).manual_seed(seed)
    continuations = complete(policy, processor, requests, cfg, generator)
    labels = [[[False] * len(split_steps(r, max_steps)) for r in candidates] for candidates in responses]
    for n, (i, j, k, prefix) in enumerate(where):
        labels[i][j][k] = any(is_correct(prefix + c, items[i].answer)
                              for c in continuations[n * rollouts:(n + 1) * rollouts])
    for i, (item, candidates) in enumerate(zip(items, responses)):
        for j, response in enumerate(candidates):
            if labels[i][j]:
                labels[i][j][-1] = is_correct(response, item.answer)
    return labels


@dataclass
class PRMData:
    """Deterministic Trainer batches of labelled PRM conversations (or ORM ones: `outcome=True` merges each
    response into one step labelled by its final answer)."""
    processor: object
    records: list  # (question, image, response, step labels)
    batch_size: int = 16
    seed: int = 0
    outcome: bool = False
    max_steps: int = 16
    grad_accum: int = 1

    def example(self, index: int):
        question, image, response, labels = self.records[index]
        if self.outcome:  # the whole response as one step, exactly as score_responses(max_steps=1) sees it
            return prm_example(self.processor, question, ["\n\n".join(split_steps(response, self.max_steps))],
                               [labels[-1]], image)
        return prm_example(self.processor, question, split_steps(response, self.max_steps), labels, image)

    def batches(self, step: int, micro: int = 0, rank: int = 0, world: int = 1):
        from .data import collate, epoch_shuffled, example_range

        positions = example_range(self.batch_size, self.grad_accum, step, micro, rank, world)
        rows = [self.example(epoch_shuffled(p, len(self.records), f"prm/{self.seed}/")) for p in positions]
        return collate(rows, self.processor.pad_token_id)


def train_reward_model(model, processor, records, outcome: bool = False, steps: int = 200, batch_size: int = 16,
                       lr: float = 5e-4, seed: int = 0, progress: bool = True) -> list[dict]:
    """Fine-tune `model` in place as a PRM (per-step "+"/"-") or, with outcome=True, an outcome RM; the loss is
    on the "+"/"-" answers (and their end-of-turn tokens), token-averaged."""
    from .loop import TrainConfig, Trainer

    data = PRMData(processor, list(records), batch_size, seed, outcome)
    cfg = TrainConfig(steps=steps, lr=lr, warmup_steps=max(1, steps // 10), seed=seed, loss_reduction="token")
    torch.manual_seed(seed)
    return Trainer(model, cfg, data.batches).fit(progress=progress)
