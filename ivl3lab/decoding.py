"""The fast decode path: the whole decode step captured once as a CUDA graph, then replayed for every token.

A plain decode step launches over a thousand small kernels from Python; at batch 1 the GPU then waits on the
launches, not on memory. A CUDA graph replays all of them with one launch. Capture needs fixed shapes and no
host sync inside the step, so each layer runs `decode_block` against a static KV cache: the write slot and the
positions are device tensors, and attention covers the whole cache under a mask of the slots written so far.
q/k/v come from one fused projection (a copy of the weights, refreshed at every prefill so training in
between is seen). With `compile_step`, torch.compile fuses the small kernels; since `decode_block` takes the
weights as arguments, one compilation serves every layer (seconds, not the minutes of a whole-model compile).
Sampling stays outside the graph, on the device, shared with the plain path.

`generate` takes this path on CUDA when nothing needs the Python-level forward (no hook, no peft adapter, eval
mode) and says in one line why when it does not. Elsewhere the same fixed-shape step runs eagerly when asked
for (`cuda_graph=True`): that is how the CPU tests check it gives the plain path's tokens.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Optional, Sequence, Union

import torch

from .hooks import clean_name
from .model import InternVL3
from .model.language import StaticKVCache, decode_block

SLOT_ROUNDING = 128  # cache lengths are rounded up to this, so prompts of similar length share one graph
_DECODERS: "weakref.WeakKeyDictionary[InternVL3, tuple]" = weakref.WeakKeyDictionary()


def fast_path_blocker(model: InternVL3, needed_len: int = 0) -> Optional[str]:
    """Why a captured step would not compute what the model computes now, or None.

    A graph replays the kernels of the capture: a hook, an intervention or an adapter switched on or off later
    would silently not take part, and dropout would be frozen. Dynamic-NTK RoPE past max_position_embeddings
    changes its base from the positions' values, which a graph cannot look at.
    """
    if model.training:
        return "the model is in training mode"
    text = model.config.text
    if text.rope_scaling_type == "dynamic" and needed_len > text.max_position_embeddings:
        return (f"the sequence ({needed_len} tokens) passes max_position_embeddings "
                f"({text.max_position_embeddings}), where dynamic RoPE scaling needs the plain path")
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return "a global module hook is registered"
    for name, module in model.named_modules():
        if module._forward_hooks or module._forward_pre_hooks:
            return f"a hook is attached to {clean_name(name) or 'the model'}"
        if hasattr(module, "lora_A"):
            return f"a peft adapter is attached ({clean_name(name)}); merge it for the fast path"
    return None


class FixedStepDecoder:
    """A static KV cache, device-side step state and (on CUDA) the captured decode step, for one batch size
    and cache length. `prefill` runs eagerly and fills the cache; `step(token)` returns the next logits."""

    def __init__(self, model: InternVL3, batch: int, max_len: int, capture: bool,
                 compile_step: Union[bool, str] = False):
        text, device = model.config.text, model.device
        self.batch, self.max_len, self.capture = batch, max_len, capture
        self.cache = StaticKVCache(text.num_layers, batch, text.num_kv_heads, max_len, text.dim_per_head,
                                   model.dtype, device)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)  # RoPE position of `token`
        self.slot = torch.zeros(1, dtype=torch.long, device=device)  # the cache index `token` is written to
        self.key_mask = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # slots one may attend to
        self.qkv_weight: list[torch.Tensor] = []  # per layer: q/k/v projections fused, filled by _fuse_qkv
        self.qkv_bias: list[torch.Tensor] = []
        self._fuse_qkv(model)
        self.block = decode_block
        if compile_step:  # one compilation for all layers: same shapes, weights passed as arguments
            backend = "inductor" if compile_step is True else compile_step
            self.block = torch.compile(decode_block, backend=backend, fullgraph=True, dynamic=False)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.logits: Optional[torch.Tensor] = None  # the graph's output buffer [B, V]
        self.in_use = False  # set while a generation runs on it: two interleaved ones must not share the state

    def fits(self, batch: int, needed_len: int) -> bool:
        return batch == self.batch and needed_len <= self.max_len

    def prefill(self, model: InternVL3, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                pixel_values: Optional[torch.Tensor], num_tiles_per_sample: Optional[Sequence[int]]) -> torch.Tensor:
        """The prompt through the model (eager, any length) into the cache -> last logits [B, V]."""
        cache, length = self.cache, input_ids.shape[1]
        cache._length = 0  # the prompt is written at 0..length-1
        self._fuse_qkv(model)  # the fused copies follow any training since the last call
        out = model(input_ids, pixel_values=pixel_values, attention_mask=attention_mask, use_cache=True,
                    past_key_values=cache, num_tiles_per_sample=num_tiles_per_sample, logits_to_keep=1)
        self.key_mask.zero_()  # slots left over from an earlier prompt stay masked
        if attention_mask is None:
            self.key_mask[:, :length] = True
            self.position.fill_(length)
        else:  # left padding: positions count real tokens only, as the plain path's default positions do
            self.key_mask[:, :length] = attention_mask.bool()
            self.position.copy_(attention_mask.long().sum(-1, keepdim=True))
        self.slot.fill_(length)
        return out.logits[:, -1]

    def _fuse_qkv(self, model: InternVL3) -> None:
        """(Re)fill the fused q/k/v copies in place: a captured graph keeps reading the same memory."""
        for i, layer in enumerate(model.language.layers):
            a = layer.self_attn
            for fused, name in ((self.qkv_weight, "weight"), (self.qkv_bias, "bias")):
                parts = [getattr(proj, name) for proj in (a.q_proj, a.k_proj, a.v_proj)]
                if i < len(fused):
                    torch.cat(parts, out=fused[i])
                else:
                    fused.append(torch.cat(parts))

    def _step(self, model: InternVL3) -> torch.Tensor:
        """token -> next logits [B, V]; advances slot and position in place (all on the device)."""
        self.key_mask.index_fill_(1, self.slot, True)  # the new token sees itself
        language, text = model.language, model.config.text
        x = language.embed_tokens(self.token)  # [B, 1, H]
        cos, sin = language.rotary(self.position, max_position=self.max_len)
        key_mask = self.key_mask[:, None, None, :]  # [B, 1, 1, max_len]
        for i, layer in enumerate(language.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = self.block(x, cos, sin, key_mask, self.cache.keys[i], self.cache.values[i], self.slot,
                           layer.input_layernorm.weight, self.qkv_weight[i], self.qkv_bias[i], attn.o_proj.weight,
                           layer.post_attention_layernorm.weight, mlp.gate_proj.weight, mlp.up_proj.weight,
                           mlp.down_proj.weight, num_heads=text.num_heads, num_kv_heads=text.num_kv_heads,
                           eps=text.rms_norm_eps)
        logits = model.lm_head(language.norm(x)[:, -1])  # [B, V]
        self.slot.add_(1)
        self.position.add_(1)
        return logits

    def step(self, model: InternVL3, token: torch.Tensor) -> torch.Tensor:
        """token [B] -> logits [B, V]. On CUDA the returned tensor is overwritten by the next step."""
        self.token.copy_(token[:, None])
        if not self.capture:
            return self._eager_step(model)
        if self.graph is None:
            try:
                self._capture_graph(model)
            except RuntimeError as error:  # an op that cannot be captured: stay correct, only slower
                warnings.warn(f"generate: capturing the decode step as a CUDA graph failed ({error}); this "
                              f"decoder runs it uncaptured", stacklevel=2)
                self.graph, self.capture = None, False
                return self._eager_step(model)
        self.graph.replay()
        return self.logits

    def _eager_step(self, model: InternVL3) -> torch.Tensor:
        """`_step`, falling back from a compiled block to the plain one when torch.compile gives up: with
        fixed shapes it compiles once per (batch, cache length), and past its recompile limit it raises. A failed
        attempt has moved no state (slot and position advance last; the cache write is redone)."""
        try:
            return self._step(model)
        except Exception as error:
            if self.block is decode_block or "RecompileLimit" not in type(error).__name__:
                raise
            warnings.warn(f"compile_step: torch.compile reached its recompile limit ({type(error).__name__}); "
                          f"this decoder runs the uncompiled block", stacklevel=2)
            self.block = decode_block
            return self._step(model)

    def _capture_graph(self, model: InternVL3) -> None:
        with torch.cuda.device(self.token.device):  # the model's GPU, whichever is current
            self._capture_on_current_device(model)

    def _capture_on_current_device(self, model: InternVL3) -> None:
        state = (self.slot, self.position, self.key_mask)
        saved = [t.clone() for t in state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture: cuBLAS handles, autotuning, compilation
            for _ in range(2):
                self._eager_step(model)
                for t, s in zip(state, saved):  # each warm-up step is undone (its cache write is overwritten)
                    t.copy_(s)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # records the kernels; nothing runs, so no state moves
            self.logits = self._step(model)


def fixed_step_decoder(model: InternVL3, batch: int, needed_len: int, capture: bool,
                       compile_step: Union[bool, str] = False) -> FixedStepDecoder:
    """The model's cached decoder when it fits (same weights, shapes and options), else a new one.

    One decoder is kept per model (a graph holds its own memory pool); a copy of the model, a move or a
    dtype change (new weight tensors) gets a new one, and so does a generation started while another is still
    running on the cached one (two interleaved streams), without replacing it.
    """
    key = (capture, compile_step, model.dtype, str(model.device), model.config.attn_implementation,
           torch.is_inference_mode_enabled(),  # inference tensors cannot be updated in place outside it
           tuple(t.data_ptr() for t in model.parameters()),
           tuple(t.data_ptr() for t in model.buffers()))  # RoPE's inv_freq is rebuilt by every .to()
    cached = _DECODERS.get(model)
    rounded = -(-needed_len // SLOT_ROUNDING) * SLOT_ROUNDING  # never past RoPE's bound unless needed
    max_len = max(needed_len, min(rounded, model.config.text.max_position_embeddings))
    if cached is not None and cached[1].in_use:
        return FixedStepDecoder(model, batch, max_len, capture, compile_step)
    if cached is not None and cached[0] == key and cached[1].fits(batch, needed_len):
        return cached[1]
    _DECODERS.pop(model, None)  # free the old graph's memory before capturing a new one
    decoder = FixedStepDecoder(model, batch, max_len, capture, compile_step)
    _DECODERS[model] = (key, decoder)
    return decoder
