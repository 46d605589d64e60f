"""The toy test-time-scaling experiment: a process reward model trained on Monte-Carlo step labels, and
Best-of-N with it against majority voting, an outcome reward model and a random pick.

    python -m ivl3lab.train.tts_toy --policy runs/sft/model --out runs/tts

1. Sample `--samples` step-by-step answers per training question from the policy (the SFT'd toy model).
2. Label every step by `--rollouts` Monte-Carlo continuations (ivl3lab.train.prm.monte_carlo_labels).
3. Train a PRM (per-step "+"/"-") and, on the same responses, an ORM (one label: the final answer), both
   initialised from the policy.
4. On held-out test questions, sample M = max(N) answers once, score them with both, and compute accuracy vs N
   for every selector (ivl3lab.train.best_of_n). Results: results.json and best_of_n.png.
"""
from __future__ import annotations

import argparse
import copy
import json
import time

from .best_of_n import best_of_n_curve, plot_best_of_n
from .loop import prepare_run
from .mpo_toy import load_model
from .prm import monte_carlo_labels, response_score, score_responses, train_reward_model
from .reasoning import exact_step_labels, final_answer, is_correct, reasoning_items, sample_responses


def reward_records(policy, processor, items, samples: int, rollouts: int, seed: int = 0, labels: str = "mc"):
    """(question, image, response, step labels) for every sampled response of every item. labels "mc":
    Monte-Carlo rollouts (what works without ground truth); "exact": checked against the toy scene."""
    responses = sample_responses(policy, processor, items, samples, temperature=1.0, seed=seed)
    if labels == "exact":
        tile_px = policy.config.vision.image_size
        labels = [[exact_step_labels(item, r, tile_px) for r in rs] for item, rs in zip(items, responses)]
    elif labels == "mc":
        labels = monte_carlo_labels(policy, processor, items, responses, rollouts=rollouts, seed=seed + 1)
    else:
        raise ValueError(f"labels must be 'mc' or 'exact', got {labels!r}")
    return [(item.question, item.image, r, lab) for item, rs, ls in zip(items, responses, labels)
            for r, lab in zip(rs, ls) if lab]


def evaluate_best_of_n(policy, processor, reward_models: dict, items, ns=(1, 2, 4, 8, 16), seed: int = 0,
                       draws: int = 32) -> dict:
    """Sample max(ns) answers per item once, score them with each reward model, and build the curves."""
    m = max(ns)
    responses = sample_responses(policy, processor, items, m, temperature=1.0, seed=seed)
    correct = [[is_correct(r, item.answer) for r in rs] for item, rs in zip(items, responses)]
    answers = [[final_answer(r) for r in rs] for rs in responses]
    requests = [(item.question, item.image, r) for item, rs in zip(items, responses) for r in rs]
    scores = {}
    for name, (model, max_steps) in reward_models.items():
        flat = [response_score(s) for s in score_responses(model, processor, requests, max_steps=max_steps)]
        scores[name] = [flat[k * m:(k + 1) * m] for k in range(len(items))]
    curve = best_of_n_curve(correct, answers, scores, ns, draws=draws, seed=seed)
    return {"ns": list(ns), "curve": curve, "responses": responses, "correct": correct, "scores": scores}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default=None, help="the SFT'd policy (default: the shipped SFT'd toy model)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--train-items", type=int, default=150)
    ap.add_argument("--samples", type=int, default=4, help="responses per training question")
    ap.add_argument("--rollouts", type=int, default=4, help="Monte-Carlo continuations per step")
    ap.add_argument("--steps", type=int, default=200, help="reward-model training steps")
    ap.add_argument("--eval-items", type=int, default=150)
    ap.add_argument("--ns", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--labels", default="mc", choices=("mc", "exact"),
                    help="step labels: Monte-Carlo rollouts, or exact checks against the toy scene")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args(argv)
    out = prepare_run(args.out, args.threads)
    policy, processor = load_model(args.policy)
    tile_px = policy.config.vision.image_size
    timings, start = {}, time.perf_counter()
    train_items = reasoning_items("train", args.train_items, start=9_000_000, tile_px=tile_px)
    records = reward_records(policy, processor, train_items, args.samples, args.rollouts, args.seed, args.labels)
    timings["labels"] = time.perf_counter() - start
    step_labels = [x for r in records for x in r[3]]
    reward_models = {}
    for name, outcome in (("PRM", False), ("ORM", True)):
        start = time.perf_counter()
        model = copy.deepcopy(policy)
        train_reward_model(model, processor, records, outcome=outcome, steps=args.steps, seed=args.seed,
                           progress=False)
        reward_models[name] = (model.eval(), 1 if outcome else 16)
        timings[name] = time.perf_counter() - start
    start = time.perf_counter()
    test_items = reasoning_items("test", args.eval_items, tile_px=tile_px)
    result = evaluate_best_of_n(policy, processor, reward_models, test_items, tuple(args.ns), args.seed)
    timings["best_of_n"] = time.perf_counter() - start
    report = {"args": vars(args), "timings_s": timings, "ns": result["ns"], "curve": result["curve"],
              "train_responses": len(records), "train_steps_labelled": len(step_labels),
              "share_of_plus_steps": sum(step_labels) / max(len(step_labels), 1),
              "train_response_accuracy": sum(r[3][-1] for r in records) / max(len(records), 1)}
    (out / "results.json").write_text(json.dumps(report, indent=1))
    ax = plot_best_of_n(result["curve"], result["ns"], title="Best-of-N on the toy reasoning task")
    ax.figure.savefig(out / "best_of_n.png", dpi=120, bbox_inches="tight")
    print(json.dumps({k: v for k, v in report.items() if k != "args"}, indent=1))
    return report


if __name__ == "__main__":
    main()
