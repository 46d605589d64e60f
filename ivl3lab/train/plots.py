"""Training curves: loss per step and held-out accuracy per question type over wall time."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence, Union


def read_log(path: Union[str, Path]) -> list[dict]:
    """The records of a run's log.jsonl (a Trainer writes one per step)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_history(history: Sequence[dict], title: str = "", target: float = 0.9):
    """Left: training loss by step. Right: accuracy per question type (and text loss) against wall time."""
    import matplotlib.pyplot as plt

    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(12, 4))
    loss_ax.plot([h["step"] for h in history], [h["loss"] for h in history], lw=0.8)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("training loss")
    loss_ax.set_yscale("log")
    evals = [h for h in history if any(k.startswith("acc_") for k in h)]
    kinds = sorted({k for h in evals for k in h if k.startswith("acc_")})
    for kind in kinds:
        acc_ax.plot([h["time"] / 60 for h in evals], [h[kind] for h in evals], marker="o", ms=3, label=kind[4:])
    acc_ax.axhline(target, color="gray", ls="--", lw=0.8)
    acc_ax.set_xlabel("wall time (min)")
    acc_ax.set_ylabel("held-out exact match")
    acc_ax.set_ylim(0, 1.02)
    if evals and "text_val_loss" in evals[0]:
        text_ax = acc_ax.twinx()
        text_ax.plot([h["time"] / 60 for h in evals], [h["text_val_loss"] for h in evals], color="black", ls=":",
                     label="text-only val loss")
        text_ax.set_ylabel("text-only validation loss")
        text_ax.legend(loc="lower right")
    acc_ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_answers(model, processor, scenes, max_new_tokens: int = 6, columns: int = 4):
    """A grid of toy images, each with one question, the model's greedy answer and the truth (green = right)."""
    import matplotlib.pyplot as plt

    rows = (len(scenes) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 3.2 * rows), squeeze=False)
    for ax, scene in zip(axes.flat, scenes):
        kind, question, truth = scene.qa[0]
        pixel_values, _ = processor.load_image(scene.image)
        answer = model.chat(processor, pixel_values, question, dict(max_new_tokens=max_new_tokens))
        ax.imshow(scene.image)
        ax.set_title(f"{question}\n→ {answer!r} (truth {truth!r})", fontsize=8,
                     color="green" if answer == truth else "red")
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    return fig
