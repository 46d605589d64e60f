"""`Probe`: one question + image(s) + target answer, tokenised once — the unit every interp tool scores.

The score is log p(answer | prompt, image) = the sum of the answer tokens' log-probabilities, one scalar per
sample. Ablation, patching and attribution all report changes of this number, so it lives here once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .tokenmap import TokenMap


@dataclass
class Probe:
    input_ids: torch.Tensor  # [1, L + A]: prompt (with image tokens) then the answer
    attention_mask: torch.Tensor  # [1, L + A]
    pixel_values: Optional[torch.Tensor]  # [T, 3, S, S]
    answer_len: int  # A
    token_map: Optional[TokenMap]  # positions of image tokens in input_ids
    question: str = ""
    answer: str = ""

    @classmethod
    def build(cls, processor, question: str, images=None, answer: str = "", max_num: Optional[int] = None,
              end_with_im_end: bool = False) -> "Probe":
        """Tokenise prompt and answer; `answer` is scored as the assistant's reply (optionally + <|im_end|>)."""
        inputs = processor(question, images=images, max_num=max_num, return_layouts=True)
        answer_ids = processor.tokenizer(answer, add_special_tokens=False)["input_ids"]
        if end_with_im_end:
            answer_ids = answer_ids + [processor.im_end_id]
        if not answer_ids:
            raise ValueError("the answer to score is empty")
        answer_ids = torch.tensor([answer_ids], dtype=torch.long)
        token_map = TokenMap.from_inputs(inputs, processor) if inputs["pixel_values"] is not None else None
        return cls(input_ids=torch.cat([inputs["input_ids"], answer_ids], dim=1),
                   attention_mask=torch.cat([inputs["attention_mask"], torch.ones_like(answer_ids)], dim=1),
                   pixel_values=inputs["pixel_values"], answer_len=answer_ids.shape[1], token_map=token_map,
                   question=question, answer=answer)

    @property
    def prompt_len(self) -> int:
        return self.input_ids.shape[1] - self.answer_len

    @property
    def image_positions(self) -> torch.Tensor:
        return self.token_map.positions if self.token_map is not None else torch.zeros(0, dtype=torch.long)

    def to(self, device, dtype: Optional[torch.dtype] = None) -> "Probe":
        pv = None if self.pixel_values is None else self.pixel_values.to(device, dtype or self.pixel_values.dtype)
        return Probe(self.input_ids.to(device), self.attention_mask.to(device), pv, self.answer_len,
                     self.token_map, self.question, self.answer)

    def score(self, model, pixel_values: Optional[torch.Tensor] = None, **forward_kwargs) -> torch.Tensor:
        """log p(answer | prompt, image), shape [B] (B = 1, or the batch of `pixel_values` repeats)."""
        pv = self.pixel_values if pixel_values is None else pixel_values
        ids, mask = self.input_ids, self.attention_mask
        repeats = 1
        if pv is not None and self.pixel_values is not None and pv.shape[0] != self.pixel_values.shape[0]:
            repeats = pv.shape[0] // self.pixel_values.shape[0]  # a batch of perturbed copies (captum)
            ids, mask = ids.expand(repeats, -1), mask.expand(repeats, -1)
        out = model(ids, pv, attention_mask=mask, logits_to_keep=self.answer_len + 1, **forward_kwargs)
        return answer_logprob(out.logits, ids, self.answer_len)


def answer_logprob(logits: torch.Tensor, input_ids: torch.Tensor, answer_len: int) -> torch.Tensor:
    """Sum of log p(answer token | everything before it). logits: [B, >= A + 1, V] (the last positions)."""
    predicting = logits[:, -answer_len - 1:-1].float().log_softmax(-1)  # positions that predict the answer
    targets = input_ids[:, -answer_len:]
    return predicting.gather(-1, targets[..., None]).squeeze(-1).sum(-1)  # [B]
