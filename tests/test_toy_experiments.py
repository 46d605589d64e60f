"""The measured toy experiments' command lines run end to end (tiny settings) and write what docs cite."""
import json

import pytest

import ivl3lab

pytestmark = pytest.mark.skipif(not (ivl3lab.TOY_SFT_MODEL / "config.json").exists(),
                                reason="the SFT'd toy model is not shipped")


def test_mpo_experiment_cli(tmp_path):
    from ivl3lab.train import mpo_toy

    report = mpo_toy.main(["mpo", "--out", str(tmp_path), "--seeds", "0", "--steps", "2", "--items", "4",
                           "--samples", "2", "--captions", "1", "--eval-items", "3"])
    run = report["runs"][0]
    assert {"before", "mpo", "sft", "pairs", "mpo_seconds"} <= set(run)
    assert 0 <= run["mpo"] <= 1 and report["summary"]["mpo_minus_sft"] == pytest.approx(run["mpo"] - run["sft"])
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == report["summary"]
    assert (tmp_path / "pairs-seed0" / "pairs.jsonl").exists()


def test_test_time_scaling_cli(tmp_path):
    from ivl3lab.train import tts_toy

    report = tts_toy.main(["--out", str(tmp_path), "--train-items", "2", "--samples", "2", "--rollouts", "1",
                           "--steps", "1", "--eval-items", "2", "--ns", "1", "2"])
    assert set(report["curve"]) == {"random", "majority", "PRM", "ORM", "oracle"}
    assert all(len(v) == 2 for v in report["curve"].values())
    assert (tmp_path / "best_of_n.png").exists()


def test_v2pe_experiment_cli(tmp_path):
    from ivl3lab.train import v2pe_toy

    report = v2pe_toy.main(["--out", str(tmp_path), "--steps", "1", "--batch-size", "2", "--eval-images", "1", "2",
                            "--eval-deltas", "1", "0.25", "--eval-per-point", "2"])
    assert set(report["results"]) == {"standard (eval delta=1)", "v2pe (eval delta=1)", "v2pe (eval delta=0.25)"}
    assert report["longest_eval_sequence_tokens"][2] > report["longest_eval_sequence_tokens"][1]
