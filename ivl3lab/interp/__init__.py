"""Interpretability on top of the hook points: token map, attention maps, logit lens, ablations, patching,
captum attribution, an interactive explorer. Never imported by the model or by training."""
from .tokenmap import ImageToken, TokenMap

__all__ = ["ImageToken", "TokenMap"]
