"""Input pipeline: images -> tiles -> pixel_values, and the 'internvl2_5' prompt -> token ids.

Never imports `ivl3lab.model`: processing is usable (and testable) without building a network.
"""
from ivl3lab.processing.images import (
    IMAGENET_MEAN, IMAGENET_STD, TileLayout, candidate_grids, choose_grid, dynamic_preprocess, load_image,
    process_image, tiles_to_tensor, to_rgb,
)
from ivl3lab.processing.processor import Processor
from ivl3lab.processing.template import (
    DEFAULT_SYSTEM_MESSAGE, IMAGE_PLACEHOLDER, IMG_CONTEXT, IMG_END, IMG_START, IM_END, IM_START,
    expand_image_placeholders, image_tokens, multi_image_prefix, render_conversation, render_prompt, video_prefix,
)
from ivl3lab.processing.tokenizer import SPECIAL_TOKENS, build_tiny_tokenizer, load_tiny_tokenizer, load_tokenizer
