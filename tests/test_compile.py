"""torch.compile (inductor, CPU) gives the eager model's logits; the Trainer's compile option trains the same."""
import pytest
import torch

import ivl3lab
from ivl3lab.train.loop import Trainer, TrainConfig
from ivl3lab.train.toy import ToyData


@torch.no_grad()
def test_inductor_forward_matches_eager():
    model, processor = ivl3lab.build("tiny", seed=0)
    inputs = processor("What is it?", images=ivl3lab.SAMPLE_IMAGE)
    eager = model(inputs["input_ids"], inputs["pixel_values"]).logits
    compiled = torch.compile(model)(inputs["input_ids"], inputs["pixel_values"]).logits
    assert (compiled - eager).abs().max() <= 1e-4


def test_compiled_training_step_matches_eager():
    losses = []
    for compile_ in (False, True):
        model, processor = ivl3lab.build("tiny", seed=0, system_message="Answer.")
        data = ToyData(processor, batch_size=2, max_objects=1, text_ratio=0.0)
        trainer = Trainer(model.train(), TrainConfig(steps=2, warmup_steps=1, compile=compile_), data.batches)
        if compile_:  # inductor's backward takes minutes on 2 CPU cores; aot_eager checks the same capture
            trainer.forward = torch.compile(trainer.model, backend="aot_eager")
        trainer.fit(progress=False)
        losses.append([h["loss"] for h in trainer.history])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
