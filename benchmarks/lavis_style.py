"""The peer of benchmarks/stage1_step.py: a LAVIS-style stage-1 step on a blip2lab model's
own weights (shared, not copied), written from salesforce/LAVIS
`lavis/models/blip2_models/blip2_qformer.py` (`Blip2Qformer.forward`) and the BERT of
`lavis/models/blip2_models/Qformer.py` it calls, step for step, with blip2lab's modules
holding the weights.

Where the two steps part (every row is cost, not maths: the losses are equal, which
tests/test_lavis_style.py checks on one batch, gradients included):

| this peer, as LAVIS                                        | blip2lab `Blip2.forward`                          |
|------------------------------------------------------------|---------------------------------------------------|
| frozen ViT run on the pixels at every step                 | its output read from a disk cache                  |
| text padded to max_txt_len (tokenizer padding="max_length")| padded to the batch's longest                      |
| q, k, v: three matmuls (BertSelfAttention)                  | one fused qkv matmul                               |
| attention: matmul, additive -10000 mask, softmax, matmul    | F.scaled_dot_product_attention                     |
| image keys/values projected in every pass: B (ITC) + 3B (ITM) | once per image (qformer.ImageKV), then indexed   |
| ITM negatives drawn row by row (`multinomial(..).item()`)   | one batched multinomial                            |
| LM head over every text position                            | only over positions that predict a token           |

The same in both, as in LAVIS: ITG reuses the ITC query pass's self-attention keys/values
(`past_key_values=query_output.past_key_values`), so the queries run once for ITC and
ITG. `itg_recompute_queries=True` runs them again inside the ITG pass instead (queries +
text under the ITG mask), which some re-implementations do; it is not LAVIS.

Deviations from LAVIS kept on purpose, so both sides train the same model: the ITM
negatives follow blip2lab's rule (every positive masked: same caption, same image id)
rather than LAVIS's `softmax + 1e-4` with only the diagonal zeroed; the temperature is
clamped as in blip2lab (BLIP-1's [0.001, 0.5]); `dist.get_rank()` goes through
blip2lab.dist (LAVIS's crashes on one process) and the `.squeeze()` that breaks LAVIS at
batch 1 is a `.squeeze(-1)`.

Shape legend: B batch, W world size, Q queries, T text length, L = Q + T, N image tokens,
D_q Q-Former width, D_v image width, H heads, hd head width, E ITC width, V vocab.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip2lab import dist
from blip2lab.model import losses as L
from blip2lab.model.blip2 import Blip2
from blip2lab.model.qformer import Attention, QFormerLayer, attention_mask


def _extended(mask: Tensor) -> Tensor:
    """A bool mask (B, Lq, Lk), True = may attend -> BERT's additive mask (B, 1, Lq, Lk):
    0 where allowed, -10000 where not (LAVIS `get_extended_attention_mask`)."""
    return (1.0 - mask[:, None].float()) * -10000.0


class LavisStyleStage1(nn.Module):
    """`forward` returns the same loss dict as `Blip2.forward` (ITC, ITM, ITG and `temp`),
    so blip2lab's one training loop (`train.train`) runs it unchanged."""

    def __init__(self, model: Blip2, pad_to_max: bool = True, itg_recompute_queries: bool = False):
        """`pad_to_max`: pad every caption to qformer.max_text_len as LAVIS's tokenizer call
        does (padding="max_length"); False keeps the batch's own padding."""
        super().__init__()
        self.model = model  # the weights live here; nothing is copied
        self.pad_to_max = pad_to_max
        self.itg_recompute_queries = itg_recompute_queries

    # -- LAVIS Qformer.py: BertSelfAttention / BertAttention, on blip2lab's weights ---------

    def _heads(self, attn: Attention, x: Tensor) -> Tensor:
        B, L_, _ = x.shape
        return x.view(B, L_, attn.num_heads, attn.head_dim).transpose(1, 2)  # (B, H, L, hd)

    def _attend(self, attn: Attention, x: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
        """Scores, additive mask, softmax, dropout, weighted sum, then BertSelfOutput."""
        scores = q @ k.transpose(-1, -2) / math.sqrt(attn.head_dim)  # (B, H, Lq, Lk)
        if mask is not None:
            scores = scores + mask
        probs = F.dropout(scores.softmax(dim=-1), attn.attn_dropout, self.training)
        ctx = (probs @ v).transpose(1, 2).flatten(2)  # (B, Lq, D_q)
        return attn.norm(x + attn.dropout(attn.out(ctx)))  # dense, dropout, LayerNorm(residual)

    def _self_attention(self, attn: Attention, x: Tensor, mask: Optional[Tensor],
                        past_kv: Optional[tuple[Tensor, Tensor]]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        D = x.shape[-1]
        wq, wk, wv = attn.qkv.weight.split(D)  # LAVIS has three Linear layers: three matmuls
        bq, bk, bv = attn.qkv.bias.split(D)
        q = self._heads(attn, F.linear(x, wq, bq))  # (B, H, L, hd)
        k = self._heads(attn, F.linear(x, wk, bk))
        v = self._heads(attn, F.linear(x, wv, bv))
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)  # (B, H, P + L, hd)
        return self._attend(attn, x, q, k, v, mask), (k, v)

    def _cross_attention(self, attn: Attention, queries: Tensor, image: Tensor) -> Tensor:
        q = self._heads(attn, attn.q(queries))  # (B, H, Q, hd)
        k, v = self._heads(attn, attn.k(image)), self._heads(attn, attn.v(image))  # (B, H, N, hd): every pass
        return self._attend(attn, queries, q, k, v, None)  # image_atts all ones: an all-zero additive mask

    # -- LAVIS Qformer.py: BertLayer, BertEmbeddings, BertModel ----------------------------

    def _layer(self, layer: QFormerLayer, x: Tensor, Q: int, image: Optional[Tensor], mask: Optional[Tensor],
               past_kv) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        h, kv = self._self_attention(layer.self_attn, x, mask, past_kv)
        if Q == 0:
            return layer.text_ffn(h), kv
        queries = h[:, :Q]  # (B, Q, D_q)
        if layer.cross_attn is not None:
            queries = self._cross_attention(layer.cross_attn, queries, image)
        out = layer.query_ffn(queries)  # feed_forward_chunk_query
        if h.shape[1] > Q:
            out = torch.cat([out, layer.text_ffn(h[:, Q:])], dim=1)  # (B, L, D_q)
        return out, kv

    def _bert(self, text_ids: Optional[Tensor] = None, query_embeds: Optional[Tensor] = None,
              image: Optional[Tensor] = None, mask: Optional[Tensor] = None,
              past_kv: Optional[list] = None) -> tuple[Tensor, list]:
        """BertModel.forward: embeddings (word + position for text, queries first), LayerNorm,
        dropout, then the layers. Returns the last hidden state and every layer's keys/values."""
        qf = self.model.qformer
        parts = [] if query_embeds is None else [query_embeds]
        if text_ids is not None:  # positions start at 0: past_key_values_length = past length - query_length
            positions = torch.arange(text_ids.shape[1], device=text_ids.device)
            parts.append(qf.word_embeddings(text_ids) + qf.position_embeddings(positions))
        x = qf.dropout(qf.layernorm(torch.cat(parts, dim=1)))  # (B, L, D_q)
        Q = 0 if query_embeds is None else query_embeds.shape[1]
        present = []
        for i, layer in enumerate(qf.layers):
            x, kv = self._layer(layer, x, Q, image, mask, None if past_kv is None else past_kv[i])
            present.append(kv)
        return x, present

    # -- Blip2Qformer.forward --------------------------------------------------------------

    def forward(self, pixels: Tensor, text_ids: Tensor, text_mask: Tensor, image_ids: Optional[Tensor] = None,
                losses: Sequence[str] = ("itc", "itm", "itg"), label_smoothing: float = 0.1,
                generator: Optional[torch.Generator] = None,
                negatives: Optional[tuple[Tensor, Tensor]] = None) -> dict[str, Tensor]:
        """One LAVIS step's losses. `negatives`: (negative image per text (B,), negative text
        per image (B,)), indices into the gathered batch, to use instead of drawing them."""
        m, cfg = self.model, self.model.config.qformer
        with torch.no_grad():
            m.temp.clamp_(m.config.temp_min, m.config.temp_max)
        if self.pad_to_max:  # the tokenizer call of LAVIS: padding="max_length" (truncation is the processor's)
            extra = max(0, cfg.max_text_len - text_ids.shape[1])
            text_ids = F.pad(text_ids, (0, extra), value=cfg.pad_token_id)  # (B, T_max)
            text_mask = F.pad(text_mask, (0, extra))

        image_embeds = m.ln_vision(m.image_encoder(pixels))  # (B, N, D_v), the frozen ViT every step
        if m.image_pos is not None:
            image_embeds = image_embeds + m.image_pos
        B = image_embeds.shape[0]
        query_tokens = m.qformer.query_tokens.expand(B, -1, -1)  # (B, Q, D_q)
        query_output, query_kv = self._bert(query_embeds=query_tokens, image=image_embeds)
        image_feats = F.normalize(m.vision_proj(query_output), dim=-1)  # (B, Q, E)
        text_output, _ = self._bert(text_ids, mask=_extended(text_mask.bool()[:, None, :]))
        text_feat = F.normalize(m.text_proj(text_output[:, 0, :]), dim=-1)  # (B, E)

        # ITC
        image_feats_all = dist.all_gather_no_grad(image_feats)  # (W*B, Q, E)
        text_feat_all = dist.all_gather_no_grad(text_feat)  # (W*B, E)
        sim_q2t = (image_feats.unsqueeze(1) @ text_feat_all.unsqueeze(-1)).squeeze(-1)  # (B, W*B, Q)
        sim_i2t = sim_q2t.max(-1).values / m.temp  # (B, W*B)
        sim_t2q = (text_feat.unsqueeze(1).unsqueeze(1) @ image_feats_all.permute(0, 2, 1)).squeeze(-2)  # (B, W*B, Q)
        sim_t2i = sim_t2q.max(-1).values / m.temp
        rank = dist.rank()
        targets = torch.linspace(rank * B, rank * B + B - 1, B, dtype=int).to(pixels.device)
        out: dict[str, Tensor] = {"temp": m.temp.detach()}
        if "itc" in losses:
            out["itc_loss"] = (F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
                               + F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)) / 2
        if "itm" in losses:
            out["itm_loss"] = self._itm(image_embeds, text_ids, text_mask, image_ids, sim_i2t, sim_t2i,
                                        generator, negatives)
        if "itg" in losses:
            out["itg_loss"] = self._itg(text_ids, text_mask, query_kv, query_tokens, image_embeds, label_smoothing)
        return out

    def _negatives(self, sim_i2t: Tensor, sim_t2i: Tensor, text_ids: Tensor, ids_all: Tensor,
                   image_ids: Optional[Tensor], generator: Optional[torch.Generator]) -> tuple[Tensor, Tensor]:
        """LAVIS's two loops of `torch.multinomial(weights[b], 1).item()`, over blip2lab's weights."""
        ids_of_image_all = None if image_ids is None else dist.all_gather_no_grad(image_ids)
        positive = L.positive_pairs(text_ids, ids_all, dist.rank(), image_ids, ids_of_image_all)  # (B, W*B)
        with torch.no_grad():
            weights_t2i = F.softmax(sim_t2i.float().masked_fill(positive, float("-inf")), dim=1)
            weights_i2t = F.softmax(sim_i2t.float().masked_fill(positive, float("-inf")), dim=1)
        if not torch.isfinite(weights_t2i).all() or not torch.isfinite(weights_i2t).all():
            raise ValueError("a row has no possible ITM negative (every other example is a positive)")
        neg_image = [torch.multinomial(weights_t2i[b], 1, generator=generator).item() for b in range(len(text_ids))]
        neg_text = [torch.multinomial(weights_i2t[b], 1, generator=generator).item() for b in range(len(text_ids))]
        return torch.tensor(neg_image), torch.tensor(neg_text)

    def _itm(self, image_embeds: Tensor, text_ids: Tensor, text_mask: Tensor, image_ids: Optional[Tensor],
             sim_i2t: Tensor, sim_t2i: Tensor, generator: Optional[torch.Generator],
             negatives: Optional[tuple[Tensor, Tensor]]) -> Tensor:
        m, B = self.model, text_ids.shape[0]
        text_input_ids_world = dist.all_gather_no_grad(text_ids)  # (W*B, T)
        text_attention_mask_world = dist.all_gather_no_grad(text_mask)
        image_embeds_world = dist.all_gather_with_grad(image_embeds)  # (W*B, N, D_v)
        if negatives is None:
            negatives = self._negatives(sim_i2t, sim_t2i, text_ids, text_input_ids_world, image_ids, generator)
        neg_image, neg_text = negatives
        image_embeds_neg = torch.stack([image_embeds_world[i] for i in neg_image.tolist()])  # (B, N, D_v)
        text_ids_neg = torch.stack([text_input_ids_world[i] for i in neg_text.tolist()])  # (B, T)
        text_atts_neg = torch.stack([text_attention_mask_world[i] for i in neg_text.tolist()])

        text_ids_all = torch.cat([text_ids, text_ids, text_ids_neg], dim=0)  # pos, pos, neg: (3B, T)
        text_atts_all = torch.cat([text_mask, text_mask, text_atts_neg], dim=0)
        query_tokens_itm = m.qformer.query_tokens.expand(3 * B, -1, -1)  # (3B, Q, D_q)
        query_atts_itm = torch.ones(query_tokens_itm.shape[:-1], dtype=torch.long, device=text_ids.device)
        attention_mask_all = torch.cat([query_atts_itm, text_atts_all], dim=1)  # (3B, L)
        image_embeds_all = torch.cat([image_embeds, image_embeds_neg, image_embeds], dim=0)  # pos, neg, pos
        output_itm, _ = self._bert(text_ids_all, query_embeds=query_tokens_itm, image=image_embeds_all,
                                   mask=_extended(attention_mask_all.bool()[:, None, :]))
        vl_embeddings = output_itm[:, : query_tokens_itm.shape[1], :]  # (3B, Q, D_q)
        logits = m.itm_head(vl_embeddings).mean(dim=1)  # (3B, 2)
        itm_labels = torch.cat([torch.ones(B, dtype=torch.long), torch.zeros(2 * B, dtype=torch.long)]).to(
            text_ids.device)
        return F.cross_entropy(logits, itm_labels)

    def _itg(self, text_ids: Tensor, text_mask: Tensor, query_kv: list, query_tokens: Tensor, image_embeds: Tensor,
             label_smoothing: float) -> Tensor:
        m, cfg = self.model, self.model.config.qformer
        decoder_input_ids = text_ids.clone()
        decoder_input_ids[:, 0] = cfg.dec_token_id  # LAVIS: tokenizer.bos_token_id, the [DEC] token
        labels = decoder_input_ids.masked_fill(decoder_input_ids == cfg.pad_token_id, -100)
        Q = query_tokens.shape[1]
        causal = attention_mask("itg", Q, text_mask)  # (B, L, L); LAVIS builds it with has_query
        if self.itg_recompute_queries:
            hidden, _ = self._bert(decoder_input_ids, query_embeds=query_tokens, image=image_embeds,
                                   mask=_extended(causal))
            hidden = hidden[:, Q:]  # (B, T, D_q)
        else:  # LAVIS: past_key_values=query_output.past_key_values
            hidden, _ = self._bert(decoder_input_ids, mask=_extended(causal[:, Q:, :]), past_kv=query_kv)
        prediction_scores = m.qformer.lm_head(hidden)  # (B, T, V): BertLMHeadModel's cls over every position
        return L.itg_loss(prediction_scores, labels, label_smoothing)["itg_loss"]
