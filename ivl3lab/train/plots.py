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


def plot_preference_history(history: Sequence[dict], title: str = "MPO"):
    """The MPO terms, rewards and margin, preference accuracy and the reward shift delta, by step."""
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for key in ("loss_pref", "loss_quality", "loss_gen", "loss"):
        axes[0].plot(steps, [h[key] for h in history], label=key)
    axes[0].set_title("loss terms")
    for key in ("reward_chosen", "reward_rejected", "margin"):
        axes[1].plot(steps, [h[key] for h in history], label=key)
    axes[1].plot(steps, [h["delta"] for h in history], "k:", label="delta (reward shift)")
    axes[1].set_title("rewards  beta*(log pi - log pi_ref)")
    axes[2].plot(steps, [h["accuracy"] for h in history], label="reward accuracy (r_c > r_r)")
    axes[2].set_ylim(0, 1.02)
    axes[2].set_title("preference accuracy (batch)")
    evals = [h for h in history if any(k.startswith("acc_") for k in h)]
    for key in sorted({k for h in evals for k in h if k.startswith("acc_")}):
        axes[3].plot([h["step"] for h in evals], [h[key] for h in evals], "o-", label=key[4:])
    axes[3].set_ylim(0, 1.02)
    axes[3].set_title("held-out accuracy")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_reasoning_answers(models: dict, processor, items, max_new_tokens: int = 64, columns: int = 4):
    """Toy images with the step-by-step answer of each model (green = right final answer, red = wrong)."""
    import matplotlib.pyplot as plt

    from .reasoning import is_correct, sample_responses

    answers = {name: sample_responses(m, processor, items, 1, temperature=0.0, max_new_tokens=max_new_tokens)
               for name, m in models.items()}
    columns = min(columns, len(items))
    rows = (len(items) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 4.6 * rows), squeeze=False)
    for k, (ax, item) in enumerate(zip(axes.flat, items)):
        ax.imshow(item.image)
        ax.set_title(item.question, fontsize=8)
        ax.set_xticks([]), ax.set_yticks([])
        lines = []
        for name, responses in answers.items():
            text = responses[k][0].replace("\n\n", " | ")
            ok = is_correct(responses[k][0], item.answer)
            lines.append((f"{name}: {text}", "green" if ok else "red"))
        for j, (line, colour) in enumerate(lines):
            ax.text(0, -0.04 - 0.09 * j, line, transform=ax.transAxes, fontsize=6.5, color=colour, va="top",
                    wrap=True)
    for ax in list(axes.flat)[len(items):]:
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_step_scores(steps: Sequence[str], scores: Sequence[float], labels: Sequence[bool] = (), ax=None,
                     title: str = ""):
    """One response's steps as horizontal bars of P("+"), optionally with their Monte-Carlo labels."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(7, 0.45 * len(steps) + 0.8))
    y = list(range(len(steps)))[::-1]
    colours = ["tab:green" if s >= 0.5 else "tab:red" for s in scores]
    ax.barh(y, scores, color=colours)
    names = [s if len(s) < 48 else s[:45] + "..." for s in steps]
    if labels:
        names = [f"[{'+' if ok else '-'}] {n}" for n, ok in zip(names, labels)]
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlim(0, 1)
    ax.axvline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel('P("+")  (step score)')
    ax.set_title(title, fontsize=9)
    return ax
