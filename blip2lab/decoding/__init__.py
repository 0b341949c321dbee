"""Decoding: one model-agnostic engine (greedy, beam search, sampling: `generation`) for every
generator in blip2lab, and the lean decoder paths of the frozen LLMs (`fast_lm`: OPT, Llama,
T5 with a static KV cache and CUDA graphs), token-identical to transformers' `generate`."""

from .fast_lm import FastDecoder, fast_decoder
from .generation import DecodingConfig, decode_sequences, generate, kv_reorder

__all__ = ["DecodingConfig", "generate", "decode_sequences", "kv_reorder", "FastDecoder", "fast_decoder"]
