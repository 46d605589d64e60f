"""Ablations: remove part of the picture (or one attention head) and see how log p(answer) changes.

Three ways to remove image tokens at a hook point (tutorials/03_ablation.md explains why they disagree):
zero (write 0: simple, but far off-distribution), mean (the average over reference inputs with the same tile
layout: removes only what is specific to this image) and resample (another input's activation: on-distribution,
but the effect depends on the image picked). A `Scope` says which tokens: all, a tile, the thumbnail, a pixel
region, one token or a 2x2 token group. Every effect is ablated - clean log p(answer), in nats.
Sweeps run several ablations per forward (one per batch row); this batching machinery is shared with patching.py.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from tqdm.auto import tqdm

from ..hooks import ActivationCache, caching_hooks, hook_points, hooks
from .probe import Probe, answer_logprob
from .tokenmap import Box, TokenMap

DEFAULT_POINT = "hook_inputs_embeds"
TOKEN_POINTS = re.compile(r"hook_inputs_embeds|projector\.hook_(unshuffled|out)|language\.layers\.\d+\."
                          r"(hook_resid_(pre|mid|post)|hook_attn_out|hook_mlp_out|mlp\.hook_post)")


# --------------------------------------------------------------------------------------------------- scopes
@dataclass(frozen=True)
class Scope:
    """Which image tokens: all by default, narrowed by every field given. `positions(token_map)` resolves it.

    Scope(tile=2), Scope(thumbnail=True), Scope(box=(left, top, right, bottom)) (original pixels; tokens whose
    box centre is inside, via TokenMap.tokens_in_box), Scope(tile=0, row=3, col=4) (one token), Scope(tile=0,
    row=2, col=2, size=2) (the 2x2 token group rows 2-3, cols 2-3; each token already merges 2x2 ViT patches).
    """

    tile: Optional[int] = None
    thumbnail: Optional[bool] = None
    box: Optional[Box] = None
    row: Optional[int] = None  # top-left token of a size x size block (clipped at the tile's edge)
    col: Optional[int] = None
    size: int = 1
    image: int = 0

    @property
    def label(self) -> str:
        parts = [f"tile {self.tile}" if self.tile is not None else "", "thumbnail" if self.thumbnail else "",
                 "box (" + ", ".join(f"{v:.0f}" for v in self.box) + ")" if self.box else "",
                 f"({self.row},{self.col})" + (f"+{self.size}x{self.size}" if self.size > 1 else "")
                 if self.row is not None else ""]
        return " ".join(p for p in parts if p) or "all image tokens"

    def positions(self, token_map: TokenMap) -> torch.Tensor:  # [k] sequence positions; an error if k = 0
        chosen = [t.position for t in token_map.tokens if t.image == self.image
                  and (self.tile is None or t.tile == self.tile) and self.thumbnail in (None, t.thumbnail)
                  and (self.row is None or (self.row <= t.row < self.row + self.size
                                            and self.col <= t.col < self.col + self.size))]
        if self.box is not None:
            inside = set(token_map.tokens_in_box(self.box, self.image, bool(self.thumbnail)).tolist())
            chosen = [p for p in chosen if p in inside]
        if not chosen:
            raise ValueError(f"scope {self.label!r} selects no image tokens of image {self.image}")
        return torch.tensor(chosen, dtype=torch.long)


def unit_scopes(token_map: TokenMap, unit: str = "token") -> list[Scope]:
    """The units of a sweep, which partition the image tokens: every "token", 2x2 "group" or "tile"."""
    tiles = list(dict.fromkeys((t.image, t.tile) for t in token_map.tokens))
    if unit == "tile":
        return [Scope(tile=tile, image=image) for image, tile in tiles]
    if unit not in ("token", "group"):
        raise ValueError(f"unit must be 'token', 'group' or 'tile', got {unit!r}")
    step, side = (1 if unit == "token" else 2), token_map.side
    return [Scope(tile=tile, row=r, col=c, size=step, image=image) for image, tile in tiles
            for r in range(0, side, step) for c in range(0, side, step)]


def spread(values: torch.Tensor, scopes: Sequence[Scope], token_map: TokenMap) -> torch.Tensor:
    """One value per scope [S] -> one per image token [n_image_tokens] (what plot_image_scores draws)."""
    out = torch.full((len(token_map),), float("nan"))
    for value, scope in zip(torch.as_tensor(values).flatten().tolist(), scopes):
        out[torch.isin(token_map.positions, scope.positions(token_map))] = value
    return out


# ---------------------------------------------- shared machinery: score a batch of differently edited copies
def check_same_layout(a: Probe, b: Probe, names: tuple[str, str] = ("clean", "corrupted")) -> None:
    """Activations are copied token by token, so both inputs must be cut into the same tiles."""
    def describe(probe: Probe) -> str:
        layouts = probe.token_map.layouts if probe.token_map else []
        return "; ".join(f"{lay.cols}x{lay.rows} grid{' + thumbnail' if lay.has_thumbnail else ''} "
                         f"({lay.num_tiles} tile{'s' * (lay.num_tiles > 1)})" for lay in layouts) or "no image"
    if describe(a) != describe(b):
        raise ValueError(f"the {names[0]} and {names[1]} inputs need the same tile layout, but {names[0]} has "
                         f"{describe(a)} and {names[1]} has {describe(b)} (use the same aspect ratio and max_num)")


@torch.no_grad()
def score_batch(model, probe: Probe, batch: int = 1, fwd_hooks=()) -> torch.Tensor:
    """log p(answer) for `batch` copies of the probe run together, so hooks can edit each row differently [B].
    Unless a hook edits the ViT, the ViT runs once and its output is repeated per row (at hook_vision_out)."""
    fwd_hooks, pixel_values = list(fwd_hooks), probe.pixel_values.to(model.device)
    if any(str(name).startswith("vision.") for name, _ in fwd_hooks):
        pixel_values = pixel_values.repeat(batch, 1, 1, 1)  # [B*T, 3, S, S], row-major in the batch
    elif batch > 1:
        fwd_hooks.append(("hook_vision_out", lambda x, hook: x.repeat(batch, 1, 1)))
    ids, mask = (t.to(model.device).expand(batch, -1) for t in (probe.input_ids, probe.attention_mask))
    with hooks(model, fwd_hooks):
        out = model(ids, pixel_values, attention_mask=mask, logits_to_keep=probe.answer_len + 1)
    return answer_logprob(out.logits, ids, probe.answer_len).cpu()


def run_batched(model, probe: Probe, rows: Sequence, make_hooks: Callable, batch_size: int = 16,
                progress: bool = True, desc: str = "") -> torch.Tensor:
    """Score one edited copy of the probe per row [R]; `make_hooks(chunk_of_rows)` builds the hooks of a batch."""
    chunks = [rows[start:start + batch_size] for start in range(0, len(rows), batch_size)]
    return torch.cat([score_batch(model, probe, len(chunk), make_hooks(chunk))
                      for chunk in tqdm(chunks, desc=desc, disable=not progress)])


def view_index(probe: Probe, point: str, positions) -> torch.Tensor:
    """Sequence positions -> indices along the token axis of `point` seen as [rows, tokens, d]: the sequence
    for LLM points, the image tokens (tile by tile) for projector points."""
    if not TOKEN_POINTS.fullmatch(point):
        raise ValueError(f"{point!r} is not a per-token point: use hook_inputs_embeds, projector.hook_out, "
                         f"projector.hook_unshuffled or a language.layers.{{i}} residual/attn_out/mlp_out point")
    positions = torch.as_tensor(positions, dtype=torch.long)
    if not point.startswith("projector."):
        return positions
    image = probe.image_positions
    index = torch.searchsorted(image, positions).clamp(max=len(image) - 1)
    if not torch.equal(image[index], positions):
        raise ValueError(f"{point} holds image tokens only; some positions are text")
    return index


def cache_views(model, probe: Probe, points: Sequence[str]) -> dict[str, torch.Tensor]:
    """point -> its activation on the probe, as [tokens, d] (the token axis of `view_index`)."""
    cache = ActivationCache()
    score_batch(model, probe, 1, caching_hooks(cache, list(points), hook_points(model), to=None))
    return {p: cache[p].reshape(-1, cache[p].shape[-1]) for p in points}


def image_activations(model, probe: Probe, point: str) -> torch.Tensor:
    """`point`'s activation at the probe's image tokens, in token order [n_image_tokens, d]."""
    return cache_views(model, probe, [point])[point][view_index(probe, point, probe.image_positions)]


def replacing_hooks(index: dict[str, torch.Tensor], values: dict[str, torch.Tensor]) -> Callable:
    """`make_hooks` for rows {point: bool mask [M]}: row b gets values[point][m] at index[point][m] where
    mask[m] is set (index, values: [M], [M, d] per point); everything else is left as computed."""
    def replace(index: torch.Tensor, mask: torch.Tensor, values: torch.Tensor):
        def hook(act: torch.Tensor, hook) -> torch.Tensor:  # [B, L, d] or [B*T, n, d] -> seen as [B, tokens, d]
            flat = act.reshape(mask.shape[0], -1, act.shape[-1]).clone()
            idx, keep = index.to(act.device), ~mask.to(act.device)[..., None]  # [M], [B, M, 1]
            flat[:, idx] = torch.where(keep, flat[:, idx], values.to(act))
            return flat.reshape(act.shape)
        return hook

    def make_hooks(rows: Sequence[dict]) -> list:
        fwd_hooks = []
        for point in {p for row in rows for p in row}:
            none = torch.zeros(len(index[point]), dtype=torch.bool)
            mask = torch.stack([row.get(point, none) for row in rows])  # [B, M]
            fwd_hooks.append((point, replace(index[point], mask, values[point])))
        return fwd_hooks
    return make_hooks


# ------------------------------------------------------------------------------------ image-token ablation
def ablation_values(model, probe: Probe, method: str = "zero", point: str = DEFAULT_POINT,
                    reference: Union[Probe, Sequence[Probe], None] = None) -> torch.Tensor:
    """What to write at the image tokens [n_image_tokens, d]: zeros, the mean over `reference` probes, or the
    activation of the `reference` probe (resample)."""
    if method == "zero":
        return torch.zeros_like(image_activations(model, probe, point))
    refs = [reference] if isinstance(reference, Probe) else list(reference or [])
    if method not in ("mean", "resample") or not refs or (method == "resample" and len(refs) != 1):
        raise ValueError(f"method must be 'zero', 'mean' (reference=[probes]) or 'resample' (reference=one probe); "
                         f"got {method!r} with {len(refs)} reference probe(s)")
    for ref in refs:
        check_same_layout(probe, ref, ("probe", "reference"))
    return torch.stack([image_activations(model, ref, point) for ref in refs]).mean(0, dtype=torch.float32)


def ablate_scopes(model, probe: Probe, scopes: Sequence[Scope], method: str = "zero", point: str = DEFAULT_POINT,
                  reference=None, batch_size: int = 16, progress: bool = True) -> torch.Tensor:
    """Effect (ablated - clean log p(answer)) of ablating each scope on its own, several per forward. [S]"""
    image = probe.image_positions
    index = {point: view_index(probe, point, image)}
    values = {point: ablation_values(model, probe, method, point, reference)}
    rows = [{point: torch.isin(image, scope.positions(probe.token_map))} for scope in scopes]
    scores = run_batched(model, probe, rows, replacing_hooks(index, values), batch_size, progress, f"{method} ablation")
    return scores - score_batch(model, probe)


def ablate(model, probe: Probe, scope: Optional[Scope] = None, method: str = "zero", point: str = DEFAULT_POINT,
           reference=None) -> float:
    """Change of log p(answer) when the `scope`'s image tokens (default: all) are ablated at `point`."""
    return ablate_scopes(model, probe, [scope or Scope()], method, point, reference, 1, False).item()


def occlusion_sweep(model, probe: Probe, unit: str = "group", method: str = "zero", point: str = DEFAULT_POINT,
                    reference=None, batch_size: int = 16, progress: bool = True) -> torch.Tensor:
    """Ablate every token / 2x2 group / tile in turn; each image token gets its unit's effect. [n_image_tokens]"""
    scopes = unit_scopes(probe.token_map, unit)
    effects = ablate_scopes(model, probe, scopes, method, point, reference, batch_size, progress)
    return spread(effects, scopes, probe.token_map)


# ------------------------------------------------------------------------------------------ head ablation
def head_sweep(model, probe: Probe, tower: str = "language", layers: Optional[Sequence[int]] = None,
               heads: Optional[Sequence[int]] = None, tiles: Optional[Sequence[int]] = None, text_to_image_only=False,
               renormalize: bool = False, batch_size: int = 16, progress: bool = True) -> torch.Tensor:
    """Effect of zeroing each head on its own [layers, heads] (default: all): its slice of `hook_z` (before the
    output projection), in the vision tower optionally only in `tiles`. `text_to_image_only` (language) instead
    zeroes the head's attention from text queries to image keys; `renormalize` rescales the rest of each row to
    sum to 1 (as if image keys were masked before the softmax), else the image share of the output is removed."""
    if tower not in ("vision", "language") or (text_to_image_only and tower == "vision"):
        raise ValueError("tower must be 'vision' or 'language'; text_to_image_only is for the language tower")
    cfg = model.config.vision if tower == "vision" else model.config.text
    layers = list(range(cfg.num_layers)) if layers is None else list(layers)
    heads = list(range(cfg.num_heads)) if heads is None else list(heads)
    rows = [(layer, head) for layer in layers for head in heads]
    is_image = torch.isin(torch.arange(probe.input_ids.shape[1]), probe.image_positions)  # [L]
    text_to_image = ~is_image[:, None] & is_image[None, :]  # [L query, L key]
    all_tiles = torch.arange(len(probe.pixel_values))  # [T]
    in_tiles = torch.isin(all_tiles, all_tiles if tiles is None else torch.as_tensor(tiles))

    def make_hooks(chunk):
        fwd_hooks = []
        for layer in dict.fromkeys(layer for layer, _ in chunk):
            off = torch.tensor([[(l, h) == (layer, k) for k in range(cfg.num_heads)] for l, h in chunk])  # [B, H]
            if text_to_image_only:
                cut = off[:, :, None, None] & text_to_image  # [B, H, L, L]
                fwd_hooks.append((f"language.layers.{layer}.self_attn.hook_pattern", _cut_pattern(cut, renormalize)))
            elif tower == "vision":  # its hook_z has one row per tile: [B*T, N, H, D]
                off = (off[:, None, :] & in_tiles[None, :, None]).flatten(0, 1)
                fwd_hooks.append((f"vision.layers.{layer}.attn.hook_z", _zero_heads(off)))
            else:
                fwd_hooks.append((f"language.layers.{layer}.self_attn.hook_z", _zero_heads(off)))
        return fwd_hooks
    effects = run_batched(model, probe, rows, make_hooks, batch_size, progress, f"{tower} heads")
    return (effects - score_batch(model, probe)).reshape(len(layers), len(heads))


def ablate_head(model, probe: Probe, layer: int, head: int, tower: str = "language", **options) -> float:
    """Change of log p(answer) when one head is ablated; `options` as in `head_sweep`."""
    return head_sweep(model, probe, tower, [layer], [head], batch_size=1, progress=False, **options).item()


def _zero_heads(heads: torch.Tensor):  # heads [rows, H] -> a hook zeroing them in hook_z [rows, tokens, H, D]
    return lambda z, hook: z.masked_fill(heads.to(z.device)[:, None, :, None], 0.0)


def _cut_pattern(cut: torch.Tensor, renormalize: bool):
    def hook(pattern: torch.Tensor, hook) -> torch.Tensor:  # [B, H, L, L]
        pattern = pattern.masked_fill(cut.to(pattern.device), 0.0)
        return pattern / pattern.sum(-1, keepdim=True) if renormalize else pattern
    return hook


# ------------------------------------------------------------------------------------------------- plots
def plot_effects(effects: dict, title: str = "ablation effect", ax=None):
    """Bar chart of {label: effect} (or {label: {method: effect}} for grouped bars); < 0 = answer less likely."""
    import matplotlib.pyplot as plt

    grouped = {k: (v if isinstance(v, dict) else {"": v}) for k, v in effects.items()}
    methods = list(dict.fromkeys(m for v in grouped.values() for m in v))
    ax = ax or plt.subplots(figsize=(1.2 + 1.1 * len(grouped), 3.5))[1]
    width, x = 0.8 / len(methods), torch.arange(len(grouped)).numpy()
    for i, method in enumerate(methods):
        ax.bar(x + i * width, [float(v.get(method, "nan")) for v in grouped.values()], width, label=method or None)
    ax.set_xticks(x + width * (len(methods) - 1) / 2, list(grouped), rotation=30, ha="right")
    ax.axhline(0, color="black", lw=0.8)
    ax.set(ylabel="Δ log p(answer)", title=title)
    if len(methods) > 1:
        ax.legend()
    ax.figure.tight_layout()
    return ax.figure


def plot_matrix(matrix, title: str = "", xlabel: str = "head", ylabel: str = "layer", xticklabels=None, ax=None):
    """A [rows, cols] heatmap with a diverging colour map centred on 0 (e.g. `head_sweep`'s effects)."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    matrix = torch.as_tensor(matrix, dtype=torch.float32).cpu()
    bound = float(matrix.nan_to_num().abs().max()) or 1.0
    ax = ax or plt.subplots(figsize=(min(12, 2 + 0.5 * matrix.shape[1]), 1 + 0.4 * matrix.shape[0]))[1]
    shown = ax.imshow(matrix.numpy(), cmap="RdBu", vmin=-bound, vmax=bound, aspect="auto", interpolation="nearest")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    for axis in (ax.xaxis, ax.yaxis):  # rows and columns are whole numbers (layers, heads, units)
        axis.set_major_locator(MaxNLocator(integer=True))
    if xticklabels is not None:
        ax.set_xticks(range(len(xticklabels)), xticklabels, rotation=90, fontsize=7)
    ax.figure.colorbar(shown, ax=ax)
    return ax.figure
