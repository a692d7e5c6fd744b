"""ACAT networks (Fontanella et al., ICML 2023, sections 3 and 4.2, appendix B).

Volumes are (B, C, X, Y, S): MONAI channel-first, RAS, X left -> right (the first half along X is
the patient's left hemisphere), Y posterior -> anterior, S the axial slices (last axis).

- :class:`SliceCNN`: the 7-convolution slice encoder of the brain-CT "MTL" model (appendix B).
- :class:`SliceClassifier`: the baseline. As in the MTL model each slice is cut at the midline into
  a left and a right half; the right half is mirrored so that both halves look alike (the same
  anatomy on the same side of the image) and one CNN serves both. Each half's last feature map is
  average-pooled, the two half features are concatenated per slice ([left, right]), averaged over
  the slices and classified by one linear layer. The paper's MTL model has two heads (lesion yes/no
  and side); one 4-way head (none, left, right, both) expresses the same decision and is what the
  accuracy is computed on.
- :class:`ACATClassifier`: the baseline plus a saliency branch of the same architecture. After
  early, middle and late image layers a spatial mask from the saliency features modulates the image
  features (F + F * mask); the masks are fused by a 1x1 convolution into a last mask applied before
  pooling; an MLP weights the slices instead of the plain average.
- :class:`SliceAutoencoder`: the autoencoder of the counterfactual saliency maps (appendix B: three
  residual blocks in the encoder and in the decoder, 3x3 filters, no bottleneck), per slice.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit, UpSample
from monai.networks.layers import Act, Norm
from torch import nn

SLICE_CHANNELS = (16, 32, 32, 64, 64, 128, 128)
SLICE_STRIDES = (1, 2, 1, 2, 1, 2, 1)


def volume_to_slices(volume: torch.Tensor) -> torch.Tensor:
    """(B, C, X, Y, S) -> (B*S, C, X, Y), slices of one volume contiguous."""
    b, c, x, y, s = volume.shape
    return volume.permute(0, 4, 1, 2, 3).reshape(b * s, c, x, y)


def slices_to_volume(slices: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(B*S, C, X, Y) -> (B, C, X, Y, S), the inverse of :func:`volume_to_slices`."""
    n, c, x, y = slices.shape
    return slices.reshape(batch_size, n // batch_size, c, x, y).permute(0, 2, 3, 4, 1)


class SliceCNN(nn.Module):
    """Seven 3x3 convolutions (batch norm, ReLU) on 2D slices; a layer list so callers can interleave.

    The default widths and strides downsample by 8, so a 64x128 half slice ends at 8x16.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = SLICE_CHANNELS,
        strides: Sequence[int] = SLICE_STRIDES,
    ):
        super().__init__()
        if len(channels) != len(strides) or not channels:
            raise ValueError(f"channels {tuple(channels)} and strides {tuple(strides)} must have the same length")
        self.layers = nn.ModuleList()
        cin = in_channels
        for cout, stride in zip(channels, strides):
            # No bias: batch norm follows, and a bias-free conv maps a zero input to zero features.
            self.layers.append(
                Convolution(2, cin, cout, strides=stride, kernel_size=3, act=Act.RELU, norm=Norm.BATCH, bias=False)
            )
            cin = cout
        self.out_channels = cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class SliceClassifier(nn.Module):
    """The baseline: hemispheres of every slice through one CNN, pooled, averaged over slices, linear.

    ``hemispheres=False`` runs whole slices through the CNN (features of width F instead of 2F).
    """

    def __init__(
        self,
        num_classes: int = 4,
        in_channels: int = 1,
        channels: Sequence[int] = SLICE_CHANNELS,
        strides: Sequence[int] = SLICE_STRIDES,
        dropout: float = 0.2,
        hemispheres: bool = True,
        spatial_pool: str = "avg",
    ):
        super().__init__()
        if spatial_pool not in ("avg", "max"):
            raise ValueError(f"spatial_pool '{spatial_pool}' is unknown; expected avg or max")
        self.spatial_pool = spatial_pool
        self.hemispheres = hemispheres
        self.parts = 2 if hemispheres else 1
        self.cnn = SliceCNN(in_channels, channels, strides)
        self.num_features = self.parts * self.cnn.out_channels
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(self.num_features, num_classes)

    def _to_halves(self, volume: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, S) -> (B*S*P, C, X/P, Y), ordered (volume, slice, [left, mirrored right]).

        P = 2 with hemispheres (1 otherwise). The right half is flipped along X so that its midline
        is on the same side of the image as the left half's.
        """
        slices = volume_to_slices(volume)
        if not self.hemispheres:
            return slices
        n, c, x, y = slices.shape
        if x % 2:
            raise ValueError(f"the left-right size {x} must be even to cut slices at the midline")
        half = x // 2
        pair = torch.stack([slices[:, :, :half], slices[:, :, half:].flip(2)], dim=1)
        return pair.reshape(n * 2, c, half, y)

    def _from_halves(self, maps: torch.Tensor, batch_size: int) -> torch.Tensor:
        """(B*S*P, C, h, w) half maps -> (B, C, P*h, w, S): the right half un-mirrored, halves side by side."""
        if self.hemispheres:
            n, c, h, w = maps.shape
            pair = maps.reshape(n // 2, 2, c, h, w)
            maps = torch.cat([pair[:, 0], pair[:, 1].flip(2)], dim=2)
        return slices_to_volume(maps, batch_size)

    def _pool_halves(self, features: torch.Tensor, batch_size: int) -> torch.Tensor:
        """(B*S*P, F, h, w) -> (B, S, P*F): global pooling, then [left, right] per slice.

        ``max`` pooling keeps a small lesion's response, which an average over the half slice dilutes.
        """
        pooled = features.amax(dim=(2, 3)) if self.spatial_pool == "max" else features.mean(dim=(2, 3))
        return pooled.reshape(batch_size, -1, self.num_features)

    def slice_features(self, volume: torch.Tensor) -> torch.Tensor:
        """Per-slice features (B, S, P*F), [left, right] halves."""
        return self._pool_halves(self.cnn(self._to_halves(volume)), volume.shape[0])

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.slice_features(volume).mean(dim=1)))


class ACATClassifier(SliceClassifier):
    """ACAT: the baseline's image branch modulated by spatial attention from a saliency branch.

    It subclasses :class:`SliceClassifier` so that the image branch (``cnn``) and the head (``head``)
    keep the baseline's parameter names: ACAT is fine-tuned from the baseline (paper appendix C).
    The saliency branch has only the layers up to the last attention layer; later ones would have
    no use and no gradient (unused parameters also break DistributedDataParallel).

    ``attention_layers`` are 1-based indices of the image layers followed by an attention module
    (paper 4.2: after the first, third and fifth convolution of the MTL model).
    """

    def __init__(
        self,
        num_classes: int = 4,
        in_channels: int = 1,
        channels: Sequence[int] = SLICE_CHANNELS,
        strides: Sequence[int] = SLICE_STRIDES,
        attention_layers: Sequence[int] = (1, 3, 5),
        slice_hidden: int = 64,
        dropout: float = 0.2,
        hemispheres: bool = True,
        spatial_pool: str = "avg",
    ):
        super().__init__(num_classes, in_channels, channels, strides, dropout, hemispheres, spatial_pool)
        layers = sorted(set(int(i) for i in attention_layers))
        if not layers or layers[0] < 1 or layers[-1] > len(channels):
            raise ValueError(f"attention_layers {tuple(attention_layers)} must be in 1..{len(channels)}")
        self.attention_layers = tuple(layers)
        depth = layers[-1]
        self.saliency_cnn = SliceCNN(in_channels, channels[:depth], strides[:depth])
        # Channel max-pool (in forward) -> 3x3 conv -> sigmoid: the paper's salient attention module.
        self.attention = nn.ModuleDict(
            {str(i): Convolution(2, 1, 1, kernel_size=3, act=Act.SIGMOID, norm=None) for i in layers}
        )
        # Attention fusion: a 1x1 convolution weighting the pooled masks.
        self.fusion = Convolution(2, len(layers), 1, kernel_size=1, act=Act.SIGMOID, norm=None)
        self.slice_attention = nn.Sequential(
            nn.Linear(self.num_features, slice_hidden),
            nn.LeakyReLU(),
            nn.Dropout(0.1),
            nn.Linear(slice_hidden, 1),
        )

    def load_baseline(
        self, baseline: SliceClassifier | Mapping[str, torch.Tensor], gate_bias: float | None = None
    ) -> ACATClassifier:
        """Initialise from a trained baseline: its CNN into both branches, its head into the head.

        Accepts the baseline network or its state dict. Shapes must match (strict loading). With
        ``gate_bias`` None the attention modules and the slice MLP keep their random initialisation,
        whose masks (about 0.5 everywhere) rescale the baseline's features at every attended layer, so
        fine-tuning starts from a network that is no longer the baseline. A number instead closes the
        gates: the attention and fusion convolutions get zero weights and that bias (every mask
        sigmoid(gate_bias), e.g. 0.05 for -3) and the slice MLP's output layer zero weights (equal slice
        weights, the baseline's mean), so ACAT starts next to the baseline and opens a gate only where
        the gradient asks for it (zero-initialised weights still receive gradients).
        """
        state = baseline.state_dict() if isinstance(baseline, nn.Module) else baseline
        cnn = {k[len("cnn.") :]: v for k, v in state.items() if k.startswith("cnn.")}
        head = {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}
        self.cnn.load_state_dict(cnn)
        self.head.load_state_dict(head)
        depth = len(self.saliency_cnn.layers)
        self.saliency_cnn.load_state_dict({k: v for k, v in cnn.items() if int(k.split(".")[1]) < depth})
        if gate_bias is not None:
            with torch.no_grad():
                for block in [*self.attention.values(), self.fusion]:
                    block.conv.weight.zero_()
                    block.conv.bias.fill_(float(gate_bias))
                self.slice_attention[-1].weight.zero_()
                self.slice_attention[-1].bias.zero_()
        return self

    def added_parameters(self) -> list[nn.Parameter]:
        """The parameters ACAT adds to the baseline (attention, fusion, slice MLP): fine-tuning can give them
        their own learning rate, since at the baseline's small fine-tuning rate they barely move from their
        initialisation."""
        return [*self.attention.parameters(), *self.fusion.parameters(), *self.slice_attention.parameters()]

    def _attend(self, volume: torch.Tensor, saliency: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Modulated per-slice features (B, S, P*F) and the masks in half-slice layout."""
        if saliency.shape != volume.shape:
            raise ValueError(f"saliency {tuple(saliency.shape)} must have the image's shape {tuple(volume.shape)}")
        image = self._to_halves(volume)
        salient = self._to_halves(saliency)
        masks: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.cnn.layers, start=1):
            image = layer(image)
            if i <= len(self.saliency_cnn.layers):
                salient = self.saliency_cnn.layers[i - 1](salient)
            if str(i) in self.attention:
                mask = self.attention[str(i)](salient.amax(dim=1, keepdim=True))
                image = image + image * mask
                masks[f"layer{i}"] = mask
        size = image.shape[2:]
        pooled = [F.adaptive_avg_pool2d(mask, size) for mask in masks.values()]
        fused = self.fusion(torch.cat(pooled, dim=1))
        masks["fused"] = fused
        image = image + image * fused
        return self._pool_halves(image, volume.shape[0]), masks

    def slice_features(self, volume: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
        """Per-slice features (B, S, P*F) after the saliency attention, before the slice weighting."""
        return self._attend(volume, saliency)[0]

    def _slice_weights(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.slice_attention(features))  # (B, S, 1)

    def forward(self, volume: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
        features, _ = self._attend(volume, saliency)
        weights = self._slice_weights(features)
        # Normalised so that the slice weights choose *which* slices count, not the feature scale.
        pooled = (weights * features).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-12)
        return self.head(self.dropout(pooled))

    @torch.no_grad()
    def attention_masks(self, volume: torch.Tensor, saliency: torch.Tensor) -> dict[str, torch.Tensor]:
        """The masks in volume layout, for figures: ``layer<i>`` and ``fused`` (B, 1, X_i, Y_i, S) at
        their own resolution, and ``slices`` (B, S), the normalised slice weights."""
        features, masks = self._attend(volume, saliency)
        out = {name: self._from_halves(mask, volume.shape[0]) for name, mask in masks.items()}
        weights = self._slice_weights(features)[..., 0]
        out["slices"] = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return out


class SliceAutoencoder(nn.Module):
    """Per-slice residual autoencoder with a spatial latent (no fully connected bottleneck).

    Encoder: three stride-2 MONAI residual units, the last one linear so the latent is not
    restricted to ReLU's half space (the counterfactual search moves it in both directions).
    Decoder: three (bilinear x2 upsampling, residual unit) blocks and a 3x3 output convolution
    to the image's channels through tanh, since images are scaled to [-1, 1].
    """

    def __init__(
        self, in_channels: int = 1, channels: Sequence[int] = (16, 32, 64), strides: Sequence[int] = (2, 2, 2)
    ):
        super().__init__()
        if len(channels) != 3 or len(strides) != 3:
            raise ValueError(
                f"channels={tuple(channels)}, strides={tuple(strides)}: the autoencoder has 3 blocks each way"
            )
        self.divisor = int(torch.prod(torch.tensor(list(strides))))
        unit = dict(spatial_dims=2, kernel_size=3, act=Act.RELU, norm=Norm.BATCH)
        encoder: list[nn.Module] = []
        cin = in_channels
        for i, (cout, stride) in enumerate(zip(channels, strides)):
            encoder.append(
                ResidualUnit(in_channels=cin, out_channels=cout, strides=stride, last_conv_only=i == 2, **unit)
            )
            cin = cout
        self.encoder = nn.Sequential(*encoder)
        decoder: list[nn.Module] = []
        for cout, stride in zip((*reversed(channels[:-1]), channels[0]), reversed(strides)):
            up = (
                UpSample(
                    2, cin, cin, scale_factor=stride, mode="nontrainable", interp_mode="bilinear", align_corners=False
                )
                if stride > 1
                else nn.Identity()
            )
            decoder.append(nn.Sequential(up, ResidualUnit(in_channels=cin, out_channels=cout, strides=1, **unit)))
            cin = cout
        self.decoder = nn.Sequential(*decoder)
        self.output = Convolution(2, cin, in_channels, kernel_size=3, act=Act.TANH, norm=None)

    def encode(self, volume: torch.Tensor) -> torch.Tensor:
        """(B, C, X, Y, S) -> latent (B, S, channels[-1], X/d, Y/d), d the product of the strides."""
        if any(size % self.divisor for size in volume.shape[2:4]):
            raise ValueError(f"slice size {tuple(volume.shape[2:4])} must be divisible by {self.divisor}")
        z = self.encoder(volume_to_slices(volume))
        return z.reshape(volume.shape[0], volume.shape[-1], *z.shape[1:])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent (B, S, C_z, h, w) -> volume (B, C, 8h, 8w, S)."""
        b, s = z.shape[:2]
        slices = self.output(self.decoder(z.reshape(b * s, *z.shape[2:])))
        return slices_to_volume(slices, b)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(volume))
