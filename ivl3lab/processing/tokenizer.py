"""Tokenizers: the real InternVL3 one (any Hugging Face tokenizer dir) and a tiny offline one for tests/toys.

The tiny tokenizer is a byte-level BPE (so any text, Chinese included, round-trips) trained
deterministically on a small built-in English corpus about coloured shapes, numbers and positions -- the
vocabulary of the toy tasks. It carries the same special tokens as InternVL3, each one a single id.
`scripts/build_assets.py` writes it to `ivl3lab/assets/tiny_tokenizer/`; tests load that copy.
"""
from __future__ import annotations

from pathlib import Path
from typing import Union

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from ivl3lab.processing.template import DEFAULT_SYSTEM_MESSAGE

# Order matters: the tiny tokenizer gives them ids 0..12 in this order (so <IMG_CONTEXT> = 5).
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
    "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>", "<video>",
)

# Named roles that transformers' InternVL processor looks up on the tokenizer (reference §3.3).
EXTRA_SPECIAL_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}

# transformers-native InternVL chat template (converter in transformers): no default system prompt; an
# image item becomes the <IMG_CONTEXT> placeholder that InternVLProcessor expands to <img>...</img>.
HF_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)

TINY_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_tokenizer"

# ---------------------------------------------------------------------------------------------------------
# Built-in corpus

COLOURS = "red green blue yellow orange purple pink brown black white gray cyan magenta".split()
SHAPES = "circle square triangle star rectangle ellipse diamond cross hexagon heart".split()
NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
).split()
POSITIONS = (
    "left right above below top bottom middle center corner tile first second third fourth fifth sixth "
    "last next upper lower inside outside between near far row column grid"
).split()
COMMON_WORDS = (
    "the a an of and to in is it that this for on with as was be are at by from or not but have has had "
    "what which who where when how why all each every some any many more most few no yes other same "
    "different one only also there here image picture photo shape shapes colour color object objects "
    "background small large big tiny huge long short wide tall round sharp bright dark light "
    "answer question describe count find show look see give tell list name say think know make use "
    "can could will would should may might must do does did done being been were am "
    "number numbers total sum plus minus times equals result step steps final reason because so then "
    "first second finally therefore thus since if else true false correct wrong "
    "i you he she we they me him her us them my your its our their "
    "picture drawn placed located positioned appears contains shows has "
    "side sides edge edges point points line lines area size part parts half whole "
    "just very quite almost about around exactly only over under into onto out up down "
    "after before while during again once twice both either neither none nothing something everything "
    "good best better bad worse simple clear plain empty full filled outline solid "
    "user assistant system model language vision multimodal assistant helpful"
).split()

TEMPLATES = (
    "Describe the image.",
    "What is in the image?",
    "How many {shape}s are there?",
    "How many {colour} shapes are in the image?",
    "Which shape is {colour}?",
    "There is a {colour} {shape} in the {pos} of the image.",
    "There are {n} {colour} {shape}s.",
    "The {shape} is {colour} and it is {pos}.",
    "Answer: {n}",
    "Answer: {colour} {shape}",
    "Step {d}: count the {colour} {shape}s.",
    "Final Answer: {n}",
    "Image-{d}: <image>\nWhat is the {colour} {shape}?",
    "Frame{d}: <image>\nWhere is the {shape}?",
)


def _corpus() -> list[str]:
    """Deterministic training text: chat strings, the toy-task templates over every colour/shape, numbers,
    arithmetic, and word lists. Order is fixed so the trained merges are identical on every build."""
    lines = [
        f"<|im_start|>system\n{DEFAULT_SYSTEM_MESSAGE}<|im_end|>\n",
        "<|im_start|>user\n<image>\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n",
        "You are a helpful assistant.",
        " ".join(COLOURS), " ".join(SHAPES), " ".join(NUMBER_WORDS), " ".join(POSITIONS), " ".join(COMMON_WORDS),
        " ".join(w.capitalize() for w in COLOURS + SHAPES + NUMBER_WORDS + POSITIONS + COMMON_WORDS),
    ]
    for i, template in enumerate(TEMPLATES):
        for j, colour in enumerate(COLOURS):
            for k, shape in enumerate(SHAPES):
                position = POSITIONS[(i + j + k) % len(POSITIONS)]
                lines.append(template.format(colour=colour, shape=shape, pos=position,
                                             n=NUMBER_WORDS[(j + k) % 21], d=(i + j + k) % 10))
    for a in range(11):
        for b in range(11):
            lines.append(f"{a} + {b} = {a + b}. {a} * {b} = {a * b}. {NUMBER_WORDS[a]} plus {NUMBER_WORDS[b]}")
    lines += [str(n) for n in range(1000)]
    return lines


def build_tiny_tokenizer(vocab_size: int = 1024) -> Tokenizer:
    """Train the tiny byte-level BPE. `vocab_size` counts everything (13 specials + 256 bytes + merges)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # first ids, registered as special (never split)
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte reachable -> lossless
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"the corpus is too small: trained {tokenizer.get_vocab_size()} of {vocab_size} tokens")
    return tokenizer


def wrap_for_transformers(tokenizer: Tokenizer):
    """A transformers tokenizer with InternVL's roles: eos = <|im_end|> (the chat stop token), pad =
    <|endoftext|>, no bos, the named image tokens, and the transformers-native chat template."""
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        extra_special_tokens=dict(EXTRA_SPECIAL_TOKENS),
        model_max_length=8192,  # the tiny preset's max_position_embeddings
    )
    wrapped.chat_template = HF_CHAT_TEMPLATE
    return wrapped


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(path_or_dir: Union[str, Path]):
    """`AutoTokenizer.from_pretrained` (offline-friendly) with an error that says what was looked for."""
    from transformers import AutoTokenizer

    path = Path(path_or_dir)
    if path.exists() and not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        raise FileNotFoundError(f"no tokenizer files (tokenizer.json / tokenizer_config.json) in {str(path)!r}")
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # AutoTokenizer peeks at config.json and warns that internvl_chat is unknown
    try:
        return AutoTokenizer.from_pretrained(str(path_or_dir))
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"cannot load a tokenizer from {str(path_or_dir)!r}: {err}") from err
    finally:
        hf_logging.set_verbosity(verbosity)


def load_tiny_tokenizer():
    """The tiny tokenizer shipped in ivl3lab/assets (regenerate with `python scripts/build_assets.py`)."""
    if not (TINY_TOKENIZER_DIR / "tokenizer.json").exists():
        raise FileNotFoundError(
            f"tiny tokenizer missing at {TINY_TOKENIZER_DIR}; run `python scripts/build_assets.py` to build it")
    return load_tokenizer(TINY_TOKENIZER_DIR)
