"""The training loop, explicit and readable: AdamW, warmup + cosine, exact gradient accumulation, clipping,
bf16 autocast on GPU, atomic checkpoints with exact resume, a clear stop on a non-finite loss, DDP.

Data is a function `batches(step, micro, rank, world) -> Batch` that is deterministic in its arguments, so the
data position of a run is just its step counter: resuming from a checkpoint replays exactly the same batches.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist

from ..model.ops import Block
from .data import Batch
from .losses import chunked_loss_sums, loss_sums, token_weights


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    lr: float = 1e-3
    lr_vision: Optional[float] = None  # per-component learning rates (None = lr)
    lr_projector: Optional[float] = None
    lr_language: Optional[float] = None
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_accum: int = 1  # micro-batches per optimizer step
    clip_grad: float = 1.0
    loss_reduction: str = "token"  # token | sample | square
    autocast: bool = True  # bf16 autocast on CUDA (ignored on CPU)
    gradient_checkpointing: Union[bool, str] = False  # True / "full", or "selective" (see set_gradient_checkpointing)
    # True / "blocks": torch.compile each ViT/LLM block (model.compile_blocks); "graphs": the same blocks replayed
    # as CUDA graphs on CUDA (plain compiled blocks elsewhere); "model": the whole forward (graph breaks where it
    # needs host values)
    compile: Union[bool, str] = False
    loss_chunk: int = 0  # > 0: chunked linear + cross-entropy, never materialising full logits
    log_every: int = 10
    eval_every: int = 0  # 0 = never
    ckpt_every: int = 0  # 0 = only at the end
    keep_checkpoints: int = 2
    seed: int = 0


class NonFiniteLoss(RuntimeError):
    pass


# ----------------------------------------------------------------------------------------------- optimizer
def param_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """Per-component learning rates; no weight decay on norms, biases, embeddings, layer scales."""
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        tower = "vision" if ".vision." in f".{name}" else "projector" if "projector" in name else "language"
        lr = getattr(cfg, f"lr_{tower}") or cfg.lr
        decay = p.ndim >= 2 and "embed" not in name
        group = groups.setdefault((tower, decay), {"params": [], "lr": lr, "base_lr": lr, "name": tower,
                                                   "weight_decay": cfg.weight_decay if decay else 0.0})
        group["params"].append(p)
    if not groups:
        raise ValueError("no trainable parameters: everything is frozen")
    return list(groups.values())


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to 1, then cosine to min_lr_ratio at the last step."""
    return warmup_cosine(step, cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio)


def warmup_cosine(step: int, steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """The factor on the learning rate at 0-based `step`: linear warmup to 1, then cosine to min_lr_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def prepare_run(out, threads: int = 0) -> Path:
    """What every toy experiment's command line does first: set torch's threads (0 = leave as is) and create
    the output folder, returned as a Path."""
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


# ----------------------------------------------------------------------------------------------- checkpoints
def is_sharded(model) -> bool:
    """True for an FSDP2 (`fully_shard`) model, whose state_dict() holds only this rank's shards."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return isinstance(model, FSDPModule)


def full_state(model, optimizer) -> tuple[dict, dict]:
    """Model and optimizer state as whole tensors. Under FSDP2 this gathers the shards (a collective: every
    rank must call it) onto the CPU, so rank 0 writes one checkpoint, which an FSDP2 run with any number of
    processes resumes from (optimizer state is keyed by parameter name, as torch.distributed.checkpoint does)."""
    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return model.state_dict(), optimizer.state_dict()


def save_checkpoint(directory: Path, step: int, model, optimizer, extra: dict, keep: int = 2,
                    state: Optional[tuple[dict, dict]] = None) -> Path:
    """Write step-N/ under a temporary name and rename it, then point `latest` at it (both renames are atomic):
    a kill at any moment leaves the previous complete checkpoint as `latest`. `state`: (model, optimizer)
    state dicts already gathered with `full_state` (FSDP2)."""
    directory.mkdir(parents=True, exist_ok=True)
    final, tmp = directory / f"step-{step:07d}", directory / f".step-{step:07d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    model_state, optimizer_state = state or (model.state_dict(), optimizer.state_dict())
    state = {"step": step, "model": model_state, "optimizer": optimizer_state, "extra": extra,
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                     "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}}
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    pointer = directory / "latest.tmp"
    pointer.write_text(final.name)
    os.replace(pointer, directory / "latest")
    for old in sorted(directory.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(directory: Path, model, optimizer) -> tuple[int, dict]:
    """-> (step to continue from, extra state). Restores model, optimizer and every RNG."""
    name = (directory / "latest").read_text().strip()
    state = torch.load(directory / name / "state.pt", map_location="cpu", weights_only=False)
    if is_sharded(model):  # whole tensors in the file; every rank keeps its own shards of them
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True))
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"], state["extra"]


# ----------------------------------------------------------------------------------------------- the loop
@dataclass
class Trainer:
    model: torch.nn.Module
    cfg: TrainConfig
    batches: Callable[[int, int, int, int], Batch]  # (step, micro, rank, world) -> Batch
    out_dir: Optional[Path] = None
    evaluate: Optional[Callable[[torch.nn.Module, int], dict]] = None
    loss_fn: Optional[Callable] = None  # (model, batch, weights) -> (loss_sum, weight_sum, metrics); default LM loss
    wrap_ddp: bool = True  # under torch.distributed, wrap in DDP (False when the model is already FSDP-sharded)
    weights_fn: Optional[Callable] = None  # batch -> weights whose step-wide sum normalises the loss (default: tokens)
    on_step_end: Optional[Callable[[], None]] = None  # after each optimizer step (e.g. MPO's delta update)
    stateful: dict = field(default_factory=dict)  # name -> object with state_dict(): saved in checkpoints
    history: list = field(default_factory=list)

    def __post_init__(self):
        self.out_dir = Path(self.out_dir) if self.out_dir else None
        self.world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.rank = dist.get_rank() if self.world > 1 else 0
        self.device = next(self.model.parameters()).device
        self.module = self.model
        if self.cfg.gradient_checkpointing:
            self.module.set_gradient_checkpointing(self.cfg.gradient_checkpointing)
        if self.world > 1 and self.wrap_ddp:
            self.model = torch.nn.parallel.DistributedDataParallel(self.module)
        if self.cfg.compile not in (False, True, "blocks", "graphs", "model"):
            raise ValueError(f"compile must be False, True / 'blocks', 'graphs' or 'model', got {self.cfg.compile!r}")
        blocks = [m for m in self.module.modules() if isinstance(m, Block)]  # peft-wrapped models too
        if self.cfg.compile in (True, "blocks", "graphs"):
            options = {"mode": "reduce-overhead"} if self.cfg.compile == "graphs" else {}
            for block in blocks:
                if block.compile_options is None:  # keep options set by compile_blocks
                    block.compile_forward(options)
        # CUDA graphs, asked for here or by the blocks' own options: the loop must mark steps and own the gradients
        self.graphs = self.cfg.compile == "graphs" or any(
            (b.compile_options or {}).get("mode") == "reduce-overhead" for b in blocks)
        if self.graphs and self.cfg.gradient_checkpointing:
            raise ValueError("compiled blocks replayed as CUDA graphs and gradient checkpointing do not go together "
                             "(the recomputation would replay graphs inside the backward pass): use compile='blocks'")
        self.forward = torch.compile(self.model) if self.cfg.compile == "model" else self.model
        fused = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(param_groups(self.module, self.cfg), betas=self.cfg.betas, fused=fused)
        self.step = 0
        self.extra: dict = {}

    def resume(self) -> bool:
        """Continue from out_dir/latest if there is one."""
        if self.out_dir is None or not (self.out_dir / "latest").exists():
            return False
        self.step, self.extra = load_checkpoint(self.out_dir, self.module, self.optimizer)
        for name, obj in self.stateful.items():
            obj.load_state_dict(self.extra[name])
        return True

    def _micro_loss(self, batch: Batch, weights: torch.Tensor):
        if self.loss_fn is not None:
            return self.loss_fn(self.forward, batch, weights)
        if self.cfg.loss_chunk:
            out = self.forward(**batch.model_inputs(), compute_logits=False)
            total, weight = chunked_loss_sums(out.hidden_states, self.module.lm_head, batch.labels, weights,
                                              self.cfg.loss_chunk)
        else:
            out = self.forward(**batch.model_inputs())
            total, weight = loss_sums(out.logits, batch.labels, weights)
        return total, weight, {}

    def train_step(self) -> dict:
        cfg, step = self.cfg, self.step
        micro_batches = [self.batches(step, m, self.rank, self.world).to(self.device) for m in range(cfg.grad_accum)]
        weights = [self.weights_fn(b).to(self.device) if self.weights_fn else
                   token_weights(b.labels, b.segment_ids, cfg.loss_reduction) for b in micro_batches]
        total_weight = torch.stack([w.sum() for w in weights]).sum()
        if self.world > 1:
            dist.all_reduce(total_weight)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * lr_factor(step, cfg)
        autocast = torch.autocast("cuda", torch.bfloat16, enabled=cfg.autocast and self.device.type == "cuda")
        loss_total, metrics = 0.0, {}
        if self.graphs:
            self._own_gradients()
        for m, (batch, w) in enumerate(zip(micro_batches, weights)):
            sync = not hasattr(self.model, "no_sync") or m == len(micro_batches) - 1
            ctx = self.model.no_sync() if not sync else contextlib.nullcontext()
            if self.graphs:  # the previous micro-batch's graph outputs are dead: its backward pass has run
                torch.compiler.cudagraph_mark_step_begin()
            with ctx, autocast:
                total, _, extra_metrics = self._micro_loss(batch, w)
                loss = total / total_weight.clamp(min=1e-12) * self.world  # DDP averages gradients over ranks
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(f"non-finite loss ({loss.item()}) at step {step}, micro-batch {m}; "
                                        f"nothing was updated, the last good checkpoint is kept "
                                        f"({self.out_dir / 'latest' if self.out_dir else 'no checkpoint dir'})")
                loss.backward()
            loss_total += loss.detach() / self.world
            for key, value in extra_metrics.items():  # averaged over the step's micro-batches
                metrics[key] = metrics.get(key, 0.0) + value / len(micro_batches)
        if self.world > 1:
            dist.all_reduce(loss_total)
        if self.graphs:
            self._drop_untouched_gradients()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), cfg.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=not self.graphs)
        if self.on_step_end:
            self.on_step_end()
        self.step += 1
        return {**metrics, "step": self.step, "loss": float(loss_total), "grad_norm": float(grad_norm),
                "lr": self.optimizer.param_groups[0]["lr"]}

    def _own_gradients(self) -> None:
        """With CUDA graphs, a gradient the backward graph hands out lives in the graph's memory, which the next
        micro-batch's replay overwrites; autograd would keep that tensor as .grad if .grad were None. Zeroed .grad
        tensors of our own make it add into them instead (the step then zeroes them rather than dropping them)."""
        self._zeroed = {}
        for p in self.module.parameters():
            if p.requires_grad:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                self._zeroed[p] = (p.grad, p.grad._version)

    def _drop_untouched_gradients(self) -> None:
        """A parameter no micro-batch reached (the ViT on a text-only step) gets .grad None again, as without
        graphs: AdamW skips it then, instead of decaying it and moving it by its momentum."""
        for p, (grad, version) in self._zeroed.items():
            if p.grad is grad and grad._version == version:  # the same tensor, never written (not replaced)
                p.grad = None
        self._zeroed = {}  # no reference left to the dropped tensors

    def fit(self, progress: bool = True) -> list[dict]:
        from tqdm.auto import tqdm

        cfg, start_time = self.cfg, time.perf_counter()
        self.module.train()
        self.module.zero_grad(set_to_none=True)  # gradients left by earlier work must not join the first step
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not progress or self.rank != 0, desc="train")
        if self.out_dir and self.rank == 0:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        log = (self.out_dir / "log.jsonl").open("a") if self.out_dir and self.rank == 0 else None
        try:
            while self.step < cfg.steps:
                record = self.train_step()
                record["time"] = time.perf_counter() - start_time
                if self.evaluate and cfg.eval_every and (self.step % cfg.eval_every == 0 or self.step == cfg.steps):
                    self.module.eval()
                    record.update(self.evaluate(self.module, self.step))
                    self.module.train()
                self.history.append(record)
                if log:
                    log.write(json.dumps(record) + "\n")
                    log.flush()
                bar.update(1)
                if self.step % max(1, cfg.log_every) == 0:
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                if self.out_dir and ((cfg.ckpt_every and self.step % cfg.ckpt_every == 0) or self.step == cfg.steps):
                    state = full_state(self.module, self.optimizer) if is_sharded(self.module) else None
                    if self.rank == 0:
                        self.extra.update({name: obj.state_dict() for name, obj in self.stateful.items()})
                        save_checkpoint(self.out_dir, self.step, self.module, self.optimizer, self.extra,
                                        cfg.keep_checkpoints, state)
        finally:
            bar.close()
            if log:
                log.close()
        self.module.eval()
        return self.history
