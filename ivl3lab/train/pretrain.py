"""Native multimodal pre-training on the toy world, from the command line; one process or several (torchrun).

    python -m ivl3lab.train.pretrain --steps 1500 --out runs/toy                  # one process
    torchrun --nproc_per_node 2 -m ivl3lab.train.pretrain --steps 1500 --out runs/toy   # DDP (gloo on CPU)
    torchrun --nproc_per_node 8 -m ivl3lab.train.pretrain --preset internvl3-1b --fsdp ...  # FSDP2 on GPUs
    python -m ivl3lab.train.pretrain --preset internvl3-1b --attn flash --compile graphs --loss-chunk 1024 ...  # GPU

The global batch (`--batch-size`) is split over ranks and micro-batches, so the same command with more
processes follows the same loss curve. A run resumes from `--out` when a checkpoint is there.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

from ..build import build
from .loop import Trainer, TrainConfig
from .sft import set_trainable
from .toy import ToyData, make_evaluator
from .vision_warmup import warm_up_vision

TOY_SYSTEM_MESSAGE = "Answer the question."


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--out", required=True, help="checkpoints, log.jsonl and the final model/ go here")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=32, help="global batch (all ranks, all micro-batches)")
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lr-vision", type=float, default=3e-3,
                    help="the from-scratch ViT learns faster with more (used when the ViT trains: no warm-up, "
                         "or --no-freeze-vision)")
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--text-ratio", type=float, default=0.25, help="share of text-only samples (1:3 -> 0.25)")
    ap.add_argument("--loss-reduction", default="square", choices=("token", "sample", "square"))
    ap.add_argument("--pack-tokens", type=int, default=512, help="> 0: pack examples into rows of this many tokens")
    ap.add_argument("--name-shape", action="store_true",
                    help='colour answers name the shape first ("star red"; notebook 06 does, the shipped model not)')
    ap.add_argument("--every-colour", action="store_true",
                    help="ask the colour of every object of a scene (notebook 06 does, the shipped model not)")
    ap.add_argument("--max-objects", type=int, default=3)
    ap.add_argument("--vision-warmup-steps", type=int, default=300,
                    help="ViT-only dense shape/colour pre-training before the multimodal stage (0 = none)")
    ap.add_argument("--freeze-vision", action=argparse.BooleanOptionalAction, default=True,
                    help="after a warm-up, train only the projector and the LLM (the warmed-up ViT stays as it is)")
    ap.add_argument("--listing", action=argparse.BooleanOptionalAction, default=True,
                    help="add the object list ('The objects: star red 2, ...') to every image conversation")
    ap.add_argument("--vision-position-weight", type=float, default=1.0,
                    help="weight of the warm-up's where-targets: each patch's tile number and x bin (0 = off)")
    ap.add_argument("--vision-count-weight", type=float, default=0.0,
                    help="weight of the warm-up's count target: each tile's first token learns how many objects "
                         "the tile shows (0 = off)")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-per-type", type=int, default=100)
    ap.add_argument("--ckpt-every", type=int, default=250)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads per process (0 = leave as is)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--attn", default="sdpa", choices=("sdpa", "flash", "flex"),
                    help="attention backend; on a GPU, 'flash' sends packed rows to a varlen kernel")
    ap.add_argument("--compile", default="none", choices=("none", "blocks", "graphs", "model"),
                    help="torch.compile the blocks, the blocks as CUDA graphs (GPU), or the whole model")
    ap.add_argument("--loss-chunk", type=int, default=0, help="> 0: the LM head and loss this many positions at a time")
    ap.add_argument("--fsdp", action="store_true", help="shard with FSDP2 (fully_shard) instead of DDP")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def init_distributed(device: str) -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def save_final_model(model, args, processor, directory: Path, rank: int) -> None:
    """The trained model in the original checkpoint format. Under FSDP2 the shards are gathered first (every
    rank takes part) and rank 0 writes them through an ordinary, unsharded copy of the model."""
    from .loop import is_sharded

    if is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            whole, _ = build(args.preset, seed=args.seed, device="cpu", system_message=TOY_SYSTEM_MESSAGE)
            whole.load_state_dict(state)
            whole.save_pretrained(directory, format="original", processor=processor)
    elif rank == 0:
        model.save_pretrained(directory, format="original", processor=processor)


SETTINGS = "run_settings.json"


def run_settings(args: argparse.Namespace, out: Path, resuming: bool) -> dict:
    """What a run must keep from start to finish: whether the ViT trains (it sets the optimizer's parameter
    groups) and whether conversations carry the object list (it sets the data). A fresh run records them; a
    resumed one must ask for the same, or it stops with a clear message instead of torch's optimizer error."""
    wanted = {"freeze_vision": bool(args.freeze_vision and args.vision_warmup_steps), "listing": args.listing}
    if not resuming:
        return wanted
    path = out / SETTINGS
    # runs made before these options trained the ViT and had no object list
    found = json.loads(path.read_text()) if path.exists() else {"freeze_vision": False, "listing": False}
    if found != wanted:
        flags = " ".join([f"--vision-warmup-steps {max(args.vision_warmup_steps, 1)}" if found["freeze_vision"]
                          else "--no-freeze-vision", "--listing" if found["listing"] else "--no-listing"])
        raise SystemExit(f"{out} was started with {found}, this command asks for {wanted}: resume it with "
                         f"`{flags}` (the warm-up is not rerun on resume), or start a new --out")
    return found


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world = init_distributed(args.device)
    device = f"cuda:{torch.cuda.current_device()}" if args.device.startswith("cuda") else args.device
    model, processor = build(args.preset, seed=args.seed, device=device, system_message=TOY_SYSTEM_MESSAGE)
    model.set_attn_implementation(args.attn)
    tile_px = model.config.vision.image_size
    data = ToyData(processor, batch_size=args.batch_size, grad_accum=args.grad_accum, tile_px=tile_px,
                   max_objects=args.max_objects, text_ratio=args.text_ratio, pack_tokens=args.pack_tokens,
                   listing=args.listing, name_shape=args.name_shape,
                   every_colour=args.every_colour, seed=args.seed)
    # under FSDP2 an evaluation forward gathers shards, so every rank must run it (only rank 0 logs)
    evaluate = make_evaluator(processor, per_type=args.eval_per_type, tile_px=tile_px, max_objects=args.max_objects,
                              name_shape=args.name_shape) \
        if args.eval_every and (rank == 0 or args.fsdp) else None
    cfg = TrainConfig(steps=args.steps, lr=args.lr, lr_vision=args.lr_vision, warmup_steps=args.warmup,
                      grad_accum=args.grad_accum, loss_reduction=args.loss_reduction, eval_every=args.eval_every,
                      ckpt_every=args.ckpt_every, seed=args.seed, loss_chunk=args.loss_chunk,
                      compile=False if args.compile == "none" else args.compile)
    out = Path(args.out)
    resuming = (out / "latest").exists()
    settings = run_settings(args, out, resuming)
    if args.vision_warmup_steps and not resuming:  # every rank runs the same seeded warm-up, before any sharding
        warmup = warm_up_vision(model, steps=args.vision_warmup_steps, seed=args.seed,
                                position_weight=args.vision_position_weight, count_weight=args.vision_count_weight)
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
            (out / "vision_warmup.json").write_text(json.dumps(warmup, indent=1))
    if settings["freeze_vision"]:  # before the optimizer (and DDP / FSDP) see the parameters
        set_trainable(model, vision=False)
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for block in list(model.vision.layers) + list(model.language.layers):
            fully_shard(block)
        fully_shard(model)
    trainer = Trainer(model, cfg, data.batches, out_dir=out, evaluate=evaluate, wrap_ddp=not args.fsdp)
    if trainer.resume() and rank == 0:
        print(f"resumed from {out / (out / 'latest').read_text()} at step {trainer.step}")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "args.json").write_text(json.dumps(vars(args), indent=2))
        (out / SETTINGS).write_text(json.dumps(settings))  # on resume: the same settings (run_settings checked)
    history = trainer.fit(progress=not args.no_progress)
    save_final_model(model, args, processor, out / "model", rank)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return history


if __name__ == "__main__":
    main()
