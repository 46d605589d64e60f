"""Activation patching: which activations carry the difference between a clean and a corrupted image?

Run the corrupted input, overwrite one activation (a layer's residual stream, attention output or MLP output,
at the image positions) with its value from the clean run, and measure how much of the clean answer's
log-probability comes back:

    recovery = (patched - corrupted) / (clean - corrupted)          (each one log p(answer))

1: this activation alone restores the clean behaviour; 0: it carries none of the difference. Activations are
copied position by position, so both inputs need the same prompt and the same tile layout (checked). When
clean and corrupted score the same the ratio is undefined: `normalised_recovery` gives NaN there, and the
sweeps below raise an error instead. tutorials/04_activation_patching.md discusses the pitfalls.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from .ablation import (cache_views, check_same_layout, plot_matrix, replacing_hooks, run_batched, score_batch,
                       unit_scopes, view_index)
from .probe import Probe

KINDS = {"resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post",
         "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out"}


def layer_point(kind: str, layer: int) -> str:
    """("attn_out", 3) -> "language.layers.3.hook_attn_out"."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    return f"language.layers.{layer}.{KINDS[kind]}"


def normalised_recovery(patched, clean, corrupted) -> torch.Tensor:
    """(patched - corrupted) / (clean - corrupted), elementwise; NaN where clean == corrupted (nothing to
    recover, so the question has no answer)."""
    patched = torch.as_tensor(patched, dtype=torch.float32)
    gap = float(clean) - float(corrupted)
    return (patched - float(corrupted)) / gap if gap != 0 else torch.full_like(patched, float("nan"))


def check_patchable(clean: Probe, corrupted: Probe, names: tuple[str, str] = ("clean", "corrupted")) -> None:
    """Same tile layout (the error names both layouts), then the same prompt and answer tokens."""
    check_same_layout(clean, corrupted, names)
    if not torch.equal(clean.input_ids, corrupted.input_ids):
        raise ValueError(f"{names[0]} and {names[1]} need the same prompt and answer (their token ids differ): "
                         f"patching copies activations position by position")


def baseline_scores(model, clean: Probe, corrupted: Probe, min_gap: float = 1e-6) -> tuple[float, float]:
    """log p(answer) on the clean and on the corrupted input; an error if they are (nearly) equal."""
    check_patchable(clean, corrupted)
    clean_score, corrupted_score = score_batch(model, clean).item(), score_batch(model, corrupted).item()
    if abs(clean_score - corrupted_score) < min_gap:
        raise ValueError(f"clean and corrupted give the same log p(answer) ({clean_score:.6g} vs "
                         f"{corrupted_score:.6g}), so (patched - corrupted) / (clean - corrupted) is undefined; "
                         f"use a corruption that changes the answer's probability")
    return clean_score, corrupted_score


def _from_source(model, source: Probe, points: Sequence[str], positions: torch.Tensor):
    """Cache `source` at `points` -> (index per point, make_hooks writing its values at `positions`)."""
    views = cache_views(model, source, points)
    index = {p: view_index(source, p, positions) for p in points}
    return index, replacing_hooks(index, {p: views[p][index[p]] for p in points})


def _positions(probe: Probe, positions: Union[str, Sequence[int], torch.Tensor, None]) -> torch.Tensor:
    """"image" (or None): the image tokens; "all": every position; else the given sequence positions."""
    if isinstance(positions, str) and positions not in ("image", "all"):
        raise ValueError(f"positions must be 'image', 'all' or sequence positions, got {positions!r}")
    if positions is None or isinstance(positions, str):
        return probe.image_positions if positions in (None, "image") else torch.arange(probe.input_ids.shape[1])
    return torch.as_tensor(positions, dtype=torch.long)


def patch_score(model, target: Probe, source: Probe, point: str, positions=None) -> float:
    """log p(answer) of `target` with `source`'s activation at `point` written over `positions` ("image" =
    the image tokens, the default; "all"; or sequence positions)."""
    check_patchable(source, target, ("source", "target"))
    index, make_hooks = _from_source(model, source, [point], _positions(source, positions))
    return run_batched(model, target, [{point: torch.ones(len(index[point]), dtype=torch.bool)}], make_hooks,
                       batch_size=1, progress=False).item()


def patch(model, clean: Probe, corrupted: Probe, point: str, positions=None) -> float:
    """Normalised recovery of one patch: the clean activation at `point` (and `positions`) into the corrupted run."""
    clean_score, corrupted_score = baseline_scores(model, clean, corrupted)
    return normalised_recovery(patch_score(model, corrupted, clean, point, positions), clean_score,
                               corrupted_score).item()


def patch_layers(model, clean: Probe, corrupted: Probe, kinds: Sequence[str] = ("resid_pre", "attn_out", "mlp_out"),
                 positions="image", batch_size: int = 8, progress: bool = True) -> dict[str, torch.Tensor]:
    """kind -> recovery per layer [layers]: each layer's clean activation patched on its own into the corrupted
    run, at the image positions (or "all" positions)."""
    clean_score, corrupted_score = baseline_scores(model, clean, corrupted)
    layers = range(model.config.text.num_layers)
    points = [layer_point(kind, layer) for kind in kinds for layer in layers]
    index, make_hooks = _from_source(model, clean, points, _positions(clean, positions))
    rows = [{p: torch.ones(len(index[p]), dtype=torch.bool)} for p in points]
    scores = run_batched(model, corrupted, rows, make_hooks, batch_size, progress, "patching layers")
    recovery = normalised_recovery(scores, clean_score, corrupted_score).reshape(len(kinds), len(layers))
    return dict(zip(kinds, recovery))


def patch_positions(model, clean: Probe, corrupted: Probe, kind: str = "resid_pre", unit: str = "tile",
                    layers: Optional[Sequence[int]] = None, batch_size: int = 16, progress: bool = True):
    """Position-resolved patching: (recovery [layers, units], the units' scopes). Each entry patches one unit
    (a "token", 2x2 "group" or "tile", see `unit_scopes`) at one layer. `spread(recovery[i], scopes, token_map)`
    turns a row into a per-token map for `plot_image_scores`."""
    clean_score, corrupted_score = baseline_scores(model, clean, corrupted)
    layers = list(range(model.config.text.num_layers)) if layers is None else list(layers)
    scopes, image = unit_scopes(clean.token_map, unit), clean.image_positions
    points = [layer_point(kind, layer) for layer in layers]
    _, make_hooks = _from_source(model, clean, points, image)
    masks = [torch.isin(image, scope.positions(clean.token_map)) for scope in scopes]  # [units] x [K]
    rows = [{p: mask} for p in points for mask in masks]
    scores = run_batched(model, corrupted, rows, make_hooks, batch_size, progress, f"patching {kind} by {unit}")
    return normalised_recovery(scores, clean_score, corrupted_score).reshape(len(layers), len(scopes)), scopes


# ------------------------------------------------------------------------------------------------- plots
def plot_recovery(curves: dict, title: str = "activation patching at image positions", ax=None):
    """One line per kind (`patch_layers`): recovery against layer; 1 = clean behaviour restored."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    ax = ax or plt.subplots(figsize=(6, 3.5))[1]
    for kind, values in curves.items():
        values = torch.as_tensor(values).cpu()
        ax.plot(range(len(values)), values.numpy(), marker="o", label=kind)
    ax.axhline(0, color="black", lw=0.8)
    ax.axhline(1, color="gray", lw=0.8, ls="--")
    ax.set(xlabel="layer", ylabel="normalised recovery", title=title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend()
    return ax.figure


def plot_layer_position(recovery, scopes=None, layers: Optional[Sequence[int]] = None,
                        title: str = "recovery by layer and position", ax=None):
    """Layer x position heatmap (`patch_positions`): columns labelled with their scopes when few, dotted lines
    between tiles when many; `layers` labels the rows when only some layers were patched."""
    labels = [s.label for s in scopes] if scopes is not None and len(scopes) <= 40 else None
    fig = plot_matrix(recovery, title, xlabel="image position (tile by tile, thumbnail last)", ylabel="layer",
                      xticklabels=labels, ax=ax)
    ax = ax or fig.axes[0]
    if layers is not None:
        ax.set_yticks(range(len(layers)), list(layers))
    if scopes is not None and labels is None:
        tiles = [(s.image, s.tile) for s in scopes]
        for column in [i for i in range(1, len(tiles)) if tiles[i] != tiles[i - 1]]:
            ax.axvline(column - 0.5, color="gray", lw=0.8, ls=":")
    return fig
