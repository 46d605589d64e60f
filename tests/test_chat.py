"""The chat API end to end on the tiny preset: chat / history / streaming / batch_chat, and load_pretrained
returning a working processor for checkpoints saved in both formats."""
import pytest
import torch
from PIL import Image

import ivl3lab
from ivl3lab.demo import SAMPLE

GREEDY = dict(max_new_tokens=10)


@pytest.fixture(scope="module")
def tiny():
    return ivl3lab.build("tiny", seed=0)


@pytest.fixture(scope="module")
def images():
    sample = Image.open(SAMPLE).convert("RGB")
    return sample, sample.crop((0, 0, 200, 200)).resize((150, 150))


def test_chat_matches_manual_generation(tiny, images):
    model, processor = tiny
    pv, _ = processor.load_image(images[0])
    answer, history = model.chat(processor, pv, "What is in the image?", GREEDY, return_history=True)
    inputs = processor("What is in the image?", images=images[0])
    tokens = ivl3lab.generate(model, inputs["input_ids"], pixel_values=inputs["pixel_values"],
                              generation_config=dict(GREEDY, eos_token_id=processor.im_end_id))
    assert answer == processor.decode(tokens[0])
    assert history == [("<image>\nWhat is in the image?", answer)]
    # a second turn replays the first (with its image placeholder) and re-encodes the image
    again, history2 = model.chat(processor, pv, "And the colour?", GREEDY, history=history, return_history=True)
    assert len(history2) == 2 and history2[0] == history[0] and isinstance(again, str)


def test_stream_chat_yields_the_same_text(tiny, images):
    model, processor = tiny
    pv, _ = processor.load_image(images[0])
    pieces = list(model.stream_chat(processor, pv, "Describe the image.", GREEDY))
    assert "".join(pieces).strip() == model.chat(processor, pv, "Describe the image.", GREEDY)


def test_batch_chat_equals_one_by_one(tiny, images):
    model, processor = tiny
    pvs = [processor.load_image(im)[0] for im in images]
    questions = ["What is in the image?", "How many shapes?"]
    batch = model.batch_chat(processor, torch.cat(pvs), questions, GREEDY,
                             num_patches_list=[pv.shape[0] for pv in pvs])
    single = [model.chat(processor, pv, q, GREEDY) for pv, q in zip(pvs, questions)]
    assert batch == single
    with pytest.raises(ValueError, match="num_patches_list"):
        model.batch_chat(processor, torch.cat(pvs), questions, GREEDY)


def test_multi_image_chat_with_num_patches_list(tiny, images):
    model, processor = tiny
    pvs = [processor.load_image(im)[0] for im in images]
    question = "Image-1: <image>\nImage-2: <image>\nWhat differs?"
    answer = model.chat(processor, torch.cat(pvs), question, GREEDY, num_patches_list=[len(p) for p in pvs])
    assert isinstance(answer, str)
    with pytest.raises(ValueError, match="2 <image> placeholders but 1 image"):
        model.chat(processor, torch.cat(pvs), question, GREEDY)


@pytest.mark.parametrize("fmt", ["original", "hf"])
def test_load_pretrained_returns_model_and_processor(tiny, images, tmp_path, fmt):
    model, processor = tiny
    ivl3lab.save_pretrained(model, tmp_path, format=fmt, processor=processor)
    loaded, loaded_processor = ivl3lab.load_pretrained(tmp_path)
    assert loaded_processor.image_token_id == processor.image_token_id == loaded.config.image_token_id
    pv, _ = processor.load_image(images[0])
    assert loaded.chat(loaded_processor, pv, "What?", GREEDY) == model.chat(processor, pv, "What?", GREEDY)


def test_released_style_checkpoint_without_processor_file(tiny, images, tmp_path):
    """A real repo has config.json + tokenizer files but no ivl3lab_processor.json: settings come from config."""
    model, processor = tiny
    ivl3lab.save_pretrained(model, tmp_path, format="original")
    processor.tokenizer.save_pretrained(tmp_path)
    _, loaded_processor = ivl3lab.load_pretrained(tmp_path)
    cfg = model.config
    assert (loaded_processor.image_size, loaded_processor.max_num) == (cfg.vision.image_size, cfg.max_dynamic_patch)
    assert loaded_processor.num_image_token == cfg.num_image_token


def test_missing_tokenizer_is_a_clear_error(tiny, tmp_path):
    model, _ = tiny
    ivl3lab.save_pretrained(model, tmp_path, format="hf")
    with pytest.raises((FileNotFoundError, OSError, ValueError)):
        ivl3lab.load_pretrained(tmp_path)
    loaded, none = ivl3lab.load_pretrained(tmp_path, with_processor=False)
    assert none is None and loaded.config.image_token_id == model.config.image_token_id
