"""Packed rows through the varlen kernel (flash-attn's, or PyTorch's own) against the dense mask, on a GPU:

    python benchmarks/check_varlen.py            # tiny preset, toy batch packed with padding, bf16 autocast

The CPU tests can only check our side of the kernel with stand-ins; this runs the real one. A float32 dense-mask
run is the reference; the bf16 dense-mask run says how far bf16 alone moves logits and gradients. Eager blocks,
compiled blocks and compiled blocks replayed as CUDA graphs, all through the kernel (the dense fallback is made to
raise), must stay within `--factor` times that distance (+ 1e-3). Exits non-zero otherwise. On CPU (no kernel) it
only checks that the packed rows fall back to the dense mask.
"""
from __future__ import annotations

import argparse
import sys

import torch
from torch._dynamo.utils import counters

import ivl3lab
from ivl3lab.model import ops
from ivl3lab.train.losses import lm_loss
from ivl3lab.train.toy import ToyData


def no_dense_fallback(rows):
    raise AssertionError("dense fallback on the varlen path")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--factor", type=float, default=2.0)
    a = ap.parse_args(argv)
    cuda = a.device.startswith("cuda")
    model, processor = ivl3lab.build("tiny", seed=0, system_message="Answer.", device=a.device)
    model.train()
    batch = ToyData(processor, batch_size=8, max_objects=2, pack_tokens=512).batches(0, 0).to(a.device)
    real = batch.segment_ids >= 0
    rows = ops.PackedRows(batch.segment_ids, None)
    cu = rows.cu_seqlens.tolist()
    print(f"torch {torch.__version__}; kernel: {'flash-attn' if ops._HAS_FLASH else 'torch varlen_attn'}"
          f"{'' if ops._HAS_FLASH else f' {sorted(ops._TORCH_VARLEN[1]) if ops._TORCH_VARLEN else None}'}; "
          f"{batch.segment_ids.shape[0]} rows of {batch.segment_ids.shape[1]}, runs {cu} "
          f"({cu.count(cu[-1]) - 1} empty), max_len {rows.max_len}", flush=True)

    calls, varlen, dense_fallback = [], ops._varlen, ops.PackedRows.dense

    def counted(*args):
        calls.append(1)
        return varlen(*args)

    def run(backend, autocast, mode=False, repeats=1):
        """logits at real positions and all gradients; mode: False eager blocks, None compiled, or a compile mode"""
        model.set_attn_implementation(backend)
        if mode is not False:
            model.compile_blocks(dynamic=False, **({"mode": mode} if mode else {}))
        try:
            for _ in range(repeats):  # CUDA graphs: warm up, record, replay
                if mode == "reduce-overhead":
                    torch.compiler.cudagraph_mark_step_begin()
                model.zero_grad(set_to_none=True)
                with torch.autocast("cuda", torch.bfloat16, enabled=autocast and cuda):
                    logits = model(**batch.model_inputs()).logits
                    loss = lm_loss(logits.float(), batch.labels, batch.segment_ids)
                loss.backward()
            grads = torch.cat([p.grad.flatten().float() for p in model.parameters()])
            return logits.float()[real].detach().clone(), grads
        finally:
            model.set_attn_implementation("sdpa").compile_blocks(False)

    reference = run("sdpa", False)
    dense = run("sdpa", True)
    bound = [a.factor * float((x - r).abs().max()) + 1e-3 for x, r in zip(dense, reference)]
    print(f"bf16 dense mask vs float32: max |dlogit| {bound[0] - 1e-3:.2e}, max |dgrad| {bound[1] - 1e-3:.2e} "
          f"(/ {a.factor})", flush=True)
    result, ok = {}, True
    if cuda:  # the kernel must run: the dense fallback would hide a wrong dispatch
        ops.PackedRows.dense = no_dense_fallback
    try:
        variants = (("eager", False, 1), ("compiled", None, 1), ("CUDA graphs", "reduce-overhead", 3)) if cuda else (
            ("eager", False, 1),)
        for name, mode, repeats in variants:
            calls.clear()
            ops._varlen = counted if mode is False else varlen  # counted in eager blocks (in a graph, a guard)
            torch._dynamo.reset()
            graphs = counters["stats"]["unique_graphs"]
            try:
                logits, grads = run("flash", True, mode, repeats)
            except Exception as e:  # reported; the other variants still run
                print(f"varlen {name}: FAILED {type(e).__name__}: {e}"[:600], flush=True)
                result[name], ok = dict(error=str(e)[:300]), False
                continue
            d_logit = float((logits - reference[0]).abs().max())
            d_grad = float((grads - reference[1]).abs().max())
            compiled = counters["stats"]["unique_graphs"] - graphs
            good = (d_logit <= bound[0] and d_grad <= bound[1] and (bool(calls) == cuda or mode is not False)
                    and (compiled > 0) == (mode is not False))
            result[name] = dict(d_logit=d_logit, d_grad=d_grad, kernel_calls=len(calls), graphs=compiled, ok=good)
            ok &= good
            print(f"varlen {name}: max |dlogit| {d_logit:.2e}, max |dgrad| {d_grad:.2e}"
                  f"{f', {len(calls)} kernel calls' if mode is False else f', {compiled} graphs compiled'} -> "
                  f"{'ok' if good else 'FAIL'}", flush=True)
    finally:
        ops._varlen = varlen
        ops.PackedRows.dense = dense_fallback
    result["ok"] = ok
    return result


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
