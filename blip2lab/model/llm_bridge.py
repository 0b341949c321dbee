"""The frozen LLM of stage 2 and the projection that feeds it (paper Sec. 3.3, Figure 3).

The Q outputs of the Q-Former go through one fully-connected layer into the LLM's input
embedding width and are prepended to the text embeddings as a soft visual prompt
(attention mask ones for them). The LLM stays frozen; the Q-Former path and the
projection train. Two families (BLIP2_REFERENCE.md Sec. 3):

- decoder-only (any transformers causal LM: OPT, Llama-family, GPT-2): sequence
  [Q visual][BOS][prompt][text]["\\n"][pad], language-modelling loss on the text only;
- encoder-decoder (T5 / FlanT5): encoder input [Q visual ; prefix text], decoder target
  the suffix text (prefix LM).

Shape legend: B batch, Q queries, T text length, S target length, D_q Q-Former width,
D_lm LLM input width, V vocab.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
from torch import Tensor, nn

from ..decoding import DecodingConfig, FastDecoder, fast_decoder, generate, kv_reorder
from ..dtypes import as_dtype, dtype_name, pick_dtype
from .losses import lm_loss

Kind = Literal["decoder", "encoder_decoder"]


def llm_kind(model: nn.Module) -> Kind:
    return "encoder_decoder" if getattr(model.config, "is_encoder_decoder", False) else "decoder"


def _cache_name(model: nn.Module) -> str:
    """transformers renamed the KV-cache argument `past_key_values` -> `cache` during 5.x;
    speak whichever this version's model understands."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class LanguageModel(nn.Module):
    """A frozen transformers LLM and the trainable projection into it."""

    def __init__(self, model: nn.Module, qformer_width: int, prompt_norm: str = "none"):
        super().__init__()
        self.kind: Kind = llm_kind(model)
        self.model = model
        if prompt_norm not in ("none", "embedding"):
            raise ValueError(f"prompt_norm must be 'none' or 'embedding', got {prompt_norm!r}")
        self.prompt_norm = prompt_norm  # LLMConfig.visual_prompt_norm
        self._word_norm: Optional[float] = None  # the LLM's mean word-embedding norm, read once
        # D_lm is the width of the LLM's input embeddings (OPT-350m projects 512 -> 1024
        # inside; its inputs are 512 wide).
        self.projection = nn.Linear(qformer_width, self.width)  # HF `language_projection`
        self._cache_arg = _cache_name(model)
        # The lean decode path (fast_lm.py) for OPT / Llama / T5; False forces transformers' forward.
        self.use_fast_decode = True
        # Its static buffers + CUDA graphs (fast_lm.StaticSteps): None = on CUDA only; True
        # forces them (eagerly replayed off CUDA, as the tests do), False turns them off.
        self.static_decode: Optional[bool] = None
        self._fast: Optional[tuple] = None  # (the LLM it was built for, its FastDecoder or None)
        self.freeze()

    @property
    def width(self) -> int:
        return self.model.get_input_embeddings().embedding_dim

    def freeze(self) -> "LanguageModel":
        """Explicit and idempotent: no gradients for the LLM, and it stays in eval mode."""
        self.model.requires_grad_(False)
        self.model.eval()
        return self

    def train(self, mode: bool = True) -> "LanguageModel":
        super().train(mode)
        self.model.eval()  # frozen: no dropout, whatever the parent asks
        return self

    def embed(self, ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(ids)  # (B, T, D_lm)

    def to_dtype(self, dtype: torch.dtype | str) -> "LanguageModel":
        """The frozen LLM in `dtype` (a torch dtype or its name), for inference (fp16 refused for
        T5, as `pick_dtype`). The trained projection keeps its own: its output is cast at the
        boundary (`visual_prompt`)."""
        dtype = as_dtype(dtype)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"LanguageModel.to_dtype needs a dtype, got {dtype!r}")
        pick_dtype(dtype_name(dtype), self.kind, "cpu")  # raises for fp16 T5
        self.model.to(dtype)
        self._fast = None  # the lean decoder's static buffers were of the old dtype
        return self

    def visual_prompt(self, queries: Tensor) -> Tensor:
        """Q-Former query outputs (B, Q, D_q) -> soft visual prompt (B, Q, D_lm) in the LLM's dtype.
        A Q-Former kept in fp32 before a bf16 projection is cast down first, as transformers does.
        With `prompt_norm="embedding"` each vector is rescaled to the word embeddings' mean norm."""
        visual = self.projection(queries.to(self.projection.weight.dtype))  # (B, Q, D_lm)
        if self.prompt_norm == "embedding":
            visual = visual * (self.word_norm() / visual.norm(dim=-1, keepdim=True).clamp(min=1e-6))
        return visual.to(self.model.dtype)

    def word_norm(self) -> float:
        """The mean L2 norm of the frozen LLM's input embeddings (a constant: it is frozen)."""
        if self._word_norm is None:
            self._word_norm = float(self.model.get_input_embeddings().weight.detach().float().norm(dim=-1).mean())
        return self._word_norm

    # -- training ------------------------------------------------------------------------

    def loss(self, visual: Tensor, llm_ids: Tensor, llm_mask: Tensor, llm_labels: Tensor,
             llm_target_ids: Optional[Tensor] = None, llm_target_mask: Optional[Tensor] = None,
             per_item: bool = False) -> dict[str, Tensor]:
        """Stage-2 generative loss (`per_item`: see `losses.lm_loss`).

        decoder-only: llm_ids (B, T) = [BOS][prompt][text]["\\n"][pad] with llm_labels -100 on
        BOS, prompt and padding; the visual tokens get label -100 here.
        encoder-decoder: llm_ids (B, T) the encoder's prefix text, llm_target_ids (B, S) the
        decoder target and llm_labels (B, S) the target with padding -100."""
        B, Q = visual.shape[:2]
        ones = torch.ones(B, Q, dtype=llm_mask.dtype, device=llm_mask.device)
        embeds = torch.cat([visual, self.embed(llm_ids)], dim=1)  # (B, Q + T, D_lm)
        mask = torch.cat([ones, llm_mask], dim=1)  # (B, Q + T)
        if self.kind == "decoder":
            logits = self.model(inputs_embeds=embeds, attention_mask=mask).logits  # (B, Q + T, V)
            ignore = torch.full((B, Q), -100, dtype=llm_labels.dtype, device=llm_labels.device)
            return lm_loss(logits, torch.cat([ignore, llm_labels], dim=1), shift=True, per_item=per_item)
        if llm_target_ids is None:
            raise ValueError("an encoder-decoder LLM needs llm_target_ids (the decoder target)")
        # T5 builds its decoder inputs by shifting the labels right (decoder_start = pad).
        decoder_ids = self.model._shift_right(llm_target_ids)  # (B, S)
        logits = self.model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_ids,
                            decoder_attention_mask=None if llm_target_mask is None else
                            torch.cat([torch.ones_like(llm_target_mask[:, :1]), llm_target_mask[:, :-1]], 1)).logits
        return lm_loss(logits, llm_labels, shift=False, per_item=per_item)  # (B, S, V) already aligned with the targets

    # -- generation ----------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, visual: Tensor, llm_ids: Tensor, llm_mask: Tensor, decoding: DecodingConfig,
                 eos_token_id: int | Sequence[int], pad_token_id: int) -> Tensor:
        """New tokens (B, L) after the visual prompt and the (padded) text prompt.
        Decoder-only prompts must be left-padded (the processor does so)."""
        B, Q = visual.shape[:2]
        limit = getattr(self.model.config, "max_position_embeddings", None)
        needed = Q + llm_ids.shape[1] + (decoding.max_new_tokens if self.kind == "decoder" else 0)
        if limit is not None and needed > limit:
            raise ValueError(f"{Q} visual + {llm_ids.shape[1]} prompt + {decoding.max_new_tokens} new tokens exceed "
                             f"the LLM's {limit} positions: shorten the question or the history")
        ones = torch.ones(B, Q, dtype=llm_mask.dtype, device=llm_mask.device)
        prefix = torch.cat([visual, self.embed(llm_ids)], dim=1)  # (B, Q + T, D_lm)
        mask = torch.cat([ones, llm_mask], dim=1)  # (B, Q + T)
        fast = self.fast_decoder()
        rows = B * decoding.num_beams if decoding.uses_beams else B  # state rows after the first step
        static = self.static_decode if self.static_decode is not None else prefix.device.type == "cuda"
        if self.kind == "decoder":
            start = llm_ids[:, -1:]  # stands for the prompt; the first step feeds `prefix` instead
            if fast is not None:
                call = fast.start(prefix, mask, rows, prefix.shape[1] + decoding.max_new_tokens, static)
                step, state, reorder = call.step, call.state, call.reorder
            else:
                state = {"prefix": prefix, "mask": mask, "cache": None}
                step, reorder = self._decoder_step, kv_reorder
            return generate(step, start, state, decoding, eos_token_id=eos_token_id,
                            pad_token_id=pad_token_id, reorder=reorder, history_ids=llm_ids)
        # The encoder runs once per image, never per beam.
        encoder_out = self.model.get_encoder()(inputs_embeds=prefix, attention_mask=mask).last_hidden_state
        start = torch.full((B, 1), self.model.config.decoder_start_token_id, dtype=torch.long, device=llm_ids.device)
        if fast is not None:
            call = fast.start(encoder_out, mask, rows, decoding.max_new_tokens, static)
            step, state, reorder = call.step, call.state, call.reorder
        else:
            state = {"encoder": encoder_out, "encoder_mask": mask, "cache": None}
            step, reorder = self._encoder_decoder_step, kv_reorder
        return generate(step, start, state, decoding, eos_token_id=eos_token_id,
                        pad_token_id=pad_token_id, reorder=reorder)

    def fast_decoder(self) -> Optional[FastDecoder]:
        """The lean decoder (fast_lm.py), built once so its static buffers and CUDA graphs
        outlive a call; None where transformers' forward must run (or use_fast_decode is off)."""
        if not self.use_fast_decode:
            return None
        if self._fast is None or self._fast[0] is not self.model:
            self._fast = (self.model, fast_decoder(self.model))
        return self._fast[1]

    def _decoder_step(self, new_ids: Tensor, state: dict) -> tuple[Tensor, dict]:
        mask = state["mask"]  # (B, P) over everything cached so far, plus the new tokens below
        if state["cache"] is None:
            embeds = state["prefix"]  # the first step: visual prompt + text prompt
        else:
            embeds = self.embed(new_ids)  # (B, 1, D_lm)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        # Positions count real tokens only, so left padding does not shift them
        # (transformers `generate` does the same).
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -embeds.shape[1]:]
        out = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True,
                         **{self._cache_arg: state["cache"]})
        return out.logits[:, -1].float(), {"prefix": None, "mask": mask, "cache": _returned_cache(out)}

    def _encoder_decoder_step(self, new_ids: Tensor, state: dict) -> tuple[Tensor, dict]:
        out = self.model(encoder_outputs=(state["encoder"],), attention_mask=state["encoder_mask"],
                         decoder_input_ids=new_ids, use_cache=True, **{self._cache_arg: state["cache"]})
        return out.logits[:, -1].float(), state | {"cache": _returned_cache(out)}
