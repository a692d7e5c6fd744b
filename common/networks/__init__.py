"""Networks of the five methods, 2D and 3D by ``spatial_dims``, built from MONAI blocks."""

from common.networks.patchgan import PatchGANClassifier
from common.networks.vagan import Classifier, CounterfactualMaps, Critic, EffectMap, MapGenerator

__all__ = ["Classifier", "CounterfactualMaps", "Critic", "PatchGANClassifier", "EffectMap", "MapGenerator"]
