"""`Processor`: question(s) + image(s) -> input_ids / attention_mask / pixel_values, the way the original
`chat()` / `batch_chat()` build them (template 'internvl2_5', `<image>` expansion, left padding).

It never touches the model: everything the model needs to know about the prompt travels in the
returned dict (`num_patches_list`, and `layouts` for mapping visual tokens back to pixels).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from PIL import Image

from ivl3lab.processing.images import ImageSource, TileLayout, dynamic_preprocess, load_image, tiles_to_tensor
from ivl3lab.processing.template import (
    IM_END, IMAGE_PLACEHOLDER, IMG_CONTEXT, IMG_END, IMG_START, History, expand_image_placeholders,
    multi_image_prefix, render_prompt,
)
from ivl3lab.processing.tokenizer import load_tokenizer

CONFIG_NAME = "ivl3lab_processor.json"
_SETTINGS = ("image_size", "num_image_token", "min_num", "max_num", "use_thumbnail", "system_message")


def _is_image(x: Any) -> bool:
    return isinstance(x, (Image.Image, str, Path, bytes, bytearray))


class Processor:
    """Tokenizer + tiling settings. Call it on a question (or a batch) with images to get model inputs."""

    def __init__(self, tokenizer, image_size: int = 448, num_image_token: int = 256, min_num: int = 1,
                 max_num: int = 12, use_thumbnail: bool = True, system_message: Optional[str] = None):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.num_image_token = num_image_token  # LLM tokens per tile
        self.min_num = min_num
        self.max_num = max_num
        self.use_thumbnail = use_thumbnail
        self.system_message = system_message  # None -> the template's default (Chinese) system message

    def __repr__(self) -> str:
        settings = ", ".join(f"{name}={getattr(self, name)!r}" for name in _SETTINGS)
        return f"Processor({type(self.tokenizer).__name__}, {settings})"

    @classmethod
    def from_config(cls, config, tokenizer) -> "Processor":
        """Settings from an `ivl3lab.config.InternVLConfig`, so tiles and token counts match the model."""
        return cls(tokenizer, image_size=config.vision.image_size, num_image_token=config.num_image_token,
                   min_num=config.min_dynamic_patch, max_num=config.max_dynamic_patch,
                   use_thumbnail=config.use_thumbnail, system_message=config.system_message)

    # -- token ids ------------------------------------------------------------------------------------

    def _token_id(self, token: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(token)
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if token_id is None or (unk is not None and token_id == unk and token != self.tokenizer.unk_token):
            raise ValueError(f"the tokenizer has no {token!r} token; InternVL needs it as a special token")
        return token_id

    @property
    def image_token_id(self) -> int:
        return self._token_id(IMG_CONTEXT)

    @property
    def im_end_id(self) -> int:
        return self._token_id(IM_END)  # the chat stop token

    @property
    def img_start_id(self) -> int:
        return self._token_id(IMG_START)

    @property
    def img_end_id(self) -> int:
        return self._token_id(IMG_END)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self._token_id("<|endoftext|>")

    # -- pixels ---------------------------------------------------------------------------------------

    def load_image(self, image: ImageSource, max_num: Optional[int] = None) -> tuple[torch.Tensor, TileLayout]:
        """One image -> (pixel_values [T, 3, S, S], layout), tiled with this processor's settings."""
        tiles, layout = dynamic_preprocess(load_image(image), self.min_num, max_num or self.max_num,
                                           self.image_size, self.use_thumbnail)
        return tiles_to_tensor(tiles, size=self.image_size), layout

    def load_video(self, frames: Sequence[ImageSource]) -> tuple[torch.Tensor, list[int]]:
        """Video frames -> (pixel_values [F, 3, S, S], [1] * F): one tile per frame, no thumbnail (spec §3.3).
        Pair it with `template.video_prefix(F)` in the question."""
        tiles = [dynamic_preprocess(load_image(f), 1, 1, self.image_size, False)[0][0] for f in frames]
        return tiles_to_tensor(tiles, size=self.image_size), [1] * len(tiles)

    # -- text -----------------------------------------------------------------------------------------

    def build_prompt(self, question: str, num_patches_list: Optional[Sequence[int]] = None,
                     history: Optional[History] = None) -> str:
        """The full prompt string, image tokens expanded. As in `chat()`: with images, no history and no
        `<image>` in the question, `<image>\\n` is prepended. History questions may hold the placeholders."""
        num_patches_list = list(num_patches_list or [])
        if num_patches_list and not history and IMAGE_PLACEHOLDER not in question:
            question = f"{IMAGE_PLACEHOLDER}\n{question}"
        prompt = render_prompt(question, history, self.system_message)
        return expand_image_placeholders(prompt, num_patches_list, self.num_image_token)

    def _encode(self, prompt: str, num_tiles: int) -> list[int]:
        ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        expected, found = num_tiles * self.num_image_token, ids.count(self.image_token_id)
        if found != expected:  # a tokenizer that splits <IMG_CONTEXT>, or the token typed into the question
            raise ValueError(f"the prompt tokenises to {found} {IMG_CONTEXT} ids but {num_tiles} tiles need "
                             f"{expected}; {IMG_CONTEXT} must be one special token and not appear in the text")
        return ids

    def tokenize(self, prompts: Sequence[str], num_tiles_per_sample: Optional[Sequence[int]] = None,
                 padding_side: str = "left") -> dict:
        """Already-built prompts -> padded `input_ids` / `attention_mask`, checking each prompt's image tokens."""
        tiles = list(num_tiles_per_sample) if num_tiles_per_sample is not None else [None] * len(prompts)
        ids = [self._encode(p, t) if t is not None else self.tokenizer(p, add_special_tokens=False)["input_ids"]
               for p, t in zip(prompts, tiles)]
        input_ids, attention_mask = self._pad(ids, padding_side)
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    # -- batches --------------------------------------------------------------------------------------

    def __call__(self, questions: Union[str, Sequence[str]], images: Any = None, history: Any = None,
                 max_num: Optional[int] = None, padding_side: str = "left", return_layouts: bool = False) -> dict:
        """Model inputs for one question or a batch.

        `images`: for one question, None / an image / a list of images; for a batch, a list with one such
        entry per question. `history`: (question, answer) pairs, or for a batch one list per question.
        A sample with several images and no `<image>` placeholders gets 'Image-k: <image>' lines.
        """
        batch = not isinstance(questions, str)
        questions = list(questions) if batch else [questions]
        per_sample_images = self._split_images(images, len(questions), batch)
        histories = list(history) if batch and history is not None else [history] * len(questions)
        if len(histories) != len(questions):
            raise ValueError(f"got {len(histories)} histories for {len(questions)} questions")

        all_ids, pixel_values, num_patches_list, tiles_per_sample, layouts = [], [], [], [], []
        for question, sample_images, sample_history in zip(questions, per_sample_images, histories):
            sample_patches = []
            for image in sample_images:
                pixels, layout = self.load_image(image, max_num)
                pixel_values.append(pixels)
                layouts.append(layout)
                sample_patches.append(layout.num_tiles)
            if len(sample_images) > 1 and not sample_history and IMAGE_PLACEHOLDER not in question:
                question = multi_image_prefix(len(sample_images)) + question
            prompt = self.build_prompt(question, sample_patches, sample_history)
            all_ids.append(self._encode(prompt, sum(sample_patches)))
            num_patches_list += sample_patches
            tiles_per_sample.append(sum(sample_patches))

        input_ids, attention_mask = self._pad(all_ids, padding_side)
        out = {
            "input_ids": input_ids,  # [B, L]
            "attention_mask": attention_mask,  # [B, L], 0 on padding
            "pixel_values": torch.cat(pixel_values) if pixel_values else None,  # [T_total, 3, S, S]
            "num_patches_list": num_patches_list,  # tiles per image, in prompt order
            "num_tiles_per_sample": tiles_per_sample,
        }
        if return_layouts:
            out["layouts"] = layouts
        return out

    @staticmethod
    def _split_images(images: Any, batch_size: int, batch: bool) -> list[list]:
        """Normalise `images` to one (possibly empty) list of images per sample."""
        def as_list(entry: Any) -> list:
            if entry is None:
                return []
            return [entry] if _is_image(entry) else list(entry)

        if not batch:
            return [as_list(images)]
        if images is None:
            return [[] for _ in range(batch_size)]
        if _is_image(images) or len(images) != batch_size:
            raise ValueError(f"for a batch of {batch_size} questions, pass images as a list with one entry "
                             f"(None, an image or a list of images) per question")
        return [as_list(entry) for entry in images]

    def _pad(self, sequences: list[list[int]], padding_side: str) -> tuple[torch.Tensor, torch.Tensor]:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, seq in enumerate(sequences):
            span = slice(length - len(seq), length) if padding_side == "left" else slice(0, len(seq))
            input_ids[row, span] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, span] = 1
        return input_ids, attention_mask

    # -- output ---------------------------------------------------------------------------------------

    def decode(self, ids: Union[Sequence[int], torch.Tensor]) -> str:
        """Generated ids -> answer text: stop at the first `<|im_end|>`, drop specials, strip (like `chat()`)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if self.im_end_id in ids:
            ids = ids[: ids.index(self.im_end_id)]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        return text.split(IM_END)[0].strip()

    # -- persistence ----------------------------------------------------------------------------------

    def save_pretrained(self, directory: Union[str, Path]) -> None:
        """Tokenizer files + `ivl3lab_processor.json` with the tiling/prompt settings."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(directory))
        settings = {name: getattr(self, name) for name in _SETTINGS}
        (directory / CONFIG_NAME).write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n")

    @classmethod
    def from_pretrained(cls, directory: Union[str, Path], config=None) -> "Processor":
        """From `ivl3lab_processor.json` + the tokenizer; for a checkpoint that has no such file (a released
        model), the settings come from its `InternVLConfig` (`config=`)."""
        path = Path(directory) / CONFIG_NAME
        if path.exists():
            settings = json.loads(path.read_text())
            return cls(load_tokenizer(directory), **{k: settings[k] for k in _SETTINGS if k in settings})
        if config is None:
            raise FileNotFoundError(f"no {CONFIG_NAME} in {str(directory)!r} and no model config to take the "
                                    f"image settings from; was it saved with Processor.save_pretrained?")
        return cls.from_config(config, load_tokenizer(directory))
