"""Model-agnostic incremental decoding: greedy, beam search and sampling.

One engine serves every generator in blip2lab: the Q-Former's ITG decoder (captioning
without an LLM), the frozen LLMs of stage 2 (OPT, Llama, FlanT5's decoder) and the fast
generation paths. The model is hidden behind two callables:

* ``step(new_ids, state) -> (logits, state)``: feed new token ids ``(B', t)``, get the
  logits of the LAST position ``(B', V)`` and the updated state (KV cache, attention
  mask, encoder outputs, ...). The first call gets the whole prompt ``(B, T0)``; later
  calls get the token chosen at the previous step ``(B', 1)``.
* ``reorder(state, index) -> state``: keep state rows ``index`` (dim 0 is the batch).
  Beam search uses it once to expand the prompt's state to ``B * num_beams`` rows and
  then whenever a beam's parent changes. ``kv_reorder`` handles the usual nests of
  tensors and transformers ``Cache`` objects.

Semantics follow transformers 5.x ``generation/utils.py`` and ``logits_process.py`` so
that greedy and beam outputs are token-identical to ``model.generate`` on the same
weights: the processors (repetition penalty, no-repeat n-gram, min new tokens, then for
sampling temperature, top-k, top-p) run in transformers' order, greedy and sampling
process raw logits, beam search processes log-softmaxed logits (as ``_beam_search``
does) and is a port of its vectorised top-2K / finished-hypotheses bookkeeping,
including the ``early_stopping`` heuristics. Lengths count NEW tokens only (BLIP2_REFERENCE
Sec. 3: the HF issues about ``max_length`` including the 32 visual tokens).

Deliberate differences from transformers, all documented where they happen:
* ``num_beams == 1`` with ``strategy="beam"`` runs greedy search, as ``generate`` does.
* Beam search runs the prompt once per batch row, not once per beam, and expands the
  state with ``reorder`` while following the first step's parents (same logits, K times
  less prefill work).
* Negative ids in ``history_ids`` are ignored by the penalty processors; this is how a
  caller mirrors transformers' ``prompt_ignore_length`` for left padding.
* Finished beam rows are padded with ``pad_token_id`` (transformers uses EOS when
  ``pad_token_id == 0``, a quirk of ``pad or eos``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import ConfigError

__all__ = [
    "DecodingConfig",
    "StepFn",
    "ReorderFn",
    "generate",
    "decode_sequences",
    "kv_reorder",
]

StepFn = Callable[[Tensor, Any], tuple[Tensor, Any]]
ReorderFn = Callable[[Any, Tensor], Any]

_NEG = -1.0e9  # transformers' "impossible" beam score; kept identical for bit-equal ranking


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@dataclass
class DecodingConfig:
    """How to pick tokens (BLIP2_REFERENCE Sec. 3 "Decoding defaults" gives the paper's values)."""

    # greedy = argmax; beam = transformers' beam search; sample = multinomial after warpers.
    strategy: Literal["greedy", "beam", "sample"] = "greedy"
    # Hypotheses kept by beam search (captions and VQA use 5); ignored by other strategies.
    num_beams: int = 1
    # NEW tokens only, never the prompt or the 32 visual tokens (the HF max_length trap).
    max_new_tokens: int = 30
    # EOS is forbidden before this many new tokens (captioning uses 1, COCO eval 8).
    min_new_tokens: int = 0
    # Sampling only: logits are divided by it before top-k / top-p.
    temperature: float = 1.0
    # Sampling only: keep the k most likely tokens; 0 turns it off.
    top_k: int = 0
    # Sampling only: nucleus mass to keep (the paper samples with 0.9); 1.0 turns it off.
    top_p: float = 1.0
    # Beam only: finished score = sum of log-probs / new_len ** length_penalty (VQA uses -1).
    length_penalty: float = 1.0
    # transformers' CTRL penalty over tokens already in the sequence (prompt included):
    # a positive score is divided by it, a negative one multiplied. 1.0 turns it off.
    repetition_penalty: float = 1.0
    # Forbid any n-gram of this size from occurring twice; 0 turns it off.
    no_repeat_ngram_size: int = 0
    # Beam only, transformers' meaning: True stops a row once num_beams hypotheses are
    # finished; False stops when the heuristic says no running beam can win; "never"
    # uses the canonical (exact) bound.
    early_stopping: bool | str = False
    # Sampling only: seeds a private torch.Generator (reproducible); None uses torch's
    # global RNG, which reproduces transformers' sampling under the same torch.manual_seed.
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        _check(self.strategy in ("greedy", "beam", "sample"),
               f"strategy must be 'greedy', 'beam' or 'sample', got {self.strategy!r}")
        _check(_is_int(self.num_beams) and self.num_beams >= 1,
               f"num_beams must be an integer >= 1, got {self.num_beams!r}")
        _check(_is_int(self.max_new_tokens) and self.max_new_tokens >= 1,
               f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        _check(_is_int(self.min_new_tokens) and 0 <= self.min_new_tokens <= self.max_new_tokens,
               f"min_new_tokens must be an integer in [0, max_new_tokens={self.max_new_tokens}], "
               f"got {self.min_new_tokens!r}")
        _check(_is_num(self.temperature) and self.temperature >= 0,
               f"temperature must be a finite number >= 0, got {self.temperature!r}")
        _check(self.strategy != "sample" or self.temperature > 0,
               "temperature must be > 0 when strategy='sample' (use strategy='greedy' for argmax)")
        _check(_is_int(self.top_k) and self.top_k >= 0,
               f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        _check(_is_num(self.top_p) and 0 < self.top_p <= 1,
               f"top_p must be in (0, 1] (1 = off), got {self.top_p!r}")
        _check(_is_num(self.length_penalty),
               f"length_penalty must be a finite number, got {self.length_penalty!r}")
        _check(_is_num(self.repetition_penalty) and self.repetition_penalty > 0,
               f"repetition_penalty must be a finite number > 0 (1 = off), got {self.repetition_penalty!r}")
        _check(_is_int(self.no_repeat_ngram_size) and self.no_repeat_ngram_size >= 0,
               f"no_repeat_ngram_size must be an integer >= 0 (0 = off), got {self.no_repeat_ngram_size!r}")
        _check(self.early_stopping is True or self.early_stopping is False or self.early_stopping == "never",
               f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        _check(self.seed is None or _is_int(self.seed),
               f"seed must be an integer or None, got {self.seed!r}")

    @property
    def uses_beams(self) -> bool:
        """Beam search proper; transformers runs greedy search when num_beams == 1."""
        return self.strategy == "beam" and self.num_beams > 1


# ----------------------------------------------------------------------------------------
# Logits processors: vectorised ports of transformers' classes, same arithmetic.
# ids: (R, S) every token the row has seen (history + new); scores: (R, V).


def _repetition_penalty(ids: Tensor, scores: Tensor, penalty: float) -> Tensor:
    """RepetitionPenaltyLogitsProcessor: each seen token once, <0 multiplied, >0 divided."""
    V = scores.shape[-1]
    # Ids outside the head's vocabulary, and negative (ignored) ids, go to a spare column.
    ids = torch.where(ids < 0, V, ids.clamp(max=V))
    padded = F.pad(scores, (0, 1))  # (R, V + 1)
    seen = padded.gather(1, ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return padded.scatter(1, ids, seen)[:, :V]


def _no_repeat_ngram(ids: Tensor, scores: Tensor, n: int) -> Tensor:
    """NoRepeatNGramLogitsProcessor: ban the token that would repeat an earlier n-gram."""
    S, V = ids.shape[-1], scores.shape[-1]
    if S < n:
        return scores
    # Only windows whose first n-1 tokens equal the current suffix can be completed next.
    prefix = ids[:, S + 1 - n:]  # (R, n-1)
    windows = ids.unfold(1, n, 1)  # (R, S-n+1, n)
    matches = (windows[..., :-1] == prefix.unsqueeze(1)).all(-1)  # (R, S-n+1)
    last = windows[..., -1]
    target = torch.where(matches & (last >= 0), last.clamp(max=V), V)  # spare column V = no ban
    banned = torch.zeros(scores.shape[0], V + 1, dtype=torch.bool, device=scores.device)
    banned.scatter_(1, target, True)
    return scores.masked_fill(banned[:, :V], -math.inf)


def _forbid_eos(scores: Tensor, eos: Tensor) -> Tensor:
    """MinNewTokensLengthLogitsProcessor, for a step known to be before min_new_tokens."""
    is_eos = torch.isin(torch.arange(scores.shape[-1], device=scores.device), eos)  # (V,)
    return scores.masked_fill(is_eos, -math.inf)


def _top_k(scores: Tensor, k: int) -> Tensor:
    """TopKLogitsWarper (min_tokens_to_keep=1): ties with the k-th score survive."""
    k = min(k, scores.shape[-1])
    kth = torch.topk(scores, k)[0][..., -1, None]
    return scores.masked_fill(scores < kth, -math.inf)


def _top_p(scores: Tensor, p: float) -> Tensor:
    """TopPLogitsWarper (min_tokens_to_keep=1): drop the least likely tokens of mass <= 1-p."""
    sorted_logits, sorted_idx = torch.sort(scores, descending=False)
    cum = sorted_logits.softmax(-1).cumsum(-1)
    remove = cum <= (1 - p)
    remove[..., -1:] = False
    remove = remove.scatter(1, sorted_idx, remove)
    return scores.masked_fill(remove, -math.inf)


def _process(scores: Tensor, seen: Optional[Tensor], n_new: int, cfg: DecodingConfig,
             eos: Tensor, sampling: bool) -> Tensor:
    """Apply the processors in the order transformers' ``_get_logits_processor`` builds them."""
    if cfg.repetition_penalty != 1.0:
        scores = _repetition_penalty(seen, scores, cfg.repetition_penalty)
    if cfg.no_repeat_ngram_size > 0:
        scores = _no_repeat_ngram(seen, scores, cfg.no_repeat_ngram_size)
    if n_new < cfg.min_new_tokens:
        scores = _forbid_eos(scores, eos)
    if sampling:
        if cfg.temperature != 1.0:
            scores = scores / cfg.temperature
        if cfg.top_k != 0:
            scores = _top_k(scores, cfg.top_k)
        if cfg.top_p < 1.0:
            scores = _top_p(scores, cfg.top_p)
    return scores


def _needs_ids(cfg: DecodingConfig) -> bool:
    return cfg.repetition_penalty != 1.0 or cfg.no_repeat_ngram_size > 0


# ----------------------------------------------------------------------------------------
# Public API


@torch.no_grad()
def generate(step: StepFn, prompt_ids: Tensor, state: Any, cfg: DecodingConfig, *,
             eos_token_id: int | Sequence[int], pad_token_id: int,
             reorder: ReorderFn | None = None, history_ids: Tensor | None = None) -> Tensor:
    """Decode up to ``cfg.max_new_tokens`` tokens after ``prompt_ids`` (B, T0).

    ``history_ids`` (B, T) are the ids the repetition penalty and no-repeat n-gram see
    besides the new tokens (transformers: the full ``input_ids``; encoder-decoder: the
    decoder ids only); default ``prompt_ids``; negative entries are ignored.
    ``reorder`` defaults to ``kv_reorder`` and is only used by beam search.

    Returns the NEW tokens only, LongTensor (B, L <= max_new_tokens); each row keeps its
    EOS and is padded with ``pad_token_id`` after it. L is the longest row's length.
    """
    if prompt_ids.dim() != 2:
        raise ValueError(f"prompt_ids must be (B, T0), got shape {tuple(prompt_ids.shape)}")
    B = prompt_ids.shape[0]
    history = prompt_ids if history_ids is None else history_ids
    if history.dim() != 2 or history.shape[0] != B:
        raise ValueError(f"history_ids must be (B={B}, T), got shape {tuple(history.shape)}")
    eos_list = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    eos = torch.tensor(eos_list, dtype=torch.long, device=prompt_ids.device)
    if cfg.uses_beams:
        return _beam_search(step, prompt_ids, state, cfg, eos, pad_token_id,
                            reorder or kv_reorder, history.long())
    return _greedy_or_sample(step, prompt_ids, state, cfg, eos, pad_token_id, history.long())


def _greedy_or_sample(step: StepFn, prompt_ids: Tensor, state: Any, cfg: DecodingConfig,
                      eos: Tensor, pad: int, history: Tensor) -> Tensor:
    """transformers ``_sample``: finished rows keep running on pad tokens until all are done."""
    B, device = prompt_ids.shape[0], prompt_ids.device
    sampling = cfg.strategy == "sample"
    generator = None
    if sampling and cfg.seed is not None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)  # logits move to `device`
    out = torch.full((B, cfg.max_new_tokens), pad, dtype=torch.long, device=device)  # (B, L_max)
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    new_ids = prompt_ids
    for t in range(cfg.max_new_tokens):
        logits, state = step(new_ids, state)  # (B, V)
        logits = logits.to(device=device, dtype=torch.float32)  # as transformers: fp32, ids' device
        seen = torch.cat([history, out[:, :t]], 1) if _needs_ids(cfg) else None  # (B, T + t)
        scores = _process(logits, seen, t, cfg, eos, sampling)
        if sampling:
            tok = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
        else:
            tok = scores.argmax(-1)
        tok = torch.where(unfinished, tok, pad)  # finished rows emit pad, as transformers
        out[:, t] = tok
        unfinished &= ~torch.isin(tok, eos)
        if t + 1 == cfg.max_new_tokens or not bool(unfinished.any()):
            return out[:, : t + 1]
        new_ids = tok[:, None]  # (B, 1)
    raise AssertionError("unreachable")


def _gather_beams(x: Tensor, idx: Tensor) -> Tensor:
    """x (B, K, ...) -> rows idx (B, K') along the beam axis (transformers ``_gather_beams``)."""
    while idx.dim() < x.dim():
        idx = idx.unsqueeze(-1)
    return torch.take_along_dim(x, idx, dim=1)


def _beam_search(step: StepFn, prompt_ids: Tensor, state: Any, cfg: DecodingConfig,
                 eos: Tensor, pad: int, reorder: ReorderFn, history: Tensor) -> Tensor:
    """Port of transformers ``_beam_search`` (vectorised, static shapes), new tokens only.

    Legend: K beams, C = max(2, 1 + #eos) * K candidates kept per step, L = max_new_tokens.
    """
    B, device = prompt_ids.shape[0], prompt_ids.device
    K, L, lp, es = cfg.num_beams, cfg.max_new_tokens, cfg.length_penalty, cfg.early_stopping
    C = max(2, 1 + eos.numel()) * K
    top_k_mask = torch.arange(C, device=device) < K  # (C,) only these may become finished

    running_seqs = torch.full((B, K, L), pad, dtype=torch.long, device=device)
    running_scores = torch.zeros(B, K, device=device)
    running_scores[:, 1:] = _NEG  # only beam 0 is live at first: K copies of one prompt
    seqs = running_seqs.clone()  # finished hypotheses, best first
    scores_fin = torch.full((B, K), _NEG, device=device)
    lens_fin = torch.zeros(B, K, dtype=torch.long, device=device)
    is_sent_finished = torch.zeros(B, K, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    batch_offset = torch.arange(B, device=device)[:, None] * K  # (B, 1)
    identity = torch.arange(B * K, device=device)
    history_beams = history.repeat_interleave(K, 0)  # (B*K, T)

    new_ids = prompt_ids
    for t in range(L):
        logits, state = step(new_ids, state)  # (B, V) at t == 0, else (B*K, V)
        # transformers processes log-probs here, not logits.
        logp = F.log_softmax(logits.to(device=device, dtype=torch.float32), -1)
        if t == 0:
            seen = history if _needs_ids(cfg) else None
            logp = _process(logp, seen, t, cfg, eos, sampling=False)
            logp = logp[:, None, :].expand(B, K, -1)  # (B, K, V): all beams share the prompt
        else:
            seen = (torch.cat([history_beams, running_seqs[:, :, :t].reshape(B * K, t)], 1)
                    if _needs_ids(cfg) else None)  # (B*K, T + t)
            logp = _process(logp, seen, t, cfg, eos, sampling=False).view(B, K, -1)
        V = logp.shape[-1]
        acc = (logp + running_scores[:, :, None]).reshape(B, K * V)  # (B, K*V)

        # Top-C continuations over (beam, token).
        cand_scores, cand_idx = torch.topk(acc, C)  # (B, C)
        cand_beam, cand_tok = cand_idx // V, cand_idx % V
        cand_seqs = _gather_beams(running_seqs, cand_beam)  # (B, C, L)
        cand_seqs[:, :, t] = cand_tok
        cand_parent = cand_beam + batch_offset  # (B, C) flat row in the (B*K) state
        hits = torch.isin(cand_tok, eos) | (t + 1 >= L)  # (B, C) EOS or max length

        # Running beams for the next step: the best K candidates that did not stop.
        running_cand = cand_scores + hits.to(torch.float32) * _NEG
        keep = torch.topk(running_cand, K)[1]  # (B, K)
        running_seqs = _gather_beams(cand_seqs, keep)
        running_scores = _gather_beams(running_cand, keep)
        parents = _gather_beams(cand_parent, keep).reshape(B * K)

        # Finished hypotheses: merge the new ones (top-K candidates only) and keep the best K.
        just_finished = hits & top_k_mask[None, :]
        fin = cand_scores / ((t + 1) ** lp)
        full = torch.all(is_sent_finished, -1, keepdim=True) & (es is True)
        fin += full.to(torch.float32) * _NEG
        fin += (~improvable).to(torch.float32) * _NEG
        fin += (~just_finished) * _NEG
        merged = torch.topk(torch.cat([scores_fin, fin], 1), K)[1]  # (B, K) of 0..K+C
        seqs = _gather_beams(torch.cat([seqs, cand_seqs], 1), merged)
        scores_fin = _gather_beams(torch.cat([scores_fin, fin], 1), merged)
        lens_fin = _gather_beams(torch.cat([lens_fin, torch.full_like(cand_tok, t + 1)], 1), merged)
        is_sent_finished = _gather_beams(torch.cat([is_sent_finished, just_finished], 1), merged)

        # Can a running beam still beat the worst finished one? (_check_early_stop_heuristic)
        n_new = t + 1
        best_len = L if (es == "never" and lp > 0.0) else n_new
        best_running = running_scores[:, :1] / (best_len ** lp)  # (B, 1)
        worst_fin = torch.where(is_sent_finished, scores_fin.min(1, keepdim=True)[0], _NEG)
        improvable = improvable & torch.any(best_running > worst_fin, -1, keepdim=True)
        go_on = (improvable.any() & ~(is_sent_finished.all() & (es is True)) & ~hits.all())
        if not bool(go_on):
            break

        # Follow the parents (t == 0: expand the B prompt rows to B*K beams).
        if t == 0:
            state = reorder(state, parents // K)
        elif not torch.equal(parents, identity):
            state = reorder(state, parents)
        new_ids = running_seqs[:, :, t].reshape(B * K, 1)

    best = seqs[:, 0]  # (B, L) hypotheses are sorted by score
    n = int(lens_fin[:, 0].max())
    return best[:, :n]


def decode_sequences(tokens: Tensor, eos_token_id: int | Sequence[int], pad_token_id: int) -> list[list[int]]:
    """``generate`` output -> lists of ids: cut at the first EOS, then drop trailing pads."""
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    rows = []
    for row in tokens.tolist():
        cut = next((i for i, tok in enumerate(row) if tok in eos), len(row))
        row = row[:cut]
        while row and row[-1] == pad_token_id:
            row.pop()
        rows.append(row)
    return rows


def kv_reorder(state: Any, index: Tensor) -> Any:
    """Default ``reorder``: keep batch rows ``index`` of every tensor in a nested state.

    Tensors (dim 0 = batch) are ``index_select``-ed; tuples (named ones too), lists and
    dicts are rebuilt; objects with a ``reorder_cache`` method (transformers ``Cache``)
    are reordered in place and returned; anything else (0-d tensors, ints, None) passes
    through unchanged.
    """
    if isinstance(state, Tensor):
        return state.index_select(0, index.to(state.device)) if state.dim() > 0 else state
    if hasattr(state, "reorder_cache"):
        state.reorder_cache(index)
        return state
    if isinstance(state, dict):
        return type(state)((k, kv_reorder(v, index)) for k, v in state.items())
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        return type(state)(*(kv_reorder(v, index) for v in state))
    if isinstance(state, (tuple, list)):
        return type(state)(kv_reorder(v, index) for v in state)
    return state
