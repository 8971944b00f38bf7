"""Norm layers and networks for NormBench, built from `app.catalogue`."""

from models.nets import build_model
from models.norms import create_norm_layer, get_norm_layer

__all__ = ["build_model", "create_norm_layer", "get_norm_layer"]
