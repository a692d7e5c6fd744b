"""Networks of the five methods, 2D and 3D by ``spatial_dims``, built from MONAI blocks."""

from common.networks.acat import ACATClassifier, SliceAutoencoder, SliceClassifier, SliceCNN
from common.networks.icam import (
    AttributeClassifier,
    AttributeEncoder,
    ContentDiscriminator,
    ContentEncoder,
    DomainDiscriminator,
    Generator,
    reparameterize,
)
from common.networks.patchgan import PatchGANClassifier
from common.networks.probe import minimum_input_size
from common.networks.tvd import FeatureCNN
from common.networks.vagan import Classifier, CounterfactualMaps, Critic, EffectMap, MapGenerator

__all__ = [
    "ACATClassifier",
    "SliceAutoencoder",
    "SliceClassifier",
    "SliceCNN",
    "Classifier",
    "CounterfactualMaps",
    "Critic",
    "PatchGANClassifier",
    "EffectMap",
    "FeatureCNN",
    "MapGenerator",
    "AttributeClassifier",
    "AttributeEncoder",
    "ContentDiscriminator",
    "ContentEncoder",
    "DomainDiscriminator",
    "Generator",
    "minimum_input_size",
    "reparameterize",
]
