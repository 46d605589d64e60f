"""The toy MPO experiment, end to end (issue: measured, over seeds, against the right baselines).

    python -m ivl3lab.train.mpo_toy sft --out runs/sft --threads 2    # the shipped toy model -> reasoning SFT
    python -m ivl3lab.train.mpo_toy mpo --out runs/mpo --threads 1   # seeds 0 1 2, from the shipped SFT'd model

`sft` teaches the pre-trained toy model the step-by-step answer format (ivl3lab/train/reasoning.py). `mpo`, per
seed: samples answers from the SFT model on training scenes, builds correctness pairs (and Dropout-NTP caption
pairs), then trains two copies for the same steps, batches and learning rate — MPO, and SFT on the chosen answers
alone — and measures greedy accuracy on held-out test scenes before and after. Results go to results.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from ..build import load_toy
from .loop import TrainConfig, Trainer, prepare_run
from .mpo import MPOConfig
from .preference import correctness_pairs, dropout_ntp_pairs, save_pairs, train_preference
from .reasoning import ReasoningSFTData, accuracy, reasoning_items


def sft_reasoning(model, processor, steps: int = 300, batch_size: int = 16, lr: float = 1e-3, seed: int = 0,
                  out_dir=None, progress: bool = True) -> list[dict]:
    """Supervised fine-tuning on the reasoning format (loss on assistant tokens only), half the batch being the
    pre-training conversations so the short answers are kept."""
    data = ReasoningSFTData(processor, batch_size=batch_size, tile_px=model.config.vision.image_size, seed=seed)
    cfg = TrainConfig(steps=steps, lr=lr, warmup_steps=max(1, steps // 10), seed=seed, loss_reduction="square")
    trainer = Trainer(model, cfg, data.batches, out_dir=out_dir)
    trainer.resume()
    return trainer.fit(progress=progress)


def load_model(path):
    """A model directory, or (None) the shipped SFT'd toy model."""
    from ..weights.io import load_pretrained

    if path:
        return load_pretrained(path, dtype=torch.float32)
    return load_toy(dtype=torch.float32, variant="sft")


def build_pairs(model, processor, n_items: int, n_samples: int, seed: int, out_dir=None, captions: int = 0):
    """Correctness pairs from `n_items` training scenes (and Dropout-NTP pairs from `captions` scenes)."""
    tile_px = model.config.vision.image_size
    items = reasoning_items("train", n_items, start=7_000_000 + 10_000 * seed, tile_px=tile_px)
    triples, stats = correctness_pairs(model, processor, items, n=n_samples, seed=seed)
    pairs = [(item.question, item.image, chosen, rejected) for item, chosen, rejected in triples]
    if out_dir is not None:
        save_pairs(out_dir, pairs, "correctness", answers=[item.answer for item, _, _ in triples])
    if captions:
        scenes = reasoning_items("train", captions, start=8_000_000 + 10_000 * seed, tile_px=tile_px)
        ntp = dropout_ntp_pairs(model, processor, [("Describe the image.", s.image) for s in scenes])
        stats["dropout_ntp_pairs"] = len(ntp)
        if out_dir is not None:
            save_pairs(out_dir, ntp, "dropout_ntp", append=True)
        pairs += ntp
    return pairs, stats


def run_seed(sft_path, seed: int, steps: int, n_items: int, n_samples: int, eval_items, out: Path,
             captions: int = 0, lr: float = 5e-4, batch_size: int = 8, progress: bool = False) -> dict:
    torch.manual_seed(seed)
    model, processor = load_model(sft_path)
    start = time.perf_counter()
    pairs, stats = build_pairs(model, processor, n_items, n_samples, seed, out / f"pairs-seed{seed}", captions)
    stats["pair_seconds"] = time.perf_counter() - start
    result = {"seed": seed, **stats, "before": accuracy(model, processor, eval_items)}
    for method in ("mpo", "sft"):
        model, processor = load_model(sft_path)
        start = time.perf_counter()
        history = train_preference(model, processor, pairs, method=method, steps=steps, lr=lr,
                                   batch_size=batch_size, seed=seed, mpo=MPOConfig(), progress=progress)
        result[f"{method}_seconds"] = time.perf_counter() - start
        result[method] = accuracy(model, processor, eval_items)
        result[f"{method}_history"] = history
    return result


def summarise(results: list[dict]) -> dict:
    out = {}
    for key in ("before", "mpo", "sft"):
        values = [r[key] for r in results]
        out[key] = {"mean": statistics.mean(values), "std": statistics.pstdev(values), "values": values}
    out["mpo_minus_before"] = statistics.mean(r["mpo"] - r["before"] for r in results)
    out["mpo_minus_sft"] = statistics.mean(r["mpo"] - r["sft"] for r in results)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    a = sub.add_parser("sft")
    a.add_argument("--out", required=True)
    a.add_argument("--steps", type=int, default=300)
    a.add_argument("--threads", type=int, default=0)
    b = sub.add_parser("mpo")
    b.add_argument("--sft", default=None, help="the SFT'd model directory (default: the shipped one)")
    b.add_argument("--out", required=True)
    b.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    b.add_argument("--steps", type=int, default=300)
    b.add_argument("--items", type=int, default=400, help="training questions to sample answers for")
    b.add_argument("--samples", type=int, default=8, help="answers sampled per question")
    b.add_argument("--captions", type=int, default=32, help="scenes for Dropout-NTP caption pairs")
    b.add_argument("--eval-items", type=int, default=200)
    b.add_argument("--lr", type=float, default=5e-4)
    b.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    out = prepare_run(args.out, args.threads)
    if args.command == "sft":
        model, processor = load_toy(dtype=torch.float32)
        start = time.perf_counter()
        history = sft_reasoning(model, processor, steps=args.steps, out_dir=out / "checkpoints")
        items = reasoning_items("val", 200, tile_px=model.config.vision.image_size)
        report = {"seconds": time.perf_counter() - start, "val_reasoning_accuracy": accuracy(model, processor, items),
                  "final_loss": history[-1]["loss"]}
        model.save_pretrained(out / "model", format="original", processor=processor)
        (out / "results.json").write_text(json.dumps(report, indent=1))
        print(json.dumps(report, indent=1))
        return report
    model, processor = load_model(args.sft)
    eval_items = reasoning_items("test", args.eval_items, tile_px=model.config.vision.image_size)
    results = []
    for seed in args.seeds:
        results.append(run_seed(args.sft, seed, args.steps, args.items, args.samples, eval_items, out,
                                args.captions, args.lr))
        print(json.dumps({k: v for k, v in results[-1].items() if not k.endswith("history")}))
    report = {"args": vars(args), "summary": summarise(results), "runs": results}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report["summary"], indent=1))
    return report


if __name__ == "__main__":
    main()
