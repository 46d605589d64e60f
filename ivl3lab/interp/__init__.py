"""Interpretability on top of the hook points: token map, attention maps, logit lens, ablations, patching,
captum attribution, an interactive explorer. Never imported by the model or by training."""
from .ablation import (Scope, ablate, ablate_head, ablate_scopes, ablation_values, head_sweep, image_activations,
                       occlusion_sweep, plot_effects, plot_matrix, spread, unit_scopes)
from .adapters import TARGETS, AdapterComparison, compare_with_adapter, plot_adapter_differences
from .attention import (image_attention_mass, patches_to_tokens, query_positions, rollout_patch_scores, rollout_step,
                        text_image_patterns, text_to_image_attention, vision_attention, vision_rollout)
from .attribution import (Attribution, feature_ablation, feature_mask, forward_fn, integrated_gradients,
                          layer_integrated_gradients, make_baseline, region_mask)
from .explorer import AttentionExplorer
from .lens import Lens, logit_lens, plot_lens
from .patching import (baseline_scores, check_patchable, layer_point, normalised_recovery, patch, patch_layers,
                       patch_positions, patch_score, plot_layer_position, plot_recovery)
from .plots import image_score_maps, plot_attention_grid, plot_image_scores, plot_layer_curve, plot_rollout, plot_tile_maps
from .probe import Probe, answer_logprob
from .tokenmap import ImageToken, TokenMap

__all__ = [
    "TokenMap", "ImageToken", "Probe", "answer_logprob",
    "text_to_image_attention", "text_image_patterns", "image_attention_mass", "query_positions", "vision_attention",
    "vision_rollout", "rollout_step", "rollout_patch_scores", "patches_to_tokens",
    "Lens", "logit_lens", "plot_lens", "AttentionExplorer",
    "plot_image_scores", "image_score_maps", "plot_attention_grid", "plot_tile_maps", "plot_rollout", "plot_layer_curve",
    "Attribution", "integrated_gradients", "layer_integrated_gradients", "feature_ablation", "feature_mask",
    "region_mask", "forward_fn", "make_baseline",
    "Scope", "unit_scopes", "spread", "ablate", "ablate_scopes", "ablation_values", "image_activations",
    "occlusion_sweep", "head_sweep", "ablate_head", "plot_effects", "plot_matrix",
    "patch", "patch_score", "patch_layers", "patch_positions", "normalised_recovery", "baseline_scores",
    "check_patchable", "layer_point", "plot_recovery", "plot_layer_position",
    "compare_with_adapter", "AdapterComparison", "plot_adapter_differences", "TARGETS",
]
