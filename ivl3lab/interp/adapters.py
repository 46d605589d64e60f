"""What does a LoRA adapter change? Cache the same activations with the adapter on and off, on the same input.

peft wraps ivl3lab's plain `nn.Module` directly: `peft.get_peft_model(model, LoraConfig(target_modules=regex))`
(no `task_type`: `"CAUSAL_LM"` would want transformers' `prepare_inputs_for_generation`). peft injects LoRA
layers *inside* the existing modules and prefixes every name with `base_model.model.`, which `hook_points`
strips, so hook names stay the same. `with peft_model.disable_adapter():` runs the very same weights without
the adapter: one model gives both runs, and everything upstream of the first adapted module stays bit-identical.

Give `target_modules` as a regex (`TARGETS`): plain names like "fc1" or "proj" match modules in the ViT, the
projector and the LLM at once.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from ..hooks import ActivationCache, NameFilter, caching_hooks, hook_points, hooks
from .probe import Probe

# Regexes for LoraConfig(target_modules=...), matched against ivl3lab module names (peft uses re.fullmatch).
TARGETS = {
    "language_attention": r"language\.layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
    "language_mlp": r"language\.layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)",
    "vision_attention": r"vision\.layers\.\d+\.attn\.(qkv|proj)",
    "vision_mlp": r"vision\.layers\.\d+\.mlp\.(fc1|fc2)",
    "projector": r"projector\.(fc1|fc2)",
}


@dataclass
class AdapterComparison:
    """Cached activations with and without the adapter, and how far each one moved."""

    with_adapter: ActivationCache
    without_adapter: ActivationCache
    max_abs: dict[str, float]  # max |on - off|
    rel_norm: dict[str, float]  # ||on - off|| / ||off||
    output_with: Any = None  # what the run function returned (a Probe: log p(answer) [1])
    output_without: Any = None

    def changed(self, atol: float = 0.0) -> list[str]:
        """Names whose activation moved by more than `atol` anywhere."""
        return [name for name, value in self.max_abs.items() if value > atol]

    def __repr__(self) -> str:
        rows = [f"  {name:<50} max|Δ| {value:.3g}  rel {self.rel_norm[name]:.3g}"
                for name, value in self.max_abs.items()]
        return "AdapterComparison(\n" + "\n".join(rows) + "\n)"


def compare_with_adapter(peft_model: nn.Module, run: Union[Probe, Callable[[nn.Module], Any]], names: NameFilter,
                         pattern_queries=None, pattern_keys=None) -> AdapterComparison:
    """Run `run` twice on `peft_model` — adapter enabled, then disabled — caching the hook points `names`.

    run: a Probe (scores its answer) or any `fn(model) -> output` (e.g. `lambda m: m(ids, pixel_values)`).
    names: as in run_with_cache (a name, a list, a regex); attention patterns work too, with
    `pattern_queries` / `pattern_keys` selecting a slice as in run_with_cache.
    """
    if not hasattr(peft_model, "disable_adapter"):
        raise TypeError("expected a peft model (peft.get_peft_model(...)) with a `disable_adapter()` context")
    fn = run.score if isinstance(run, Probe) else run
    with torch.no_grad():
        output_on, on = _run_cached(peft_model, fn, names, pattern_queries, pattern_keys)
        with peft_model.disable_adapter():
            output_off, off = _run_cached(peft_model, fn, names, pattern_queries, pattern_keys)
    max_abs, rel_norm = {}, {}
    for name in on:
        delta = on[name].float() - off[name].float()
        max_abs[name] = float(delta.abs().max()) if delta.numel() else 0.0
        rel_norm[name] = float(delta.norm() / off[name].float().norm().clamp(min=1e-12))
    return AdapterComparison(on, off, max_abs, rel_norm, output_on, output_off)


def _run_cached(model: nn.Module, fn: Callable, names: NameFilter, pattern_queries, pattern_keys):
    cache = ActivationCache()
    keys = None if pattern_keys is None else torch.as_tensor(pattern_keys, dtype=torch.long)
    saving = caching_hooks(cache, names, hook_points(model), to="cpu", pattern_keys=keys)
    with hooks(model, saving, pattern_queries=pattern_queries):
        output = fn(model)
    return output, cache


def plot_adapter_differences(comparison: AdapterComparison, metric: str = "rel_norm", ax=None):
    """Per-layer differences: one line per hook template (`language.layers.{i}.hook_resid_post`, ...) over the
    layer index; hook points outside the layer stacks are drawn as labelled bars beside it."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    values = getattr(comparison, metric)
    series: dict[str, dict[int, float]] = {}
    single: dict[str, float] = {}
    for name, value in values.items():
        match = re.fullmatch(r"(.*layers)\.(\d+)\.(.*)", name)
        if match:
            series.setdefault(f"{match[1]}.{{i}}.{match[3]}", {})[int(match[2])] = value
        else:
            single[name] = value
    if ax is None:
        ncols = 1 + bool(single and series)
        fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 3.5), squeeze=False)
        ax, side_ax = axes[0][0], (axes[0][1] if ncols == 2 else axes[0][0])
    else:
        side_ax = ax
    for template, points in series.items():
        layers = sorted(points)
        ax.plot(layers, [points[i] for i in layers], marker="o", label=template)
    if series:
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.legend(fontsize=7)
        ax.set_title("adapter on vs off")
    if single:
        side_ax.barh(list(single), list(single.values()), color="tab:gray")
        side_ax.invert_yaxis()  # model order, top to bottom
        side_ax.set_xlabel(metric)
        side_ax.set_title("outside the layer stacks")
        side_ax.tick_params(axis="y", labelsize=7)
    ax.figure.tight_layout()
    return ax.figure


__all__ = ["TARGETS", "AdapterComparison", "compare_with_adapter", "plot_adapter_differences"]
