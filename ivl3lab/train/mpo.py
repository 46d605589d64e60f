"""Mixed Preference Optimization (spec §8): w_p * DPO(sigmoid) + w_q * BCO(pair, reward shift delta) + w_g * NLL.

    r_c = beta * (log pi(y_c|x) - log pi_ref(y_c|x))        (sums over response tokens)
    L_p = -log sigmoid(r_c - r_r)
    L_q = -log sigmoid(r_c - delta) - log sigmoid(-(r_r - delta))
    L_g = -log pi(y_c|x) / |y_c|                            (per sequence; "token" = mean over all chosen tokens)

delta is the running mean of past rewards (TRL 0.10.1's RunningMoments, which InternVL trained with): the
batch mean of concat(r_c, r_r) updates a count-weighted cumulative mean once per optimizer step, is frozen
during evaluation and lives in checkpoints. Current TRL dropped delta; we keep it, and log every term.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import IGNORE, Batch, chat_example, collate


@dataclass(frozen=True)
class MPOConfig:
    beta: float = 0.1
    w_pref: float = 0.8  # sigmoid (DPO) weight
    w_quality: float = 0.2  # bco_pair weight
    w_gen: float = 1.0  # generation (NLL on chosen) weight, rpo_alpha in TRL
    gen_norm: str = "length"  # "length": per-sequence mean; "token": mean over all chosen tokens of the batch


class RunningMean:
    """Count-weighted cumulative mean of batch means (TRL RunningMoments.update, mean part)."""

    def __init__(self, mean: float = 0.0, count: float = 1e-24):
        self.mean, self.count = mean, count

    def update(self, values: torch.Tensor) -> float:
        """Fold in one batch (all ranks together when torch.distributed is running)."""
        stats = torch.stack([values.float().sum(), torch.tensor(float(values.numel()), device=values.device)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stats)
        n = float(stats[1])
        batch_mean = float(stats[0]) / n
        total = self.count + n
        self.mean += (batch_mean - self.mean) * n / total
        self.count = total
        return self.mean

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.count = float(state["mean"]), float(state["count"])


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p over supervised tokens, number of them), per sequence; logits [B, L, V], labels [B, L]."""
    targets = labels[:, 1:]
    mask = targets != IGNORE
    logp = logits[:, :-1].float().log_softmax(-1).gather(-1, targets.clamp(min=0)[..., None]).squeeze(-1)
    return (logp * mask).sum(-1), mask.sum(-1)


def mpo_terms(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, chosen_lengths,
              delta: float, cfg: MPOConfig) -> dict[str, torch.Tensor]:
    """Per-pair loss terms and rewards ([P] each) from per-sequence log-prob sums."""
    r_c = cfg.beta * (chosen_logps - ref_chosen_logps)
    r_r = cfg.beta * (rejected_logps - ref_rejected_logps)
    pref = -F.logsigmoid(r_c - r_r)
    quality = -F.logsigmoid(r_c - delta) - F.logsigmoid(-(r_r - delta))
    if cfg.gen_norm == "length":
        gen = -chosen_logps / chosen_lengths.clamp(min=1)
    elif cfg.gen_norm == "token":  # every pair carries the batch's token-mean NLL
        gen = (-chosen_logps.sum() / chosen_lengths.sum().clamp(min=1)).expand_as(chosen_logps)
    else:
        raise ValueError(f"gen_norm must be 'length' or 'token', got {cfg.gen_norm!r}")
    loss = cfg.w_pref * pref + cfg.w_quality * quality + cfg.w_gen * gen
    return {"loss": loss, "loss_pref": pref, "loss_quality": quality, "loss_gen": gen,
            "reward_chosen": r_c, "reward_rejected": r_r, "margin": r_c - r_r, "accuracy": (r_c > r_r).float()}


class MPOObjective:
    """A Trainer `loss_fn` for preference batches: rows [0, P) are chosen answers, [P, 2P) rejected ones to
    the same prompts (one forward for both). The reference log-probs come from `reference(batch)`: a frozen
    copy, the same model with LoRA adapters disabled, or precomputed values (`batch.ref_logps`)."""

    def __init__(self, cfg: MPOConfig, reference=None):
        self.cfg = cfg
        self.reference = reference  # callable(batch) -> [2P] ref log-prob sums, or None for batch.ref_logps
        self.delta = RunningMean()
        self.pending: list[torch.Tensor] = []  # rewards of the current optimizer step (all micro-batches)

    @staticmethod
    def weights(batch: Batch) -> torch.Tensor:
        """The normaliser: MPO averages over pairs."""
        return torch.ones(batch.input_ids.shape[0] // 2)

    def __call__(self, forward, batch: Batch, weights: torch.Tensor):
        pairs = batch.input_ids.shape[0] // 2
        logits = forward(**batch.model_inputs()).logits
        logps, lengths = sequence_logps(logits, batch.labels)
        with torch.no_grad():
            ref = self.reference(batch) if self.reference is not None else batch.ref_logps
        terms = mpo_terms(logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:], lengths[:pairs],
                          self.delta.mean, self.cfg)
        self.pending.append(torch.cat([terms["reward_chosen"], terms["reward_rejected"]]).detach())
        metrics = {k: float(v.detach().mean()) for k, v in terms.items() if k != "loss"}
        metrics["delta"] = self.delta.mean
        return terms["loss"].sum(), weights.sum(), metrics

    def state_dict(self) -> dict:
        return {"delta": self.delta.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.delta.load_state_dict(state["delta"])

    def on_step_end(self) -> None:
        """Update delta once per optimizer step, with the rewards of all its micro-batches."""
        if self.pending:
            self.delta.update(torch.cat(self.pending))
            self.pending = []


def preference_batch(processor, items, system_message=None) -> Batch:
    """items: (question, image or None, chosen answer, rejected answer). Chosen rows first, then rejected:
    both halves share prompts and images, so one forward scores both."""
    chosen = [chat_example(processor, [(q, good)], image, system_message) for q, image, good, _ in items]
    rejected = [chat_example(processor, [(q, bad)], image, system_message) for q, image, _, bad in items]
    return collate(chosen + rejected, processor.pad_token_id)


def reference_from_model(reference_model):
    """Reference log-probs from a frozen model (a copy, or a peft model inside `adapters_disabled`)."""
    def score(batch: Batch) -> torch.Tensor:
        logits = reference_model(**batch.model_inputs()).logits
        return sequence_logps(logits, batch.labels)[0]
    return score


def reference_from_adapters(peft_model):
    """The reference policy of a LoRA run: the same module with its adapters disabled (no second copy)."""
    def score(batch: Batch) -> torch.Tensor:
        with peft_model.disable_adapter():
            logits = peft_model(**batch.model_inputs()).logits
        return sequence_logps(logits, batch.labels)[0]
    return score


def precompute_reference(reference_model, batch: Batch) -> Batch:
    """Store the reference log-probs in the batch once (saves a forward per step, and the reference's memory)."""
    with torch.no_grad():
        batch.ref_logps = reference_from_model(reference_model)(batch)
    return batch
