"""The 'internvl2_5' template, pinned with literal strings (spec §4.1, §4.3, §7)."""
import pytest
import torch

from ivl3lab.processing.template import (
    DEFAULT_SYSTEM_MESSAGE, expand_image_placeholders, image_tokens, multi_image_prefix, render_conversation,
    render_prompt, video_prefix,
)

torch.set_num_threads(1)

SYS = "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"


def test_default_system_message_is_the_exact_string():
    assert DEFAULT_SYSTEM_MESSAGE == SYS


def test_render_single_turn():
    assert render_prompt("Describe the image.") == (
        "<|im_start|>system\n" + SYS + "<|im_end|>\n"
        "<|im_start|>user\nDescribe the image.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_render_with_history_and_custom_system():
    prompt = render_prompt("And now?", history=[("Q1", "A1"), ("Q2", "A2")], system_message="Be brief.")
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n<|im_start|>assistant\nA2<|im_end|>\n"
        "<|im_start|>user\nAnd now?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_render_empty_system_message_is_kept_empty():
    assert render_prompt("q", system_message="").startswith("<|im_start|>system\n<|im_end|>\n")


def test_render_conversation_masks_prefix_and_trailing_newline():
    segments = render_conversation([
        {"role": "user", "content": "What?"}, {"role": "assistant", "content": "A star."},
        {"role": "user", "content": "Colour?"}, {"role": "assistant", "content": "Red."},
    ])
    assert segments == [
        ("<|im_start|>system\n" + SYS + "<|im_end|>\n", False),
        ("<|im_start|>user\nWhat?<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False), ("A star.<|im_end|>", True), ("\n", False),
        ("<|im_start|>user\nColour?<|im_end|>\n", False),
        ("<|im_start|>assistant\n", False), ("Red.<|im_end|>", True), ("\n", False),
    ]
    # the segments concatenate to the same text the inference template would produce for that history
    text = "".join(s for s, _ in segments)
    assert text == render_prompt("Colour?", [("What?", "A star.")]) + "Red.<|im_end|>\n"


def test_render_conversation_system_message_replaces_default():
    segments = render_conversation([{"role": "system", "content": "S"}, {"role": "user", "content": "u"}])
    assert segments == [("<|im_start|>system\nS<|im_end|>\n", False), ("<|im_start|>user\nu<|im_end|>\n", False)]
    with pytest.raises(ValueError, match="position 1"):
        render_conversation([{"role": "user", "content": "u"}, {"role": "system", "content": "S"}])
    with pytest.raises(ValueError, match="'tool'"):
        render_conversation([{"role": "tool", "content": "x"}])


def test_image_tokens():
    assert image_tokens(2, 3) == "<img>" + "<IMG_CONTEXT>" * 6 + "</img>"
    assert image_tokens(1, 1) == "<img><IMG_CONTEXT></img>"


def test_expand_placeholders_in_order():
    prompt = "Image-1: <image>\nImage-2: <image>\nCompare."
    assert expand_image_placeholders(prompt, [2, 1], 1) == (
        "Image-1: <img><IMG_CONTEXT><IMG_CONTEXT></img>\nImage-2: <img><IMG_CONTEXT></img>\nCompare."
    )
    assert expand_image_placeholders("no images", [], 256) == "no images"


def test_expand_placeholder_count_mismatch_names_both_numbers():
    with pytest.raises(ValueError) as info:
        expand_image_placeholders("<image> and <image>", [3, 1, 2], 4)
    message = str(info.value)
    assert "2 <image> placeholders" in message and "3 images" in message and "[3, 1, 2]" in message


def test_prefixes():
    assert multi_image_prefix(2) == "Image-1: <image>\nImage-2: <image>\n"
    assert video_prefix(3) == "Frame1: <image>\nFrame2: <image>\nFrame3: <image>\n"
    assert multi_image_prefix(0) == ""
