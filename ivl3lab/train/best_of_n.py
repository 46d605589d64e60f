"""Best-of-N test-time scaling, measured: pick one of N sampled responses by a process reward model, an
outcome reward model, majority voting or at random, and plot accuracy against N.

Every question is sampled once, M times (M = the largest N); accuracy at a smaller N averages over `draws`
random subsets of size N of those M, so all selectors see the same candidates and the curves are comparable.
"""
from __future__ import annotations

import random
from collections import Counter
from typing import Optional, Sequence


def choose_majority(answers: Sequence[Optional[str]], rng: random.Random) -> int:
    """Index of a response whose final answer is the most common (None never wins unless it is all there is);
    ties are broken at random."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return rng.randrange(len(answers))
    top = max(counts.values())
    winners = [i for i, a in enumerate(answers) if a is not None and counts[a] == top]
    return winners[rng.randrange(len(winners))] if len({answers[i] for i in winners}) > 1 else winners[0]


def choose_best(scores: Sequence[float]) -> int:
    """Highest score; ties: the first."""
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def best_of_n_curve(correct: Sequence[Sequence[bool]], answers: Sequence[Sequence[Optional[str]]],
                    scores: dict[str, Sequence[Sequence[float]]], ns: Sequence[int] = (1, 2, 4, 8, 16),
                    draws: int = 32, seed: int = 0) -> dict[str, list[float]]:
    """Accuracy per selector for each N: {"random": [...], "majority": [...], <score name>: [...], "oracle": [...]}.

    correct[q][m]: is response m of question q right; answers[q][m]: its final answer; scores[name][q][m]: a
    reward model's score. "random" is the expected accuracy of a uniform pick; "oracle" (any of the N is
    right, pass@N) is the ceiling a perfect verifier would reach."""
    rng = random.Random(seed)
    m = len(correct[0])
    if any(len(c) != m for c in correct):
        raise ValueError("every question needs the same number of sampled responses")
    if max(ns) > m:
        raise ValueError(f"N up to {max(ns)} needs at least that many samples per question, got {m}")
    names = ["random", "majority", *scores, "oracle"]
    curve: dict[str, list[float]] = {name: [] for name in names}
    for n in ns:
        totals = dict.fromkeys(names, 0.0)
        trials = 0
        for q in range(len(correct)):
            for _ in range(draws if n < m else 1):
                subset = rng.sample(range(m), n)
                picks = [correct[q][i] for i in subset]
                totals["random"] += sum(picks) / n
                totals["majority"] += picks[choose_majority([answers[q][i] for i in subset], rng)]
                for name, table in scores.items():
                    totals[name] += picks[choose_best([table[q][i] for i in subset])]
                totals["oracle"] += any(picks)
                trials += 1
        for name in names:
            curve[name].append(totals[name] / trials)
    return curve


def plot_best_of_n(curve: dict[str, list[float]], ns: Sequence[int] = (1, 2, 4, 8, 16), ax=None, title: str = ""):
    """Accuracy vs N (log2 axis), one line per selector."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 3.8))
    styles = {"oracle": dict(color="grey", linestyle=":"), "random": dict(color="black", linestyle="--")}
    for name, values in curve.items():
        ax.plot(ns, values, marker="o", label=name, **styles.get(name, {}))
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(ns), [str(n) for n in ns])
    ax.set_xlabel("N (responses sampled per question)")
    ax.set_ylabel("accuracy")
    ax.set_title(title or "Best-of-N")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return ax
