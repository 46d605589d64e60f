"""torchrun with 2 CPU processes (gloo) follows the single-process loss curve for the same global batch."""
import json
import os
import subprocess
import sys

ARGS = ["--steps", "3", "--batch-size", "4", "--warmup", "1", "--eval-every", "0", "--ckpt-every", "0",
        "--no-progress", "--threads", "1", "--max-objects", "2", "--loss-reduction", "square"]


def losses(out_dir):
    return [json.loads(line)["loss"] for line in (out_dir / "log.jsonl").read_text().splitlines()]


def test_ddp_two_processes_match_one(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, "-m", "ivl3lab.train.pretrain", "--out", str(tmp_path / "one"), *ARGS],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29561", "-m", "ivl3lab.train.pretrain", "--out", str(tmp_path / "two"), *ARGS],
                         env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-2000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    assert max(abs(a - b) for a, b in zip(one, two)) <= 1e-5
    assert (tmp_path / "two" / "model" / "model.safetensors").exists()
