"""Copy a finished reasoning-SFT run into the package (ivl3lab/assets/toy_model_sft) and record what it scores.

    python -m ivl3lab.train.mpo_toy sft --out runs/sft
    python scripts/ship_toy_sft_model.py runs/sft

Writes the model (bf16 safetensors) with its processor, and results.json: the SFT report (wall time, validation
accuracy) and greedy reasoning accuracy on fresh held-out test questions (tests/test_toy_model.py re-checks it).
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
from ivl3lab.train.reasoning import accuracy, reasoning_items  # noqa: E402

FRESH_START = 300_000  # test-split scene indices for the shipped number


def main(run: str) -> None:
    run_dir = Path(run)
    model, processor = ivl3lab.load_pretrained(run_dir / "model")
    target = ivl3lab.TOY_SFT_MODEL
    shutil.rmtree(target, ignore_errors=True)
    ivl3lab.save_pretrained(model.to(torch.bfloat16), target, format="original", processor=processor)
    shipped, processor = ivl3lab.load_toy(variant="sft")
    items = reasoning_items("test", 200, start=FRESH_START, tile_px=shipped.config.vision.image_size)
    results = {"command": "python -m ivl3lab.train.mpo_toy sft --out runs/sft",
               "sft_report": json.loads((run_dir / "results.json").read_text()),
               "fresh_test_from": FRESH_START, "questions": len(items),
               "reasoning_accuracy": accuracy(shipped, processor, items)}
    (target / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(sys.argv[1])
