"""Hook points: named identity modules on the forward path, where activations can be read or edited.

TransformerLens-style. A hook is `fn(tensor, hook) -> None | tensor`; returning a tensor replaces the
activation downstream. Names are module paths (`language.layers.3.self_attn.hook_pattern`), stable across
peft wrapping (the `base_model.model.` prefix is stripped) and listed in docs/hooks.md — they are an API.

Attention patterns cost memory, so they are computed only where a hook asks for them: an attention layer
whose `hook_pattern` has a hook materialises the probabilities (eager math); every other layer keeps the fast
backend. `pattern_queries` restricts that to chosen query rows (e.g. only the last token), computed beside the
fast backend's output: memory then grows with the rows kept, not with the sequence length squared.
"""
from __future__ import annotations

import contextlib
import re
from typing import Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

HookFn = Callable[[torch.Tensor, "HookPoint"], Optional[torch.Tensor]]
NameFilter = Union[str, Sequence[str], Callable[[str], bool], None]
PEFT_PREFIXES = ("base_model.model.",)


class HookPoint(nn.Module):
    """Identity. `name` is set by `hook_points()`; `query_index` is set while only some pattern rows are wanted."""

    def __init__(self):
        super().__init__()
        self.name: Optional[str] = None
        self.query_index: Optional[torch.Tensor] = None  # used by hook_pattern points only

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    @property
    def active(self) -> bool:
        return bool(self._forward_hooks)

    def add_hook(self, fn: HookFn) -> torch.utils.hooks.RemovableHandle:
        return self.register_forward_hook(lambda module, args, output: fn(output, module))

    def extra_repr(self) -> str:
        return self.name or ""


def clean_name(name: str) -> str:
    for prefix in PEFT_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def hook_points(model: nn.Module) -> dict[str, HookPoint]:
    """name -> HookPoint, in module order; also stamps each point's `.name`."""
    points = {}
    for name, module in model.named_modules():
        if isinstance(module, HookPoint):
            module.name = clean_name(name)
            points[module.name] = module
    return points


def select(points: dict[str, HookPoint], names: NameFilter) -> list[HookPoint]:
    """Filter by exact name, a list of names, a regex (a string that is not a name), or a predicate."""
    if names is None:
        return list(points.values())
    if callable(names):
        return [p for n, p in points.items() if names(n)]
    if isinstance(names, str):
        if names in points:
            return [points[names]]
        chosen = [p for n, p in points.items() if re.fullmatch(names, n)]
        if not chosen:
            raise KeyError(f"no hook point matches {names!r}; see docs/hooks.md or ivl3lab.hook_points(model)")
        return chosen
    missing = [n for n in names if n not in points]
    if missing:
        raise KeyError(f"unknown hook points {missing}; see docs/hooks.md or ivl3lab.hook_points(model)")
    return [points[n] for n in names]


@contextlib.contextmanager
def hooks(model: nn.Module, fwd_hooks: Iterable[tuple[NameFilter, HookFn]] = (),
          pattern_queries: Optional[torch.Tensor] = None) -> Iterator[nn.Module]:
    """Attach hooks for the duration of a `with` block; they are removed on exit, also after an exception.

    pattern_queries: query positions whose attention rows the `hook_pattern` points should see (the rest is
    not computed); a pattern hook may not edit in that mode.
    """
    points = hook_points(model)
    handles = []
    touched = []
    try:
        for names, fn in fwd_hooks:
            for point in select(points, names):
                handles.append(point.add_hook(fn))
                if pattern_queries is not None and point.name.endswith("hook_pattern"):
                    point.query_index = torch.as_tensor(pattern_queries, dtype=torch.long)
                    touched.append(point)
        yield model
    finally:
        for handle in handles:
            handle.remove()
        for point in touched:
            point.query_index = None


def run_with_hooks(model: nn.Module, *args, fwd_hooks: Iterable[tuple[NameFilter, HookFn]] = (), **kwargs):
    with hooks(model, fwd_hooks):
        return model(*args, **kwargs)


class ActivationCache(dict):
    """name -> tensor (for hooks that fire several times, e.g. per decoding step: a list of tensors)."""

    def __repr__(self) -> str:
        shapes = {k: (tuple(v.shape) if torch.is_tensor(v) else f"{len(v)} steps") for k, v in self.items()}
        return f"ActivationCache({shapes})"

    def stack(self, pattern: str) -> torch.Tensor:
        """Stack the entries whose names match a regex in layer order, e.g. `language.layers.\\d+.hook_resid_post`."""
        names = [n for n in self if re.fullmatch(pattern, n)]
        if not names:
            raise KeyError(f"nothing cached matches {pattern!r}")
        return torch.stack([self[n] for n in names])


def caching_hooks(cache: ActivationCache, names: NameFilter, points: dict[str, HookPoint],
                  to: Union[str, torch.device, None] = "cpu", dtype: Optional[torch.dtype] = None,
                  pattern_keys: Optional[torch.Tensor] = None, steps: bool = False):
    """Hooks that copy activations into `cache` (detached, moved, cast, pattern keys sliced)."""
    def save(tensor: torch.Tensor, hook: HookPoint) -> None:
        value = tensor.detach()
        if pattern_keys is not None and hook.name.endswith("hook_pattern"):
            value = value[..., pattern_keys.to(value.device)]
        value = value.to(device=to, dtype=dtype) if (to is not None or dtype is not None) else value
        if steps:
            cache.setdefault(hook.name, []).append(value)
        else:
            cache[hook.name] = value
    return [(p.name, save) for p in select(points, names)]


def run_with_cache(model: nn.Module, *args, names_filter: NameFilter = None, to="cpu",
                   dtype: Optional[torch.dtype] = None, pattern_queries=None, pattern_keys=None,
                   fwd_hooks: Iterable[tuple[NameFilter, HookFn]] = (), **kwargs):
    """Run the model once and return (output, ActivationCache of the selected hook points).

    Caching `hook_pattern` points switches only those layers to materialised attention. `pattern_queries` /
    `pattern_keys` keep just that slice (query rows / key columns) of every requested pattern — e.g. text
    queries x image keys of LLM patterns. ViT patterns are indexed by patch (CLS = 0) and LLM patterns by
    sequence position, so slice them in separate runs.
    """
    cache = ActivationCache()
    points = hook_points(model)
    keys = None if pattern_keys is None else torch.as_tensor(pattern_keys, dtype=torch.long)
    saving = caching_hooks(cache, names_filter, points, to, dtype, keys)
    with hooks(model, list(fwd_hooks) + saving, pattern_queries=pattern_queries):
        output = model(*args, **kwargs)
    return output, cache


__all__ = ["HookPoint", "ActivationCache", "hook_points", "hooks", "run_with_hooks", "run_with_cache",
           "caching_hooks", "select"]
