"""A lean decode path for the frozen decoder-only LLM: the same weights and the same
arithmetic as transformers' OPT and Llama forwards, without their per-step machinery.

Each decoding step of transformers' causal LMs builds masks, updates a dynamic cache and
walks through several wrappers; for a small LLM that Python work costs more than the
matrix products. Here the keys and values live in one preallocated (static) cache, the
key-padding mask is kept as a tensor, and a step is the layer loop and nothing else.
Families other than OPT and Llama (GPT-2, T5, ...) use the transformers forward
(`LanguageModel._decoder_step`); `fast_decoder()` says which applies.

Shape legend: B batch (rows, beams included), T new positions this call, M cache capacity,
H heads, Hkv key/value heads, hd head width, D model width, V vocab.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _FastDecoder:
    """Shared parts: the static cache and one attention call over it."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int):
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim

    def new_state(self, batch: int, capacity: int, dtype: torch.dtype, device: torch.device) -> dict:
        # Batch first, so beam search can reorder every tensor of the state along dim 0.
        shape = (batch, self.layers, self.kv_heads, capacity, self.head_dim)
        return {
            "k": torch.zeros(shape, dtype=dtype, device=device),  # (B, L, Hkv, M, hd)
            "v": torch.zeros(shape, dtype=dtype, device=device),
            "mask": torch.zeros(batch, capacity, dtype=torch.bool, device=device),  # real keys so far
            "length": 0,  # filled positions
            "padded": True,  # whether any key may be padding (False lets steps skip the mask)
        }

    @staticmethod
    def _mask(state: dict, end: int) -> Optional[Tensor]:
        return state["mask"][:, :end] if state["padded"] else None

    @staticmethod
    def reorder(state: dict, index: Tensor) -> dict:
        """Beam search's `reorder`: keep rows `index`, copying only the filled part of the cache."""
        n = state["length"]
        out = dict(state)
        if index.numel() != state["k"].shape[0]:  # expanding to beams: new tensors of the new size
            for key in ("k", "v", "mask"):
                out[key] = state[key].index_select(0, index)
        else:
            for key in ("k", "v"):
                state[key][..., :n, :] = state[key][index, ..., :n, :]
            state["mask"][:, :n] = state["mask"][index, :n]
        if state.get("prefix") is not None:
            out["prefix"] = state["prefix"].index_select(0, index)
        return out

    @staticmethod
    def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float, causal_from: int) -> Tensor:
        """q (B, H, T, hd) over cache keys k, v (B, Hkv, S, hd); `mask` (B, S) real keys; the T
        new rows sit at positions causal_from .. causal_from + T - 1."""
        B, H, T, _ = q.shape
        S = k.shape[2]
        if k.shape[1] != H:  # grouped-query attention: share each key/value head
            k = k.repeat_interleave(H // k.shape[1], dim=1)
            v = v.repeat_interleave(H // v.shape[1], dim=1)
        if T == 1 and mask is None:  # one new row and no padding anywhere: nothing to hide
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        if mask is None:
            mask = torch.ones(B, S, dtype=torch.bool, device=q.device)
        allowed = mask[:, None, None, :]  # (B, 1, 1, S)
        if T > 1:
            rows = torch.arange(causal_from, causal_from + T, device=q.device)[:, None]
            allowed = allowed & (torch.arange(S, device=q.device)[None, :] <= rows)  # (B, 1, T, S)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)


class FastOPT(_FastDecoder):
    """transformers `OPTForCausalLM`, step by step (modeling_opt.py, same op order)."""

    def __init__(self, model: nn.Module):
        cfg = model.config
        self.model, self.decoder = model, model.model.decoder
        self.heads = cfg.num_attention_heads
        super().__init__(cfg.num_hidden_layers, self.heads, cfg.hidden_size // self.heads)
        self.pre_norm = cfg.do_layer_norm_before
        self.act = _activation(cfg.activation_function)

    def forward(self, embeds: Tensor, positions: Tensor, state: dict) -> Tensor:
        """embeds (B, T, D_in) of the new positions; positions (B, T) their position ids;
        `state` updated in place. Returns the last position's logits (B, V)."""
        dec, start = self.decoder, state["length"]
        B, T, _ = embeds.shape
        if dec.project_in is not None:
            embeds = dec.project_in(embeds)
        h = embeds + dec.embed_positions(None, 0, position_ids=positions)  # (B, T, D)
        end = start + T
        for i, layer in enumerate(dec.layers):
            residual = h
            if self.pre_norm:
                h = layer.self_attn_layer_norm(h)
            att = layer.self_attn
            q = (att.q_proj(h) * att.scaling).view(B, T, self.heads, -1).transpose(1, 2)  # (B, H, T, hd)
            state["k"][:, i, :, start:end] = att.k_proj(h).view(B, T, self.heads, -1).transpose(1, 2)
            state["v"][:, i, :, start:end] = att.v_proj(h).view(B, T, self.heads, -1).transpose(1, 2)
            ctx = self.attend(q, state["k"][:, i, :, :end], state["v"][:, i, :, :end], self._mask(state, end),
                              1.0, start)  # OPT scales q itself
            h = residual + att.out_proj(ctx.transpose(1, 2).reshape(B, T, -1))
            if not self.pre_norm:
                h = layer.self_attn_layer_norm(h)
            residual = h
            if self.pre_norm:
                h = layer.final_layer_norm(h)
            h = residual + layer.fc2(self.act(layer.fc1(h)))
            if not self.pre_norm:
                h = layer.final_layer_norm(h)
        state["length"] = end
        h = h[:, -1]
        if dec.final_layer_norm is not None:
            h = dec.final_layer_norm(h)
        if dec.project_out is not None:
            h = dec.project_out(h)
        return self.model.lm_head(h)  # (B, V)


class FastLlama(_FastDecoder):
    """transformers `LlamaForCausalLM` (SmolLM2 and kin), step by step (modeling_llama.py)."""

    def __init__(self, model: nn.Module):
        cfg = model.config
        self.model, self.inner = model, model.model
        self.heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        super().__init__(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim)
        self.scaling = head_dim**-0.5

    def forward(self, embeds: Tensor, positions: Tensor, state: dict) -> Tensor:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        start = state["length"]
        B, T, _ = embeds.shape
        end = start + T
        h = embeds
        cos, sin = self.inner.rotary_emb(h, positions)  # (B, T, hd) each
        for i, layer in enumerate(self.inner.layers):
            residual = h
            h = layer.input_layernorm(h)
            att = layer.self_attn
            q = att.q_proj(h).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
            k = att.k_proj(h).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
            v = att.v_proj(h).view(B, T, -1, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            state["k"][:, i, :, start:end] = k
            state["v"][:, i, :, start:end] = v
            ctx = self.attend(q, state["k"][:, i, :, :end], state["v"][:, i, :, :end], self._mask(state, end),
                              self.scaling, start)
            h = residual + att.o_proj(ctx.transpose(1, 2).reshape(B, T, -1))
            residual = h
            h = residual + layer.mlp(layer.post_attention_layernorm(h))
        state["length"] = end
        return self.model.lm_head(self.inner.norm(h[:, -1]))  # (B, V)


def _activation(name: str):
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def fast_decoder(model: nn.Module) -> Optional[_FastDecoder]:
    """The lean decoder for `model`, or None where only transformers' forward is exact
    (other families, or configurations this path does not reproduce)."""
    cfg = model.config
    kind = getattr(cfg, "model_type", "")
    if kind == "opt" and getattr(cfg, "layerdrop", 0.0) == 0.0:
        return FastOPT(model)
    if kind == "llama" and getattr(cfg, "pretraining_tp", 1) == 1 and not getattr(cfg, "mlp_bias", False):
        return FastLlama(model)
    return None
