"""Preference data made by the model itself (MMPR's two pipelines), stored as JSONL with images, and the
toy MPO / SFT-on-chosen runs that use it.

1. **Correctness-based pairs** for questions with a ground truth: sample N step-by-step answers; those whose
   final answer is right are chosen, the wrong ones rejected.
2. **Dropout next-token prediction** (Dropout-NTP) for open answers without a ground truth (captions): the
   model's own answer *with* the image is chosen; the same answer truncated at half and continued by the model
   *without* the image is rejected — what the model says when it stops looking.
"""
from __future__ import annotations

import copy
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image

from .data import Batch, epoch_shuffled, example_range
from .mpo import MPOConfig, MPOObjective, preference_batch, sequence_logps
from .reasoning import ReasoningItem, complete, is_correct, sample_responses


@dataclass
class PreferencePair:
    question: str
    image: Optional[str]  # file name inside the dataset directory (None: text only)
    chosen: str
    rejected: str
    source: str  # "correctness" | "dropout_ntp"
    answer: Optional[str] = None  # the ground truth, when there is one


# -------------------------------------------------------------------------------------------- pipelines
def correctness_pairs(model, processor, items: Sequence[ReasoningItem], n: int = 8, temperature: float = 1.0,
                      seed: int = 0, max_pairs_per_item: int = 2) -> tuple[list[tuple[ReasoningItem, str, str]], dict]:
    """(item, chosen, rejected) from n samples per item, and statistics (sampled accuracy, items with pairs).

    An item whose samples are all right or all wrong gives no pair (nothing to prefer); otherwise up to
    `max_pairs_per_item` distinct (right, wrong) pairs."""
    samples = sample_responses(model, processor, items, n, temperature, seed)
    rng = random.Random(seed)
    pairs, right_total = [], 0
    for item, responses in zip(items, samples):
        right = sorted({r for r in responses if is_correct(r, item.answer)})
        wrong = sorted({r for r in responses if not is_correct(r, item.answer)})
        right_total += sum(is_correct(r, item.answer) for r in responses)
        combos = [(c, r) for c in right for r in wrong]
        rng.shuffle(combos)
        pairs += [(item, c, r) for c, r in combos[:max_pairs_per_item]]
    stats = {"items": len(items), "samples": len(items) * n, "sample_accuracy": right_total / max(len(items) * n, 1),
             "pairs": len(pairs), "items_with_pairs": len({id(p[0]) for p in pairs})}
    return pairs, stats


def truncate_half(text: str) -> str:
    """The first half of an answer, cut before a space (Dropout-NTP's truncation point). No trailing space:
    the tokenizer's words carry their leading space, so the continuation starts with " word" as usual."""
    words = text.split(" ")
    return " ".join(words[:max(1, len(words) // 2)])


def _join(prefix: str, continuation: str) -> str:
    """prefix + continuation as one text: `decode` strips the continuation's leading space, so put it back
    unless the continuation starts with punctuation."""
    if not continuation or continuation[0] in ".,;:!?":
        return prefix + continuation
    return prefix + " " + continuation


def dropout_ntp_pairs(model, processor, questions_images: Sequence[tuple[str, Image.Image]],
                      max_new_tokens: int = 64) -> list[tuple[str, Image.Image, str, str]]:
    """(question, image, chosen, rejected): chosen = the model's greedy answer with the image; rejected = its
    first half continued greedily without the image. Pairs where both are the same are dropped."""
    greedy = dict(max_new_tokens=max_new_tokens, do_sample=False)
    pixels = [processor.load_image(image)[0] for _, image in questions_images]
    answers = complete(model, processor, [(q, pv, "") for (q, _), pv in zip(questions_images, pixels)], greedy)
    prefixes = [truncate_half(a) for a in answers]
    blind = complete(model, processor, [(q, None, prefix) for (q, _), prefix in zip(questions_images, prefixes)],
                     greedy)
    return [(q, image, a, _join(prefix, b)) for (q, image), a, prefix, b in zip(questions_images, answers, prefixes,
                                                                               blind)
            if _join(prefix, b).strip() != a.strip()]


# -------------------------------------------------------------------------------------------- JSONL storage
def save_pairs(directory, pairs: Sequence[tuple[str, Optional[Image.Image], str, str]], source: str,
               answers: Optional[Sequence[Optional[str]]] = None, append: bool = False) -> Path:
    """Write `pairs.jsonl` and the images as PNG files beside it; identical images are stored once."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    names: dict[int, str] = {}
    existing = len(list(directory.glob("image-*.png")))
    with (directory / "pairs.jsonl").open("a" if append else "w") as f:
        for k, (question, image, chosen, rejected) in enumerate(pairs):
            name = None
            if image is not None:
                if id(image) not in names:
                    names[id(image)] = f"image-{existing + len(names):06d}.png"
                    image.save(directory / names[id(image)])
                name = names[id(image)]
            answer = answers[k] if answers is not None else None
            f.write(json.dumps(asdict(PreferencePair(question, name, chosen, rejected, source, answer))) + "\n")
    return directory / "pairs.jsonl"


def load_pairs(directory) -> list[tuple[PreferencePair, Optional[Image.Image]]]:
    directory = Path(directory)
    out = []
    for line_number, line in enumerate((directory / "pairs.jsonl").read_text().splitlines(), start=1):
        try:
            pair = PreferencePair(**json.loads(line))
        except (json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"{directory / 'pairs.jsonl'}:{line_number}: not a preference pair ({error})") from None
        image = Image.open(directory / pair.image).convert("RGB") if pair.image else None
        out.append((pair, image))
    return out


# -------------------------------------------------------------------------------------------- training
@dataclass
class PreferenceData:
    """Deterministic batches of pairs for the Trainer: a seeded permutation per epoch, `batch_size` pairs per
    optimizer step (chosen rows first, then rejected). `ref_logps` are filled in when precomputed."""
    processor: object
    pairs: list  # (question, image, chosen, rejected)
    batch_size: int = 8
    seed: int = 0
    grad_accum: int = 1
    ref_logps: Optional[torch.Tensor] = None  # [len(pairs), 2]: chosen, rejected

    def indices(self, step: int, micro: int, rank: int = 0, world: int = 1) -> list[int]:
        return [epoch_shuffled(position, len(self.pairs), f"{self.seed}/")
                for position in example_range(self.batch_size, self.grad_accum, step, micro, rank, world)]

    def batch_of(self, indices: Sequence[int]) -> Batch:
        batch = preference_batch(self.processor, [self.pairs[i] for i in indices])
        if self.ref_logps is not None:
            index = torch.tensor(list(indices))
            batch.ref_logps = torch.cat([self.ref_logps[index, 0], self.ref_logps[index, 1]])
        return batch

    def batches(self, step: int, micro: int, rank: int = 0, world: int = 1) -> Batch:
        return self.batch_of(self.indices(step, micro, rank, world))

    def chosen_batches(self, step: int, micro: int, rank: int = 0, world: int = 1) -> Batch:
        """Only the chosen halves: the SFT-on-chosen baseline sees exactly the same answers."""
        from .data import chat_example, collate

        chosen = [chat_example(self.processor, [(q, good)], image) for q, image, good, _ in
                  (self.pairs[i] for i in self.indices(step, micro, rank, world))]
        return collate(chosen, self.processor.pad_token_id)


@torch.no_grad()
def precompute_reference_logps(reference_model, data: PreferenceData, batch_size: int = 16) -> torch.Tensor:
    """[len(pairs), 2] reference log-prob sums of (chosen, rejected): computed once, before training."""
    device = next(reference_model.parameters()).device
    out = []
    for start in range(0, len(data.pairs), batch_size):
        indices = list(range(start, min(start + batch_size, len(data.pairs))))
        batch = data.batch_of(indices).to(device)
        with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):  # as the Trainer's policy
            logits = reference_model(**batch.model_inputs()).logits
        logps = sequence_logps(logits, batch.labels)[0].cpu()
        out.append(torch.stack([logps[:len(indices)], logps[len(indices):]], dim=1))
    return torch.cat(out)


def train_preference(model, processor, pairs, method: str = "mpo", steps: int = 100, batch_size: int = 8,
                     lr: float = 2e-4, seed: int = 0, mpo: MPOConfig = MPOConfig(), out_dir=None, evaluate=None,
                     eval_every: int = 0, progress: bool = True):
    """Fine-tune `model` in place on preference pairs; returns the Trainer's history.

    method "mpo": MPO against a frozen copy of the starting model (its log-probs precomputed once);
    method "sft": the same steps, batches and learning rate, but only the NLL of the chosen answers — the
    baseline that tells what the preference terms add."""
    from .loop import TrainConfig, Trainer

    data = PreferenceData(processor, list(pairs), batch_size, seed)
    cfg = TrainConfig(steps=steps, lr=lr, warmup_steps=max(1, steps // 10), eval_every=eval_every, seed=seed,
                      loss_reduction="token")
    torch.manual_seed(seed)
    if method == "mpo":
        data.ref_logps = precompute_reference_logps(copy.deepcopy(model).eval(), data)
        objective = MPOObjective(mpo)
        trainer = Trainer(model, cfg, data.batches, out_dir=out_dir, evaluate=evaluate, loss_fn=objective,
                          weights_fn=objective.weights, on_step_end=objective.on_step_end,
                          stateful={"mpo": objective})
    elif method == "sft":
        trainer = Trainer(model, cfg, data.chosen_batches, out_dir=out_dir, evaluate=evaluate)
    else:
        raise ValueError(f"method must be 'mpo' or 'sft', got {method!r}")
    trainer.resume()
    return trainer.fit(progress=progress)
