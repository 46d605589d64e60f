"""Tiny tokenizer (ids, round trips, shipped asset) and Processor (token accounting, batching, images)."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from ivl3lab.config import get_preset
from ivl3lab.processing.processor import Processor
from ivl3lab.processing.tokenizer import (
    SPECIAL_TOKENS, TINY_TOKENIZER_DIR, build_tiny_tokenizer, load_tiny_tokenizer, load_tokenizer,
)

torch.set_num_threads(1)

EXPECTED_IDS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<img>": 3, "</img>": 4,
                "<IMG_CONTEXT>": 5, "<quad>": 6, "</quad>": 7, "<ref>": 8, "</ref>": 9, "<box>": 10,
                "</box>": 11, "<video>": 12}


@pytest.fixture(scope="module")
def tok():
    return load_tiny_tokenizer()


@pytest.fixture(scope="module")
def proc(tok):
    return Processor.from_config(get_preset("tiny"), tok)  # 112-px tiles, 16 tokens per tile, max 6 tiles


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


def test_special_token_ids(tok):
    assert tuple(EXPECTED_IDS) == SPECIAL_TOKENS
    assert {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS} == EXPECTED_IDS
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == 0 and tok.bos_token is None
    assert tok.context_image_token_id == 5 and tok.start_image_token_id == 3 and tok.video_token_id == 12


def test_vocab_size(tok):
    assert len(tok) == 1024 and tok.backend_tokenizer.get_vocab_size() == 1024


def test_round_trip_and_special_tokens_are_single_ids(tok):
    text = "<|im_start|>user\n你好，世界！\n\n  Image-1: <img><IMG_CONTEXT></img>\t3 + 4 = 7 é<|im_end|>\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    for special, special_id in EXPECTED_IDS.items():
        ids = tok(f"a red{special}star", add_special_tokens=False)["input_ids"]
        assert ids.count(special_id) == 1 and sum(i < 13 for i in ids) == 1, special
        assert tok.decode(ids, skip_special_tokens=True) == "a redstar"


def test_build_is_deterministic_and_matches_shipped_asset():
    first, second = build_tiny_tokenizer().to_str(), build_tiny_tokenizer().to_str()
    assert first == second
    shipped = json.loads((TINY_TOKENIZER_DIR / "tokenizer.json").read_text())
    assert shipped["model"]["vocab"] == json.loads(first)["model"]["vocab"]
    assert shipped["model"]["merges"] == json.loads(first)["model"]["merges"]


def test_asset_loads_with_auto_tokenizer_and_chat_template():
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(TINY_TOKENIZER_DIR))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\n<IMG_CONTEXT>\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_tiny_preset_agrees_with_tiny_tokenizer(tok):
    config = get_preset("tiny")
    assert config.image_token_id == tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    assert config.text.vocab_size == len(tok)


def test_load_tokenizer_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------------------------
# Processor


def _image(width, height, colour=(200, 30, 30)):
    return Image.new("RGB", (width, height), colour)


def test_from_config_settings(proc):
    cfg = get_preset("tiny")
    assert (proc.image_size, proc.num_image_token, proc.min_num, proc.max_num) == (
        cfg.vision.image_size, cfg.num_image_token, cfg.min_dynamic_patch, cfg.max_dynamic_patch)
    assert (proc.min_num, proc.max_num) == (1, 6)
    ids = (proc.image_token_id, proc.im_end_id, proc.img_start_id, proc.img_end_id, proc.pad_token_id)
    assert ids == (5, 2, 3, 4, 0)


def test_missing_token_is_a_clear_error():
    class NoSpecials:
        unk_token_id = None
        pad_token_id = None

        def convert_tokens_to_ids(self, token):
            return None

    with pytest.raises(ValueError, match="<IMG_CONTEXT>"):
        Processor(NoSpecials()).image_token_id


def test_three_tile_image_token_accounting(proc):
    out = proc("What is this?", images=_image(100, 50))  # aspect 2 -> 2x1 grid + thumbnail
    ids, n = out["input_ids"][0].tolist(), proc.num_image_token
    assert out["pixel_values"].shape == (3, 3, proc.image_size, proc.image_size)
    assert out["num_patches_list"] == [3] and out["num_tiles_per_sample"] == [3]
    assert ids.count(3) == 1 and ids.count(4) == 1
    start, end = ids.index(3), ids.index(4)
    assert ids[start + 1:end] == [5] * (3 * n) and ids.count(5) == 3 * n
    assert out["attention_mask"].all()
    text = proc.tokenizer.decode(ids)
    assert text.startswith("<|im_start|>system\n你是书生·万象") and "<|im_start|>user\n<img>" in text
    assert text.endswith("</img>\nWhat is this?<|im_end|>\n<|im_start|>assistant\n")


def test_batch_is_left_padded(proc):
    questions = ["Describe the image.", "Describe the image."]
    out = proc(questions, images=[_image(100, 50), _image(60, 60)], return_layouts=True)
    assert out["num_patches_list"] == [3, 1] and out["num_tiles_per_sample"] == [3, 1]
    assert out["pixel_values"].shape[0] == 4 and len(out["layouts"]) == 2
    mask, ids = out["attention_mask"], out["input_ids"]
    n_pad = 2 * proc.num_image_token  # the second sample has 2 tiles (2 x tokens per tile) fewer
    assert mask[0].all() and not mask[1, :n_pad].any() and mask[1, n_pad:].all()
    assert (ids[1, :n_pad] == proc.pad_token_id).all()
    alone = proc(questions[1], images=_image(60, 60))["input_ids"][0]
    assert torch.equal(ids[1, n_pad:], alone)
    right = proc(questions, images=[_image(100, 50), _image(60, 60)], padding_side="right")
    assert not right["attention_mask"][1, -n_pad:].any() and torch.equal(right["input_ids"][1, :-n_pad], alone)


def test_batch_with_text_only_sample(proc):
    out = proc(["Hi", "Describe the image."], images=[None, _image(60, 60)])
    assert out["num_tiles_per_sample"] == [0, 1] and out["pixel_values"].shape[0] == 1
    assert proc("Hi")["pixel_values"] is None


def test_multi_image_prompt(proc):
    out = proc("Compare them.", images=[_image(100, 50), _image(60, 60)])
    text = proc.tokenizer.decode(out["input_ids"][0])
    assert "Image-1: <img>" in text and "</img>\nImage-2: <img>" in text and "</img>\nCompare them." in text
    assert out["num_patches_list"] == [3, 1] and out["input_ids"][0].tolist().count(5) == 4 * proc.num_image_token


def test_build_prompt_placeholder_rules(proc):
    assert "user\n<image>" not in proc.build_prompt("Q", [1])  # expanded, not left as text
    context = "<IMG_CONTEXT>" * proc.num_image_token
    assert "<|im_start|>user\n<img>" + context + "</img>\nQ<|im_end|>" in proc.build_prompt("Q", [1])
    # with history the placeholder lives in the first question; nothing is prepended to the new one
    prompt = proc.build_prompt("And?", [1], history=[("<image>\nWhat?", "A star.")])
    assert "user\n<img>" in prompt and prompt.endswith("user\nAnd?<|im_end|>\n<|im_start|>assistant\n")


def test_video_frames_are_single_tiles(proc):
    frames = [_image(320, 180, (10 * i, 0, 0)) for i in range(4)]
    pixel_values, num_patches_list = proc.load_video(frames)
    size = proc.image_size
    assert pixel_values.shape == (4, 3, size, size) and num_patches_list == [1, 1, 1, 1]
    expected = np.asarray(frames[2].resize((size, size), Image.BICUBIC), dtype=np.float32)[..., 0] / 255
    assert np.allclose(pixel_values[2, 0].numpy(), (expected - 0.485) / 0.229, atol=1e-5)


def test_placeholder_mismatch_names_both_numbers(proc):
    with pytest.raises(ValueError) as info:
        proc("<image> vs <image>", images=_image(60, 60))
    assert re.search(r"\b2\b.*placeholder.*\b1\b.*image", str(info.value))


def test_save_load_round_trip(proc, tmp_path):
    # settings that differ from both Processor's defaults and the tiny preset's, so neither can stand in for them
    custom = Processor(proc.tokenizer, image_size=168, num_image_token=36, max_num=4, system_message="Be brief.")
    custom.save_pretrained(tmp_path)
    loaded = Processor.from_pretrained(tmp_path)
    settings = (loaded.image_size, loaded.num_image_token, loaded.max_num, loaded.system_message)
    assert settings == (168, 36, 4, "Be brief.")
    a = custom("How many stars?", images=_image(100, 50))
    b = loaded("How many stars?", images=_image(100, 50))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])


def test_corrupt_bytes_raise_value_error(proc):
    with pytest.raises(ValueError, match="cannot read image"):
        proc("Q", images=b"\x89PNG\r\n\x1a\n garbage")


def test_decode_stops_at_im_end(proc):
    ids = proc.tokenizer("Answer: red<|im_end|>ignored tail", add_special_tokens=False)["input_ids"]
    assert proc.decode(ids) == "Answer: red"
    assert proc.decode(torch.tensor([1] + ids)) == "Answer: red"
