"""Checkpoint I/O: the original OpenGVLab format and the transformers-native format (spec §2)."""
from .configs import UnsupportedCheckpoint, detect_format, from_hf_config, from_original_config, to_hf_config, to_original_config
from .io import config_from_dict, load_pretrained, read_safetensors, save_pretrained
from .keymaps import KeyMapError, from_format, to_format, to_transformers_memory

__all__ = ["load_pretrained", "save_pretrained", "read_safetensors", "config_from_dict", "UnsupportedCheckpoint",
           "KeyMapError", "to_transformers_memory", "detect_format", "from_format", "to_format", "from_hf_config", "from_original_config",
           "to_hf_config", "to_original_config"]
