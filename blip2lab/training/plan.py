"""`blip2lab train ... --plan`: the trainable parameters and the memory a run needs per GPU,
before any weight is read: the model is built on the meta device from the configs alone
(the source's config.json, the LLM's config), the fine-tuning mode applied to it, and the
bytes counted.

    weights      every parameter at its storage precision: trainable ones in fp32 (master
                 weights), the frozen LLM in its dtype (bf16 / fp16 on a GPU, fp32 on the
                 CPU; 1 byte per linear weight in 8-bit, half a byte in 4-bit), the frozen
                 image encoder in fp32 (as blip2lab loads it)
    gradients    fp32, trainable parameters only
    optimizer    AdamW's two fp32 moments per trainable parameter
    activations  what autograd keeps for the backward pass at the batch size (below)

Activations per transformer layer, in elements, for b rows of s tokens, width h, FFN f and
a heads over s_kv keys (the tensors PyTorch saves for backward, Korthikanti et al. 2022's
count): a trainable layer keeps its linear inputs, q/k/v and the attention output, the
LayerNorm inputs and the FFN's hidden pair, b s (8h + 2f), plus the attention probabilities
a b s s_kv (twice with attention dropout; none on CUDA, where the fused kernels recompute
them). A frozen layer on the gradient's path (the LLM of stage 2) keeps no linear inputs:
b s (6h + f) (+ h per LoRA-adapted projection). With gradient checkpointing a layer keeps
its input, b s h, and one layer is recomputed at a time. Stage 1 runs the Q-Former four
times: ITC queries (B x Q) and text (B x T), ITM over 3B pairs of [Q ; T], ITG text over
[Q ; T]; stage 2 the queries, then the LLM over [Q ; T_llm] with its logits (B s V, fp32,
twice: logits and their softmax). A frozen image encoder keeps nothing (no gradient).

tests/test_plan.py holds the estimate against the peak memory measured on the CPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch

from ..config import Blip2Config, LLMConfig, from_dict
from ..dtypes import pick_dtype
from .finetune import apply_finetune, lora_targets, trainable_summary
from .resolution import resized_vision
from .run import TrainRunConfig, resolve_precision, stage_losses

__all__ = ["Plan", "estimate", "format_plan", "model_config"]

GB = 1024**3


@dataclass
class Plan:
    trainable: int
    frozen: int
    by_part: dict
    bytes: dict  # weights, gradients, optimizer, activations, total
    batch_size: int
    device: str
    losses: tuple

    def fits(self, gb: float) -> bool:
        return self.bytes["total"] <= gb * GB


# -- the model's configs, without weights ---------------------------------------------------


def model_config(cfg: TrainRunConfig) -> tuple[Blip2Config, Optional[object]]:
    """(Blip2Config, transformers config of the LLM or None) of the run's model, from files only."""
    from transformers import AutoConfig

    from ..pipeline import PRESETS

    m = cfg.model
    source = None if m.source is None else Path(PRESETS.get(m.source, m.source))
    if source is None or source.suffix in (".pth", ".pt"):
        config = _built_config(m)
        llm = AutoConfig.from_pretrained(config.llm.name_or_path) if config.llm.kind != "none" else None
    elif (source / "config.json").is_file() and "qformer" in json.loads((source / "config.json").read_text()):
        config = from_dict(Blip2Config, json.loads((source / "config.json").read_text()))
        llm = AutoConfig.from_pretrained(str(source / "llm")) if config.llm.kind != "none" else None
    else:
        from ..formats.hf import _read_hf_config, config_from_hf

        hf_config, arch = _read_hf_config(source)
        retrieval = arch == "Blip2ForImageTextRetrieval"
        config = config_from_hf(hf_config, text_input=retrieval)
        llm = None if retrieval else hf_config.text_config
        if llm is not None:  # the LLM's weights live in the checkpoint; its dtype as loading picks it
            kind = "encoder_decoder" if getattr(llm, "is_encoder_decoder", False) else "decoder"
            config = replace(config, llm=LLMConfig(kind=kind, name_or_path=f"language_model of {source}"))
    if cfg.stage == "stage2" and llm is None and m.llm.kind != "none":
        config, llm = replace(config, llm=m.llm), AutoConfig.from_pretrained(m.llm.name_or_path)
    if m.image_size is not None:  # the run's image size: more image tokens for the Q-Former to read
        config = replace(config, vision=resized_vision(config.vision, m.image_size))
    return config, llm


def _built_config(m) -> Blip2Config:
    from ..formats.sources import tokenizer_from_path
    from ..processor import make_qformer_tokenizer
    from .sources import qformer_from_bert

    folder = m.qformer_tokenizer or m.build.qformer.init_from
    if folder is None:
        return m.build
    tok = make_qformer_tokenizer(tokenizer_from_path(folder))
    return replace(m.build, qformer=qformer_from_bert(m.build.qformer, tok))


def _meta_model(config: Blip2Config, llm_config):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from ..model import Blip2

    with init_empty_weights():
        lm = None
        if llm_config is not None:
            auto = AutoModelForSeq2SeqLM if config.llm.kind == "encoder_decoder" else AutoModelForCausalLM
            lm = auto.from_config(llm_config)
        return Blip2(config, language_model=lm)


# -- bytes -----------------------------------------------------------------------------


def _layer(b: int, s: int, h: int, f: int, heads: int, s_kv: int, probs: int, frozen: bool = False,
           adapted: int = 0, checkpointed: bool = False) -> int:
    """Elements one transformer layer keeps for backward (see the module docstring)."""
    if checkpointed:
        return b * s * h
    per_token = (6 * h + f + adapted * h) if frozen else (8 * h + 2 * f)
    return b * s * per_token + probs * heads * b * s * s_kv


def _qformer_acts(config: Blip2Config, B: int, losses, probs: int, ckpt: bool) -> int:
    q, N = config.qformer, config.vision.num_tokens
    Q, T, h, f, a = q.num_queries, q.max_text_len, q.hidden_size, q.ffn_size, q.num_heads

    def stack(b: int, s: int, s_kv: int, cross_rows: int) -> int:
        total = 0
        for i in range(q.num_layers):
            total += _layer(b, s, h, f, a, s_kv, probs, checkpointed=ckpt)
            if q.has_cross_attention(i) and cross_rows:  # queries over the N image tokens: K, V (b N h each)
                total += 0 if ckpt else b * (4 * cross_rows * h + 2 * N * h) + probs * a * b * cross_rows * N
        return total

    total = 0
    if any(n != "lm" for n in losses):
        total += stack(B, Q, Q, Q) + stack(B, T, T, 0)  # ITC: queries alone, text alone
        if "itm" in losses:
            total += stack(3 * B, Q + T, Q + T, Q)
        if "itg" in losses:
            total += stack(B, T, Q + T, 0) + 2 * B * T * q.vocab_size  # + LM-head logits and their softmax
    if "lm" in losses:
        total += stack(B, Q, Q, Q)
    return total


def _llm_acts(config: Blip2Config, llm, B: int, probs: int, adapted: int, ckpt: bool, T_llm: int) -> int:
    c = llm.config
    Q = config.qformer.num_queries
    h = getattr(c, "hidden_size", None) or getattr(c, "d_model")
    f = getattr(c, "ffn_dim", None) or getattr(c, "intermediate_size", None) or getattr(c, "d_ff")
    a = getattr(c, "num_attention_heads", None) or getattr(c, "num_heads")
    V = c.vocab_size
    if config.llm.kind == "encoder_decoder":
        enc = c.num_layers * _layer(B, Q + T_llm, h, f, a, Q + T_llm, probs, True, adapted, ckpt)
        dec = c.num_decoder_layers * (_layer(B, T_llm, h, f, a, T_llm, probs, True, adapted, ckpt)
                                      + (0 if ckpt else 4 * B * T_llm * h) + probs * a * B * T_llm * (Q + T_llm))
        return enc + dec + 2 * B * T_llm * V
    s = Q + T_llm
    return c.num_hidden_layers * _layer(B, s, h, f, a, s, probs, True, adapted, ckpt) + 2 * B * s * V


def _vision_acts(config: Blip2Config, B: int, probs: int, ckpt: bool) -> int:
    v = config.vision
    N = v.num_tokens
    return v.used_layers * _layer(B, N, v.width, v.intermediate_size, v.heads, N, probs, checkpointed=ckpt)


def _weight_bytes(model, config: Blip2Config, quantize: str, device: str) -> int:
    llm_dtype = pick_dtype(config.llm.dtype, config.llm.kind, device) if config.llm.kind != "none" else None
    head = model.llm.model.get_output_embeddings() if model.llm is not None else None
    quantized = set()
    if quantize != "none" and model.llm is not None:
        quantized = {id(m.weight) for m in model.llm.model.modules() if isinstance(m, torch.nn.Linear) and m is not head}
    total = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            total += 4 * p.numel()
        elif id(p) in quantized:
            total += p.numel() * (1.0 if quantize == "8bit" else 0.5625)  # NF4 + its fp32 block scales
        elif name.startswith("llm.model."):
            total += p.numel() * llm_dtype.itemsize
        else:
            total += 4 * p.numel()
    return int(total)


def estimate(cfg: TrainRunConfig, device: str = "cuda") -> Plan:
    """The plan of `cfg` on `device` ("cuda": per GPU; "cpu": the CPU run), per process."""
    config, llm_config = model_config(cfg)
    model = _meta_model(config, llm_config)
    model = apply_finetune(model, replace(cfg.finetune, quantize="none"), torch.device("meta"))
    losses = stage_losses(cfg, model.llm is not None)
    counts = trainable_summary(model)
    B, ft = cfg.train.batch_size, cfg.finetune
    act_bytes = 2 if resolve_precision(cfg.precision) in ("bf16", "fp16") or device == "cuda" else 4
    dropout = config.qformer.attention_dropout > 0
    probs = 0 if device == "cuda" else (2 if dropout else 1)
    acts = _qformer_acts(config, B, losses, probs, ft.gradient_checkpointing)
    if "lm" in losses and model.llm is not None:
        adapted = len(lora_targets(model, ft.lora).get("llm", ())) if ft.mode == "lora" else 0
        T_llm = cfg.model.llm_max_len or config.llm.max_text_len
        acts += _llm_acts(config, model.llm.model, B, 0 if device == "cuda" else 1, adapted,
                          ft.gradient_checkpointing, T_llm)
    if ft.train_vision:
        acts += _vision_acts(config, B, probs, ft.gradient_checkpointing)
    trainable = counts["trainable"]
    parts = {"weights": _weight_bytes(model, config, ft.quantize, device), "gradients": 4 * trainable,
             "optimizer": 8 * trainable, "activations": acts * act_bytes}
    parts["total"] = sum(parts.values())
    return Plan(trainable, counts["frozen"], counts["by_part"], parts, B, device, losses)


def format_plan(plan: Plan) -> str:
    b = plan.bytes
    lines = [f"trainable parameters: {plan.trainable:,} of {plan.trainable + plan.frozen:,} "
             f"({100 * plan.trainable / max(1, plan.trainable + plan.frozen):.2f}%); losses {list(plan.losses)}"]
    lines += [f"  {part:<16} {n:,}" for part, n in plan.by_part.items()]
    lines.append(f"estimated memory per {'GPU' if plan.device == 'cuda' else 'process'} at batch {plan.batch_size}:")
    lines += [f"  {k:<12} {b[k] / GB:8.2f} GB" for k in ("weights", "gradients", "optimizer", "activations")]
    lines.append(f"  {'total':<12} {b['total'] / GB:8.2f} GB  ({'fits' if plan.fits(24) else 'does not fit'} in 24 GB)")
    return "\n".join(lines)
