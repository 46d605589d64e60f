"""Every row of the speed issue, ivl3lab beside transformers in one process on the same random weights.

    python benchmarks/bench_gpu.py --preset internvl3-1b            # prefill, decode b1/b8, training step
    python benchmarks/bench_gpu.py --preset internvl3-8b --no-train # prefill, decode b1/b8
    python benchmarks/bench_gpu.py --preset tiny --device cpu       # CPU smoke mode (CI), no timing claims

Inference rows come from bench_inference.py (same method as shared/bench/anchor_transformers.py). The training
row follows the anchor too: fp32 master weights, bf16 autocast, AdamW, batch 8 x (1 tile + 512 text tokens),
median of 5 steps after 2 warm-up steps. ivl3lab uses its chunked linear + cross-entropy (no full logits) and
fused AdamW; transformers its own `labels=` loss. Each is timed with only its own model and optimizer on the
device, so the peak memory is its own. MFU counts as the anchor does, 6 x params x tokens (LLM, embedding
included, lm_head once) + 6 x params x patches (ViT), against the anchor's 790 TFLOP/s and the chip's dense
bf16 peak.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package; loaded by path in tests
import bench_inference as bench  # noqa: E402

from ivl3lab.train.losses import chunked_loss_sums, token_weights  # noqa: E402

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense bf16, from the spec sheets
ANCHOR_PEAK = 790e12  # what the anchor's MFU column divides by
VARIANTS = {  # --train-variants key -> (row name, label in the printed table)
    "packed": ("ivl3lab packed", "the samples packed in one row (dense mask)"),
    "flex": ("ivl3lab packed flex", "packed, FlexAttention"),
    "selective": ("ivl3lab selective checkpointing", "selective activation checkpointing"),
    "compiled": ("ivl3lab compiled", "blocks compiled"),
    "compiled_flex": ("ivl3lab compiled packed flex", "packed, FlexAttention, blocks compiled"),
    "compiled_graphs": ("ivl3lab compiled + CUDA graphs", "blocks compiled as CUDA graphs"),
    "compiled_model": ("ivl3lab whole model compiled", "torch.compile of the whole model"),
    "varlen": ("ivl3lab packed varlen", "packed, varlen kernel"),
    "compiled_varlen": ("ivl3lab compiled packed varlen", "packed, varlen kernel, blocks compiled"),
    "compiled_graphs_varlen": ("ivl3lab compiled + CUDA graphs packed varlen",
                               "packed, varlen kernel, blocks compiled as CUDA graphs"),
    "trainer_graphs": ("ivl3lab Trainer packed varlen graphs",
                       "the Trainer's step: the 8 packed in a row, varlen, compile='graphs', clipping"),
    "trainer_graphs_accum": ("ivl3lab Trainer packed varlen graphs, 2 micro-batches",
                             "the same Trainer step in 2 micro-batches of 4 packed in a row (accumulation)"),
}


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-train", action="store_true", help="skip the training-step row")
    ap.add_argument("--train-batch", type=int, default=None, help="sequences per training step (8; tiny: 2)")
    ap.add_argument("--train-text", type=int, default=None, help="text tokens per sequence (512; tiny: 32)")
    ap.add_argument("--train-only", action="store_true", help="only the training-step row (no prefill/decode rows)")
    ap.add_argument("--train-variants", default="packed,flex,selective",
                    help=f"ivl3lab training variants to time beside the default step, comma-separated, from "
                         f"{','.join(VARIANTS)} ('compiled*': every ViT/LLM block torch.compile'd)")
    ap.add_argument("--profile-train", default=None,
                    help="write PyTorch profiles of one training step to PATH.ivl3lab.txt / PATH.transformers.txt")
    ours, rest = ap.parse_known_args(argv)
    return ours, rest


def train_row(a, train_batch: int, train_text: int, profile_path=None,
              chosen=("packed", "flex", "selective")) -> dict:
    """One mixed-precision AdamW step on 1-tile + text sequences, both implementations, same weights."""
    ours, hf = bench.build_models(a.preset, a.device, torch.float32, a.seed)
    ours.train(), hf.train()
    cuda = a.device.startswith("cuda")
    if cuda:
        hf.to("cpu")  # each implementation is measured alone on the device
    cfg = ours.config
    ids, mask, pixels = bench.make_prompt(cfg, 1, train_text, train_batch, a.device, torch.float32, a.seed + 9)
    labels = ids.masked_fill(ids == cfg.image_token_id, -100)
    fused = a.device.startswith("cuda")
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-5, fused=fused)
    opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-5, fused=fused)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=fused)
    weights = token_weights(labels)

    def ours_step(model=ours):
        with autocast:
            out = model(ids, pixel_values=pixels, compute_logits=False)
            total, n = chunked_loss_sums(out.hidden_states, ours.lm_head, labels, weights, chunk=1024)
        (total / n).backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    # the same 8 samples packed into one row: positions restart and attention stays inside each sample
    length = ids.shape[1]
    packed = dict(input_ids=ids.reshape(1, -1), position_ids=torch.arange(length, device=a.device).repeat(train_batch)[None],
                  segment_ids=torch.arange(train_batch, device=a.device).repeat_interleave(length)[None])
    packed_labels = labels.reshape(1, -1)
    packed_weights = token_weights(packed_labels, packed["segment_ids"])

    def ours_packed_step():
        with autocast:
            out = ours(**packed, pixel_values=pixels, compute_logits=False)
            total, n = chunked_loss_sums(out.hidden_states, ours.lm_head, packed_labels, packed_weights, chunk=1024)
        (total / n).backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    trainers = {}  # grad_accum -> Trainer

    def trainer_step(accum):  # Trainer.train_step as it runs in a training run, on the same 8 samples
        from ivl3lab.train.data import Batch
        from ivl3lab.train.loop import Trainer, TrainConfig

        per_micro = train_batch // accum

        def micro_batch(step, micro, rank, world):  # micro-batch m: its samples packed in one row
            rows = slice(micro * per_micro, (micro + 1) * per_micro)
            row_ids = ids[rows].reshape(1, -1)
            return Batch(row_ids, labels[rows].reshape(1, -1), torch.ones_like(row_ids), pixels[rows], [per_micro],
                         position_ids=packed["position_ids"][:, :row_ids.shape[1]],
                         segment_ids=packed["segment_ids"][:, :row_ids.shape[1]])

        def step():
            if accum not in trainers:
                cfg_t = TrainConfig(steps=10 ** 9, lr=1e-5, warmup_steps=0, grad_accum=accum, compile="graphs",
                                    loss_chunk=1024)
                trainers[accum] = Trainer(ours, cfg_t, micro_batch)
            ours.set_attn_implementation("flash").compile_blocks(mode="reduce-overhead")  # what the Trainer sets
            try:
                trainers[accum].train_step()
            finally:
                ours.set_attn_implementation("sdpa").compile_blocks(False)
        return step

    def hf_step():
        with autocast:
            loss = hf(input_ids=ids, pixel_values=pixels, labels=labels).loss
        loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    tokens = ids.numel()
    tied = cfg.text.tie_word_embeddings
    p_llm = sum(p.numel() for p in ours.language.parameters()) + (0 if tied else ours.lm_head.weight.numel())
    p_vit = sum(p.numel() for p in ours.vision.parameters())
    flops = 6 * p_llm * tokens + 6 * p_vit * train_batch * (1 + cfg.vision.grid_size ** 2)
    row = dict(name=f"training step, {train_batch} x (1 tile + {train_text} text)", unit="tok/s",
               higher_is_better=True)

    def with_settings(fn, backend="sdpa", checkpointing=False, compile_blocks=False, mode=None):
        def step():
            ours.set_attn_implementation(backend).set_gradient_checkpointing(checkpointing)
            if compile_blocks:  # static shapes: each layout gets its own graph, none falls back to dynamic shapes
                ours.compile_blocks(dynamic=False, **({"mode": mode} if mode else {}))
            if mode == "reduce-overhead":  # a new training step: the previous step's graph outputs are dead
                torch.compiler.cudagraph_mark_step_begin()
            try:
                fn()
            finally:
                ours.set_attn_implementation("sdpa").set_gradient_checkpointing(False).compile_blocks(False)
        return step

    steps = {"packed": with_settings(ours_packed_step),  # block-diagonal mask, SDPA
             "flex": with_settings(ours_packed_step, backend="flex"),  # block-sparse FlexAttention
             "selective": with_settings(ours_step, checkpointing="selective"),
             "compiled": with_settings(ours_step, compile_blocks=True),
             "compiled_flex": with_settings(ours_packed_step, backend="flex", compile_blocks=True),
             "compiled_graphs": with_settings(ours_step, compile_blocks=True, mode="reduce-overhead"),
             "compiled_model": with_settings(lambda: ours_step(whole)),
             "varlen": with_settings(ours_packed_step, backend="flash"),  # PackedRows: flash-attn's or torch's kernel
             "compiled_varlen": with_settings(ours_packed_step, backend="flash", compile_blocks=True),
             "compiled_graphs_varlen": with_settings(ours_packed_step, backend="flash", compile_blocks=True,
                                                     mode="reduce-overhead"),
             "trainer_graphs": trainer_step(1), "trainer_graphs_accum": trainer_step(2)}
    whole = torch.compile(ours, dynamic=False)  # graph breaks where the forward needs host values
    variants = {VARIANTS[key][0]: steps[key] for key in chosen}
    if any("varlen" in key or "trainer" in key for key in chosen):  # the packed rows compute the batch's loss
        row["packed_varlen_loss"] = packed_varlen_loss(ours, ids, pixels, labels, packed, packed_labels, autocast)
        print(f"loss of the batch / of the packed row through the varlen kernel: {row['packed_varlen_loss']}",
              flush=True)
    profiled = {"ivl3lab", "transformers", "ivl3lab compiled", "ivl3lab compiled + CUDA graphs",
                "ivl3lab compiled + CUDA graphs packed varlen", "ivl3lab Trainer packed varlen graphs",
                "ivl3lab Trainer packed varlen graphs, 2 micro-batches"}
    for impl, fn in (("ivl3lab", ours_step), *variants.items(), ("transformers", hf_step)):
        if cuda and impl == "transformers":  # swap: ivl3lab's model and optimizer state off the device
            opt_ours.state.clear()
            ours.to("cpu")
            hf.to(a.device)
            opt_hf = torch.optim.AdamW(hf.parameters(), lr=1e-5, fused=fused)
        for trainer in trainers.values():  # before each row, not inside its timed calls: each peak is its own
            trainer.optimizer.state.clear()
        ours.zero_grad(set_to_none=True)  # the .grad tensors a Trainer keeps
        if "Trainer" in impl:  # one AdamW state on the device: the Trainer's
            opt_ours.state.clear()
        if cuda:
            torch.cuda.empty_cache()
        try:
            m = bench.measure(fn, a.device, 3 if "graphs" in impl else 2, 5)  # CUDA graphs: warm-up, record, replay
        except Exception as e:  # reported; the other measurements still run
            if impl not in variants:
                raise
            print(f"{impl} training step failed: {type(e).__name__}: {e}"[:400], flush=True)
            continue
        row[impl] = dict(m, value=tokens / m["seconds"], tflops=flops / m["seconds"] / 1e12,
                         mfu_vs_790=flops / m["seconds"] / ANCHOR_PEAK)
        print(f"{impl}: {row[impl]['value']:.0f} tok/s, {row[impl]['mfu_vs_790']:.1%} of 790 TF, "
              f"first call {m['first_call_s']:.1f} s", flush=True)  # kept if a later variant fails or runs out
        if profile_path and impl in profiled:
            print(f"-- profile of one {impl} training step", flush=True)
            bench.profile(fn, a.device, f"{profile_path}.{impl.replace(' ', '_').replace('+', 'plus')}.txt", rows=40)
    row["speedup"] = row["transformers"]["seconds"] / row["ivl3lab"]["seconds"]
    del ours, hf, opt_ours, opt_hf
    return row


@torch.no_grad()
def packed_varlen_loss(model, ids, pixels, labels, packed, packed_labels, autocast) -> list:
    """[loss of the batch (SDPA), loss of the same samples packed in one row with backend "flash"]: equal up to
    bf16 rounding when the varlen runs are right (checked beside the timing, on the timed weights)."""
    from ivl3lab.model import ops
    from ivl3lab.train.losses import lm_loss

    losses, calls, varlen = [], [], ops._varlen
    ops._varlen = lambda *args: calls.append(1) or varlen(*args)  # counts the layers that took the kernel
    try:
        for backend, inputs, target in (("sdpa", dict(input_ids=ids), labels), ("flash", packed, packed_labels)):
            model.set_attn_implementation(backend)
            with autocast:
                logits = model(**inputs, pixel_values=pixels).logits
            losses.append(float(lm_loss(logits.float(), target, inputs.get("segment_ids"))))
    finally:
        ops._varlen = varlen
        model.set_attn_implementation("sdpa")
    kernel = "flash-attn" if ops._HAS_FLASH else "torch varlen_attn" if ops._TORCH_VARLEN else "none"
    return losses + [f"{len(calls)} of {len(model.language.layers)} layers through the varlen kernel ({kernel})"]


def main(argv=None) -> dict:
    mine, rest = parse(argv)
    a = bench.parse_args(rest)
    chosen = [k for k in mine.train_variants.split(",") if k]
    unknown = set(chosen) - set(VARIANTS)
    if unknown:  # before minutes of model building
        raise SystemExit(f"unknown --train-variants {sorted(unknown)}; choose from {','.join(VARIANTS)}")
    if mine.train_only:
        name = torch.cuda.get_device_name() if a.device.startswith("cuda") else bench.cpu_name()
        res = dict(device=a.device, device_name=name, torch=torch.__version__, preset=a.preset, rows=[])
    else:
        res = bench.main(rest)  # prints the inference table
    if not mine.no_train:
        tiny = a.preset == "tiny"
        row = train_row(a, mine.train_batch or (2 if tiny else 8), mine.train_text or (32 if tiny else 512),
                        mine.profile_train, chosen)
        res["rows"].append(row)
        o, t = row["ivl3lab"], row["transformers"]
        peak = next((v for k, v in PEAK_BF16.items() if k in res["device_name"]), None)
        mfu = lambda r: f"{r['mfu_vs_790']:.1%} of 790 TF" + (f", {r['tflops'] * 1e12 / peak:.1%} of peak" if peak else "")  # noqa: E731
        print(f"\n| {row['name']} | tok/s | {o['value']:.0f} | {t['value']:.0f} | {row['speedup']:.2f}x | "
              f"MFU ivl3lab {mfu(o)}; transformers {mfu(t)} | peak GB "
              f"{o.get('peak_gb') or 0:.1f} / {t.get('peak_gb') or 0:.1f} |", flush=True)
        for name, label in VARIANTS.values():
            if name in row:
                k = row[name]
                print(f"| same, ivl3lab, {label} | tok/s | {k['value']:.0f} | | {t['seconds'] / k['seconds']:.2f}x | "
                      f"MFU {mfu(k)} | peak GB {k.get('peak_gb') or 0:.1f} | first call {k['first_call_s']:.1f} s |",
                      flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
