"""load_pretrained / save_pretrained for both checkpoint formats, single-file or sharded safetensors.

Loading builds the model on the meta device (no time or memory spent on a random init), maps the keys through
the format's table, checks them strictly and assigns the tensors in the requested dtype and device.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import load_file, save_file

from ..config import InternVLConfig
from ..model import InternVL3
from .configs import (UnsupportedCheckpoint, detect_format, from_hf_config, from_original_config,
                      to_hf_config, to_original_config)
from .keymaps import check_state_dict, from_format, to_format

SAFE_INDEX = "model.safetensors.index.json"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "*.jinja"]


def resolve(path_or_repo_id: Union[str, os.PathLike], revision: Optional[str] = None) -> Path:
    """A local directory, or a hub repo id fetched with huggingface_hub (weights, configs, tokenizer)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file; pass the checkpoint directory")
    if str(path_or_repo_id).count("/") != 1:
        raise FileNotFoundError(f"{path_or_repo_id!r} is neither a local directory nor a hub repo id "
                                f"(like 'OpenGVLab/InternVL3-1B')")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(path_or_repo_id), revision=revision, allow_patterns=HUB_PATTERNS))
    except Exception as err:  # offline, unknown repo, auth: say which and keep the cause
        raise OSError(f"could not download {path_or_repo_id!r} from the hub: {err}") from err


def read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / SAFE_INDEX
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        missing = sorted({f for f in weight_map.values() if not (directory / f).exists()})
        if missing:
            raise FileNotFoundError(f"{index} lists shards that are not there: {missing}")
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_file(directory / shard))
        return state
    single = directory / "model.safetensors"
    if single.exists():
        return load_file(single)
    found = sorted(p.name for p in directory.iterdir())
    raise FileNotFoundError(f"no model.safetensors or {SAFE_INDEX} in {directory} (found: {found}); "
                            f"only safetensors checkpoints are read")


def config_from_dict(raw: dict) -> tuple[InternVLConfig, str]:
    fmt = detect_format(raw)
    return (from_original_config(raw) if fmt == "original" else from_hf_config(raw)), fmt


def load_pretrained(path_or_repo_id, dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu",
                    attn_implementation: str = "sdpa", revision: Optional[str] = None,
                    with_processor: bool = True):
    """Load an InternVL3 checkpoint in either format -> (model in eval mode, processor or None).

    dtype None keeps the checkpoint's dtype. The processor (tokenizer + image settings) is read from the same
    directory; the `<IMG_CONTEXT>` id always comes from the tokenizer.
    """
    directory = resolve(path_or_repo_id, revision)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"no config.json in {directory}")
    config, fmt = config_from_dict(json.loads(config_path.read_text()))
    config = config.replace(attn_implementation=attn_implementation)

    processor = None
    if with_processor:
        from ..processing.processor import Processor
        processor = Processor.from_pretrained(directory, config=config)
        config = config.replace(image_token_id=processor.image_token_id)

    theirs = read_safetensors(directory)
    ours, unexpected = from_format(theirs, fmt)
    with torch.device("meta"):
        model = InternVL3(config)
    tied = ("lm_head.weight",) if config.text.tie_word_embeddings else ()
    check_state_dict(model.state_dict(), ours, unexpected, fmt, tied=tied)
    if tied:
        ours["lm_head.weight"] = ours["language.embed_tokens.weight"]
    ours = {k: v.to(device=device, dtype=dtype or v.dtype) for k, v in ours.items()}
    model.load_state_dict(ours, strict=True, assign=True)
    if tied:
        model.lm_head.weight = model.language.embed_tokens.weight
    rotary = model.language.rotary  # non-persistent buffer: rebuild it off the meta device
    rotary.inv_freq = rotary._inv_freq(config.text.rope_theta).to(device)
    return model.eval(), processor


def save_pretrained(model: InternVL3, directory, format: str = "original", processor=None,
                    max_shard_size: int = 4 << 30) -> Path:
    """Write config.json + safetensors (sharded above `max_shard_size` bytes) in the 'original' or 'hf'
    format, plus the processor's files when one is given. Files are written to a temporary name first."""
    if format not in ("original", "hf"):
        raise ValueError(f"format must be 'original' or 'hf', got {format!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if cfg.text.tie_word_embeddings:
        state.pop("lm_head.weight")
    theirs = to_format(state, format)
    raw = to_original_config(cfg) if format == "original" else to_hf_config(cfg)
    raw["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    _write_json(directory / "config.json", raw)
    _write_shards(theirs, directory, max_shard_size)
    if processor is not None:
        processor.save_pretrained(directory)
    return directory


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False))
    os.replace(tmp, path)


def _write_shards(state: dict[str, torch.Tensor], directory: Path, max_shard_size: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][key] = state[key]
        size += nbytes
    for stale in [directory / "model.safetensors", directory / SAFE_INDEX, *directory.glob("model-*.safetensors")]:
        stale.unlink(missing_ok=True)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors" for n in range(len(shards))])
    for name, shard in zip(names, shards):
        tmp = directory / (name + ".tmp")
        save_file(shard, tmp, metadata={"format": "pt"})
        os.replace(tmp, directory / name)
    if len(shards) > 1:
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        total = sum(t.numel() * t.element_size() for t in state.values())
        _write_json(directory / SAFE_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})


__all__ = ["load_pretrained", "save_pretrained", "read_safetensors", "config_from_dict", "UnsupportedCheckpoint"]
