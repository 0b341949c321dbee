"""The frozen image encoder of BLIP-2 (paper Sec. 3.1, the leftmost box of Fig. 2).

One small interface, pixels [B, 3, H, W] -> tokens [B, N, D_v], over two backends:

- `OpenClipImageEncoder`: any open_clip ViT tower, native (`VisionTransformer`) or timm
  (`TimmModel`, which is how open_clip builds EVA01-g-14, the EVA-CLIP ViT-g of the paper).
- `HFBlip2ImageEncoder`: transformers' `Blip2VisionModel`, the layout of the official
  Salesforce/blip2-* checkpoints.

The paper "remove[s] the last layer of the ViT and use[s] the second last layer's output
features" (Sec. 3.1), so the tokens come from block `layer_index` (default -2) and the
blocks after it are pruned away: never computed, never held. The tokens are returned
*before* any final LayerNorm: in BLIP-2 that norm is the trainable `ln_vision`, which the
model owns (LAVIS `blip2.py` `init_vision_encoder`; HF calls the same weights
`vision_model.post_layernorm`).

Freezing follows open_clip's `lock()`: an explicit, idempotent `freeze()`, and a `train()`
override that keeps a frozen tower in eval mode whatever its parent asks, instead of
LAVIS's monkeypatched `disabled_train`.

Shapes: B batch, N image tokens (prefix [CLS] + patches), D_v tower width.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from .config import CLIP_MEAN, CLIP_STD, ConfigError, VisionConfig

__all__ = [
    "ImageEncoder",
    "OpenClipImageEncoder",
    "HFBlip2ImageEncoder",
    "build_image_encoder",
    "vision_config_from_hf",
]


def _to_rgb(image):
    """PIL image -> RGB (drops alpha, expands grey). A named function, unlike a lambda,
    pickles, so the transform can be shipped to DataLoader workers."""
    return image.convert("RGB")


class ImageEncoder(nn.Module):
    """A frozen image tower: pixels [B, 3, S, S] -> tokens [B, N, D_v].

    Subclasses build the tower and implement `_encode`; this base class owns input
    validation, freezing and the matching preprocessing transform.
    """

    width: int  # D_v, what the Q-Former's cross-attention keys/values read
    num_tokens: int  # N, prefix ([CLS]) tokens included
    image_size: int  # S; the tower's position embeddings fix it
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __init__(self, *, width: int, num_tokens: int, image_size: int,
                 mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.width = int(width)
        self.num_tokens = int(num_tokens)
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.frozen = False

    # -- freezing ------------------------------------------------------------------------

    def freeze(self) -> "ImageEncoder":
        """No gradients, eval mode (dropout, drop-path off) for good. Safe to call twice."""
        self.requires_grad_(False)
        self.frozen = True
        self.eval()
        return self

    def unfreeze(self) -> "ImageEncoder":
        """Trainable again, for the fine-tuning runs that update the ViT (paper Sec. 4.2, 4.4;
        LAVIS `freeze_vit: False`). Leaves the train/eval mode to the caller."""
        self.requires_grad_(True)
        self.frozen = False
        return self

    def train(self, mode: bool = True) -> "ImageEncoder":
        # A frozen tower stays in eval mode whatever a parent's .train() asks (open_clip
        # lock() semantics, done by overriding rather than LAVIS's `disabled_train` patch).
        return super().train(mode and not self.frozen)

    def set_gradient_checkpointing(self, enabled: bool = True) -> "ImageEncoder":
        """Recompute each block in the backward pass instead of keeping its activations
        (`vision.gradient_checkpointing`). Only an unfrozen tower has a backward pass; a
        frozen one runs under no_grad and is unaffected."""
        raise NotImplementedError(f"{type(self).__name__} does not support gradient checkpointing")

    # -- forward ---------------------------------------------------------------------------

    def _check_pixels(self, pixels: Tensor) -> None:
        if not isinstance(pixels, Tensor) or pixels.dim() != 4:
            got = f"a {pixels.dim()}-D tensor of shape {tuple(pixels.shape)}" if isinstance(pixels, Tensor) \
                else type(pixels).__name__
            raise ValueError(f"expected a 4-D tensor [B, 3, H, W] of pixels, got {got}")
        if not pixels.is_floating_point():
            raise ValueError(f"expected floating-point pixels (normalised, e.g. from encoder.preprocess()), "
                             f"got dtype {pixels.dtype}")
        B, C, H, W = pixels.shape
        if C != 3:
            raise ValueError(f"expected 3 channels (RGB), got {C}")
        if (H, W) != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}x{self.image_size} pixels, got {H}x{W}; "
                             f"use encoder.preprocess()")
        if B == 0:
            raise ValueError("empty batch: got 0 images")

    def forward(self, pixels: Tensor) -> Tensor:
        """pixels [B, 3, S, S] (normalised with `mean`/`std`) -> tokens [B, N, D_v]."""
        self._check_pixels(pixels)
        # Run in the tower's dtype (e.g. fp16 weights fed fp32 pixels); autocast still wins.
        pixels = pixels.to(dtype=next(self.parameters()).dtype)
        # A frozen tower gives no gradients anyway; no_grad also skips storing activations.
        # (So no gradients reach the pixels through a frozen tower: unfreeze() for that.)
        with torch.no_grad() if self.frozen else contextlib.nullcontext():
            return self._encode(pixels)  # (B, N, D_v)

    def _encode(self, pixels: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement _encode(pixels) -> [B, N, D_v]")

    # -- preprocessing ---------------------------------------------------------------------

    def preprocess(self):
        """The eval transform this tower expects: PIL image -> normalised [3, S, S] tensor.
        The whole image squashed to SxS (bicubic), as LAVIS's `blip_image_eval` and HF's
        BlipImageProcessor do (not open_clip's shorter-side resize + centre crop), so
        results match the official checkpoints on non-square photos too."""
        from torchvision import transforms as T

        return T.Compose([
            _to_rgb,
            T.Resize((self.image_size, self.image_size), interpolation=T.InterpolationMode.BICUBIC),
            T.ToTensor(),
            T.Normalize(self.mean, self.std),
        ])

    def extra_repr(self) -> str:
        return f"width={self.width}, num_tokens={self.num_tokens}, image_size={self.image_size}, frozen={self.frozen}"


def _square(size, what: str) -> int:
    """open_clip / timm / HF keep sizes as int or (h, w); BLIP-2 towers are square."""
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h != w:
        raise ValueError(f"only square {what} are supported, got {h}x{w}")
    return int(h)


def _absolute_index(layer_index: int, depth: int, what: str) -> int:
    if not -depth <= layer_index < depth:
        raise ValueError(f"layer_index {layer_index} is outside a {what} of {depth} blocks")
    return layer_index % depth


# ---------------------------------------------------------------------------------------
# open_clip towers
# ---------------------------------------------------------------------------------------


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
                              patch_size=_square(visual.patch_size, "patches"),
                              num_prefix_tokens=1,  # open_clip's ViT always has exactly one class token
                              depth=len(visual.transformer.resblocks))
    trunk = getattr(visual, "trunk", None)
    if isinstance(visual, TimmModel) and all(
            hasattr(trunk, a) for a in ("forward_intermediates", "prune_intermediate_layers", "blocks",
                                        "patch_embed", "num_prefix_tokens", "embed_dim")):
        # A timm ViT-like trunk (ViT, EVA: open_clip's EVA01-g-14 is BLIP-2's EVA-CLIP ViT-g).
        return _OpenClipTower(pruner=trunk, width=trunk.embed_dim, grid=tuple(trunk.patch_embed.grid_size),
                              patch_size=_square(trunk.patch_embed.patch_size, "patches"),
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
                         image_size=_square(visual.image_size, "images"), mean=mean, std=std)
        self.num_prefix_tokens = tower.num_prefix_tokens
        self.block_index = _absolute_index(layer_index, tower.depth, "tower")
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
        `cfg` (the rest of the model sizes itself from `cfg`, e.g. the Q-Former's D_v).
        Otherwise: a plain open_clip `VisionTransformer` of cfg's sizes.
        """
        import open_clip

        if cfg.model_name is not None:
            # Check the image size from the architecture's JSON before building (EVA-g is 1B params).
            known = open_clip.get_model_config(cfg.model_name)  # None for unknown / 'local-dir:' names
            size = (known or {}).get("vision_cfg", {}).get("image_size")
            if size is not None and _square(size, "images") != cfg.image_size:
                raise ConfigError(f"vision.image_size is {cfg.image_size} but open_clip model {cfg.model_name!r} "
                                  f"has {_square(size, 'images')}; set --model.vision.image_size={size}")
            try:
                visual = open_clip.create_model(cfg.model_name, pretrained=None).visual  # never downloads
            except RuntimeError as err:
                raise ConfigError(f"vision.model_name {cfg.model_name!r}: open_clip cannot build it "
                                  f"(names: open_clip.list_models())") from err
            tower = _inspect_open_clip_tower(visual)
            actual = {"image_size": _square(visual.image_size, "images"), "patch_size": tower.patch_size,
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


# ---------------------------------------------------------------------------------------
# transformers' Blip2VisionModel (the official checkpoints)
# ---------------------------------------------------------------------------------------


class HFBlip2ImageEncoder(ImageEncoder):
    """transformers' `Blip2VisionModel`, tokens from encoder layer `layer_index`.

    The HF checkpoints already dropped EVA-CLIP-g's last block (39 of 40 are stored), so
    the default is their last layer, -1. The output is taken *before* `post_layernorm`:
    those weights are BLIP-2's trainable `ln_vision` (LAVIS name), which the model owns, so
    here `post_layernorm` becomes an Identity and a loader maps
    `vision_model.post_layernorm.*` -> `ln_vision.*`. Layers after `layer_index` are
    dropped. Submodule names match HF (`vision_model.embeddings`, `vision_model.encoder.
    layers.i`), so checkpoint keys load unchanged. The model is modified in place.
    """

    def __init__(self, vision_model: nn.Module, layer_index: int = -1,
                 mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD):
        from transformers import Blip2VisionModel

        if not isinstance(vision_model, Blip2VisionModel):
            raise TypeError(f"HFBlip2ImageEncoder needs a transformers Blip2VisionModel, "
                            f"got {type(vision_model).__name__}")
        hf = vision_model.config
        image_size = _square(hf.image_size, "images")
        grid = image_size // _square(hf.patch_size, "patches")
        super().__init__(width=hf.hidden_size, num_tokens=grid * grid + 1, image_size=image_size,
                         mean=mean, std=std)
        layers = vision_model.encoder.layers
        self.block_index = _absolute_index(layer_index, len(layers), "Blip2VisionModel")
        # (vision_model.config is left as is: it may be shared with a parent Blip2Config.)
        vision_model.encoder.layers = layers[: self.block_index + 1]
        vision_model.post_layernorm = nn.Identity()
        self.vision_model = vision_model

    def set_gradient_checkpointing(self, enabled: bool = True) -> "HFBlip2ImageEncoder":
        # transformers' switch (renamed activation_checkpointing_* in 5.2x; older 5.x has the
        # gradient_checkpointing_* names); its layers checkpoint only in training mode.
        vm = self.vision_model
        if enabled and hasattr(vm, "activation_checkpointing_enable"):
            vm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif enabled:
            vm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif vm.is_gradient_checkpointing:
            getattr(vm, "activation_checkpointing_disable", vm.gradient_checkpointing_disable)()
        return self

    def _encode(self, pixels: Tensor) -> Tensor:
        h = self.vision_model.embeddings(pixels)  # (B, N, D_v): [CLS] + patches + positions
        return self.vision_model.encoder(inputs_embeds=h).last_hidden_state  # (B, N, D_v)

    @classmethod
    def from_config(cls, cfg: VisionConfig) -> "HFBlip2ImageEncoder":
        """A randomly initialised Blip2VisionModel shaped by `cfg` (weights from a loader)."""
        from transformers import Blip2VisionConfig, Blip2VisionModel

        hf = Blip2VisionConfig(
            hidden_size=cfg.width,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            layer_norm_eps=cfg.layer_norm_eps,
            qkv_bias=True,  # EVA-CLIP's q_bias / v_bias, as in every official checkpoint
        )
        return cls(Blip2VisionModel(hf), layer_index=cfg.layer_index, mean=cfg.mean, std=cfg.std)


def vision_config_from_hf(hf_vision_config) -> VisionConfig:
    """The VisionConfig of a transformers `Blip2VisionConfig` (e.g. `Blip2Config.vision_config`)."""
    return VisionConfig(
        backend="hf_blip2",
        image_size=_square(hf_vision_config.image_size, "images"),
        patch_size=_square(hf_vision_config.patch_size, "patches"),
        width=hf_vision_config.hidden_size,
        layers=hf_vision_config.num_hidden_layers,
        heads=hf_vision_config.num_attention_heads,
        mlp_dim=hf_vision_config.intermediate_size,
        layer_index=-1,  # the HF checkpoints store only the blocks BLIP-2 uses (39 of EVA's 40)
        layer_norm_eps=hf_vision_config.layer_norm_eps,
        # ln_vision *is* HF's post_layernorm, which runs with the vision config's eps (1e-6),
        # whereas LAVIS builds ln_vision with nn.LayerNorm's 1e-5. Same weights, different eps:
        # take the source checkpoint's, or outputs drift from the reference.
        ln_vision_eps=hf_vision_config.layer_norm_eps,
    )


def build_image_encoder(cfg: VisionConfig) -> ImageEncoder:
    """The frozen image encoder described by `cfg`, ready for BLIP-2 (already frozen)."""
    from .efficientnet import EfficientNetImageEncoder  # a CNN tower; that module builds on this one

    builders = {"open_clip": OpenClipImageEncoder.from_config, "hf_blip2": HFBlip2ImageEncoder.from_config,
                "efficientnet": EfficientNetImageEncoder.from_config}
    if cfg.backend not in builders:
        raise ConfigError(f"vision.backend must be one of {sorted(builders)}, got {cfg.backend!r}")
    return builders[cfg.backend](cfg).freeze()
