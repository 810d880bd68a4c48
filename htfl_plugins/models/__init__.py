"""Model zoo: every model is a feature extractor (base → feature_dim) and a head."""

from htfl_plugins.models.zoo import GROUPS, MODELS, BaseHeadSplit, build_model, mixes_samples

__all__ = ["BaseHeadSplit", "MODELS", "GROUPS", "build_model", "mixes_samples"]
