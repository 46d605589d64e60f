"""Copy a finished reasoning-SFT run into the package (ivl3lab/assets/toy_model_sft) and record what it scores.

    python -m ivl3lab.train.mpo_toy sft --out runs/sft
    python scripts/ship_toy_sft_model.py runs/sft

Writes the model (bf16 safetensors) with its processor, and results.json: the SFT report (wall time, validation
accuracy) and greedy reasoning accuracy on fresh held-out test questions (tests/test_toy_model.py re-checks it).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ivl3lab  # noqa: E402
from ship_toy_model import copy_into_package  # noqa: E402  (this folder: the script's own sys.path entry)
from ivl3lab.train.reasoning import accuracy, reasoning_items  # noqa: E402

FRESH_START = 300_000  # test-split scene indices for the shipped number


def main(run: str) -> None:
    run_dir, target = Path(run), ivl3lab.TOY_SFT_MODEL
    copy_into_package(run_dir, target)
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
