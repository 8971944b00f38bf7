"""Norm layers and networks for NormBench, built from `app.core.catalogue`."""

from models.nets import build_model
from models.norms import create_norm_layer, get_norm_layer, norm_includes_activation, norm_standardizes_weights
from models.precise_bn import precise_bn_samples, recompute_bn_stats

__all__ = [
    "build_model",
    "create_norm_layer",
    "get_norm_layer",
    "norm_includes_activation",
    "norm_standardizes_weights",
    "precise_bn_samples",
    "recompute_bn_stats",
]
