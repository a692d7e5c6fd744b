"""A MONAI dictionary transform that explains a classifier's prediction for one image."""

from __future__ import annotations

import torch
from monai.data import MetaTensor
from monai.transforms import MapTransform
from torch import nn

from common.attribution.baselines import attribute

# The attribution-constraint paper's short names for the maps it computes at inference.
PAPER_NAMES = {"G": "gradient", "IG": "integrated_gradients", "EG": "expected_gradients"}


class Attributiond(MapTransform):
    """Adds ``output_key``: the attribution map of ``network`` for ``image_key`` (channel-first, one item).

    The map is a ``MetaTensor`` carrying the image's metadata and transform trace, so ``Invertd``
    with ``orig_keys=image_key`` brings it back to the input's space.

    Args:
        network: the classifier.
        method: a :data:`common.attribution.METHODS` name or the paper's ``G``, ``IG``, ``EG``.
        kwargs: passed to :func:`common.attribution.attribute` (e.g. ``baselines``, ``n_steps``).
    """

    def __init__(
        self, network: nn.Module, method: str = "G", image_key: str = "image", output_key: str = "attribution", **kwargs
    ):
        super().__init__([image_key])
        self.network = network
        self.method = PAPER_NAMES.get(method, method)
        self.output_key = output_key
        self.kwargs = kwargs

    def __call__(self, data):
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            self.network.eval()
            x = torch.as_tensor(image).as_subclass(torch.Tensor)[None]
            amap = attribute(self.network, x, self.method, **self.kwargs)[0]
            meta = image.meta if isinstance(image, MetaTensor) else {}
            ops = image.applied_operations if isinstance(image, MetaTensor) else []
            d[self.output_key] = MetaTensor(amap, meta=dict(meta), applied_operations=list(ops))
        return d
