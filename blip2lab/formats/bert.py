"""The Q-Former from a BERT checkpoint, as the paper starts it from bert-base-uncased
(LAVIS `init_Qformer`): self-attention, text FFN and embeddings copied, the query FFN a copy
of the text FFN, cross-attention left at its fresh initialisation. `init_qformer_from_bert`
reads a transformers folder (or a `package:` path) strictly through `bert_table`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ..config import QFormerConfig
from .keys import Keys, WeightsError, keys_of, qformer_layer_table, remap
from .sources import local_model

__all__ = ["bert_table", "text_queries", "init_qformer_from_bert"]

def bert_table(cfg: QFormerConfig, theirs_prefix: str = "") -> dict[str, Keys]:
    """Q-Former keys <- a BERT checkpoint (transformers BertModel / BertForMaskedLM names),
    as LAVIS `init_Qformer` does with bert-base-uncased: self-attention, text FFN and the
    embeddings are copied, the query FFN is copied from the text FFN, cross-attention
    stays fresh (normal(0, 0.02))."""
    p = theirs_prefix
    table: dict[str, Keys] = {
        "position_embeddings.weight": f"{p}embeddings.position_embeddings.weight",
        "layernorm.weight": f"{p}embeddings.LayerNorm.weight",
        "layernorm.bias": f"{p}embeddings.LayerNorm.bias",
    }
    for i in range(cfg.num_layers):
        layer = qformer_layer_table(i, False, f"{p}encoder.layer", "bert")
        for ours, theirs in layer.items():
            # The query FFN starts as a copy of BERT's FFN (LAVIS `intermediate_query`).
            table[ours] = tuple(k.replace("intermediate_query", "intermediate").replace("output_query", "output")
                                for k in keys_of(theirs))
    return table


def text_queries(words: Tensor, positions: Tensor, num_queries: int, seed: int = 0) -> Tensor:
    """(Q, D) query embeddings that look like a Q-token sentence to the BERT they came from:
    the word embedding of a fixed random draw of words (after the first 1,000 rows, which
    in BERT vocabularies are special and unused tokens) plus positions 0..Q-1."""
    first = 1000 if words.shape[0] > 2000 else 0
    ids = torch.randint(first, words.shape[0], (num_queries,), generator=torch.Generator().manual_seed(seed))
    return words[ids] + positions[:num_queries]  # (Q, D)


def init_qformer_from_bert(qformer: nn.Module, path: str | Path) -> list[str]:
    """Copy a BERT-like checkpoint in transformers format (a folder, or a `package:` path:
    sources.local_model) into `qformer`. Returns the checkpoint keys deliberately not
    used, for the caller to report.

    Deviations (as LAVIS): BERT's token-type embeddings and pooler are dropped (the
    Q-Former has neither); BERT's vocabulary may be one shorter than ours ([DEC] was
    added): those rows keep their random init. A checkpoint saved without the MLM head
    (a sentence-embedding BERT such as all-MiniLM-L6-v2: `architectures` names no
    `*ForMaskedLM`) is read as a bare encoder, and the Q-Former's LM head keeps its own
    init (its decoder is tied to the copied word embeddings)."""
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    path = local_model(path)
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
    has_head = any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in bert_cfg.architectures or ())
    auto = AutoModelForMaskedLM if has_head else AutoModel
    bert, info = auto.from_pretrained(str(path), output_loading_info=True)
    if info["missing_keys"] or info["mismatched_keys"]:  # transformers would have left them random
        raise WeightsError(f"{path} does not fill a {type(bert).__name__}: missing {sorted(info['missing_keys'])}, "
                           f"mismatched {sorted(info['mismatched_keys'])}")
    state = {k.removeprefix("bert."): v for k, v in bert.state_dict().items()}
    table = bert_table(cfg)
    if has_head:
        table |= {"lm_head.dense.weight": "cls.predictions.transform.dense.weight",
                  "lm_head.dense.bias": "cls.predictions.transform.dense.bias",
                  "lm_head.norm.weight": "cls.predictions.transform.LayerNorm.weight",
                  "lm_head.norm.bias": "cls.predictions.transform.LayerNorm.bias"}
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
        if cfg.freeze_word_embeddings:  # the added rows ([DEC]) never train: a fixed draw, not the global RNG's
            extra = own["word_embeddings.weight"][words.shape[0]:]  # (V - V_bert, D_q)
            extra.copy_(torch.randn(extra.shape, generator=torch.Generator().manual_seed(0)) * cfg.init_std)
        bias = state.get("cls.predictions.bias")
        if bias is not None:
            own["lm_head.bias"][: bias.shape[0]].copy_(bias)
        if cfg.query_init == "text":  # QFormerConfig.query_init: word + position embeddings of a fixed draw
            own["query_tokens"].copy_(text_queries(words, state["embeddings.position_embeddings.weight"],
                                                   cfg.num_queries)[None])
    used = {k for theirs in table.values() for k in keys_of(theirs)}
    return sorted(k for k in state if k not in used and not k.startswith("embeddings.word_embeddings"))
