"""The 'internvl2_5' conversation template (ChatML with a default Chinese system message), spec §4.1 / §4.3.

Plain string functions, no tokenizer: what the model sees is decided here, and tests pin it literally.
"""
from __future__ import annotations

from typing import Optional, Sequence

DEFAULT_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，"
    "是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)

IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
IMAGE_PLACEHOLDER = "<image>"  # user-facing; replaced by image_tokens() before tokenisation, never a token itself
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ASSISTANT_PREFIX = f"{IM_START}assistant\n"  # opens the model's turn; never supervised

History = Sequence[tuple[str, str]]


def _system_turn(system_message: Optional[str]) -> str:
    system = DEFAULT_SYSTEM_MESSAGE if system_message is None else system_message
    return f"{IM_START}system\n{system}{IM_END}\n"


def _user_turn(text: str) -> str:
    return f"{IM_START}user\n{text}{IM_END}\n"


def render_prompt(question: str, history: Optional[History] = None, system_message: Optional[str] = None) -> str:
    """System turn, replayed (question, answer) turns, the new question and an open assistant turn,
    exactly as the original `chat()` builds it."""
    parts = [_system_turn(system_message)]
    for past_question, past_answer in history or ():
        parts.append(_user_turn(past_question))
        parts.append(f"{ASSISTANT_PREFIX}{past_answer}{IM_END}\n")
    parts.append(_user_turn(question))
    parts.append(ASSISTANT_PREFIX)
    return "".join(parts)


def render_conversation(messages: Sequence[dict], system_message: Optional[str] = None) -> list[tuple[str, bool]]:
    """A training conversation as (text, supervised) segments, following `preprocess_internvl2_5` (spec §7):
    only an answer and its `<|im_end|>` are supervised; the assistant prefix and the trailing newline are not.
    A leading {"role": "system"} message replaces the default system message. Tokenise each segment
    separately and concatenate, as the original does per turn, so the mask lines up with token boundaries."""
    messages = list(messages)
    if messages and messages[0]["role"] == "system":
        system_message, messages = messages[0]["content"], messages[1:]
    segments = [(_system_turn(system_message), False)]
    for i, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if role == "user":
            segments.append((_user_turn(content), False))
        elif role == "assistant":
            segments += [(ASSISTANT_PREFIX, False), (f"{content}{IM_END}", True), ("\n", False)]
        elif role == "system":
            raise ValueError(f"a system message is only allowed first, found one at position {i}")
        else:
            raise ValueError(f"unknown role {role!r} at position {i} (expected 'user', 'assistant' or 'system')")
    return segments


def image_tokens(num_tiles: int, num_image_token: int) -> str:
    """`<img>` + one `<IMG_CONTEXT>` per visual token (num_image_token per tile) + `</img>`."""
    return f"{IMG_START}{IMG_CONTEXT * (num_image_token * num_tiles)}{IMG_END}"


def expand_image_placeholders(prompt: str, num_patches_list: Sequence[int], num_image_token: int) -> str:
    """Replace the k-th `<image>` by the tokens of image k. Unlike the original (which silently leaves a
    mismatch for the model to choke on), a count mismatch is an error here."""
    found = prompt.count(IMAGE_PLACEHOLDER)
    if found != len(num_patches_list):
        raise ValueError(
            f"the prompt has {found} {IMAGE_PLACEHOLDER} placeholders but {len(num_patches_list)} images were "
            f"given (num_patches_list={list(num_patches_list)})"
        )
    for num_tiles in num_patches_list:
        prompt = prompt.replace(IMAGE_PLACEHOLDER, image_tokens(num_tiles, num_image_token), 1)
    return prompt


def multi_image_prefix(n: int) -> str:
    """Model-card convention for several images in one question: 'Image-1: <image>\\nImage-2: <image>\\n'."""
    return "".join(f"Image-{i}: {IMAGE_PLACEHOLDER}\n" for i in range(1, n + 1))


def video_prefix(n: int) -> str:
    """Inference convention for n video frames: 'Frame1: <image>\\nFrame2: <image>\\n' (no hyphen).
    Note: the original TRAINING code writes 'Frame-1: <image>' (with a hyphen); use that when fine-tuning."""
    return "".join(f"Frame{i}: {IMAGE_PLACEHOLDER}\n" for i in range(1, n + 1))
