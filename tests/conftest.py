"""Shared test fixtures: tiny transformers InternVL models with non-trivial random weights (the reference)."""
import os
import sys
from pathlib import Path

import torch

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/helpers.py
