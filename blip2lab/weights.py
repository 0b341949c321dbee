"""Weights in and out: blip2lab's own checkpoints and the explicit key tables that map
other layouts (a BERT checkpoint, Hugging Face BLIP-2) onto our modules.

Every load is strict: shapes are asserted key by key, and a key left over or missing is
an error that names it (nanoGPT `from_pretrained`; never LAVIS's `strict=False` with the
message ignored). A blip2lab checkpoint is a folder with `config.json` (the resolved
config) and `model.safetensors`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import Blip2Config, QFormerConfig, from_dict, to_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class WeightsError(RuntimeError):
    """A checkpoint does not fit the model; the message names the keys."""


# ---------------------------------------------------------------------------------------
# Strict loading with named leftovers
# ---------------------------------------------------------------------------------------


def load_strict(module: nn.Module, state: Mapping[str, Tensor], allowed_missing: Iterable[str] = (),
                source: str = "checkpoint") -> None:
    """Copy `state` into `module`: every key must exist with the same shape, and every
    parameter/buffer of the module must be given, except the keys in `allowed_missing`
    (parts the source layout does not carry, e.g. HF checkpoints drop `temp`)."""
    own = module.state_dict()
    allowed = set(allowed_missing)
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state) - allowed)
    bad_shapes = [f"{k}: {tuple(state[k].shape)} in {source}, {tuple(own[k].shape)} in model"
                  for k in sorted(set(state) & set(own)) if state[k].shape != own[k].shape]
    problems = []
    if unexpected:
        problems.append(f"keys in {source} the model does not have: {unexpected}")
    if missing:
        problems.append(f"model keys missing from {source}: {missing}")
    if bad_shapes:
        problems.append("shape mismatches: " + "; ".join(bad_shapes))
    if problems:
        raise WeightsError("strict load failed; " + " | ".join(problems))
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)


# ---------------------------------------------------------------------------------------
# blip2lab's own format
# ---------------------------------------------------------------------------------------


def save_pretrained(model: nn.Module, path: str | Path) -> Path:
    """Write `config.json` + `model.safetensors` (tied weights stored once)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = path / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "library": "blip2lab"})
    tmp.replace(path / WEIGHTS_NAME)  # atomic: a crash never leaves half a file under the real name
    (path / CONFIG_NAME).write_text(json.dumps(to_dict(model.config), indent=2) + "\n")
    return path


def read_safetensors(file: str | Path) -> dict[str, Tensor]:
    """Read a safetensors file (memory-mapped by safetensors); a damaged file is a clear error."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"no weights file at {file}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"cannot read {file}: it is not a complete safetensors file ({err})") from err


def load_pretrained(path: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuild a model saved by `save_pretrained` (config first, then a strict load)."""
    from .blip2 import Blip2  # the model imports this module; import late to avoid a cycle

    path = Path(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: not a blip2lab checkpoint folder")
    config = from_dict(Blip2Config, json.loads(config_file.read_text()))
    state = read_safetensors(path / WEIGHTS_NAME)
    model = Blip2(config)
    load_strict(model, state, source=str(path / WEIGHTS_NAME))
    return model.to(map_location)


# ---------------------------------------------------------------------------------------
# Key tables: ours <- theirs
# ---------------------------------------------------------------------------------------


def _qformer_layer_table(i: int, has_cross: bool, theirs: str, style: str) -> dict[str, str]:
    """One Q-Former layer. `style` "hf" (HF BLIP-2: `attention.attention.query`) or "bert"
    (BERT / LAVIS: `attention.self.query`)."""
    att = "attention.attention" if style == "hf" else "attention.self"
    cross = "crossattention.attention" if style == "hf" else "crossattention.self"
    ours = f"layers.{i}"
    t = f"{theirs}.{i}"
    table = {}
    blocks = [("self_attn", att, "attention.output")]
    if has_cross:
        blocks.append(("cross_attn", cross, "crossattention.output"))
    for mine, core, output in blocks:
        for a, b in (("q", "query"), ("k", "key"), ("v", "value")):
            for p in ("weight", "bias"):
                table[f"{ours}.{mine}.{a}.{p}"] = f"{t}.{core}.{b}.{p}"
        for p in ("weight", "bias"):
            table[f"{ours}.{mine}.out.{p}"] = f"{t}.{output}.dense.{p}"
            table[f"{ours}.{mine}.norm.{p}"] = f"{t}.{output}.LayerNorm.{p}"
    for mine, suffix in (("text_ffn", ""), ("query_ffn", "_query")):
        for p in ("weight", "bias"):
            table[f"{ours}.{mine}.fc1.{p}"] = f"{t}.intermediate{suffix}.dense.{p}"
            table[f"{ours}.{mine}.fc2.{p}"] = f"{t}.output{suffix}.dense.{p}"
            table[f"{ours}.{mine}.norm.{p}"] = f"{t}.output{suffix}.LayerNorm.{p}"
    return table


def hf_retrieval_table(cfg: QFormerConfig) -> dict[str, str]:
    """Our `Blip2` keys (below the frozen tower) <- HF `Blip2ForImageTextRetrieval` keys."""
    table = {
        "ln_vision.weight": "vision_model.post_layernorm.weight",  # HF's post_layernorm IS ln_vision
        "ln_vision.bias": "vision_model.post_layernorm.bias",
        "qformer.query_tokens": "query_tokens",
        "qformer.word_embeddings.weight": "embeddings.word_embeddings.weight",
        "qformer.position_embeddings.weight": "embeddings.position_embeddings.weight",
        "qformer.layernorm.weight": "qformer.layernorm.weight",
        "qformer.layernorm.bias": "qformer.layernorm.bias",
    }
    for i in range(cfg.num_layers):
        for ours, theirs in _qformer_layer_table(i, cfg.has_cross_attention(i), "qformer.encoder.layer", "hf").items():
            table[f"qformer.{ours}"] = theirs
    for ours, theirs in (("vision_proj", "vision_projection"), ("text_proj", "text_projection"), ("itm_head", "itm_head")):
        for p in ("weight", "bias"):
            table[f"{ours}.{p}"] = f"{theirs}.{p}"
    return table


# Parts of our model that HF retrieval checkpoints do not carry (BLIP2_REFERENCE.md Sec. 6):
# the learned temperature and the Q-Former's LM head (its decoder is tied, only the rest).
HF_RETRIEVAL_ABSENT = ("temp", "qformer.lm_head.bias", "qformer.lm_head.dense.weight", "qformer.lm_head.dense.bias",
                       "qformer.lm_head.norm.weight", "qformer.lm_head.norm.bias")


def remap(state: Mapping[str, Tensor], table: Mapping[str, str], source: str,
          prefix: str = "", ignore: Iterable[str] = ()) -> dict[str, Tensor]:
    """Rename `state` (their keys) to ours through `table` (ours -> theirs). Their keys that
    the table does not use, other than those starting with an `ignore` prefix, are an error
    naming them; so is a table entry their state lacks."""
    missing = sorted(theirs for theirs in table.values() if theirs not in state)
    if missing:
        raise WeightsError(f"{source} lacks keys the model needs: {missing}")
    used = set(table.values())
    leftover = sorted(k for k in state if k not in used and not any(k.startswith(p) for p in ignore))
    if leftover:
        raise WeightsError(f"{source} has keys no table entry uses: {leftover}")
    return {prefix + ours: state[theirs] for ours, theirs in table.items()}


def bert_table(cfg: QFormerConfig, theirs_prefix: str = "") -> dict[str, str]:
    """Q-Former keys <- a BERT checkpoint (transformers BertModel / BertForMaskedLM names),
    as LAVIS `init_Qformer` does with bert-base-uncased: self-attention, text FFN and the
    embeddings are copied, the query FFN is copied from the text FFN, cross-attention
    stays fresh (normal(0, 0.02))."""
    p = theirs_prefix
    table = {
        "position_embeddings.weight": f"{p}embeddings.position_embeddings.weight",
        "layernorm.weight": f"{p}embeddings.LayerNorm.weight",
        "layernorm.bias": f"{p}embeddings.LayerNorm.bias",
    }
    for i in range(cfg.num_layers):
        layer = _qformer_layer_table(i, False, f"{p}encoder.layer", "bert")
        for ours, theirs in layer.items():
            # The query FFN starts as a copy of BERT's FFN (LAVIS `intermediate_query`).
            table[ours] = theirs.replace("intermediate_query", "intermediate").replace("output_query", "output")
    return table


def init_qformer_from_bert(qformer: nn.Module, path: str | Path) -> list[str]:
    """Copy a BERT-like checkpoint in transformers format (a folder) into `qformer`.
    Returns the checkpoint keys deliberately not used, for the caller to report.

    Deviations (as LAVIS): BERT's token-type embeddings and pooler are dropped (the
    Q-Former has neither); BERT's vocabulary may be one shorter than ours ([DEC] was
    added): those rows keep their random init."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    cfg: QFormerConfig = qformer.cfg
    bert_cfg = AutoConfig.from_pretrained(str(path))
    for ours, theirs in (("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
                         ("num_heads", "num_attention_heads"), ("ffn_size", "intermediate_size"),
                         ("max_position_embeddings", "max_position_embeddings")):
        if getattr(cfg, ours) != getattr(bert_cfg, theirs):
            raise WeightsError(f"qformer.{ours} ({getattr(cfg, ours)}) != the BERT checkpoint's {theirs} "
                               f"({getattr(bert_cfg, theirs)}) at {path}")
    if bert_cfg.vocab_size > cfg.vocab_size:
        raise WeightsError(f"the BERT vocabulary ({bert_cfg.vocab_size}) exceeds qformer.vocab_size ({cfg.vocab_size})")
    bert = AutoModelForMaskedLM.from_pretrained(str(path))
    state = {k.removeprefix("bert."): v for k, v in bert.state_dict().items()}
    table = bert_table(cfg)
    head = {"lm_head.dense.weight": "cls.predictions.transform.dense.weight",
            "lm_head.dense.bias": "cls.predictions.transform.dense.bias",
            "lm_head.norm.weight": "cls.predictions.transform.LayerNorm.weight",
            "lm_head.norm.bias": "cls.predictions.transform.LayerNorm.bias"}
    table |= head
    new = remap(state, table, source=str(path),
                ignore=("embeddings.token_type_embeddings", "embeddings.word_embeddings", "embeddings.position_ids",
                        "pooler.", "cls.predictions.bias", "cls.predictions.decoder"))
    with torch.no_grad():
        own = qformer.state_dict()
        for key, value in new.items():
            if own[key].shape != value.shape:
                raise WeightsError(f"{key}: {tuple(value.shape)} in {path}, {tuple(own[key].shape)} in the Q-Former")
            own[key].copy_(value)
        words = state["embeddings.word_embeddings.weight"]  # (V_bert, D_q)
        own["word_embeddings.weight"][: words.shape[0]].copy_(words)
        bias = state.get("cls.predictions.bias")
        if bias is not None:
            own["lm_head.bias"][: bias.shape[0]].copy_(bias)
    return sorted(k for k in state if k not in set(table.values()) and not k.startswith("embeddings.word_embeddings"))
