"""The speed-ups of the Q-Former and of stage 1, apart from the paper's math they leave
unchanged. Each is named here with its reason, is switched by one field of `Speedups`
(`Blip2.speedups`; `Speedups.off()` runs the plain path), and is tested equal to the plain
path in outputs and gradients (tests/test_speedups.py). What each buys is measured in
docs/performance.md.

| switch | what it skips | why the result is the same |
|---|---|---|
| `image_kv_once` | re-projecting an image's cross-attention keys/values for every pass that reads it (ITC's queries, ITM's 3B pairs: LAVIS projects each image 4 times) | they are a function of the image alone (`ImageKV`) |
| `prune_last_layer` | in the last layer, the rows the caller does not read (ITM reads the queries, ITC's text side [CLS]) | those rows are read by nobody; what the kept rows attend to (every row's key and value) comes from the layer's input (`RowPlan.keep`) |
| `pack_text_ffn` | the text FFN on padding rows | padding rows are masked as keys and their outputs never read (`RowPlan.text_rows`) |
| `itg_reuses_queries` | rerunning the queries for ITG: the text decodes over the queries' cached self-attention keys/values (LAVIS) | under ITG's mask the queries never see the text, so their keys/values are those of the ITC pass |
| `itg_predicting_rows` | the (D_q x V) LM head on positions that predict nothing (padding, the last token) | the loss reads no other position (`losses.itg_targets`) |

Shapes: B batch, T text length, H heads, N image tokens, hd head width, M rows kept.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["Speedups", "KV", "ImageKV", "RowPlan", "ROW_BUCKET", "text_rows", "packed_ffn"]

KV = tuple[Tensor, Tensor]  # one layer's keys and values, each (B, H, P, hd) (self) or (B, H, N, hd) (cross)


@dataclass
class Speedups:
    """Which speed-ups a `Blip2` uses (all by default). None of them changes a result."""

    image_kv_once: bool = True
    prune_last_layer: bool = True
    pack_text_ffn: bool = True
    itg_reuses_queries: bool = True
    itg_predicting_rows: bool = True

    @classmethod
    def off(cls) -> "Speedups":
        """The plain path: the paper's passes, every row computed."""
        return cls(**{f.name: False for f in fields(cls)})


# The packed text FFN takes its rows in multiples of this: the count of real tokens changes
# with every batch, and oneDNN's bf16 CPU matmul compiles a kernel for each new row count.
ROW_BUCKET = 64


@dataclass
class RowPlan:
    """Which rows of a Q-Former pass are computed. `keep`: the caller reads only the first
    `keep` output rows, so the last layer computes only those (its output is (B, keep, D_q)).
    `text_rows`: the positions (M,) into the B*T text rows that take the text FFN (`text_rows()`:
    the real ones, padded up to a multiple of ROW_BUCKET); None: all."""

    keep: Optional[int] = None
    text_rows: Optional[Tensor] = None

    def at_layer(self, i: int, num_layers: int) -> "RowPlan":
        """The plan of layer i: rows are pruned in the last layer only."""
        return self if i == num_layers - 1 else RowPlan(None, self.text_rows)


def text_rows(text_mask: Tensor) -> Optional[Tensor]:
    """text_mask (B, T) -> the positions (M,) into B*T whose text FFN runs, sorted: every real
    token and as many padding positions as round the count up to a multiple of ROW_BUCKET (or
    all there are); None when nothing is padding. One wait on a GPU (the count), not per layer."""
    padding = (text_mask.flatten() == 0).to(torch.uint8)  # (B*T,)
    real = padding.numel() - int(padding.sum())
    if real == padding.numel():
        return None
    count = min(real + (-real % ROW_BUCKET), padding.numel())
    return torch.argsort(padding, stable=True)[:count].sort().values  # the real positions come first


def packed_ffn(ffn: nn.Module, text: Tensor, rows: Tensor) -> Tensor:
    """`ffn(text)` on the rows (M,) of the B*T text positions only; the other (padding) rows
    keep their input, finite, as a gradient through unused rows needs. text: (B, T, D_q)."""
    flat = text.reshape(-1, text.shape[-1])  # (B*T, D_q)
    packed = ffn(flat.index_select(0, rows))  # (M, D_q)
    return flat.index_copy(0, rows, packed).view_as(text)


@dataclass
class ImageKV:
    """The image side of every cross-attention layer, projected once: per layer the keys and
    values (B, H, N, hd) each, None on layers without cross-attention.

    They are a function of the image alone (not of the queries or the text), so stage 1
    computes them once per image and every pass that reads the image indexes them: ITC's
    query pass and ITM's 3B (text, image) pairs, where LAVIS projects the same images four
    times (B for ITC, 3B for ITM). Same values, same gradients (indexing sums them back)."""

    layers: list[Optional[KV]]

    @property
    def batch_size(self) -> int:
        return next(kv[0].shape[0] for kv in self.layers if kv is not None)

    def select(self, rows: Tensor) -> "ImageKV":
        """The images at `rows` (an index or bool tensor over B)."""
        return ImageKV([None if kv is None else (kv[0][rows], kv[1][rows]) for kv in self.layers])

    @staticmethod
    def cat(parts: list["ImageKV"]) -> "ImageKV":
        """Images of several ImageKV one after another, (sum of B, H, N, hd) per layer."""
        return ImageKV([None if kvs[0] is None else (torch.cat([kv[0] for kv in kvs]), torch.cat([kv[1] for kv in kvs]))
                        for kvs in zip(*(p.layers for p in parts))])
