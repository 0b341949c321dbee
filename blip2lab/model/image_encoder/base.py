"""The frozen image encoder of BLIP-2 (paper Sec. 3.1, the leftmost box of Figure 2): the
interface every tower implements, pixels [B, 3, S, S] -> tokens [B, N, D_v].

Freezing follows open_clip's `lock()`: an explicit, idempotent `freeze()`, and a `train()`
override that keeps a frozen tower in eval mode whatever its parent asks, instead of
LAVIS's monkeypatched `disabled_train`. The pixels come normalised from the one image
transform of `blip2lab.processor` (training, evaluation and serving alike).

Shapes: B batch, N image tokens (prefix [CLS] + patches), D_v tower width.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ImageEncoder", "square", "absolute_index", "interpolate_pos_embed", "POS_EMBED_NAMES"]

# What the towers call their position table: transformers' Blip2VisionModel, open_clip's
# VisionTransformer, timm's ViT / EVA trunks (open_clip's EVA01-g-14).
POS_EMBED_NAMES = ("position_embedding", "positional_embedding", "pos_embed")


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
            raise ValueError(f"expected floating-point pixels (normalised, e.g. from Blip2Processor.images()), "
                             f"got dtype {pixels.dtype}")
        B, C, H, W = pixels.shape
        if C != 3:
            raise ValueError(f"expected 3 channels (RGB), got {C}")
        if (H, W) != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}x{self.image_size} pixels, got {H}x{W}; "
                             f"use Blip2Processor.images()")
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

    def extra_repr(self) -> str:
        return f"width={self.width}, num_tokens={self.num_tokens}, image_size={self.image_size}, frozen={self.frozen}"


def square(size, what: str) -> int:
    """open_clip / timm / HF keep sizes as int or (h, w); BLIP-2 towers are square."""
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h != w:
        raise ValueError(f"only square {what} are supported, got {h}x{w}")
    return int(h)


def absolute_index(layer_index: int, depth: int, what: str) -> int:
    if not -depth <= layer_index < depth:
        raise ValueError(f"layer_index {layer_index} is outside a {what} of {depth} blocks")
    return layer_index % depth


def interpolate_pos_embed(pos: Tensor, old_grid: int, new_grid: int) -> Tensor:
    """A ViT's position embeddings (..., P + old_grid^2, D) on another patch grid: the P prefix
    rows ([CLS], registers) kept as they are, the 2-D grid of the others resized bicubically
    (align_corners=False, no antialias), as LAVIS's `interpolate_pos_embed` and transformers'
    `interpolate_pos_encoding` do to fine-tune at 364 px a tower pre-trained at 224 (paper
    Sec. 4). Computed in fp32, returned in the input's dtype."""
    prefix = pos.shape[-2] - old_grid**2
    if prefix < 0:
        raise ValueError(f"{pos.shape[-2]} positions are fewer than a {old_grid}x{old_grid} grid")
    D = pos.shape[-1]
    rows = pos.reshape(-1, pos.shape[-2], D)  # (L, P + g^2, D), L the leading dims (1 or none)
    grid = rows[:, prefix:].reshape(-1, old_grid, old_grid, D).permute(0, 3, 1, 2).float()  # (L, D, g, g)
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(-1, new_grid**2, D).to(pos.dtype)  # (L, g'^2, D)
    out = torch.cat([rows[:, :prefix], grid], dim=1)  # (L, P + g'^2, D)
    return out.reshape(*pos.shape[:-2], prefix + new_grid**2, D)
