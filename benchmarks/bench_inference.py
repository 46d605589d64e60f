"""Inference speed: ivl3lab vs transformers' InternVLForConditionalGeneration, same random weights, same inputs.

    python benchmarks/bench_inference.py --preset internvl3-1b --device cuda --dtype bfloat16 --out 1b.json
    python benchmarks/bench_inference.py --preset internvl3-8b --device cuda --dtype bfloat16
    python benchmarks/bench_inference.py --preset tiny --device cpu --dtype float32      # CPU smoke mode

The measurement follows shared/bench/anchor_transformers.py (which produced transformers' H200 anchor figures):
- prefill: one forward over a 13-tile prompt (8 text + 13 x 256 image + 64 text tokens), vision tower included,
  logits for the last position only; 2 warm-up calls, median of 5;
- decode: greedy generation of exactly 128 new tokens from a 1-tile prompt (8 + 256 + 32 tokens per sample) at
  batch 1 and 8; the timed call includes its prefill; tok/s = batch * new_tokens / median of 3 (1 warm-up).
Both sides use SDPA attention and their default `generate`: for transformers a dynamic KV cache, for ivl3lab
a static cache with the decode step captured as a CUDA graph (on CUDA). ivl3lab's other decode paths are timed
beside it: the plain (uncaptured) path, and with --compile-step the captured step compiled by torch.compile;
on CUDA the captured path's greedy tokens are compared with the plain path's. Weights are random but identical: the
transformers model is built from `to_hf_config` and loaded with ivl3lab's own weights, then checked to give the
same logits before anything is timed. No tokenizer is needed: prompts are made of ids directly.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import transformers

import ivl3lab
from ivl3lab.weights import to_hf_config, to_transformers_memory

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    """Real presets default to the anchor's shapes; `tiny` defaults to a CPU smoke size (seconds, not minutes)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="internvl3-1b", help="tiny, internvl3-1b, internvl3-8b, ...")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 on cuda, else float32")
    ap.add_argument("--tiles", type=int, default=None, help="tiles in the prefill prompt (13; tiny: 3)")
    ap.add_argument("--new-tokens", type=int, default=None, help="greedy tokens per decode run (128; tiny: 8)")
    ap.add_argument("--batches", default=None, help="decode batch sizes, comma-separated (1,8; tiny: 1,2)")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per row (prefill 5, decode 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per row, >= 1 (prefill 2, decode 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile-step", action="store_true", help="also time the torch.compile'd captured step")
    ap.add_argument("--profile", default=None, help="write a PyTorch profile of ivl3lab's prefill here (text)")
    ap.add_argument("--skip-prefill", action="store_true", help="decode rows only")
    ap.add_argument("--skip-plain", action="store_true", help="don't time ivl3lab's plain decode path")
    ap.add_argument("--require-same-tokens", action="store_true",
                    help="fail unless the captured step's greedy tokens equal the plain path's (float32 checks)")
    ap.add_argument("--out", default=None, help="also write the results here as JSON")
    a = ap.parse_args(argv)
    tiny = a.preset == "tiny"
    a.dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")
    a.tiles = a.tiles or (3 if tiny else 13)
    a.new_tokens = a.new_tokens or (8 if tiny else 128)
    a.batches = [int(b) for b in (a.batches or ("1,2" if tiny else "1,8")).split(",")]
    return a


def sync(device: str) -> None:
    """CUDA kernels run asynchronously: without this, timers measure launch time, not work."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform.processor() is often empty on Linux), plus the thread count."""
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return f"{name} ({torch.get_num_threads()} threads)"


def build_models(preset: str, device: str, dtype: torch.dtype, seed: int):
    """-> (ivl3lab model, transformers model) holding the same weights, both in eval mode.

    transformers' model is built in memory from our config (no 16 GB round trip through disk for 8B) and loaded
    with our state dict renamed to its in-memory names.
    """
    ours, _ = ivl3lab.build(preset, seed=seed, dtype=dtype, device=device)  # RoPE frequencies stay float32
    ours.set_attn_implementation("sdpa")

    hf_config = transformers.InternVLConfig.from_dict(to_hf_config(ours.config))
    with torch.device(device):  # public API; `dtype=` keeps RoPE buffers in float32, as from_pretrained does
        hf = transformers.AutoModelForImageTextToText.from_config(hf_config, dtype=dtype, attn_implementation="sdpa")
    assert type(hf).__name__ == "InternVLForConditionalGeneration", type(hf)
    hf.load_state_dict(to_transformers_memory(ours.state_dict()), strict=True)  # strict: every transformers parameter gets one of ours
    return ours.eval(), hf.eval()


def make_prompt(config, tiles: int, text_len: int, batch: int, device: str, dtype: torch.dtype, seed: int):
    """Anchor layout: 8 text ids, <IMG_CONTEXT> x tiles x tokens-per-tile, text_len text ids; random pixels.

    Text ids are random but never the image id; every sample of a batch has the same length (no padding).
    """
    gen = torch.Generator().manual_seed(seed)
    high = min(config.text.vocab_size, 150_000)

    def text(n):
        ids = torch.randint(100, high, (batch, n), generator=gen)
        return ids.masked_fill(ids == config.image_token_id, 100)
    image = torch.full((batch, tiles * config.num_image_token), config.image_token_id)
    ids = torch.cat([text(8), image, text(text_len)], dim=1).to(device)
    size = config.vision.image_size
    pixels = torch.randn(batch * tiles, 3, size, size, generator=gen).to(device, dtype)
    return ids, torch.ones_like(ids), pixels


@torch.inference_mode()
def check_same_weights(ours, hf, device: str, dtype: torch.dtype, seed: int) -> float:
    """Timing two different functions would be meaningless: assert equal logits on a 1-tile prompt first."""
    ids, mask, pixels = make_prompt(ours.config, 1, 16, 1, device, dtype, seed + 1)
    a = ours(ids, pixel_values=pixels, attention_mask=mask).logits.float()
    b = hf(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits.float()
    diff = (a - b).abs().max().item()
    # fp32: same math up to summation order. bf16/fp16: rounding of different (fused vs split) kernels.
    tol = 1e-4 if dtype == torch.float32 else 0.05 * b.abs().max().item()
    if not diff <= tol:
        raise AssertionError(f"ivl3lab and transformers disagree: max |logit diff| {diff:.3g} > {tol:.3g}")
    return diff


def measure(fn, device: str, warmup: int, repeats: int) -> dict:
    """Median of `repeats` timed calls after `warmup` calls; the first (cold) call is reported on its own,
    since it carries one-off costs (kernel selection, allocator growth) a user pays once."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
    times = []
    for _ in range(max(warmup, 1) + repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    out = dict(seconds=statistics.median(times[max(warmup, 1):]), first_call_s=times[0])
    if device.startswith("cuda"):  # both models stay resident: report the peak and the growth above weights
        peak = torch.cuda.max_memory_allocated()
        out.update(peak_gb=peak / 1e9, extra_gb=(peak - resident) / 1e9)
    return out


def profile(fn, device: str, path: str, rows: int = 25) -> None:
    """Kernel-level profile of one call, the most expensive operators first, written as a text table."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        fn()
        sync(device)
    key = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=rows)
    with open(path, "w") as f:
        f.write(table)
    print("\n".join(table.splitlines()[:rows // 2 + 3]), flush=True)


def run_rows(ours, hf, a, dtype: torch.dtype) -> list[dict]:
    """The prefill row and one decode row per batch size, each for both implementations."""
    cfg, rows = ours.config, []
    ids, mask, pixels = make_prompt(cfg, a.tiles, 64, 1, a.device, dtype, a.seed + 2)
    impls = {
        "ivl3lab": lambda: ours(ids, pixel_values=pixels, attention_mask=mask, use_cache=True, logits_to_keep=1),
        "transformers": lambda: hf(input_ids=ids, pixel_values=pixels, attention_mask=mask, use_cache=True,
                                   logits_to_keep=1),
    }
    row = dict(name=f"prefill, {a.tiles} tiles, {ids.shape[1]} tokens", unit="ms", higher_is_better=False)
    for impl, fn in ({} if a.skip_prefill else impls).items():
        m = measure(fn, a.device, 2 if a.warmup is None else a.warmup, a.repeats or 5)
        row[impl] = dict(m, value=m["seconds"] * 1e3)
    if not a.skip_prefill:
        rows.append(row)
    if a.profile:
        profile(impls["ivl3lab"], a.device, a.profile)

    n = a.new_tokens
    step = "CUDA graph" if a.device.startswith("cuda") else "fixed step"  # captured only on CUDA
    variants = {} if a.skip_plain else {"plain path": dict(cuda_graph=False)}
    variants[step] = dict(cuda_graph=True)
    if a.compile_step:
        variants[f"{step} + compile"] = dict(cuda_graph=True, compile_step=True)
    for b in a.batches:
        ids, mask, pixels = make_prompt(cfg, 1, 32, b, a.device, dtype, a.seed + 3 + b)

        def ours_decode(**options):
            new = ivl3lab.generate(ours, ids, attention_mask=mask, pixel_values=pixels,
                                   generation_config=dict(max_new_tokens=n, eos_token_id=None), **options)
            assert new.shape == (b, n), new.shape
            return new

        def hf_decode():
            out = hf.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0)
            assert out.shape == (b, ids.shape[1] + n), out.shape
            return out[:, ids.shape[1]:]

        row = dict(name=f"decode, batch {b}, {n} new tokens", unit="tok/s", higher_is_better=True, variants={})
        warmup, repeats = (1 if a.warmup is None else a.warmup), a.repeats or 3
        for impl, fn in (("ivl3lab", ours_decode), ("transformers", hf_decode)):
            m = measure(fn, a.device, warmup, repeats)
            row[impl] = dict(m, value=b * n / m["seconds"])
        for name, options in variants.items():
            try:
                m = measure(lambda: ours_decode(**options), a.device, warmup, repeats)
                row["variants"][name] = dict(m, value=b * n / m["seconds"])
            except Exception as e:  # a variant that fails is reported, the other rows still run
                row["variants"][name] = dict(error=f"{type(e).__name__}: {e}"[:300])
                print(f"[{row['name']}] ivl3lab {name} failed: {row['variants'][name]['error']}", flush=True)
        # Greedy tokens agree only up to the first near-tie that rounding (different kernels) breaks the other
        # way; on random weights in bf16 that comes early. transformers vs the plain path is the control.
        plain, fixed, theirs = ours_decode(cuda_graph=False), ours_decode(cuda_graph=True), hf_decode()
        row["same_tokens_as_plain"] = (plain == fixed).float().mean().item()
        row["transformers_same_tokens_as_plain"] = (plain == theirs).float().mean().item()
        if a.require_same_tokens and not torch.equal(plain, fixed):
            raise AssertionError(f"{row['name']}: the captured step's tokens differ from the plain path's "
                                 f"({row['same_tokens_as_plain']:.0%} equal)")
        rows.append(row)
    for row in rows:  # speed-up > 1 means ivl3lab is faster, for every row
        row["speedup"] = row["transformers"]["seconds"] / row["ivl3lab"]["seconds"]
    return rows


def variant_cell(row: dict) -> str:
    parts = []
    for name, m in row.get("variants", {}).items():
        parts.append(f"{name}: failed" if "error" in m else f"{name} {m['value']:.2f} ({m['first_call_s']:.2f} s)")
    if "same_tokens_as_plain" in row:
        parts.append(f"tokens = plain path: {row['same_tokens_as_plain']:.0%} (transformers: "
                     f"{row['transformers_same_tokens_as_plain']:.0%})")
    return "; ".join(parts) or "-"


def render(res: dict) -> str:
    """Markdown table, one row per measurement."""
    cuda = res["device"].startswith("cuda")
    head = ["measurement", "unit", "ivl3lab", "transformers", "speed-up (t_transformers / t_ivl3lab; >1 = ivl3lab "
            "faster)", "first call s (ivl3lab / transformers)", "other ivl3lab paths (value, first call s)"] + (["peak GB (+ above weights), ivl3lab / "
                                                                     "transformers"] if cuda else [])
    lines = [f"device: {res['device_name']} | torch {res['torch']} | transformers {res['transformers']} | "
             f"preset {res['preset']} | {res['dtype']} | attn sdpa | parity max |dlogit| {res['parity_max_diff']:.2e}",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["rows"]:
        o, t = r["ivl3lab"], r["transformers"]
        cells = [r["name"], r["unit"], f"{o['value']:.2f}", f"{t['value']:.2f}", f"{r['speedup']:.2f}x",
                 f"{o['first_call_s']:.3f} / {t['first_call_s']:.3f}", variant_cell(r)]
        if cuda:
            cells.append(f"{o['peak_gb']:.2f} (+{o['extra_gb']:.2f}) / {t['peak_gb']:.2f} (+{t['extra_gb']:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    """Build both models, check they agree, time every row, print the table; returns the results dict."""
    a = parse_args(argv)
    dtype = DTYPES[a.dtype]
    ours, hf = build_models(a.preset, a.device, dtype, a.seed)
    parity = check_same_weights(ours, hf, a.device, dtype, a.seed)
    with torch.inference_mode():
        rows = run_rows(ours, hf, a, dtype)
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else cpu_name()
    res = dict(device=a.device, device_name=name, torch=torch.__version__, transformers=transformers.__version__,
               preset=a.preset, dtype=a.dtype, threads=torch.get_num_threads(), parity_max_diff=parity,
               params=sum(p.numel() for p in ours.parameters()),
               settings=dict(tiles=a.tiles, new_tokens=a.new_tokens, batches=a.batches, repeats=a.repeats,
                             warmup=a.warmup, seed=a.seed), rows=rows)
    print(render(res), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
