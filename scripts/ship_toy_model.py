"""Copy a finished toy run into the package (ivl3lab/assets/toy_model) and record what it scores.

    python scripts/ship_toy_model.py runs/toy

Writes the model (bf16 safetensors: a few MB) with its processor, and results.json: the run's command line,
wall time, and exact match per question type on a fresh held-out set (test split, scenes never used for
evaluation during training).
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ivl3lab  # noqa: E402
from ivl3lab.train.toy import eval_items_from, exact_match  # noqa: E402

FRESH_START = 300_000  # test-split scene indices used for the shipped numbers (and by tests/test_toy_model.py)


def copy_into_package(run_dir: Path, target: Path) -> None:
    """The run's final model, as bf16 safetensors in the original format with its processor, replacing target."""
    model, processor = ivl3lab.load_pretrained(run_dir / "model")
    shutil.rmtree(target, ignore_errors=True)
    ivl3lab.save_pretrained(model.to(torch.bfloat16), target, format="original", processor=processor)


def main(run: str) -> None:
    run_dir, target = Path(run), ivl3lab.TOY_MODEL
    copy_into_package(run_dir, target)
    shipped, processor = ivl3lab.load_toy()
    items = eval_items_from(processor, "test", FRESH_START, per_type=100, tile_px=shipped.config.vision.image_size)
    scores = exact_match(shipped, items, processor.pad_token_id)
    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    warmup = json.loads((run_dir / "vision_warmup.json").read_text()) if (run_dir / "vision_warmup.json").exists() else []
    results = {"command": json.loads((run_dir / "args.json").read_text()),
               "train_seconds": log[-1]["time"], "vision_warmup_seconds": warmup[-1]["time"] if warmup else 0.0,
               "steps": log[-1]["step"], "fresh_test_scenes_from": FRESH_START, "per_type": 100,
               "accuracy": scores, "final_val": {k: v for k, v in log[-1].items() if k.startswith("acc_") or
                                                 k == "text_val_loss"}}
    (target / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
