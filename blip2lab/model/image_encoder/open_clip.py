"""open_clip towers as BLIP-2's image encoder: any open_clip ViT, native
(`VisionTransformer`) or timm (`TimmModel`, which is how open_clip builds EVA01-g-14, the
EVA-CLIP ViT-g of the paper).

The paper "remove[s] the last layer of the ViT and use[s] the second last layer's output
features" (Sec. 3.1), so the tokens come from block `layer_index` (default -2) and the
blocks after it are pruned away: never computed, never held. The tokens are returned
*before* any final LayerNorm: in BLIP-2 that norm is the trainable `ln_vision`, which the
model owns (LAVIS `blip2.py` `init_vision_encoder`).

Shapes: B batch, N image tokens ([CLS] + grid^2 patches), D_v tower width.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from ...config import CLIP_MEAN, CLIP_STD, ConfigError, VisionConfig
from .base import ImageEncoder, absolute_index, square

__all__ = ["OpenClipImageEncoder", "build_open_clip_tower"]


@dataclass
class _OpenClipTower:
    """What OpenClipImageEncoder needs to know about an open_clip tower, read before pruning."""

    pruner: nn.Module  # the module whose prune_intermediate_layers truncates the blocks
    width: int  # D_v
    grid: tuple[int, int]
    patch_size: int
    num_prefix_tokens: int  # [CLS] (+ register tokens on some timm towers)
    depth: int  # blocks as built


def _inspect_open_clip_tower(visual: nn.Module) -> _OpenClipTower:
    from open_clip.transformer import VisionTransformer

    try:
        from open_clip.timm_model import TimmModel
    except ImportError:  # open_clip without timm support
        TimmModel = ()

    if isinstance(visual, VisionTransformer) and hasattr(visual, "forward_intermediates"):
        # Native open_clip ViT: [CLS] + grid patches, blocks in `transformer.resblocks`;
        # `width` is not stored on it, the patch conv's channels are D_v.
        return _OpenClipTower(pruner=visual, width=visual.conv1.out_channels, grid=tuple(visual.grid_size),
                              patch_size=square(visual.patch_size, "patches"),
                              num_prefix_tokens=1,  # open_clip's ViT always has exactly one class token
                              depth=len(visual.transformer.resblocks))
    trunk = getattr(visual, "trunk", None)
    if isinstance(visual, TimmModel) and all(
            hasattr(trunk, a) for a in ("forward_intermediates", "prune_intermediate_layers", "blocks",
                                        "patch_embed", "num_prefix_tokens", "embed_dim")):
        # A timm ViT-like trunk (ViT, EVA: open_clip's EVA01-g-14 is BLIP-2's EVA-CLIP ViT-g).
        return _OpenClipTower(pruner=trunk, width=trunk.embed_dim, grid=tuple(trunk.patch_embed.grid_size),
                              patch_size=square(trunk.patch_embed.patch_size, "patches"),
                              num_prefix_tokens=trunk.num_prefix_tokens, depth=len(trunk.blocks))
    raise TypeError(
        f"OpenClipImageEncoder needs an open_clip ViT tower with forward_intermediates "
        f"(open_clip.transformer.VisionTransformer, or a TimmModel around a timm ViT); got "
        f"{type(visual).__name__}. ResNet / ConvNeXt towers give no [B, N, D_v] tokens.")


def build_open_clip_tower(cfg: VisionConfig) -> nn.Module:
    """The full (unpruned) custom open_clip `VisionTransformer` that `cfg` describes; the
    encoder built from the same config holds exactly its weight names and shapes (minus the
    blocks after `layer_index`), so a tower pretrained from this loads into it."""
    from open_clip.transformer import LayerNorm as OpenClipLayerNorm
    from open_clip.transformer import VisionTransformer

    return VisionTransformer(
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        width=cfg.width,
        layers=cfg.layers,
        heads=cfg.heads,
        mlp_ratio=cfg.intermediate_size / cfg.width,
        output_dim=cfg.width,  # the projection head is pruned anyway
        norm_layer=partial(OpenClipLayerNorm, eps=cfg.layer_norm_eps),  # open_clip's, fp16-safe
    )


class OpenClipImageEncoder(ImageEncoder):
    """An open_clip ViT tower (`model.visual`), tokens taken from block `layer_index`.

    Uses open_clip's own `forward_intermediates` (stop early, prefix tokens kept) and
    `prune_intermediate_layers`, so the blocks after `layer_index`, the final norm and the
    pooling/projection head are dropped at construction. The tower is pruned in place:
    deepcopy it first if you still need the full model.
    """

    def __init__(self, visual: nn.Module, layer_index: int = -2,
                 mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD):
        tower = _inspect_open_clip_tower(visual)
        grid_h, grid_w = tower.grid
        super().__init__(width=tower.width, num_tokens=tower.num_prefix_tokens + grid_h * grid_w,
                         image_size=square(visual.image_size, "images"), mean=mean, std=std)
        self.num_prefix_tokens = tower.num_prefix_tokens
        self.block_index = absolute_index(layer_index, tower.depth, "tower")
        # Truncation keeps blocks [0, block_index], so the absolute index stays valid after it.
        tower.pruner.prune_intermediate_layers(indices=[self.block_index], prune_norm=True, prune_head=True)
        if tower.pruner is visual:
            # prune_head drops `proj` but keeps attention poolers (CoCa-style towers): drop them too.
            for name in ("attn_pool", "attn_pool_contrastive"):
                if getattr(visual, name, None) is not None:
                    setattr(visual, name, None)
        else:
            visual.head = nn.Identity()  # TimmModel's pooled projection, unused here
        self.visual = visual

    def set_gradient_checkpointing(self, enabled: bool = True) -> "OpenClipImageEncoder":
        # open_clip's own switch: its native ViT and timm trunks checkpoint block by block
        # (non-reentrant) inside forward_intermediates too.
        self.visual.set_grad_checkpointing(enabled)
        return self

    def _encode(self, pixels: Tensor) -> Tensor:
        out = self.visual.forward_intermediates(
            pixels, indices=[self.block_index], stop_early=True, intermediates_only=True,
            output_fmt="NLC", output_extra_tokens=True)
        patches = out["image_intermediates"][0]  # (B, grid^2, D_v)
        if self.num_prefix_tokens == 0:
            return patches
        prefix = out["image_intermediates_prefix"][0]  # (B, 1, D_v): [CLS]
        return torch.cat([prefix, patches], dim=1)  # (B, 1 + grid^2, D_v) = (B, N, D_v)

    @classmethod
    def from_config(cls, cfg: VisionConfig) -> "OpenClipImageEncoder":
        """A randomly initialised tower shaped by `cfg` (weights come from a loader later).

        `cfg.model_name` set: open_clip's named architecture, whose geometry must agree with
        `cfg` (the rest of the model sizes itself from `cfg`, e.g. the Q-Former's D_v); a tower
        fine-tuned at another size (`cfg.resized_from`) is built at `cfg.image_size`.
        Otherwise: a plain open_clip `VisionTransformer` of cfg's sizes.
        """
        import open_clip

        if cfg.model_name is not None:
            # Check the image size from the architecture's JSON before building (EVA-g is 1B params).
            known = open_clip.get_model_config(cfg.model_name)  # None for unknown / 'local-dir:' names
            size = (known or {}).get("vision_cfg", {}).get("image_size")
            native = cfg.resized_from or cfg.image_size
            if size is not None and square(size, "images") != native:
                raise ConfigError(f"vision.image_size is {native} but open_clip model {cfg.model_name!r} "
                                  f"has {square(size, 'images')}; set --model.vision.image_size={size}")
            force = cfg.image_size if cfg.resized_from else None  # open_clip's own switch for another grid
            try:
                visual = open_clip.create_model(cfg.model_name, pretrained=None,  # never downloads
                                                force_image_size=force).visual
            except RuntimeError as err:
                raise ConfigError(f"vision.model_name {cfg.model_name!r}: open_clip cannot build it "
                                  f"(names: open_clip.list_models())") from err
            tower = _inspect_open_clip_tower(visual)
            actual = {"image_size": square(visual.image_size, "images"), "patch_size": tower.patch_size,
                      "width": tower.width, "layers": tower.depth}
            for name, value in actual.items():
                if getattr(cfg, name) != value:
                    raise ConfigError(f"vision.{name} is {getattr(cfg, name)} but open_clip model "
                                      f"{cfg.model_name!r} has {value}; set --model.vision.{name}={value}")
        else:
            visual = build_open_clip_tower(cfg)
        return cls(visual, layer_index=cfg.layer_index, mean=cfg.mean, std=cfg.std)

    @classmethod
    def from_open_clip_model(cls, model_or_visual: nn.Module, layer_index: int = -2) -> "OpenClipImageEncoder":
        """Wrap an already built (e.g. trained) open_clip model or its `.visual`, with the
        normalisation it was trained with (`visual.preprocess_cfg`, else CLIP's)."""
        visual = getattr(model_or_visual, "visual", model_or_visual)
        pp = getattr(visual, "preprocess_cfg", None) or {}
        mean = pp.get("mean") or getattr(visual, "image_mean", None) or CLIP_MEAN
        std = pp.get("std") or getattr(visual, "image_std", None) or CLIP_STD
        return cls(visual, layer_index=layer_index, mean=tuple(mean), std=tuple(std))
