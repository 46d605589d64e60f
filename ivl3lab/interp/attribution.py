"""captum attribution over the image: which pixels, patches, image tokens and tiles raise log p(answer).

Every method here explains one number, `Probe.score` = log p(answer | prompt, image). captum treats dim 0 of
its input as the batch, but one InternVL sample is a *stack* of tiles [T, 3, S, S]. So the forward function
takes [B, T, 3, S, S] (B perturbed copies of the whole stack) and returns [B], one scalar per copy, and
captum's convergence delta and batching stay per sample. Results follow the model's own geometry:

    pixels [T, 3, S, S] -> ViT patches [T, g, g] (14 px) -> image tokens [T, n] (2x2 patches, 28 px) -> tiles [T]

`tokens` flattened is the token-map order, so `plot_image_scores(picture, probe.token_map, a.tokens)` draws it.

Baselines live in *normalised* space, pixel_values = (rgb - mean) / std: `"zeros"` is the ImageNet mean colour
(a grey), not black; `"black"` is (0 - mean) / std per channel; `"blur"` keeps the colours and removes the
detail (it asks "which edges and textures matter" rather than "which colours"). Attributions answer
"relative to this baseline", so name it when you report them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from captum.attr import FeatureAblation, IntegratedGradients, LayerIntegratedGradients
from torch import nn

from ..hooks import clean_name
from ..processing.images import IMAGENET_MEAN, IMAGENET_STD
from .probe import Probe
from .tokenmap import Box

Baseline = Union[str, torch.Tensor]
Mask = Union[str, Sequence[Box], torch.Tensor]


@dataclass
class Attribution:
    """Scores of one probe. Additive methods (IG, LIG) sum to `score - baseline_score` (up to `delta`)."""

    method: str
    tokens: torch.Tensor  # [T, n] one score per <IMG_CONTEXT> token, token-map order when flattened
    score: float  # f(input) = log p(answer)
    baseline_score: Optional[float] = None  # f(baseline image)
    delta: Optional[float] = None  # sum(attributions) - (score - baseline_score): captum's convergence delta
    tiles: Optional[torch.Tensor] = None  # [T]
    patches: Optional[torch.Tensor] = None  # [T, g, g] ViT patches
    pixels: Optional[torch.Tensor] = None  # [T, 3, S, S] (IG only)
    positions: Optional[torch.Tensor] = None  # [L] per sequence position (LIG on an LLM-side layer)
    features: Optional[torch.Tensor] = None  # [F] feature ablation: effect of removing feature id f
    mask: Optional[torch.Tensor] = None  # [T, S, S] feature ids (feature ablation)

    @property
    def relative_error(self) -> float:
        """|delta| / |f(input) - f(baseline)|: how far completeness is from exact (IG: shrinks with n_steps)."""
        if self.delta is None:
            raise ValueError(f"{self.method} is not an additive attribution: it has no completeness gap")
        return abs(self.delta) / max(abs(self.score - self.baseline_score), 1e-12)

    def plot(self, picture, token_map, **kwargs):
        """Heatmap of `tokens` over the original picture, tiles stitched, thumbnail beside (plot_image_scores)."""
        from .plots import plot_image_scores
        return plot_image_scores(picture, token_map, self.tokens, title=kwargs.pop("title", self.method), **kwargs)


# ------------------------------------------------------------------------------------------ building blocks
def forward_fn(model: nn.Module, probe: Probe) -> Callable[[torch.Tensor], torch.Tensor]:
    """captum-ready f: pixel_values [B, T, 3, S, S] (B copies of the probe's tiles) -> log p(answer) [B]."""
    def forward(pixel_values: torch.Tensor) -> torch.Tensor:
        return probe.score(model, pixel_values=pixel_values.flatten(0, 1))  # ids expanded B times
    return forward


def make_baseline(pixel_values: torch.Tensor, baseline: Baseline = "black", sigma: Optional[float] = None):
    """The reference image [T, 3, S, S] in normalised space: "black", "zeros" (= mean grey), "blur" or a tensor."""
    if torch.is_tensor(baseline):
        return baseline.to(pixel_values).expand_as(pixel_values).clone()
    if baseline == "zeros":
        return torch.zeros_like(pixel_values)
    if baseline == "black":
        black = -torch.tensor(IMAGENET_MEAN) / torch.tensor(IMAGENET_STD)  # rgb 0 after Normalize
        return black.view(1, 3, 1, 1).to(pixel_values).expand_as(pixel_values).clone()
    if baseline == "blur":
        return gaussian_blur(pixel_values, sigma or pixel_values.shape[-1] / 16)
    raise ValueError(f"baseline must be 'black', 'zeros', 'blur' or a tensor, got {baseline!r}")


def gaussian_blur(pixel_values: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of every tile and channel, reflecting at the borders."""
    size = pixel_values.shape[-1]
    radius = max(1, min(int(3 * sigma), size - 1))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=pixel_values.device)
    kernel = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    flat = pixel_values.float().reshape(-1, 1, size, size)  # [T*3, 1, S, S]
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return flat.reshape(pixel_values.shape).to(pixel_values.dtype)


def block_sum(maps: torch.Tensor, size: int) -> torch.Tensor:
    """[T, S, S] -> [T, S/size, S/size]: sum over size x size pixel blocks (14 = a ViT patch, 28 = a token)."""
    t, s, _ = maps.shape
    return maps.reshape(t, s // size, size, s // size, size).sum((2, 4))


def _geometry(probe: Probe) -> tuple[int, int, int]:
    """(tile px S, token px, patch px) of the probe: 112/28/14 for tiny, 448/28/14 for the released models."""
    size, side = probe.pixel_values.shape[-1], probe.token_map.side
    return size, size // side, size // side // 2


def _inputs(model: nn.Module, probe: Probe, baseline: Baseline):
    """Input and baseline stacks [T, 3, S, S] on the model's device and dtype, and (f(input), f(baseline))."""
    param = next(model.parameters())
    pixels = probe.pixel_values.to(param.device, param.dtype)
    base = make_baseline(pixels, baseline)
    with torch.no_grad():
        score, base_score = forward_fn(model, probe)(torch.stack([pixels, base])).tolist()
    return pixels, base, score, base_score


# ----------------------------------------------------------------------------------------------- methods
def integrated_gradients(model: nn.Module, probe: Probe, baseline: Baseline = "black", n_steps: int = 32,
                         internal_batch_size: Optional[int] = None, method: str = "gausslegendre") -> Attribution:
    """IG on pixel_values, summed per patch, per image token (28x28 px) and per tile.

    internal_batch_size: interpolation steps (copies of the tile stack) per forward pass; None = all at once.
    The baseline matters: a black image in normalised space is not zeros (see the module docstring).
    """
    pixels, base, score, base_score = _inputs(model, probe, baseline)
    ig = IntegratedGradients(forward_fn(model, probe))
    attr, delta = ig.attribute(pixels[None], baselines=base[None], n_steps=n_steps, method=method,
                               internal_batch_size=internal_batch_size, return_convergence_delta=True)
    attr = attr[0].float()  # [T, 3, S, S]
    _, token_px, patch_px = _geometry(probe)
    per_pixel = attr.sum(1)  # [T, S, S]
    tokens = block_sum(per_pixel, token_px).flatten(1)  # [T, n], row-major like pixel-unshuffle v2
    return Attribution("integrated_gradients", tokens, score, base_score, float(delta), tiles=tokens.sum(1),
                       patches=block_sum(per_pixel, patch_px), pixels=attr)


def layer_integrated_gradients(model: nn.Module, probe: Probe, layer: nn.Module, baseline: Baseline = "black",
                               n_steps: int = 32, internal_batch_size: Optional[int] = None,
                               method: str = "gausslegendre") -> Attribution:
    """LIG from pixel_values through one layer's output, summed over its width.

    - `model.projector` (or `projector.hook_out`): [T, n, H] -> one score per image token.
    - `model.vision.layers[i]`, `model.hook_vision_out`: [T, (1+)P, C] -> per patch, 2x2 sums per token.
    - an LLM-side layer (`model.hook_inputs_embeds`, `model.language.layers[i]`): [1, L, H] -> per sequence
      position; image positions give `tokens`. (LIG on `language.embed_tokens` would give exactly 0 at image
      positions: `merge_image_features` overwrites those embeddings.)
    Completeness holds through the layer because every path from the image to the answer crosses it.
    """
    name = _module_name(model, layer)
    per_tile = name.startswith(("vision.", "projector")) or name == "hook_vision_out"
    pixels, base, score, base_score = _inputs(model, probe, baseline)
    rows = pixels.shape[0] if per_tile else 1  # captum batches over the layer's rows: tiles, or the sample
    lig = LayerIntegratedGradients(forward_fn(model, probe), layer)
    attr = lig.attribute(pixels[None], baselines=base[None], n_steps=n_steps, method=method,
                         internal_batch_size=None if internal_batch_size is None else internal_batch_size * rows)
    if not torch.is_tensor(attr):
        raise TypeError(f"layer {name!r} returns {type(attr).__name__}; pick a module that returns one tensor")
    attr = attr.float().sum(-1)  # [T, n] | [T, (1+)P] | [1, L]
    delta = float(attr.sum()) - (score - base_score)
    side, tiles = probe.token_map.side, pixels.shape[0]
    if not per_tile:
        tokens = attr[0, probe.image_positions].reshape(tiles, side * side)
        return Attribution(f"LIG {name}", tokens, score, base_score, delta, tiles=tokens.sum(1), positions=attr[0])
    if attr.shape[1] == side * side:
        return Attribution(f"LIG {name}", attr, score, base_score, delta, tiles=attr.sum(1))
    patches = attr[:, -(4 * side * side):].reshape(tiles, 2 * side, 2 * side)  # CLS (if any) dropped
    tokens = block_sum(patches, 2).flatten(1)  # [T, n]; CLS's share stays in `tiles` and the completeness sum
    return Attribution(f"LIG {name}", tokens, score, base_score, delta, tiles=attr.sum(1), patches=patches)


def feature_ablation(model: nn.Module, probe: Probe, mask: Mask = "tile", baseline: Baseline = "black",
                     perturbations_per_eval: int = 4, image: int = 0) -> Attribution:
    """Replace one feature (a group of pixels) at a time by the baseline: effect = f(input) - f(ablated).

    mask: "tile", "token" / "group" (the 28x28 px block = 2x2 patches one image token reads), "patch",
    a list of (left, top, right, bottom) boxes in original-image pixels of `image` (see `region_mask`), or a
    [T, S, S] tensor of feature ids. `tokens` gives every token the effect of the feature covering it.
    """
    pixels, base, score, _ = _inputs(model, probe, baseline)
    ids = feature_mask(probe, mask, image).to(pixels.device)  # [T, S, S]
    ablation = FeatureAblation(forward_fn(model, probe))
    attr = ablation.attribute(pixels[None], baselines=base[None], feature_mask=ids[None, :, None],
                              perturbations_per_eval=perturbations_per_eval)
    per_pixel = attr[0, :, 0].float()  # [T, S, S]: every pixel carries its feature's effect
    flat = ids.flatten()
    features = (torch.bincount(flat, per_pixel.flatten().double()) / torch.bincount(flat).clamp(min=1)).float()  # [F]
    _, token_px, _ = _geometry(probe)
    tokens = (block_sum(per_pixel.double(), token_px) / token_px ** 2).float().flatten(1)  # [T, n] block means
    return Attribution("feature_ablation", tokens, score, features=features, mask=ids,
                       tiles=features if isinstance(mask, str) and mask == "tile" else None)


# ------------------------------------------------------------------------------------------ feature masks
def feature_mask(probe: Probe, mask: Mask, image: int = 0) -> torch.Tensor:
    """Feature ids [T, S, S] over the probe's tiles (see `feature_ablation`)."""
    tiles, size = probe.pixel_values.shape[0], probe.pixel_values.shape[-1]
    if torch.is_tensor(mask):
        return mask.long().expand(tiles, size, size)
    if isinstance(mask, str):
        _, token_px, patch_px = _geometry(probe)
        block = {"tile": size, "token": token_px, "group": token_px, "patch": patch_px}.get(mask)
        if block is None:
            raise ValueError(f"mask must be 'tile', 'token', 'group', 'patch', boxes or a tensor, got {mask!r}")
        per_side = size // block
        cell = torch.arange(size) // block
        local = cell[:, None] * per_side + cell[None, :]  # [S, S] block index, row-major
        return torch.arange(tiles)[:, None, None] * per_side ** 2 + local  # tile-major: token-map order
    return region_mask(probe, mask, image)


def region_mask(probe: Probe, boxes: Sequence[Box], image: int = 0) -> torch.Tensor:
    """Boxes in original-image pixels -> feature ids [T, S, S]: box k is feature k, everything else len(boxes).

    A pixel belongs to a box when its centre, mapped back through its tile's box, lies inside it: grid tiles
    see their share of the image, the thumbnail sees all of it, so a region is found in both. Later boxes win
    where boxes overlap. Tiles of other images are 'everything else'.
    """
    tmap = probe.token_map
    tiles, size = probe.pixel_values.shape[0], probe.pixel_values.shape[-1]
    ids = torch.full((tiles, size, size), len(boxes), dtype=torch.long)
    first = sum(layout.num_tiles for layout in tmap.layouts[:image])
    layout = tmap.layouts[image]
    centre = (torch.arange(size) + 0.5) / size  # pixel centres as a fraction of the tile
    for k in range(layout.num_tiles):
        left, top, right, bottom = layout.tile_box(k)
        xs, ys = left + centre * (right - left), top + centre * (bottom - top)  # original-image coordinates
        for f, (bl, bt, br, bb) in enumerate(boxes):
            inside = ((ys >= bt) & (ys < bb))[:, None] & ((xs >= bl) & (xs < br))[None, :]
            ids[first + k][inside] = f
    return ids


def _module_name(model: nn.Module, layer: nn.Module) -> str:
    for name, module in model.named_modules():
        if module is layer:
            return clean_name(name)
    raise ValueError("`layer` is not a module of `model`")


__all__ = ["Attribution", "forward_fn", "make_baseline", "gaussian_blur", "block_sum", "integrated_gradients",
           "layer_integrated_gradients", "feature_ablation", "feature_mask", "region_mask"]
