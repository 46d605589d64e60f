"""Token map: every <IMG_CONTEXT> position -> (image, tile, thumbnail, row, col) -> pixel box, and back."""
import pytest
import torch
from PIL import Image

import ivl3lab
from ivl3lab.interp import TokenMap
from ivl3lab.interp.probe import Probe


@pytest.fixture(scope="module")
def processor():
    return ivl3lab.build("tiny")[1]


# (width, height, max_num) -> expected tiles. 100x100 stays one tile: a square ties with 2x2, which wins only above
# half of 2x2 tiles' pixels (2 x image_size^2)
CASES = [((100, 100, 6), 1), ((448, 224, 6), 3), ((660, 440, 6), 7), ((900, 680, 12), 13)]


@pytest.mark.parametrize("size,tiles", CASES, ids=[f"{t}tiles" for _, t in CASES])
def test_round_trip_box_tokens_box(processor, size, tiles):
    w, h, max_num = size
    inputs = processor("Where?", images=Image.new("RGB", (w, h), "white"), max_num=max_num, return_layouts=True)
    tmap = TokenMap.from_inputs(inputs, processor)
    layout = inputs["layouts"][0]
    assert layout.num_tiles == tiles and len(tmap) == tiles * processor.num_image_token
    assert torch.equal(tmap.positions, (inputs["input_ids"][0] == processor.image_token_id).nonzero().flatten())
    side = tmap.side
    assert side >= 4  # the blocks below fit a 4x4 token grid (tiny: 112-px tiles)
    for tile in range(layout.cols * layout.rows):
        # blocks of tokens in this tile: each box maps back to exactly those tokens, and to the same box. A 2x2
        # block with neighbours on every side, and a non-square 2x3 block that reaches the tile's right edge
        for rows, cols in (((1, 2), (1, 2)), ((1, 2), (1, 2, 3))):
            block = [t.position for t in tmap.tokens if t.tile == tile and t.row in rows and t.col in cols]
            assert len(block) == len(rows) * len(cols)
            box = tmap.box_of(block)
            back = tmap.tokens_in_box(box)
            assert sorted(back.tolist()) == sorted(block)
            assert tmap.box_of(back.tolist()) == pytest.approx(box)
    # every grid token covers its share of the image; the grid tokens tile the image exactly
    area = sum((t.box[2] - t.box[0]) * (t.box[3] - t.box[1]) for t in tmap.tokens if not t.thumbnail)
    assert area == pytest.approx(w * h)
    if layout.has_thumbnail:
        thumb = tmap.select(thumbnail=True)
        assert len(thumb) == side * side and tmap[int(thumb[0])].box == (0.0, 0.0, w / side, h / side)
        assert tmap[int(thumb[-1])].tile == tiles - 1  # the thumbnail is the last tile


def test_token_fields_and_patch_groups(processor):
    inputs = processor("?", images=Image.new("RGB", (448, 224)), return_layouts=True)
    tmap = TokenMap.from_inputs(inputs, processor)
    first_of_tile1 = tmap[int(tmap.select(tile=1)[0])]
    assert (first_of_tile1.image, first_of_tile1.tile, first_of_tile1.row, first_of_tile1.col) == (0, 1, 0, 0)
    assert first_of_tile1.box[0] == pytest.approx(224.0)  # tile 1 is the right half of a 448-wide image
    token = tmap.tokens[tmap.side + 2]  # row 1, col 2 of tile 0
    assert token.patches() == [(2, 4), (2, 5), (3, 4), (3, 5)]
    with pytest.raises(KeyError, match="not an image token"):
        tmap[0]


def test_multi_image_prompt(processor):
    images = [Image.new("RGB", (448, 224)), Image.new("RGB", (100, 100))]
    inputs = processor(["Compare.", "One."], images=[images, images[1]], return_layouts=True)
    first = TokenMap.from_inputs(inputs, processor, sample=0)
    second = TokenMap.from_inputs(inputs, processor, sample=1)
    assert [lay.num_tiles for lay in first.layouts] == [3, 1] and [lay.num_tiles for lay in second.layouts] == [1]
    assert len(first.select(image=1)) == processor.num_image_token
    box = (0, 0, 100, 100)
    back = first.tokens_in_box(box, image=1)
    assert len(back) == processor.num_image_token and first.box_of(back.tolist()) == pytest.approx(box)
    with pytest.raises(ValueError, match="need"):
        TokenMap(inputs["input_ids"][0], first.layouts[:1], processor.image_token_id, processor.num_image_token)


@torch.no_grad()
def test_probe_scores_the_answer(processor):
    model, _ = ivl3lab.build("tiny", seed=0)
    probe = Probe.build(processor, "What shape?", ivl3lab.SAMPLE_IMAGE, answer="a red circle")
    score = probe.score(model)
    logits = model(probe.input_ids, probe.pixel_values).logits.log_softmax(-1)
    a = probe.answer_len
    manual = sum(logits[0, probe.prompt_len - 1 + i, probe.input_ids[0, probe.prompt_len + i]] for i in range(a))
    assert score.shape == (1,) and torch.allclose(score, manual.reshape(1), atol=1e-4)
    twice = probe.score(model, pixel_values=torch.cat([probe.pixel_values] * 2))
    assert twice.shape == (2,) and torch.allclose(twice, score.expand(2), atol=1e-4)
