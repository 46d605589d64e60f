"""Where the time of ivl3lab's decode goes: kernel time against wall time per token, and the top kernels.

    python benchmarks/profile_decode.py --preset internvl3-1b --batch 1 --compile-step --out prof.txt

One warm generate call (capture, compilation), then one profiled call. If the kernels' summed time per token
is close to the wall time per token, the step is bound by its kernels (their count and their bytes); if far
below, the GPU idles between steps (host work, launches).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

import ivl3lab

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ is not a package; loaded by path in tests
import bench_inference as bench  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="internvl3-1b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--compile-step", action="store_true")
    ap.add_argument("--out", default=None, help="the profile table (text)")
    a = ap.parse_args(argv)
    cuda = a.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    model, _ = ivl3lab.build(a.preset, dtype=dtype, device=a.device)
    ids, mask, pixels = bench.make_prompt(model.config, 1, 32, a.batch, a.device, dtype, 3)
    options = dict(cuda_graph=True, compile_step=a.compile_step)
    cfg = dict(max_new_tokens=a.new_tokens, eos_token_id=None)

    def decode():
        return ivl3lab.generate(model, ids, attention_mask=mask, pixel_values=pixels, generation_config=cfg,
                                **options)

    with torch.inference_mode():
        decode()  # capture (and compile) outside the measurement
        bench.sync(a.device)
        start = time.perf_counter()
        decode()
        bench.sync(a.device)
        wall = time.perf_counter() - start
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as prof:
            decode()
            bench.sync(a.device)
    events = prof.key_averages()
    kernel_s = sum(e.self_device_time_total for e in events) / 1e6 if cuda else float("nan")
    table = events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=30)
    kind = "captured" if cuda else "fixed-shape (eager, no graph off CUDA)"
    summary = (f"{a.preset} batch {a.batch} {'compiled ' if a.compile_step else ''}{kind} step: "
               f"{a.new_tokens} tokens in {wall * 1e3:.1f} ms ({a.batch * a.new_tokens / wall:.0f} tok/s), "
               f"{wall / a.new_tokens * 1e3:.3f} ms per step (prefill included); kernels {kernel_s * 1e3:.1f} ms "
               f"in all, {kernel_s / a.new_tokens * 1e3:.3f} ms per step")
    print(summary, flush=True)
    if a.out:
        Path(a.out).write_text(summary + "\n\n" + table)
    return dict(wall_s=wall, kernel_s=kernel_s)


if __name__ == "__main__":
    main()
