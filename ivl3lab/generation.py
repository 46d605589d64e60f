"""Generation and the InternVL chat API (`chat`, `batch_chat`, `stream_chat`, `generate`), outside the module.

The decode loop: one prefill over the prompt (with the image), then one token at a time against the KV cache,
either through the plain forward or, on CUDA, a captured fixed-shape step (ivl3lab.decoding). Batches are
left-padded; each sample stops at its own stop token and is padded afterwards. Streaming yields text pieces as
soon as they decode to whole characters.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, fields, replace
from typing import Iterator, Optional, Sequence, Union

import torch

from .decoding import fast_path_blocker, fixed_step_decoder
from .model import InternVL3
from .model.language import StaticKVCache


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    do_sample: bool = False  # False = greedy
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    eos_token_id: Union[int, Sequence[int], None] = None  # chat() sets <|im_end|>
    pad_token_id: Optional[int] = None  # fills finished samples; None -> 0

    @classmethod
    def coerce(cls, value: Union["GenerationConfig", dict, None], **defaults) -> "GenerationConfig":
        """Accept the dicts InternVL users pass (`dict(max_new_tokens=64, do_sample=False)`)."""
        if isinstance(value, GenerationConfig):
            return replace(value, **{k: v for k, v in defaults.items() if getattr(value, k) is None})
        value = dict(value or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown generation options {unknown}; known: {sorted(known)}")
        return cls(**{**defaults, **{k: v for k, v in value.items() if v is not None}})


def sample_next_token(logits: torch.Tensor, cfg: GenerationConfig,
                      generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """logits [B, V] -> token ids [B]: greedy, or temperature / top-k / top-p sampling."""
    if not cfg.do_sample:
        return logits.argmax(dim=-1)
    logits = logits.float() / max(cfg.temperature, 1e-6)
    if cfg.top_k > 0:
        kth = logits.topk(min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > cfg.top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def _stop_ids(cfg: GenerationConfig, device) -> torch.Tensor:
    eos = cfg.eos_token_id
    return torch.tensor([] if eos is None else [eos] if isinstance(eos, int) else list(eos), device=device,
                        dtype=torch.long)


@torch.no_grad()
def iter_tokens(model: InternVL3, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                pixel_values: Optional[torch.Tensor] = None, generation_config=None,
                num_tiles_per_sample: Optional[Sequence[int]] = None,
                generator: Optional[torch.Generator] = None, static_cache: bool = True,
                stop_check_every: int = 1, cuda_graph: Optional[bool] = None,
                compile_step: Union[bool, str] = False) -> Iterator[torch.Tensor]:
    """Yield the next token of every sample, [B], step by step; finished samples yield pad_token_id.

    static_cache: preallocate the KV cache for prompt + max_new_tokens (written in place) instead of growing
    it by concatenation; both give identical tokens (tested).
    stop_check_every: look on the host whether every sample has finished only every k steps (each look is a
    device sync); up to k - 1 extra steps of pad tokens may follow the last stop. Streaming uses 1.
    cuda_graph: None (auto) replays a captured decode step on CUDA when nothing needs the Python forward (no
    hooks, adapters or training mode; otherwise a one-line note says why not) and decodes plainly elsewhere;
    True forces the fixed-shape step (captured on CUDA, eager elsewhere), False the plain path.
    compile_step: also torch.compile the captured step (fused kernels, paid for by a compile on first use);
    a string names the torch.compile backend.
    """
    cfg = GenerationConfig.coerce(generation_config)
    stops = _stop_ids(cfg, input_ids.device)
    batch = input_ids.shape[0]
    # checked once on the host: an unpadded batch needs no mask at all, so no step syncs to inspect one
    padded = attention_mask is not None and not bool(attention_mask.all())
    attention_mask = attention_mask if padded else None
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
    needed_len = input_ids.shape[1] + cfg.max_new_tokens
    if _use_fixed_step(model, input_ids.is_cuda, needed_len, cuda_graph, static_cache):
        decoder = fixed_step_decoder(model, batch, needed_len, capture=input_ids.is_cuda, compile_step=compile_step)
        decoder.in_use = True
        try:
            logits = decoder.prefill(model, input_ids, attention_mask, pixel_values, num_tiles_per_sample)
            yield from _decode_loop(logits, lambda token: decoder.step(model, token), cfg, finished, stops,
                                    generator, stop_check_every)
        finally:
            decoder.in_use = False
        return
    cache = None
    if static_cache:
        text = model.config.text
        cache = StaticKVCache(text.num_layers, batch, text.num_kv_heads, input_ids.shape[1] + cfg.max_new_tokens,
                              text.dim_per_head, model.dtype, input_ids.device)
    out = model(input_ids, pixel_values=pixel_values, attention_mask=attention_mask, use_cache=True,
                past_key_values=cache, num_tiles_per_sample=num_tiles_per_sample, logits_to_keep=1)
    cache = out.past_key_values

    def next_logits(token):
        nonlocal attention_mask
        if padded:
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones(batch, 1)], dim=1)
        return model(token[:, None], attention_mask=attention_mask, past_key_values=cache,
                     use_cache=True).logits[:, -1]
    yield from _decode_loop(out.logits[:, -1], next_logits, cfg, finished, stops, generator, stop_check_every)


def _decode_loop(logits, next_logits, cfg: GenerationConfig, finished, stops, generator,
                 stop_check_every: int) -> Iterator[torch.Tensor]:
    """Sample, yield, stop per sample; `next_logits(token)` runs one decode step (plain or fixed-shape)."""
    for step in range(cfg.max_new_tokens):
        token = sample_next_token(logits, cfg, generator)
        token = token.masked_fill(finished, cfg.pad_token_id or 0)
        yield token
        finished |= torch.isin(token, stops)
        if step == cfg.max_new_tokens - 1 or ((step + 1) % stop_check_every == 0 and bool(finished.all())):
            return
        logits = next_logits(token)


def _use_fixed_step(model: InternVL3, on_cuda: bool, needed_len: int, cuda_graph: Optional[bool],
                    static_cache: bool) -> bool:
    if cuda_graph is False or (cuda_graph is None and not on_cuda):
        return False
    blocker = fast_path_blocker(model, needed_len) or (None if static_cache else "static_cache=False")
    if blocker is None:
        return True
    if cuda_graph:
        raise ValueError(f"cuda_graph=True, but {blocker}: a captured decode step would ignore it")
    warnings.warn(f"generate: {blocker}, so decoding takes the plain path (no CUDA graph)", stacklevel=4)
    return False


def generate(model: InternVL3, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
             pixel_values: Optional[torch.Tensor] = None, generation_config=None,
             num_tiles_per_sample: Optional[Sequence[int]] = None,
             generator: Optional[torch.Generator] = None, static_cache: bool = True,
             stop_check_every: Optional[int] = None, cuda_graph: Optional[bool] = None,
             compile_step: Union[bool, str] = False) -> torch.Tensor:
    """New tokens only, [B, T_new]; the stop token is included, positions after it hold pad_token_id.

    Whether all samples have stopped is looked at on the host only every `stop_check_every` steps (each look
    is a device sync; default 8 on CUDA, 1 elsewhere). The extra steps are cut off again here, so the tokens
    are the same as with a check every step; only a shared `generator` advances a few steps further.
    cuda_graph / compile_step: the decode path, see `iter_tokens` (default: a captured CUDA graph on CUDA)."""
    if stop_check_every is None:
        stop_check_every = 8 if input_ids.is_cuda else 1
    steps = list(iter_tokens(model, input_ids, attention_mask, pixel_values, generation_config,
                             num_tiles_per_sample, generator, static_cache, stop_check_every, cuda_graph,
                             compile_step))
    if not steps:
        return input_ids.new_zeros(input_ids.shape[0], 0)
    tokens = torch.stack(steps, dim=1)  # [B, T]
    cfg = GenerationConfig.coerce(generation_config)
    if stop_check_every > 1 and cfg.eos_token_id is not None:
        stopped = torch.isin(tokens, _stop_ids(cfg, tokens.device)).cumsum(1) > 0  # [B, T]: at or after the sample's stop token
        ended = stopped.all(0)  # [T]: every sample has stopped by this step
        if bool(ended.any()):  # keep up to the step where the last sample stopped, as a per-step check would
            tokens = tokens[:, :int(ended.float().argmax()) + 1]
    return tokens


# ------------------------------------------------------------------------------------------------ chat API
def _chat_inputs(processor, pixel_values, question, history, num_patches_list):
    if num_patches_list is None:
        num_patches_list = [pixel_values.shape[0]] if pixel_values is not None else []
    if not history and pixel_values is not None and "<image>" not in question:
        question = "<image>\n" + question  # as the original chat(): the placeholder is kept in the history
    prompt = processor.build_prompt(question, num_patches_list=num_patches_list, history=history)
    ids = processor.tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return question, ids


def _chat_config(processor, generation_config) -> GenerationConfig:
    return GenerationConfig.coerce(generation_config, eos_token_id=processor.im_end_id,
                                   pad_token_id=processor.pad_token_id)


def _device_inputs(model, ids, pixel_values):
    ids = ids.to(model.device)
    if pixel_values is not None:
        pixel_values = pixel_values.to(model.device, model.dtype)
    return ids, pixel_values


def chat(model: InternVL3, processor, pixel_values, question: str, generation_config=None, history=None,
         return_history: bool = False, num_patches_list=None, generator=None):
    """One chat turn, as the original InternVL `chat` (same arguments; the processor replaces the tokenizer)."""
    history = list(history or [])
    question, ids = _chat_inputs(processor, pixel_values, question, history, num_patches_list)
    ids, pixel_values = _device_inputs(model, ids, pixel_values)
    tokens = generate(model, ids, pixel_values=pixel_values, generation_config=_chat_config(processor, generation_config),
                      generator=generator)
    response = processor.decode(tokens[0])
    return (response, history + [(question, response)]) if return_history else response


def stream_chat(model: InternVL3, processor, pixel_values, question: str, generation_config=None, history=None,
                num_patches_list=None, generator=None) -> Iterator[str]:
    """Like `chat`, but yields the answer as text pieces while it is generated."""
    question, ids = _chat_inputs(processor, pixel_values, question, list(history or []), num_patches_list)
    ids, pixel_values = _device_inputs(model, ids, pixel_values)
    cfg = _chat_config(processor, generation_config)
    tokens: list[int] = []
    emitted = ""
    for token in iter_tokens(model, ids, pixel_values=pixel_values, generation_config=cfg, generator=generator):
        if token.item() == processor.im_end_id:
            break
        tokens.append(token.item())
        text = processor.tokenizer.decode(tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half a multi-byte character: wait for the rest
            continue
        if len(text) > len(emitted):
            yield text[len(emitted):]
            emitted = text


def batch_chat(model: InternVL3, processor, pixel_values, questions: Sequence[str], generation_config=None,
               num_patches_list=None, generator=None, answer_prefixes: Optional[Sequence[str]] = None) -> list[str]:
    """One question per sample, left-padded into one batch; `num_patches_list` gives each sample's tiles (0: no
    image). `answer_prefixes` pre-fill the start of each answer, which is then continued (only the continuation
    is returned)."""
    if pixel_values is not None and num_patches_list is None:
        raise ValueError("batch_chat needs num_patches_list (tiles per sample) when pixel_values are given")
    num_patches_list = list(num_patches_list or [0] * len(questions))
    if len(num_patches_list) != len(questions):
        raise ValueError(f"{len(questions)} questions but num_patches_list has {len(num_patches_list)} entries")
    prompts = []
    for question, tiles, prefix in zip(questions, num_patches_list, answer_prefixes or [""] * len(questions)):
        if tiles and "<image>" not in question:
            question = "<image>\n" + question
        prompts.append(processor.build_prompt(question, num_patches_list=[tiles] if tiles else []) + prefix)
    enc = processor.tokenize(prompts, num_tiles_per_sample=num_patches_list, padding_side="left")
    ids, pixel_values = _device_inputs(model, enc["input_ids"], pixel_values)
    tokens = generate(model, ids, attention_mask=enc["attention_mask"].to(model.device), pixel_values=pixel_values,
                      generation_config=_chat_config(processor, generation_config),
                      num_tiles_per_sample=num_patches_list, generator=generator)
    return [processor.decode(row) for row in tokens]
