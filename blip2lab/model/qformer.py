"""The Querying Transformer (Q-Former), the trainable box in the middle of BLIP-2's Figure 2.

Follows BLIP2_REFERENCE.md Sec. 1 (LAVIS `Qformer.py`, HF `Blip2QFormerModel`):
- a BERT-shaped post-LayerNorm encoder over the concatenation [Q queries ; T text tokens];
- ONE self-attention over that sequence per layer, whose mask decides who sees whom
  (`attention_mask` below builds the three masks of stage 1);
- cross-attention to the frozen image features every `cross_attention_freq` layers,
  applied to the query positions only (text never sees the image directly);
- a separate FFN for the queries (`query_ffn`, initialised as a copy of BERT's FFN);
- word + position embeddings for text only (positions start at 0 for text), then one
  LayerNorm + dropout over the whole concatenation;
- a BERT MLM-style LM head tied to the word embeddings, for ITG and Q-Former captions.

This is the plain path, the paper's math. Its speed-ups (the image's keys/values computed
once, the last layer computing only the rows read, padding rows skipping the text FFN) are
in `speedups.py`: each enters here through one optional argument (`image` as an `ImageKV`,
`rows` a `RowPlan`) and is tested equal to this path, outputs and gradients.

Shape legend: B batch, Q queries, T text length, L = Q + T, P cached (past) length,
N image tokens, D_q Q-Former width, D_v image width, H heads, hd head width, V vocab.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import QFormerConfig
from .speedups import KV, ImageKV, RowPlan, packed_ffn

# ---------------------------------------------------------------------------------------
# The three attention masks of stage 1
# ---------------------------------------------------------------------------------------


def attention_mask(mode: Literal["itc", "itm", "itg"], num_queries: int, text_mask: Tensor) -> Tensor:
    """The self-attention mask over [Q queries ; T text] (True = may attend), Figure 2 right.

    | mode | query rows     | text rows                          |
    |------|----------------|------------------------------------|
    | itc  | queries only   | text only (padding masked)         |
    | itm  | everything     | everything (padding masked)        |
    | itg  | queries only   | all queries + causal text          |

    text_mask: (B, T), 1 for real tokens, 0 for padding. Returns (B, Q + T, Q + T) bool.
    """
    B, T = text_mask.shape
    Q, L = num_queries, num_queries + text_mask.shape[1]
    device = text_mask.device
    keys_valid = torch.cat([torch.ones(B, Q, dtype=torch.bool, device=device), text_mask.bool()], dim=1)  # (B, L)
    is_query_key = torch.arange(L, device=device) < Q  # (L,)
    if mode == "itm":
        allowed = torch.ones(L, L, dtype=torch.bool, device=device)
    elif mode == "itc":
        is_query_row = is_query_key[:, None]  # (L, 1)
        allowed = is_query_row == is_query_key[None, :]  # same modality only, (L, L)
    elif mode == "itg":
        causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
        allowed = torch.zeros(L, L, dtype=torch.bool, device=device)
        allowed[:, :Q] = True  # everybody sees the queries ...
        allowed[Q:, Q:] = causal  # ... text sees earlier text; queries never see text
    else:
        raise ValueError(f"attention mask mode must be 'itc', 'itm' or 'itg', got {mode!r}")
    return allowed[None, :, :] & keys_valid[:, None, :]  # (B, L, L)


# ---------------------------------------------------------------------------------------
# Building blocks: post-LN attention and feed-forward (BERT's layout)
# ---------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head attention + output projection + dropout + residual + LayerNorm (BERT's
    `BertAttention`). Self-attention, or with `cross=True` cross-attention to the image
    (keys/values from D_v)."""

    def __init__(self, dim: int, kv_dim: int, num_heads: int, cfg: QFormerConfig, cross: bool = False):
        super().__init__()
        self.num_heads, self.head_dim, self.cross = num_heads, dim // num_heads, cross
        # Self-attention fuses q, k, v into one matmul (rows [q; k; v]; the key tables of
        # blip2lab.formats stack BERT's / HF's separate matrices). Cross-attention keeps k and
        # v apart (benchmarks/qformer.py measured a fused pair slower over the image tokens).
        if cross:
            self.q = nn.Linear(dim, dim)
            self.k = nn.Linear(kv_dim, dim)
            self.v = nn.Linear(kv_dim, dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.attn_dropout = cfg.attention_dropout

    def _heads(self, x: Tensor) -> Tensor:
        B, L, _ = x.shape
        return x.view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, L, hd)

    def source_kv(self, source: Tensor) -> KV:
        """Cross-attention keys and values of the image (B, N, D_v): (B, H, N, hd) each."""
        return self._heads(self.k(source)), self._heads(self.v(source))

    def forward(
        self,
        x: Tensor,  # (B, L, D) the rows that ask
        source: Optional[Tensor | KV] = None,  # cross-attention only: the image (B, N, D_v) or its source_kv
        mask: Optional[Tensor] = None,  # bool, broadcastable to (B, L, P + S); True = may attend
        past_kv: Optional[KV] = None,  # cached keys/values of earlier positions, (B, H, P, hd) each
        need_probs: bool = False,
        keep: Optional[int] = None,  # speedups.RowPlan: only the first `keep` rows ask (out (B, keep, D))
    ) -> tuple[Tensor, KV, Optional[Tensor]]:
        if self.cross:
            q = self._heads(self.q(x))  # (B, H, L, hd)
            k, v = source if isinstance(source, tuple) else self.source_kv(source)  # (B, H, N, hd) each
        else:
            q, k, v = (self._heads(t) for t in self.qkv(x).chunk(3, dim=-1))  # (B, H, L, hd) each
        if keep is not None:  # every row is still a key and a value; only `keep` rows ask
            x, q = x[:, :keep], q[:, :, :keep]  # (B, keep, D), (B, H, keep, hd)
            mask = None if mask is None else mask[:, :keep]  # (B, keep or 1, P + S)
        if past_kv is not None:
            k = torch.cat([past_kv[0], k], dim=2)  # (B, H, P + S, hd)
            v = torch.cat([past_kv[1], v], dim=2)
        attn_mask = None if mask is None else mask[:, None]  # (B, 1, L, P + S) broadcast over heads
        dropout_p = self.attn_dropout if self.training else 0.0
        probs = None
        if need_probs:
            # The explicit path: attention maps (and their gradients, for Grad-CAM) need the
            # probabilities themselves, which the fused kernel never materialises.
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.head_dim)  # (B, H, L, P + S)
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
            probs = scores.softmax(dim=-1)
            ctx = F.dropout(probs, dropout_p, self.training) @ v  # (B, H, L, hd)
        else:
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        ctx = ctx.transpose(1, 2).flatten(2)  # (B, L, D)
        return self.norm(x + self.dropout(self.out(ctx))), (k, v), probs


class FeedForward(nn.Module):
    """BERT's FFN: Linear -> GELU -> Linear -> dropout -> residual -> LayerNorm."""

    def __init__(self, dim: int, hidden: int, cfg: QFormerConfig):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim, eps=cfg.layer_norm_eps)
        self.dropout = nn.Dropout(cfg.hidden_dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout(self.fc2(F.gelu(self.fc1(x)))))


class QFormerLayer(nn.Module):
    """Self-attention over [queries ; text]; then queries -> cross-attention (some layers)
    -> query FFN, and text -> text FFN."""

    def __init__(self, cfg: QFormerConfig, vision_width: int, has_cross_attention: bool):
        super().__init__()
        D = cfg.hidden_size
        self.self_attn = Attention(D, D, cfg.num_heads, cfg)
        self.cross_attn = Attention(D, vision_width, cfg.num_heads, cfg, cross=True) if has_cross_attention else None
        self.text_ffn = FeedForward(D, cfg.ffn_size, cfg) if cfg.text_input else None
        self.query_ffn = FeedForward(D, cfg.ffn_size, cfg)

    def forward(self, x: Tensor, num_queries: int, image: Optional[Tensor | KV], mask: Optional[Tensor],
                past_kv: Optional[KV], need_probs: bool,
                rows: Optional[RowPlan] = None) -> tuple[Tensor, KV, Optional[Tensor], Optional[Tensor]]:
        # x: (B, L, D_q) with the first `num_queries` rows being queries (0 when text-only);
        # image: (B, N, D_v), or this layer's cross-attention keys/values already projected.
        keep = None if rows is None else rows.keep
        h, kv, self_probs = self.self_attn(x, mask=mask, past_kv=past_kv, need_probs=need_probs, keep=keep)
        queries, text = h[:, :num_queries], h[:, num_queries:]  # (B, Q, D_q), (B, T, D_q)
        cross_probs = None
        if num_queries > 0 and self.cross_attn is not None:
            if image is None:
                raise ValueError("the query positions need image features for cross-attention")
            queries, _, cross_probs = self.cross_attn(queries, source=image, need_probs=need_probs)  # (B, Q, D_q)
        parts = []
        if num_queries > 0:
            parts.append(self.query_ffn(queries))
        if text.shape[1] > 0:
            packed = rows is not None and rows.text_rows is not None and keep is None
            parts.append(packed_ffn(self.text_ffn, text, rows.text_rows) if packed else self.text_ffn(text))
        return torch.cat(parts, dim=1), kv, self_probs, cross_probs  # (B, L, D_q)


class LMHead(nn.Module):
    """BERT's MLM head (dense + GELU + LayerNorm + decoder tied to the word embeddings)."""

    def __init__(self, cfg: QFormerConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.word_embeddings = [word_embeddings]  # a list so the tied weight is owned (and saved) once
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: Tensor) -> Tensor:
        h = self.norm(F.gelu(self.dense(h)))  # (B, T, D_q)
        return F.linear(h, self.word_embeddings[0].weight, self.bias)  # (B, T, V)


# ---------------------------------------------------------------------------------------
# The Q-Former
# ---------------------------------------------------------------------------------------


@dataclass
class QFormerOutput:
    hidden: Tensor  # (B, L, D_q): the rows of this call (queries first, then text)
    past_kv: Optional[list[KV]] = None  # per layer, keys/values of cache + this call
    self_attentions: Optional[list[Tensor]] = None  # per layer, (B, H, L, P + L)
    cross_attentions: Optional[list[Optional[Tensor]]] = None  # per layer, (B, H, Q, N) or None


class QFormer(nn.Module):
    def __init__(self, cfg: QFormerConfig, vision_width: int):
        super().__init__()
        self.cfg = cfg
        D = cfg.hidden_size
        self.query_tokens = nn.Parameter(torch.zeros(1, cfg.num_queries, D))  # (1, Q, D_q)
        if cfg.text_input:
            self.word_embeddings = nn.Embedding(cfg.vocab_size, D, padding_idx=cfg.pad_token_id)
            self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, D)
        self.layernorm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)  # over [queries ; text] embeddings
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.layers = nn.ModuleList(
            [QFormerLayer(cfg, vision_width, cfg.has_cross_attention(i)) for i in range(cfg.num_layers)]
        )
        self.lm_head = LMHead(cfg, self.word_embeddings) if cfg.text_input and cfg.stage1_heads else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT's init (normal(0, 0.02) weights, zero biases, unit LayerNorms); the queries
        normal(0, 0.02) as in LAVIS `init_Qformer`."""
        std = self.cfg.init_std
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if isinstance(module, nn.Linear) and module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.query_tokens, std=std)
        if self.cfg.text_input:
            with torch.no_grad():
                self.word_embeddings.weight[self.cfg.pad_token_id].zero_()
            if self.lm_head is not None:
                nn.init.zeros_(self.lm_head.bias)

    def embed(self, text_ids: Optional[Tensor], batch_size: int, with_queries: bool, position_offset: int = 0) -> Tensor:
        """[queries ; word + position embeddings of text] -> LayerNorm -> dropout: (B, L, D_q)."""
        parts = []
        if with_queries:
            parts.append(self.query_tokens.expand(batch_size, -1, -1))  # (B, Q, D_q)
        if text_ids is not None:
            if not self.cfg.text_input:
                raise ValueError("this Q-Former has no text input (qformer.text_input=False, a stage-2 checkpoint)")
            self._check_ids(text_ids, position_offset)
            positions = torch.arange(position_offset, position_offset + text_ids.shape[1], device=text_ids.device)
            parts.append(self.word_embeddings(text_ids) + self.position_embeddings(positions))  # (B, T, D_q)
        return self.dropout(self.layernorm(torch.cat(parts, dim=1)))

    def _check_ids(self, ids: Tensor, position_offset: int) -> None:
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"text ids must be an integer tensor, got {ids.dtype}")
        lo, hi = torch.stack(torch.aminmax(ids)).tolist() if ids.numel() else (0, 0)  # one wait on a GPU, not two
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(f"text ids must lie in [0, {self.cfg.vocab_size}) (qformer.vocab_size); "
                             f"got min {lo}, max {hi}")
        if position_offset + ids.shape[1] > self.cfg.max_position_embeddings:
            raise ValueError(f"text of {position_offset + ids.shape[1]} tokens exceeds "
                             f"qformer.max_position_embeddings ({self.cfg.max_position_embeddings})")

    def forward(
        self,
        image: Optional[Tensor | ImageKV] = None,  # (B, N, D_v) after ln_vision (or its ImageKV): for the queries
        text_ids: Optional[Tensor] = None,  # (B, T)
        mask: Optional[Tensor] = None,  # bool (B, L, P + L) or broadcastable; None: everyone sees everyone
        with_queries: bool = True,
        past_kv: Optional[list[KV]] = None,  # per layer, (B, H, P, hd) keys/values of earlier rows
        position_offset: int = 0,  # position of the first text token (text already cached)
        use_cache: bool = False,
        output_attentions: bool = False,
        rows: Optional[RowPlan] = None,  # speedups.RowPlan: which rows are read, which are padding
    ) -> QFormerOutput:
        """Embed [queries ; text], then every layer: self-attention under `mask`, the query
        rows' cross-attention to the image (every `cross_attention_freq`-th layer), the two
        FFNs. With `rows`, only the rows it names are computed (see speedups.RowPlan)."""
        if not with_queries and text_ids is None:
            raise ValueError("the Q-Former needs queries, text, or both")
        B = text_ids.shape[0] if image is None else image.batch_size if isinstance(image, ImageKV) else image.shape[0]
        if B == 0:
            raise ValueError("empty batch: the Q-Former got 0 examples")
        x = self.embed(text_ids, B, with_queries, position_offset)  # (B, L, D_q)
        if isinstance(image, Tensor):  # a bf16 image tower before an fp32 Q-Former (as transformers keeps it)
            image = image.to(x.dtype)
        Q = self.cfg.num_queries if with_queries else 0
        # Checkpointing keeps each layer's input only and recomputes the rest in the backward
        # pass (the RNG state is replayed, so dropout draws the same masks).
        recompute = self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled()
        new_kv, self_attns, cross_attns = [], [], []
        for i, layer in enumerate(self.layers):
            args = (x, Q, image.layers[i] if isinstance(image, ImageKV) else image, mask,
                    None if past_kv is None else past_kv[i], output_attentions,
                    None if rows is None else rows.at_layer(i, len(self.layers)))
            x, kv, sp, cp = checkpoint(layer, *args, use_reentrant=False) if recompute else layer(*args)
            new_kv.append(kv)
            self_attns.append(sp)
            cross_attns.append(cp)
        return QFormerOutput(
            hidden=x,
            past_kv=new_kv if use_cache else None,
            self_attentions=self_attns if output_attentions else None,
            cross_attentions=cross_attns if output_attentions else None,
        )

    # -- the passes of stage 1 (Figure 2, right: one pass per mask) -------------------------

    def image_kv(self, image: Tensor) -> ImageKV:
        """image (B, N, D_v) after ln_vision -> its cross-attention keys/values, every layer
        (speedups.ImageKV: computed once, read by every pass over the same images)."""
        image = image.to(self.query_tokens.dtype)  # a bf16 tower's output into an fp32 Q-Former, as forward
        return ImageKV([None if layer.cross_attn is None else layer.cross_attn.source_kv(image)
                        for layer in self.layers])

    def encode_queries(self, image: Tensor | ImageKV, use_cache: bool = False,
                       output_attentions: bool = False) -> QFormerOutput:
        """Queries alone over the image (the ITC image side): hidden (B, Q, D_q).
        With `use_cache`, the queries' self-attention keys/values are kept for ITG."""
        return self(image=image, use_cache=use_cache, output_attentions=output_attentions)

    def encode_text(self, text_ids: Tensor, text_mask: Tensor, rows: Optional[RowPlan] = None) -> Tensor:
        """Text alone (the ITC text side; the ITC mask without the query block): (B, T, D_q)
        (with `rows.keep=1`, (B, 1, D_q): the [CLS] row, all ITC reads)."""
        return self(text_ids=text_ids, mask=text_mask.bool()[:, None, :], with_queries=False, rows=rows).hidden

    def encode_joint(self, image: Tensor | ImageKV, text_ids: Tensor, text_mask: Tensor, mode: str = "itm",
                     output_attentions: bool = False, rows: Optional[RowPlan] = None) -> QFormerOutput:
        """Queries and text in one pass under the `mode` mask (`attention_mask`): hidden
        (B, Q + T, D_q) (with `rows.keep=Q`, (B, Q, D_q): the query rows ITM reads)."""
        if mode == "itm" and bool(text_mask.all()):
            mask = None  # nothing to hide: lets attention take its unmasked fast path
        else:
            mask = attention_mask(mode, self.cfg.num_queries, text_mask)  # (B, L, L)
        return self(image=image, text_ids=text_ids, mask=mask, output_attentions=output_attentions, rows=rows)

    def decode_text(self, text_ids: Tensor, text_mask: Tensor, query_kv: list[KV],
                    rows: Optional[RowPlan] = None) -> Tensor:
        """ITG's text rows, (B, T, D_q), over the queries' cached self-attention keys/values
        (LAVIS reuses those of the ITC image pass, gradient flowing through them): under the
        ITG mask the queries never see the text, so this equals the text rows of
        `encode_joint(..., mode="itg")` (tests/test_speedups.py)."""
        Q = self.cfg.num_queries
        mask = attention_mask("itg", Q, text_mask)[:, Q:, :]  # (B, T, Q + T): the text rows
        return self(text_ids=text_ids, mask=mask, with_queries=False, past_kv=query_kv, rows=rows).hidden
