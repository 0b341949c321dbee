"""Where the Q-Former looks: cross-attention maps and Grad-CAM on the ITM score.

Two estimates of which image patches matter, both read from the Q-Former's
cross-attention (queries -> frozen image tokens), never from the frozen ViT:

- `cross_attention_maps`: the attention probabilities themselves, per cross-attention
  layer, head and query, over the image patches (what each learned query reads).
- `itm_gradcam`: Grad-CAM on the ITM "match" logit, the recipe of ALBEF
  (`visualization.ipynb`) and LAVIS (`blip_image_text_matching.compute_gradcam`):
  attention x its gradient clamped at 0, averaged over heads, at one chosen
  cross-attention layer. Deviation, forced by BLIP-2's architecture: in ALBEF/BLIP the
  text tokens cross-attend to the image, so each token has its own row of the map; in the
  Q-Former only the queries do (text reaches the image through the queries' shared
  self-attention). A word's map here is therefore the queries' Grad-CAM maps weighted by
  how much each query attends to that word in the same layer's self-attention (ITM mask,
  head mean): the part of the matching evidence routed through that word.

Both are estimates of where evidence comes from, not explanations of the decision: a map
shows attention mass and its local gradient, and a model can attend to a patch it then
ignores. The app says so next to every map.

The rest of the file turns (g, g) maps into pictures: bilinear upsampling, a light
Gaussian blur, a colour map and an alpha overlay (numpy + PIL only).

Shape legend: B batch (1 here), H heads, Q queries, N image tokens (1 [CLS] + g*g
patches), g patch grid side, T text length, W words, X cross-attention layers,
D_v image width, S display side.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from torch import Tensor

from blip2lab.model.blip2 import Blip2

Reduce = Literal["mean", "max"]


# ---------------------------------------------------------------------------------------
# Per-query cross-attention maps
# ---------------------------------------------------------------------------------------


def patch_grid(num_tokens: int) -> int:
    """g for N = 1 + g*g image tokens ([CLS] first, as open_clip and HF's Blip2VisionModel)."""
    g = math.isqrt(num_tokens - 1)
    if g * g != num_tokens - 1:
        raise ValueError(f"{num_tokens} image tokens are not [CLS] + a square grid of patches")
    return g


def _reduce(x: Tensor, dim: int, how: Reduce) -> Tensor:
    if how == "mean":
        return x.mean(dim)
    if how == "max":
        return x.amax(dim)
    raise ValueError(f"aggregation must be 'mean' or 'max', got {how!r}")


@dataclass
class CrossAttentionMaps:
    """The queries' cross-attention over the image, every cross-attention layer and head."""

    probs: Tensor  # (X, H, Q, g, g) attention probability of each patch
    cls: Tensor  # (X, H, Q) attention on [CLS] (no place in the image; probs + cls sum to 1)
    layers: tuple[int, ...]  # the Q-Former layer index of each of the X maps

    @property
    def grid(self) -> int:
        return self.probs.shape[-1]

    def select(self, layer: Optional[int] = None, head: Optional[int] = None, reduce: Reduce = "mean") -> Tensor:
        """One map per query, (Q, g, g): at Q-Former layer `layer` (None: all cross-attention
        layers combined by `reduce`) and head `head` (None: all heads combined by `reduce`)."""
        probs = self.probs  # (X, H, Q, g, g)
        if layer is None:
            probs = _reduce(probs, 0, reduce)[None]  # (1, H, Q, g, g)
        else:
            if layer not in self.layers:
                raise ValueError(f"layer {layer} has no cross-attention; cross-attention layers: {list(self.layers)}")
            probs = probs[self.layers.index(layer)][None]
        if head is None:
            return _reduce(probs[0], 0, reduce)  # (Q, g, g)
        if not 0 <= head < probs.shape[1]:
            raise ValueError(f"head {head} out of range: the Q-Former has {probs.shape[1]} heads")
        return probs[0, head]  # (Q, g, g)


@torch.no_grad()
def cross_attention_maps(model: Blip2, image: Tensor) -> CrossAttentionMaps:
    """image: (1, N, D_v) after ln_vision. One queries-only pass (the ITC image side, what
    the LLM's soft prompt is made of) on the explicit attention path, so the probabilities
    exist; the default SDPA path is untouched."""
    if image.shape[0] != 1:
        raise ValueError(f"one image at a time, got a batch of {image.shape[0]}")
    out = model.qformer.encode_queries(image, output_attentions=True)
    layers = tuple(i for i, p in enumerate(out.cross_attentions) if p is not None)
    probs = torch.stack([out.cross_attentions[i][0] for i in layers]).float()  # (X, H, Q, N)
    g = patch_grid(probs.shape[-1])
    X, H, Q, _ = probs.shape
    return CrossAttentionMaps(probs[..., 1:].reshape(X, H, Q, g, g).cpu(), probs[..., 0].cpu(), layers)


# ---------------------------------------------------------------------------------------
# Grad-CAM on the ITM score
# ---------------------------------------------------------------------------------------


@dataclass
class GradCam:
    """Grad-CAM of the ITM "match" logit at one cross-attention layer."""

    words: list[str]  # the text's words (WordPiece pieces joined), [CLS]/[SEP]/[PAD] dropped
    word_maps: Tensor  # (W, g, g) one map per word (see the module docstring)
    word_scores: Tensor  # (W,) the share of the queries' Grad-CAM mass routed through each word, sums to 1
    query_maps: Tensor  # (Q, g, g) Grad-CAM of each query
    text_map: Tensor  # (g, g) the whole text: the queries' maps, summed
    itm_prob: float  # softmax probability of "match"
    itm_logit: float  # the raw positive logit Grad-CAM differentiates
    layer: int  # the Q-Former layer whose cross-attention was used


def words_of(tokens: Sequence[str], special: set[str]) -> list[tuple[str, list[int]]]:
    """WordPiece tokens -> (word, token positions): "##" pieces join the word before them;
    special tokens are skipped."""
    words: list[tuple[str, list[int]]] = []
    for i, tok in enumerate(tokens):
        if tok in special:
            continue
        if tok.startswith("##") and words:
            words[-1] = (words[-1][0] + tok[2:], words[-1][1] + [i])
        else:
            words.append((tok, [i]))
    return words


def itm_gradcam(model: Blip2, image: Tensor, text_ids: Tensor, text_mask: Tensor, tokens: Sequence[str],
                special: set[str], layer: Optional[int] = None) -> GradCam:
    """image: (1, N, D_v) after ln_vision; text_ids, text_mask: (1, T); tokens: the T token
    strings. `layer`: a Q-Former layer with cross-attention (default: the last one).

    One ITM pass on the explicit attention path and one backward pass to the chosen
    layer's cross-attention probabilities (`torch.autograd.grad`, so no parameter's
    `.grad` is touched)."""
    if image.shape[0] != 1 or text_ids.shape[0] != 1:
        raise ValueError("Grad-CAM takes one image and one text")
    if not model.has_stage1_heads:
        raise ValueError("Grad-CAM on the ITM score needs the ITM head (a model with stage-1 heads)")
    Q = model.config.qformer.num_queries
    with torch.enable_grad():
        # The image as a leaf that asks for a gradient: the probabilities then sit on the
        # graph even when every Q-Former weight is frozen.
        image = image.detach().requires_grad_(True)
        out = model.qformer.encode_joint(image, text_ids, text_mask, "itm", output_attentions=True)
        cross_layers = [i for i, p in enumerate(out.cross_attentions) if p is not None]
        layer = cross_layers[-1] if layer is None else layer
        if layer not in cross_layers:
            raise ValueError(f"layer {layer} has no cross-attention; cross-attention layers: {cross_layers}")
        probs = out.cross_attentions[layer]  # (1, H, Q, N)
        logits = model.itm_head(out.hidden[:, :Q]).mean(dim=1)  # (1, 2): the ITM head, as Blip2.itm_logits
        (grad,) = torch.autograd.grad(logits[0, 1], probs)  # (1, H, Q, N)
    g = patch_grid(probs.shape[-1])
    cam = (probs.detach() * grad.clamp(min=0)).mean(dim=1)[0]  # (Q, N): grad x attention, head mean
    query_maps = cam[:, 1:].reshape(Q, g, g).float().cpu()  # (Q, g, g), [CLS] dropped

    # How much each query reads each text token, in the self-attention of the same layer.
    self_attn = out.self_attentions[layer].detach()[0].mean(dim=0)  # (L, L), head mean, L = Q + T
    query_to_text = self_attn[:Q, Q:].float().cpu()  # (Q, T)
    pieces = words_of(tokens, special)
    weights = torch.stack([query_to_text[:, idx].sum(dim=1) for _, idx in pieces], dim=0) if pieces \
        else torch.zeros(0, Q)  # (W, Q)
    mass = query_maps.flatten(1).sum(dim=1)  # (Q,) Grad-CAM mass of each query
    routed = weights * mass[None, :]  # (W, Q)
    word_maps = torch.einsum("wq,qhk->whk", weights, query_maps) / weights.sum(dim=1).clamp(min=1e-12)[:, None, None]
    total = routed.sum()
    word_scores = routed.sum(dim=1) / total if total > 0 else torch.zeros(len(pieces))
    probs_itm = logits.detach().softmax(dim=-1)[0]
    return GradCam(words=[w for w, _ in pieces], word_maps=word_maps, word_scores=word_scores,
                   query_maps=query_maps, text_map=query_maps.sum(dim=0), itm_prob=float(probs_itm[1]),
                   itm_logit=float(logits[0, 1].detach()), layer=layer)


# ---------------------------------------------------------------------------------------
# Maps -> pictures
# ---------------------------------------------------------------------------------------


def normalise(m: Tensor | np.ndarray) -> np.ndarray:
    """Min-max to [0, 1]; a constant map becomes all zeros (nothing stands out)."""
    a = np.asarray(m, dtype=np.float32)
    lo, hi = float(a.min()), float(a.max())
    return (a - lo) / (hi - lo) if hi - lo > 1e-12 else np.zeros_like(a)


def jet(x: np.ndarray) -> np.ndarray:
    """The jet colour map: values in [0, 1] (...) -> uint8 RGB (..., 3)."""
    x = np.clip(x, 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * x - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)  # (..., 3)
    return (rgb * 255).round().astype(np.uint8)


def upsample(m: Tensor | np.ndarray, size: int, blur: float = 0.02) -> np.ndarray:
    """(g, g) map -> (S, S) float in [0, 1]: bilinear upsampling, then a Gaussian blur of
    `blur` x S pixels (LAVIS `getAttMap` blurs by 0.02 x the image side), then min-max."""
    t = torch.as_tensor(np.asarray(m, dtype=np.float32))[None, None]  # (1, 1, g, g)
    up = F.interpolate(t, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()  # (S, S)
    up = normalise(up)
    if blur > 0:
        img = Image.fromarray((up * 255).round().astype(np.uint8))
        up = np.asarray(img.filter(ImageFilter.GaussianBlur(radius=blur * size)), dtype=np.float32) / 255
    return normalise(up)


def overlay(image: Image.Image, m: Tensor | np.ndarray, size: int = 256, alpha: float = 0.6,
            blur: float = 0.02) -> Image.Image:
    """The image squashed to S x S (what the model saw, up to its own side) with the map on
    top: colour weight alpha * map^0.7, as LAVIS `getAttMap` (low values let the image through)."""
    base = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    heat = upsample(m, size, blur)  # (S, S)
    w = (alpha * heat ** 0.7)[..., None]  # (S, S, 1)
    out = (1 - w) * base + w * jet(heat).astype(np.float32)  # (S, S, 3)
    return Image.fromarray(out.round().clip(0, 255).astype(np.uint8))


def save_npz(file: str | io.IOBase, maps: Optional[CrossAttentionMaps] = None, cam: Optional[GradCam] = None,
             **extra) -> None:
    """The raw maps (before upsampling, blur or normalisation) as a .npz archive."""
    arrays: dict[str, np.ndarray] = {}
    if maps is not None:
        arrays |= {"cross_attention": maps.probs.numpy(), "cross_attention_cls": maps.cls.numpy(),
                   "cross_attention_layers": np.array(maps.layers)}
    if cam is not None:
        arrays |= {"gradcam_words": np.array(cam.words), "gradcam_word_maps": cam.word_maps.numpy(),
                   "gradcam_word_scores": cam.word_scores.numpy(), "gradcam_query_maps": cam.query_maps.numpy(),
                   "gradcam_text_map": cam.text_map.numpy(), "gradcam_layer": np.array(cam.layer),
                   "itm_prob": np.array(cam.itm_prob)}
    arrays |= {k: np.asarray(v) for k, v in extra.items()}
    np.savez_compressed(file, **arrays)
