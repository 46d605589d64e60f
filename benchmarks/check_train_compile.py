"""The Trainer's compile options against eager training on one device (for GPUs: the CPU tests cover CPU):

    python benchmarks/check_train_compile.py --device cuda              # tiny preset, float32, 2 micro-batches a step

Same seed, same toy batches, gradient accumulation on: prints each option's losses and its largest parameter
difference from eager after the last step, and exits non-zero if any differ by more than --tol. (It is how the
blocks replayed as CUDA graphs were first found to fail inside the Trainer's accumulation loop, and then, with
`compile="graphs"` keeping .grad tensors of its own, to train like eager: docs/benchmarks.md.)

    python benchmarks/check_train_compile.py --device cuda --options blocks,graphs
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import ivl3lab
from ivl3lab.train.loop import Trainer, TrainConfig
from ivl3lab.train.toy import ToyData


def train(option, a) -> tuple[list[float], torch.Tensor, float]:
    model, processor = ivl3lab.build("tiny", seed=0, system_message="Answer.", device=a.device)
    data = ToyData(processor, batch_size=2, max_objects=1, text_ratio=0.0)
    cfg = TrainConfig(steps=a.steps, warmup_steps=1, grad_accum=2, autocast=False, compile=option, loss_chunk=64)
    trainer = Trainer(model.train(), cfg, data.batches)
    start = time.perf_counter()
    trainer.fit(progress=False)
    params = torch.cat([p.detach().flatten().float().cpu() for p in model.parameters()])
    return [h["loss"] for h in trainer.history], params, time.perf_counter() - start


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--options", default="blocks", help="TrainConfig.compile values to compare with eager")
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args(argv)
    eager_losses, eager_params, _ = train(False, a)
    print(f"eager: losses {[round(x, 6) for x in eager_losses]}", flush=True)
    result = {}
    for option in a.options.split(","):
        losses, params, seconds = train(option, a)
        loss_diff = max(abs(x - y) for x, y in zip(losses, eager_losses))
        param_diff = float((params - eager_params).abs().max())
        result[option] = dict(loss_diff=loss_diff, param_diff=param_diff, seconds=seconds)
        print(f"{option}: losses {[round(x, 6) for x in losses]}, max |loss - eager| {loss_diff:.2e}, "
              f"max |param - eager| {param_diff:.2e} ({seconds:.1f} s with compilation)", flush=True)
    bad = [k for k, v in result.items() if max(v["loss_diff"], v["param_diff"]) > a.tol]
    print("FAIL: " + ", ".join(bad) if bad else f"all within {a.tol}", flush=True)
    result["ok"] = not bad
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
