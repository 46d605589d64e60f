"""The V2PE long-context toy experiment: many images in one sequence, more than training ever showed.

    python -m ivl3lab.train.v2pe_toy --out runs/v2pe

Task: "Image-1: <image>\\nImage-2: <image>\\n... How many objects are in image j?" Two copies of the shipped toy
model are fine-tuned the same way on 1-3 images per sequence: one with ordinary positions (delta = 1), one with
V2PE (delta drawn per image from {1, 1/2, ..., 1/256}, spec §5). Both are then asked about sequences of up to 16
images (a 16-image sequence is ~1,000-1,800 tokens, several times the longest training sequence), the V2PE
model with several fixed deltas. results.json holds accuracy per (model, delta, number of images).
"""
from __future__ import annotations

import argparse
import copy
import json
import random
import time
from dataclasses import dataclass

import torch

from ..build import load_toy
from .data import Example, chat_example, collate, example_range
from .loop import TrainConfig, Trainer, prepare_run
from .toyworld import NUMBER_WORDS, scene
from .v2pe import v2pe_position_ids


def multi_image_example(processor, split: str, index: int, num_images: int, tile_px: int = 112) -> Example:
    """num_images different scenes and a count question about one of them (chosen by the index's seed)."""
    rng = random.Random(f"v2pe/{split}/{index}")
    scenes = [scene(split, 3_000_000 + index * 32 + k, tile_px) for k in range(num_images)]
    target = rng.randrange(num_images)
    question = f"How many objects are in image {target + 1}?"
    return chat_example(processor, [(question, NUMBER_WORDS[len(scenes[target].objects)])],
                        image=[s.image for s in scenes], kind=f"images={num_images}")


def with_positions(batch, image_token_id: int, delta, rng=None):
    """Set V2PE float positions on a batch (delta: a number, or "random" per image)."""
    batch.position_ids = v2pe_position_ids(batch.input_ids, image_token_id, delta, batch.attention_mask, rng)
    return batch


@dataclass
class MultiImageData:
    processor: object
    delta: object = 1.0  # 1.0 = ordinary positions; "random" = V2PE training
    batch_size: int = 16
    max_images: int = 3
    tile_px: int = 112
    seed: int = 0
    grad_accum: int = 1

    def batches(self, step: int, micro: int = 0, rank: int = 0, world: int = 1):
        examples = []
        for index in example_range(self.batch_size, self.grad_accum, step, micro, rank, world):
            n = random.Random(f"n/{self.seed}/{index}").randint(1, self.max_images)
            examples.append(multi_image_example(self.processor, "train", index, n, self.tile_px))
        batch = collate(examples, self.processor.pad_token_id)
        rng = random.Random(f"delta/{self.seed}/{step}/{rank}" + (f"/{micro}" if micro else ""))
        return with_positions(batch, self.processor.image_token_id, self.delta, rng)


@torch.no_grad()
def accuracy(model, processor, examples, delta: float, batch_size: int = 8) -> float:
    """Teacher-forced exact match of the answer (identical to greedy decoding; see train/toy.py)."""
    model.eval()
    hits = 0
    for start in range(0, len(examples), batch_size):
        batch = with_positions(collate(examples[start:start + batch_size], processor.pad_token_id),
                               processor.image_token_id, delta).to(next(model.parameters()).device)
        logits = model(**batch.model_inputs()).logits
        targets = batch.labels[:, 1:]
        ok = ((logits[:, :-1].argmax(-1) == targets) | (targets == -100)).all(-1)
        hits += int(ok.sum())
    return hits / len(examples)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--max-train-images", type=int, default=3)
    ap.add_argument("--eval-images", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--eval-deltas", type=float, nargs="+", default=[1.0, 0.25, 1 / 16, 1 / 64])
    ap.add_argument("--eval-per-point", type=int, default=60)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    out = prepare_run(args.out, args.threads)
    base, processor = load_toy(dtype=torch.float32)
    tile_px = base.config.vision.image_size
    evals = {n: [multi_image_example(processor, "test", i, n, tile_px) for i in range(args.eval_per_point)]
             for n in args.eval_images}
    tokens = {n: max(len(e.input_ids) for e in ex) for n, ex in evals.items()}
    report = {"args": vars(args), "longest_eval_sequence_tokens": tokens, "results": {}, "seconds": {}}
    for name, delta in (("standard", 1.0), ("v2pe", "random")):
        model = copy.deepcopy(base)
        data = MultiImageData(processor, delta, args.batch_size, args.max_train_images, tile_px)
        cfg = TrainConfig(steps=args.steps, lr=args.lr, warmup_steps=args.steps // 10, loss_reduction="square")
        start = time.perf_counter()
        Trainer(model, cfg, data.batches).fit(progress=False)
        report["seconds"][name] = time.perf_counter() - start
        deltas = [1.0] if name == "standard" else args.eval_deltas
        for d in deltas:
            row = {n: accuracy(model, processor, ex, d) for n, ex in evals.items()}
            report["results"][f"{name} (eval delta={d:g})"] = row
            print(name, f"delta={d:g}", row, flush=True)
    (out / "results.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
