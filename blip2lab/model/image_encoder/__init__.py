"""The frozen image encoder (Figure 2's leftmost box): one interface (`base.ImageEncoder`,
pixels [B, 3, S, S] -> tokens [B, N, D_v]) over three families of towers:

- `open_clip.OpenClipImageEncoder`: any open_clip ViT (EVA01-g-14 is the paper's EVA ViT-g);
- `hf_vision.HFBlip2ImageEncoder`: transformers' Blip2VisionModel (the official checkpoints);
- `efficientnet.EfficientNetImageEncoder`: a timm CNN, its feature map as tokens (mini-real).

`build_image_encoder(cfg)` builds the configured tower with fresh weights; pretrained
weights come in through `blip2lab.formats` (`build_model`, the checkpoint loaders).
"""

from __future__ import annotations

from ...config import ConfigError, VisionConfig
from .base import POS_EMBED_NAMES, ImageEncoder, absolute_index, interpolate_pos_embed, square
from .efficientnet import EfficientNetImageEncoder, efficientnet_taps
from .hf_vision import HFBlip2ImageEncoder
from .open_clip import OpenClipImageEncoder, build_open_clip_tower

__all__ = ["ImageEncoder", "OpenClipImageEncoder", "HFBlip2ImageEncoder", "EfficientNetImageEncoder",
           "build_image_encoder", "build_open_clip_tower", "efficientnet_taps", "square", "absolute_index",
           "interpolate_pos_embed", "POS_EMBED_NAMES"]


def build_image_encoder(cfg: VisionConfig, load_weights=None) -> ImageEncoder:
    """The frozen image encoder described by `cfg`, ready for BLIP-2 (already frozen)."""
    builders = {"open_clip": OpenClipImageEncoder.from_config, "hf_blip2": HFBlip2ImageEncoder.from_config,
                "efficientnet": lambda c: EfficientNetImageEncoder.from_config(c, load_weights)}
    if cfg.backend not in builders:
        raise ConfigError(f"vision.backend must be one of {sorted(builders)}, got {cfg.backend!r}")
    return builders[cfg.backend](cfg).freeze()
