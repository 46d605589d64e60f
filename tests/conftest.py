"""Shared test fixtures: tiny transformers InternVL models with non-trivial random weights (the reference)."""
import os
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/helpers.py

from helpers import make_hf_model  # noqa: E402


@pytest.fixture(scope="session")
def hf_300m():
    return make_hf_model("300m", seed=0)


@pytest.fixture(scope="session")
def hf_6b():
    return make_hf_model("6b", seed=1)
