"""Image pipeline: modes, loading errors, grid choice (spec §3.2), tiling, layout boxes, normalisation and
pixel parity with transformers' GotOcr2ImageProcessorPil."""
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from ivl3lab.config import get_preset
from ivl3lab.processing.images import (
    IMAGENET_MEAN, IMAGENET_STD, TileLayout, candidate_grids, choose_grid, dynamic_preprocess, load_image,
    process_image, tiles_to_tensor, to_rgb,
)

torch.set_num_threads(1)
TINY = get_preset("tiny")  # its small tiles (TINY.vision.image_size px) are checked beside the released 448 px


def _noise(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------------
# to_rgb / load_image


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P", "PA", "CMYK", "L", "1", "YCbCr"])
def test_to_rgb_8bit_modes_match_pil_convert(mode):
    source = _noise(9, 7).convert(mode)
    out = to_rgb(source)
    assert out.mode == "RGB" and out.size == (9, 7)
    assert np.array_equal(np.asarray(out), np.asarray(source.convert("RGB")))


def _grey_values(image):
    out = np.asarray(to_rgb(image))
    assert out.shape[2] == 3 and (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    return out[..., 0].ravel().tolist()


@pytest.mark.parametrize("mode,dtype", [("I;16", "<u2"), ("I;16B", ">u2")])
def test_to_rgb_16bit_divides_by_257(mode, dtype):
    values = np.array([[0, 257 * 100, 257 * 200, 65535]], dtype=dtype)
    image = Image.frombytes(mode, (4, 1), values.tobytes())
    assert image.convert("RGB").getpixel((1, 0))[0] == 255  # PIL alone clips: the reason for the rescale
    assert _grey_values(image) == [0, 100, 200, 255]


@pytest.mark.parametrize("mode,dtype", [("I", "<i4"), ("F", "<f4")])
def test_to_rgb_32bit_min_max_scaled(mode, dtype):
    values = np.array([[-1000, 0, 1000, 3000]], dtype=dtype)  # 0, 0.25, 0.5, 1 of the range
    image = Image.frombytes(mode, (4, 1), values.tobytes())
    assert _grey_values(image) == [0, 64, 128, 255]  # rint(63.75)=64, rint(127.5)=128


def test_to_rgb_constant_float_image_is_black():
    image = Image.frombytes("F", (2, 2), np.full((2, 2), 7.5, dtype="<f4").tobytes())
    assert _grey_values(image) == [0, 0, 0, 0]


def _png_bytes(image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_load_image_from_pil_path_and_bytes(tmp_path):
    image = _noise(20, 10).convert("RGBA")
    data = _png_bytes(image)
    (tmp_path / "x.png").write_bytes(data)
    expected = np.asarray(image.convert("RGB"))
    for src in (image, str(tmp_path / "x.png"), tmp_path / "x.png", data):
        out = load_image(src)
        assert out.mode == "RGB" and np.array_equal(np.asarray(out), expected)


def test_load_image_errors_name_the_source(tmp_path):
    with pytest.raises(ValueError, match=r"cannot read image <12 bytes>: .*identify"):
        load_image(b"not an image")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes(_png_bytes(_noise(64, 64))[:200])  # header ok, pixel data cut
    with pytest.raises(ValueError, match=r"cannot read image '.*cut\.png': .+"):
        load_image(truncated)
    with pytest.raises(ValueError, match=r"missing\.png"):
        load_image(tmp_path / "missing.png")


# ---------------------------------------------------------------------------------------------------------
# Grid choice

SPEC_GRIDS_1_12 = [(1, 1), (1, 2), (2, 1), (3, 1), (1, 3), (2, 2), (4, 1), (1, 4), (5, 1), (1, 5), (1, 6), (6, 1),
                   (3, 2), (2, 3), (7, 1), (1, 7), (4, 2), (2, 4), (1, 8), (8, 1), (1, 9), (3, 3), (9, 1), (2, 5),
                   (5, 2), (10, 1), (1, 10), (11, 1), (1, 11), (12, 1), (3, 4), (4, 3), (1, 12), (6, 2), (2, 6)]


def test_candidate_grids_order_matches_spec():
    assert candidate_grids(1, 12) == SPEC_GRIDS_1_12
    assert candidate_grids(2, 3) == sorted({(1, 2), (2, 1), (1, 3), (3, 1)}, key=lambda g: g[0] * g[1])


SPEC_VECTORS = [((500, 400), (4, 3)), ((800, 600), (4, 3)), ((1024, 768), (4, 3)), ((1920, 1080), (4, 2)),
                ((1080, 1920), (2, 4)), ((300, 1200), (1, 4)), ((4000, 100), (12, 1)), ((448, 448), (1, 1)),
                ((500, 500), (1, 1)), ((640, 640), (2, 2)), ((800, 800), (2, 2)), ((1000, 1000), (3, 3))]


@pytest.mark.parametrize("size,grid", SPEC_VECTORS)
def test_choose_grid_spec_vectors(size, grid):
    assert choose_grid(*size, 1, 12, 448) == grid


def test_choose_grid_tie_break_threshold():
    # squares tie between (1,1), (2,2), (3,3); (2,2) wins iff area > 0.5 * 448^2 * 4 = 401408 (633.6^2)
    assert choose_grid(633, 633, 1, 12, 448) == (1, 1)
    assert choose_grid(634, 634, 1, 12, 448) == (2, 2)


def test_choose_grid_agrees_with_transformers():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    rng = random.Random(0)
    sizes = [s for s, _ in SPEC_VECTORS] + [(rng.randint(1, 3000), rng.randint(1, 3000)) for _ in range(300)]
    for max_num, image_size in ((12, 448), (TINY.max_dynamic_patch, TINY.vision.image_size)):
        for w, h in sizes:
            expected = get_optimal_tiled_canvas((h, w), (image_size, image_size), 1, max_num)
            assert choose_grid(w, h, 1, max_num, image_size) == tuple(expected), (w, h)


# ---------------------------------------------------------------------------------------------------------
# Tiling and layout


def test_dynamic_preprocess_cuts_row_major_and_appends_thumbnail():
    # 2x1 blocks of 28 px: left red, right blue -> grid (2,1), tiles are exact crops, thumbnail last
    image = Image.new("RGB", (56, 28), (255, 0, 0))
    image.paste((0, 0, 255), (28, 0, 56, 28))
    tiles, layout = dynamic_preprocess(image, 1, 12, 28, use_thumbnail=True)
    assert layout == TileLayout(2, 1, True, 56, 28, 28) and layout.num_tiles == 3 == len(tiles)
    assert all(t.size == (28, 28) and t.mode == "RGB" for t in tiles)
    assert np.asarray(tiles[0]).reshape(-1, 3).tolist()[0] == [255, 0, 0]
    assert (np.asarray(tiles[1]) == [0, 0, 255]).all()
    assert np.array_equal(np.asarray(tiles[2]), np.asarray(image.resize((28, 28), Image.BICUBIC)))

    tiles, layout = dynamic_preprocess(image, 1, 12, 28, use_thumbnail=False)
    assert len(tiles) == 2 and not layout.has_thumbnail
    tiles, layout = dynamic_preprocess(Image.new("RGB", (30, 30)), 1, 12, 28)
    assert len(tiles) == 1 and not layout.has_thumbnail  # a single tile never gets a thumbnail


def test_tile_box_maps_back_to_original_pixels():
    layout = TileLayout(cols=3, rows=2, has_thumbnail=True, image_width=300, image_height=200, tile_size=448)
    assert layout.num_tiles == 7
    assert layout.tile_box(0) == (0, 0, 100, 100)
    assert layout.tile_box(4) == (100, 100, 200, 200)  # column 1, row 1
    assert layout.tile_box(5) == (200, 100, 300, 200)
    assert layout.tile_box(6) == (0, 0, 300, 200)  # thumbnail
    with pytest.raises(IndexError):
        layout.tile_box(7)
    area = sum((r - l) * (b - t) for l, t, r, b in map(layout.tile_box, range(6)))
    assert area == pytest.approx(300 * 200)


def test_tiles_to_tensor_normalises_and_resizes():
    tile = Image.new("RGB", (4, 4), (255, 0, 51))
    x = tiles_to_tensor([tile, Image.new("RGB", (6, 3), (255, 0, 51))])
    assert x.shape == (2, 3, 4, 4) and x.dtype == torch.float32
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (0.2 - 0.406) / 0.225]
    for c in range(3):
        assert torch.allclose(x[:, c], torch.full((2, 4, 4), expected[c]), atol=1e-6)
    with pytest.raises(ValueError, match="RGB"):
        tiles_to_tensor([tile.convert("L")])


# ---------------------------------------------------------------------------------------------------------
# Parity with transformers


@pytest.mark.parametrize("size,image_size", [((200, 130), 448), ((130, 200), 448), ((640, 400), TINY.vision.image_size),
                                             ((50, 900), TINY.vision.image_size), ((300, 300), TINY.vision.image_size),
                                             ((448, 448), 448)])
def test_pixel_parity_with_got_ocr2(size, image_size):
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    image = _noise(*size, seed=sum(size))
    reference = GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD), crop_to_patches=True, min_patches=1, max_patches=12,
    )(images=[image], return_tensors="pt")
    pixel_values, layout = process_image(image, image_size=image_size, max_num=12)
    assert [layout.num_tiles] == reference["num_patches"].tolist()
    assert pixel_values.shape == reference["pixel_values"].shape
    assert (pixel_values - reference["pixel_values"]).abs().max().item() < 1e-5
