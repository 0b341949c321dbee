"""A lean decode path for the frozen LLM: the same weights and the same arithmetic as
transformers' OPT, Llama and T5 forwards, without their per-step machinery.

Each decoding step of transformers' LMs builds masks, updates a dynamic cache and walks
through several wrappers; for a small LLM that Python work costs more than the matrix
products, and on a GPU it costs more than the kernels of even a 2.7B model. Here the keys
and values live in one preallocated (static) cache, the key-padding mask is kept as a
tensor, and a step is the layer loop and nothing else. The layers' own modules (Linear,
LayerNorm, FFN) are called, and attention is the `scaled_dot_product_attention` call
transformers' "sdpa" path makes, so on the same inputs the logits are those of
transformers (bit for bit where the kernels are the same).

Two ways to run the steps of one `generate()` call (`FastDecoder.start`):
* eager, on a state allocated for the call (the CPU default);
* static (`StaticSteps`): the state is allocated once per shape and reused by later calls
  of that shape; on CUDA every token step replays a CUDA graph of the eager step, one graph
  per cache length (a step's shapes depend on how many keys are cached), so a step costs
  one launch instead of hundreds. The graphs run exactly the eager step's kernels, hence
  the same tokens. Elsewhere the static path runs the step eagerly on the same buffers,
  which is how the CPU tests check everything but the capture itself.

The prompt (visual prefix + text, or T5's encoder output) is encoded once per image; beam
search then copies that state to the K beams of its row.

Families other than OPT, Llama and T5 (GPT-2, ...) use the transformers forward
(`LanguageModel._decoder_step`); `fast_decoder()` says which applies.

Shape legend: B batch, R state rows (B, or B*K with K beams), T new positions this call,
M cache capacity, S encoder length, H heads, Hkv key/value heads, hd head width, D model
width, V vocab, L layers.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class FastDecoder:
    """Shared parts: the static cache, one attention call over it, the token step, beam
    reordering and the per-call driver (`start`)."""

    # At most this many static shapes keep their buffers and graphs (greedy and beam of one
    # workload fit; a third shape evicts the oldest).
    max_static_shapes = 2

    def __init__(self, layers: int, kv_heads: int, head_dim: int):
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self._static: dict[tuple, StaticSteps] = {}

    # -- the family's parts ----------------------------------------------------------------

    def embed(self, ids: Tensor) -> Tensor:
        """Token ids (R, T) -> input embeddings (R, T, D)."""
        raise NotImplementedError

    def begin(self, state: dict, source: Tensor, source_mask: Tensor) -> None:
        """Take the call's prompt into a fresh state: decoder-only LLMs keep the prefix
        embeddings for the first step, T5 projects the encoder output to cross keys/values."""
        raise NotImplementedError

    def step(self, ids: Tensor, state: dict) -> Tensor:
        """One eager step: new ids (R, 1) (ignored on a decoder-only LLM's first step, which
        feeds the prefix) -> last-position logits (R, V) in fp32; `state` updated in place."""
        raise NotImplementedError

    # -- the static cache --------------------------------------------------------------------

    def new_state(self, batch: int, capacity: int, dtype: torch.dtype, device: torch.device,
                  source_len: int = 0) -> dict:
        # Batch first, so beam search can reorder every tensor of the state along dim 0.
        shape = (batch, self.layers, self.kv_heads, capacity, self.head_dim)
        return {
            "k": torch.zeros(shape, dtype=dtype, device=device),  # (R, L, Hkv, M, hd)
            "v": torch.zeros(shape, dtype=dtype, device=device),
            "mask": torch.zeros(batch, capacity, dtype=torch.bool, device=device),  # real keys so far
            "length": 0,  # filled positions
            "padded": True,  # whether any key may be padding (False lets steps skip the mask)
            "prefix": None,  # decoder-only: the prompt's embeddings until the first step eats them
            "shared": 0,  # leading positions identical across each row's beams (copied at expansion)
        }

    # Tensors of the state that follow their row through a beam reorder, and the dim whose
    # first `length` positions are the filled part.
    _filled = {"k": -2, "v": -2, "mask": 1}
    # Tensors fixed per call (T5's cross keys/values): beams of a row share their source, so
    # only the expansion to beams copies them.
    _per_source: tuple[str, ...] = ()

    def reorder(self, state: dict, index: Tensor, out: Optional[dict] = None) -> dict:
        """Beam search's `reorder`: keep rows `index`.

        Expanding to beams (more rows): into `out` (a static state of the new size) when
        given, else into new tensors; the positions filled so far (the prompt) are then the
        same in all beams of a row. The same number of rows: in place, where beam search
        only moves rows among the beams of one batch row, so the positions after that
        shared prompt are the only ones copied."""
        n = state["length"]
        if index.numel() == state["k"].shape[0]:
            shared = state["shared"]
            for key, dim in self._filled.items():  # index_select: 2x faster on CPU than x[index, ..., :n, :]
                part = state[key].narrow(dim, shared, n - shared)
                part.copy_(part.index_select(0, index))
            return state
        if out is None:
            out = dict(state)
            for key in (*self._filled, *self._per_source):
                out[key] = state[key].index_select(0, index)
        else:
            for key, dim in self._filled.items():
                out[key].narrow(dim, 0, n).copy_(state[key].narrow(dim, 0, n).index_select(0, index))
            for key in self._per_source:
                out[key].copy_(state[key].index_select(0, index))
            out.update((k, v) for k, v in state.items() if not isinstance(v, Tensor))
        if state.get("prefix") is not None:
            out["prefix"] = state["prefix"].index_select(0, index)
        out["shared"] = n
        return out

    @staticmethod
    def attend(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], scale: float, causal_from: int) -> Tensor:
        """q (B, H, T, hd) over cache keys k, v (B, Hkv, S, hd); `mask` (B, S) real keys or
        None; the T new rows sit at positions causal_from .. causal_from + T - 1.

        Without padding the calls are those of transformers' sdpa path (no mask for one new
        row, `is_causal` for a prompt over an empty cache), so the same kernels run."""
        B, H, T, _ = q.shape
        S = k.shape[2]
        if k.shape[1] != H:  # grouped-query attention: share each key/value head
            k = k.repeat_interleave(H // k.shape[1], dim=1)
            v = v.repeat_interleave(H // v.shape[1], dim=1)
        if mask is None and T == 1:  # one new row and no padding anywhere: nothing to hide
            return F.scaled_dot_product_attention(q, k, v, scale=scale)
        if mask is None and causal_from == 0 and S == T:  # the prompt over an empty cache
            return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=True)
        if mask is None:
            mask = torch.ones(B, S, dtype=torch.bool, device=q.device)
        allowed = mask[:, None, None, :]  # (B, 1, 1, S)
        if T > 1:
            rows = torch.arange(causal_from, causal_from + T, device=q.device)[:, None]
            allowed = allowed & (torch.arange(S, device=q.device)[None, :] <= rows)  # (B, 1, T, S)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale)

    # -- one generate() call -------------------------------------------------------------------

    def start(self, source: Tensor, source_mask: Tensor, rows: int, capacity: int,
              static: bool) -> "DecodeCall":
        """`generate()`'s step / reorder / state for one call. source (B, P, D): the prefix
        embeddings (decoder-only) or the encoder output (T5); source_mask (B, P); rows: R after
        the first step (B, or B*K for beam search); capacity: cache positions to allocate."""
        B, P = source.shape[:2]
        runner = self._static_steps(rows, capacity, source.dtype, source.device, P) if static else None
        if runner is not None and rows == B:
            state = runner.state  # greedy: the first step already runs on the reusable buffers
            state["mask"].zero_()
            state["length"], state["prefix"], state["shared"] = 0, None, 0
        else:
            state = self.new_state(B, capacity, source.dtype, source.device, P)
        self.begin(state, source, source_mask)
        return DecodeCall(self, state, runner)

    def release(self) -> None:
        """Drop every static state and its CUDA graphs (their memory goes back to the allocator)."""
        self._static.clear()

    def recorder_for(self, device: torch.device) -> Optional["CudaGraphRecorder"]:
        """What records the token steps on `device`: CUDA graphs on CUDA, nothing elsewhere."""
        return CudaGraphRecorder() if device.type == "cuda" else None

    def _static_steps(self, rows: int, capacity: int, dtype: torch.dtype, device: torch.device,
                      source_len: int) -> "StaticSteps":
        key = (rows, capacity, dtype, str(device), source_len if self._per_source else 0)
        runner = self._static.pop(key, None)
        if runner is None:
            while len(self._static) >= self.max_static_shapes:
                self._static.pop(next(iter(self._static)))  # the least recently used shape
            with torch.inference_mode(False):  # normal tensors: later calls may run outside inference mode
                runner = StaticSteps(self, self.new_state(rows, capacity, dtype, device, source_len),
                                     self.recorder_for(device))
        self._static[key] = runner  # most recently used last
        return runner


class DecodeCall:
    """The `step` and `reorder` that `generation.generate` drives for one call. The first
    step (the prompt) runs eagerly; later steps go through the static runner when there is
    one, once the state lives in its buffers."""

    def __init__(self, decoder: FastDecoder, state: dict, runner: Optional["StaticSteps"]):
        self.decoder, self.state, self.runner = decoder, state, runner

    def step(self, ids: Tensor, state: dict) -> tuple[Tensor, dict]:
        if self.runner is not None and state is self.runner.state and state["length"] > 0:
            return self.runner(ids), state
        return self.decoder.step(ids, state), state

    def reorder(self, state: dict, index: Tensor) -> dict:
        expanding = index.numel() != state["k"].shape[0]
        out = self.runner.state if expanding and self.runner is not None else None
        return self.decoder.reorder(state, index, out=out)


class StaticSteps:
    """The token steps of one decoder at one shape (rows, capacity, source length), over a
    state allocated once and reused by every later call of that shape.

    With a `recorder` (CUDA graphs on CUDA), each (cache length, padded) gets its step
    recorded on first use, after one warm-up run of the same step (lazy initialisations
    stay out of the recording; it writes what the step writes), and replayed after. The
    recordings keep nothing alive but this object's buffers: their logits are copied into
    `self.logits`. Host-side bookkeeping the step does (the cache length) is redone after a
    replay. Without one, the step runs eagerly on the same buffers. A recording that fails
    turns recording off for this shape (eager steps from then on), the error kept in
    `graph_error`."""

    def __init__(self, decoder: FastDecoder, state: dict, recorder: Optional["CudaGraphRecorder"]):
        self.decoder, self.state, self.recorder = decoder, state, recorder
        self.ids = torch.zeros(state["k"].shape[0], 1, dtype=torch.long, device=state["k"].device)  # (R, 1)
        self.logits: Optional[Tensor] = None  # (R, V) fp32, written by every replay
        self.graphs: dict[tuple[int, bool], Callable[[], None]] = {}  # (length, padded) -> replay
        self.graph_error: Optional[str] = None

    def __call__(self, ids: Tensor) -> Tensor:
        """New ids (R, 1) -> logits (R, V); valid until the next call."""
        self.ids.copy_(ids)
        n, key = self.state["length"], (self.state["length"], self.state["padded"])
        replay = self.graphs.get(key)
        if replay is None and self.recorder is not None:
            try:
                replay = self.graphs[key] = self._record()
            except RuntimeError as err:
                self.recorder, self.graph_error = None, f"{type(err).__name__}: {err}"
                warnings.warn(f"CUDA graph capture failed, decoding eagerly: {self.graph_error}", stacklevel=2)
                self.state["length"] = n
        if replay is None:
            return self.decoder.step(self.ids, self.state)
        replay()
        self.state["length"] = n + 1
        return self.logits

    def _record(self) -> Callable[[], None]:
        state, n = self.state, self.state["length"]
        with self.recorder.warm_up():
            logits = self.decoder.step(self.ids, state)
        state["length"] = n
        if self.logits is None:
            with torch.inference_mode(False):
                self.logits = torch.empty_like(logits)

        def step() -> None:  # leaves the host side as it found it: a replay runs no Python
            self.logits.copy_(self.decoder.step(self.ids, state))
            state["length"] = n

        try:
            return self.recorder.record(step)
        finally:
            state["length"] = n


class CudaGraphRecorder:
    """The only CUDA-specific lines of the static path: a side stream for the warm-ups (as
    PyTorch's CUDA-graph recipe asks), and capture into graphs that share one memory pool
    (they never run at the same time)."""

    def __init__(self):
        self.pool = torch.cuda.graph_pool_handle()
        self.side = torch.cuda.Stream()

    @contextlib.contextmanager
    def warm_up(self):
        self.side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side):
            yield
        torch.cuda.current_stream().wait_stream(self.side)

    def record(self, fn: Callable[[], None]) -> Callable[[], None]:
        """Capture fn's kernels (fn itself does not run); returns the graph's replay."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            fn()
        return graph.replay


# ---------------------------------------------------------------------------------------
# Decoder-only families
# ---------------------------------------------------------------------------------------


class _DecoderOnly(FastDecoder):
    """Prompt handling shared by OPT and Llama: the first step feeds the whole prefix."""

    model: nn.Module

    def embed(self, ids: Tensor) -> Tensor:
        return self.model.get_input_embeddings()(ids)

    def begin(self, state: dict, source: Tensor, source_mask: Tensor) -> None:
        state["mask"][:, : source.shape[1]] = source_mask.bool()
        state["padded"] = not bool(source_mask.all())
        state["prefix"] = source

    def step(self, ids: Tensor, state: dict) -> Tensor:
        if state["prefix"] is not None:  # the first step: visual prompt + text prompt at once
            embeds, state["prefix"] = state["prefix"], None
            real = state["mask"][:, : embeds.shape[1]].long()
            positions = (real.cumsum(-1) - 1).clamp(min=0)  # (B, P): left padding does not shift them
        else:
            n = state["length"]
            embeds = self.embed(ids)  # (R, 1, D)
            positions = state["mask"][:, :n].sum(1, keepdim=True)  # (R, 1) real tokens before it
            state["mask"][:, n] = True
        return self.forward(embeds, positions, state).float()

    def forward(self, embeds: Tensor, positions: Tensor, state: dict) -> Tensor:
        raise NotImplementedError


class FastOPT(_DecoderOnly):
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
        mask = state["mask"][:, :end] if state["padded"] else None
        for i, layer in enumerate(dec.layers):
            residual = h
            if self.pre_norm:
                h = layer.self_attn_layer_norm(h)
            att = layer.self_attn
            q = (att.q_proj(h) * att.scaling).view(B, T, self.heads, -1).transpose(1, 2)  # (B, H, T, hd)
            state["k"][:, i, :, start:end] = att.k_proj(h).view(B, T, self.heads, -1).transpose(1, 2)
            state["v"][:, i, :, start:end] = att.v_proj(h).view(B, T, self.heads, -1).transpose(1, 2)
            ctx = self.attend(q, state["k"][:, i, :, :end], state["v"][:, i, :, :end], mask,
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


class FastLlama(_DecoderOnly):
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
        mask = state["mask"][:, :end] if state["padded"] else None
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
            ctx = self.attend(q, state["k"][:, i, :, :end], state["v"][:, i, :, :end], mask, self.scaling, start)
            h = residual + att.o_proj(ctx.transpose(1, 2).reshape(B, T, -1))
            residual = h
            h = residual + layer.mlp(layer.post_attention_layernorm(h))
        state["length"] = end
        return self.model.lm_head(self.inner.norm(h[:, -1]))  # (B, V)


# ---------------------------------------------------------------------------------------
# Encoder-decoder: T5 / FlanT5
# ---------------------------------------------------------------------------------------


class FastT5(FastDecoder):
    """transformers `T5ForConditionalGeneration`'s decoder, step by step (modeling_t5.py and
    its sdpa path): self-attention over the static cache with T5's relative position bias as
    an additive mask, cross-attention over the encoder output, whose keys and values are
    projected once per call (transformers projects them on every beam row). No query
    scaling, as T5. The encoder itself is transformers' (`LanguageModel.generate`)."""

    _per_source = ("xk", "xv", "xmask")

    def __init__(self, model: nn.Module):
        cfg = model.config
        self.model, self.decoder = model, model.decoder
        self.heads = cfg.num_heads
        super().__init__(cfg.num_decoder_layers, self.heads, cfg.d_kv)
        self.bias_table = self.decoder.block[0].layer[0].SelfAttention  # owns relative_attention_bias
        # transformers 5.x scales the decoder output before a tied LM head (older: tie_word_embeddings).
        self.scale_output = getattr(cfg, "scale_decoder_outputs", cfg.tie_word_embeddings)

    def new_state(self, batch: int, capacity: int, dtype: torch.dtype, device: torch.device,
                  source_len: int = 0) -> dict:
        state = super().new_state(batch, capacity, dtype, device)
        shape = (batch, self.layers, self.heads, source_len, self.head_dim)
        state["xk"] = torch.zeros(shape, dtype=dtype, device=device)  # (R, L, H, S, hd) cross keys
        state["xv"] = torch.zeros(shape, dtype=dtype, device=device)
        state["xmask"] = torch.zeros(batch, source_len, dtype=torch.bool, device=device)  # (R, S) real tokens
        return state

    def embed(self, ids: Tensor) -> Tensor:
        return self.decoder.embed_tokens(ids)

    def begin(self, state: dict, source: Tensor, source_mask: Tensor) -> None:
        """source: the encoder output (B, S, D) -> every layer's cross keys / values."""
        B, S, _ = source.shape
        for i, block in enumerate(self.decoder.block):
            att = block.layer[1].EncDecAttention
            state["xk"][:, i] = att.k(source).view(B, S, self.heads, -1).transpose(1, 2)  # (B, H, S, hd)
            state["xv"][:, i] = att.v(source).view(B, S, self.heads, -1).transpose(1, 2)
        state["xmask"].copy_(source_mask.bool())
        state["padded"] = not bool(source_mask.all())  # padding in the encoder input (the decoder has none)

    def _self_bias(self, n: int, dtype_device: Tensor) -> Tensor:
        """T5's relative position bias of the query at position n over keys 0..n: (1, H, 1, n + 1)
        (transformers `compute_bias`)."""
        att = self.bias_table
        relative = torch.arange(n + 1, device=dtype_device.device)[None, :] - n  # (1, n + 1) key - query
        bucket = att._relative_position_bucket(relative, bidirectional=False,
                                               num_buckets=att.relative_attention_num_buckets,
                                               max_distance=att.relative_attention_max_distance)
        return att.relative_attention_bias(bucket).permute(2, 0, 1).unsqueeze(0)  # (1, H, 1, n + 1)

    def _cross_bias(self, state: dict, like: Tensor) -> Tensor:
        """Cross-attention has no position bias: zeros, with the encoder's padding at -inf-ish
        (transformers' `create_position_bias_mask`): (1 or R, H, 1, S)."""
        S = state["xk"].shape[3]
        zeros = torch.zeros(1, self.heads, 1, S, dtype=like.dtype, device=like.device)
        if not state["padded"]:
            return zeros
        return torch.where(state["xmask"][:, None, None, :], zeros, torch.finfo(like.dtype).min)

    def step(self, ids: Tensor, state: dict) -> Tensor:
        """ids (R, 1) at decoder position n = state["length"] -> logits (R, V) fp32."""
        n = state["length"]
        R = ids.shape[0]
        h = self.embed(ids)  # (R, 1, D)
        self_bias = self._self_bias(n, h)  # (1, H, 1, n + 1)
        cross_bias = self._cross_bias(state, h)
        state["mask"][:, n] = True
        for i, block in enumerate(self.decoder.block):
            self_part, cross_part, ffn = block.layer[0], block.layer[1], block.layer[-1]
            att = self_part.SelfAttention
            x = self_part.layer_norm(h)
            q = att.q(x).view(R, 1, self.heads, -1).transpose(1, 2)  # (R, H, 1, hd)
            state["k"][:, i, :, n:n + 1] = att.k(x).view(R, 1, self.heads, -1).transpose(1, 2)
            state["v"][:, i, :, n:n + 1] = att.v(x).view(R, 1, self.heads, -1).transpose(1, 2)
            ctx = F.scaled_dot_product_attention(q, state["k"][:, i, :, :n + 1], state["v"][:, i, :, :n + 1],
                                                 attn_mask=self_bias, scale=1.0)
            h = h + att.o(ctx.transpose(1, 2).reshape(R, 1, -1))
            att = cross_part.EncDecAttention
            q = att.q(cross_part.layer_norm(h)).view(R, 1, self.heads, -1).transpose(1, 2)  # (R, H, 1, hd)
            ctx = F.scaled_dot_product_attention(q, state["xk"][:, i], state["xv"][:, i], attn_mask=cross_bias,
                                                 scale=1.0)
            h = h + att.o(ctx.transpose(1, 2).reshape(R, 1, -1))
            h = ffn(h)  # T5LayerFF: norm, (gated) FFN, residual
        state["length"] = n + 1
        h = self.decoder.final_layer_norm(h[:, -1])  # (R, D)
        if self.scale_output:
            h = h * (self.model.model_dim**-0.5)
        return self.model.lm_head(h).float()  # (R, V)


def _activation(name: str):
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def fast_decoder(model: nn.Module) -> Optional[FastDecoder]:
    """The lean decoder for `model`, or None where only transformers' forward is exact
    (other families, or configurations this path does not reproduce)."""
    cfg = model.config
    kind = getattr(cfg, "model_type", "")
    if kind == "opt" and getattr(cfg, "layerdrop", 0.0) == 0.0:
        return FastOPT(model)
    if kind == "llama" and getattr(cfg, "pretraining_tp", 1) == 1 and not getattr(cfg, "mlp_bias", False):
        return FastLlama(model)
    # fp16 T5 runs transformers' inf-clamping between sub-layers, which this path leaves out
    # (blip2lab refuses fp16 for T5 anyway: llm.pick_dtype).
    if kind == "t5" and model.dtype != torch.float16:
        return FastT5(model)
    return None
