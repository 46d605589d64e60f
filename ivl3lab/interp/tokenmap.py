"""Where every `<IMG_CONTEXT>` token came from: (image, tile, thumbnail?, row, col) -> pixel box, and back.

A prompt's image tokens are laid out image by image, tile by tile (grid tiles row-major, thumbnail last),
token rows and columns row-major inside a tile (pixel-unshuffle 'v2'). Each token covers a 2x2 group of ViT
patches of its tile, and its tile covers a known box of the original image (`TileLayout.tile_box`), so every
token has a box in original-image pixels. Everything that draws a per-token score over an image uses this.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..processing.images import TileLayout

Box = tuple[float, float, float, float]  # left, top, right, bottom in original-image pixels


@dataclass(frozen=True)
class ImageToken:
    position: int  # index in the token sequence
    image: int  # which image of the prompt
    tile: int  # tile index within the image (thumbnail = last)
    thumbnail: bool
    row: int  # token row within the tile (0 .. side-1)
    col: int
    box: Box

    def patches(self) -> list[tuple[int, int]]:
        """The 2x2 ViT patches (patch row, patch col) of the tile this token merges, in channel order."""
        return [(2 * self.row + dy, 2 * self.col + dx) for dy in (0, 1) for dx in (0, 1)]


class TokenMap:
    """Image tokens of ONE sample. Build it with `TokenMap.from_inputs(inputs, processor)`."""

    def __init__(self, input_ids: torch.Tensor, layouts: Sequence[TileLayout], image_token_id: int,
                 num_image_token: int):
        ids = torch.as_tensor(input_ids).flatten()
        self.positions = (ids == image_token_id).nonzero().flatten()  # [n_image_tokens]
        self.layouts = list(layouts)
        self.side = int(round(num_image_token ** 0.5))
        if self.side * self.side != num_image_token:
            raise ValueError(f"num_image_token {num_image_token} is not a square number")
        expected = sum(layout.num_tiles for layout in self.layouts) * num_image_token
        if expected != len(self.positions):
            raise ValueError(f"the sample has {len(self.positions)} <IMG_CONTEXT> tokens but its layouts "
                             f"({[lay.num_tiles for lay in self.layouts]} tiles) need {expected}")
        self.tokens = self._enumerate()
        self._by_position = {t.position: t for t in self.tokens}

    @classmethod
    def from_inputs(cls, inputs: dict, processor, sample: int = 0) -> "TokenMap":
        """From `processor(..., return_layouts=True)` output; `sample` picks one row of a batch."""
        if "layouts" not in inputs:
            raise ValueError("call the processor with return_layouts=True to build a TokenMap")
        per_sample = [0] + list(_cumsum(_images_per_sample(inputs)))
        layouts = inputs["layouts"][per_sample[sample]:per_sample[sample + 1]]
        return cls(inputs["input_ids"][sample], layouts, processor.image_token_id, processor.num_image_token)

    def _enumerate(self) -> list[ImageToken]:
        tokens, n = [], 0
        for image, layout in enumerate(self.layouts):
            for tile in range(layout.num_tiles):
                thumb = layout.has_thumbnail and tile == layout.num_tiles - 1
                left, top, right, bottom = layout.tile_box(tile)
                w, h = (right - left) / self.side, (bottom - top) / self.side
                for row in range(self.side):
                    for col in range(self.side):
                        box = (left + col * w, top + row * h, left + (col + 1) * w, top + (row + 1) * h)
                        tokens.append(ImageToken(int(self.positions[n]), image, tile, thumb, row, col, box))
                        n += 1
        return tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, position: int) -> ImageToken:
        """The token at sequence position `position`."""
        try:
            return self._by_position[int(position)]
        except KeyError:
            raise KeyError(f"position {position} is not an image token") from None

    def select(self, image: Optional[int] = None, tile: Optional[int] = None,
               thumbnail: Optional[bool] = None) -> torch.Tensor:
        """Sequence positions of the image tokens matching every given criterion."""
        return torch.tensor([t.position for t in self.tokens
                             if (image is None or t.image == image) and (tile is None or t.tile == tile)
                             and (thumbnail is None or t.thumbnail == thumbnail)], dtype=torch.long)

    def tokens_in_box(self, box: Box, image: int = 0, include_thumbnail: bool = False) -> torch.Tensor:
        """Positions of the tokens of `image` whose box centre lies inside `box` (original pixels)."""
        left, top, right, bottom = box
        chosen = []
        for t in self.tokens:
            if t.image != image or (t.thumbnail and not include_thumbnail):
                continue
            cx, cy = (t.box[0] + t.box[2]) / 2, (t.box[1] + t.box[3]) / 2
            if left <= cx < right and top <= cy < bottom:
                chosen.append(t.position)
        return torch.tensor(chosen, dtype=torch.long)

    def box_of(self, positions: Sequence[int]) -> Box:
        """The smallest box (original pixels) covering the given image tokens."""
        boxes = [self[p].box for p in positions]
        if not boxes:
            raise ValueError("no positions given")
        return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))

    def tile_grid(self, scores: torch.Tensor, image: int = 0, tile: int = 0) -> torch.Tensor:
        """Per-image-token scores [n_image_tokens] (in token order) -> one tile's [side, side] map."""
        index = [i for i, t in enumerate(self.tokens) if t.image == image and t.tile == tile]
        return torch.as_tensor(scores).flatten()[index].reshape(self.side, self.side)


def _images_per_sample(inputs: dict) -> list[int]:
    """How many images each sample of a processor batch holds (from its tile counts)."""
    counts, tiles = [], iter(inputs["num_patches_list"])
    for total in inputs["num_tiles_per_sample"]:
        n = 0
        while total > 0:
            total -= next(tiles)
            n += 1
        counts.append(n)
    return counts


def _cumsum(values):
    total = 0
    for v in values:
        total += v
        yield total
