"""Smoke test of benchmarks/bench_inference.py: the tiny preset on CPU at the smallest settings.

Checks only that every measurement produces a row with positive numbers for both implementations (and that
the JSON agrees with the table); timings on a shared CPU say nothing, so none are asserted.
"""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from ivl3lab.config import get_preset

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_inference.py"


def load_script(name: str = "bench_inference"):
    """benchmarks/ is not a package: import a script from its path."""
    spec = importlib.util.spec_from_file_location(name, BENCH.with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def table_rows(text: str) -> dict[str, list[str]]:
    """Markdown table body -> {measurement name: cells}, skipping the header and separator lines."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] not in ("measurement",) and not set(cells[0]) <= {"-"}:
            rows[cells[0]] = cells
    return rows


def test_cpu_smoke_table_has_every_row(tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "bench.json"
    res = load_script().main(["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--tiles", "1",
                             "--new-tokens", "2", "--batches", "1,2", "--repeats", "1", "--warmup", "1",
                             "--require-same-tokens", "--out", str(out)])
    printed = capsys.readouterr().out
    rows = table_rows(printed)
    prompt_len = 8 + get_preset("tiny").num_image_token + 64  # make_prompt: 8 text + 1 tile + 64 text tokens
    expected = [f"prefill, 1 tiles, {prompt_len} tokens", "decode, batch 1, 2 new tokens",
                "decode, batch 2, 2 new tokens"]
    assert sorted(rows) == sorted(expected), printed
    for name in expected:
        cells = rows[name]
        ivl3lab, transformers = float(cells[2]), float(cells[3])
        assert ivl3lab > 0 and transformers > 0, cells
        assert float(cells[4].rstrip("x")) > 0, cells  # speed-up
    assert "speed-up (t_transformers / t_ivl3lab; >1 = ivl3lab faster)" in printed
    assert "transformers 5." in printed and "torch " in printed
    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(res))
    assert [r["name"] for r in saved["rows"]] == expected
    for row in saved["rows"]:
        for impl in ("ivl3lab", "transformers"):
            assert row[impl]["value"] > 0 and row[impl]["seconds"] > 0 and row[impl]["first_call_s"] > 0
    assert saved["parity_max_diff"] <= 1e-4


def test_gpu_bench_cpu_smoke_includes_the_training_row(tmp_path):
    torch.set_num_threads(1)
    module = load_script("bench_gpu")
    out = tmp_path / "gpu.json"
    res = module.main(["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--tiles", "1", "--new-tokens",
                       "2", "--batches", "1", "--repeats", "1", "--warmup", "1", "--train-batch", "2",
                       "--train-text", "8", "--out", str(out)])
    names = [r["name"] for r in res["rows"]]
    assert names[0].startswith("prefill") and names[-1].startswith("training step")
    train = res["rows"][-1]
    assert train["ivl3lab"]["value"] > 0 and train["transformers"]["value"] > 0
    assert json.loads(out.read_text())["rows"][-1]["name"] == train["name"]


def test_gpu_bench_training_only_with_compiled_variants(tmp_path):
    """--train-only skips the inference rows; compiled variants run (off CUDA the graphs mode is plain inductor)."""
    torch.set_num_threads(1)
    module = load_script("bench_gpu")
    res = module.main(["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--train-only", "--train-batch",
                       "2", "--train-text", "8", "--train-variants", "compiled,compiled_graphs"])
    (train,) = res["rows"]
    assert train["name"].startswith("training step")
    for impl in ("ivl3lab", "ivl3lab compiled", "ivl3lab compiled + CUDA graphs", "transformers"):
        assert train[impl]["value"] > 0
    assert "ivl3lab packed" not in train
    with pytest.raises(SystemExit, match="unknown --train-variants"):
        module.main(["--preset", "tiny", "--device", "cpu", "--train-only", "--train-variants", "fastest"])


def test_gpu_bench_packed_varlen_and_trainer_rows_cpu_smoke():
    """Beside the packed rows' timing, the packed row's loss against the batch's (on CPU through the dense mask, no
    layer through the kernel); the Trainer's own step in one and in two micro-batches."""
    torch.set_num_threads(1)
    res = load_script("bench_gpu").main(["--preset", "tiny", "--device", "cpu", "--dtype", "float32", "--train-only",
                                         "--train-batch", "2", "--train-text", "8", "--train-variants",
                                         "varlen,trainer_graphs,trainer_graphs_accum"])
    (train,) = res["rows"]
    batch_loss, packed_loss, kernel = train["packed_varlen_loss"]
    assert abs(batch_loss - packed_loss) <= 1e-5 and kernel.startswith("0 of 4 layers")
    for impl in ("ivl3lab packed varlen", "ivl3lab Trainer packed varlen graphs",
                 "ivl3lab Trainer packed varlen graphs, 2 micro-batches"):
        assert train[impl]["value"] > 0


def test_varlen_check_cpu_smoke():
    """benchmarks/check_varlen.py off CUDA: no kernel, so packed rows take the dense mask and match float32."""
    torch.set_num_threads(1)
    res = load_script("check_varlen").main(["--device", "cpu"])
    assert res["ok"] and res["eager"]["kernel_calls"] == 0 and res["eager"]["d_logit"] <= 1e-5


def test_train_compile_check_cpu_smoke():
    torch.set_num_threads(1)
    res = load_script("check_train_compile").main(["--device", "cpu", "--steps", "1", "--options", "blocks"])
    assert res["ok"] and res["blocks"]["loss_diff"] <= 1e-4 and res["blocks"]["seconds"] > 0


def test_decode_profile_cpu_smoke(tmp_path):
    torch.set_num_threads(1)
    module = load_script("profile_decode")
    out = tmp_path / "profile.txt"
    res = module.main(["--preset", "tiny", "--device", "cpu", "--new-tokens", "3", "--out", str(out)])
    assert res["wall_s"] > 0
    text = out.read_text()
    assert text.startswith("tiny batch 1 fixed-shape (eager, no graph off CUDA) step: 3 tokens") and "aten::" in text
