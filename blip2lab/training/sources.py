"""The model a training run starts from (`ModelConfig` of training/run.py): built from
its parts, opened by `blip2lab.load` (shipped names, blip2lab folders, official Hugging
Face folders / hub ids), read from a LAVIS .pth, and for stage 2 given an LLM it lacks."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Optional

from ..config import Blip2Config, ConfigError, LLMConfig, QFormerConfig
from ..formats import build_model, load_lavis, load_llm
from ..formats.sources import tokenizer_from_path
from ..model import Blip2
from ..processor import Blip2Processor, make_qformer_tokenizer, qformer_token_ids

__all__ = ["fresh", "opened", "lavis", "with_llm", "qformer_from_bert"]


def qformer_from_bert(q: QFormerConfig, tokenizer) -> QFormerConfig:
    """The Q-Former shaped like its BERT (`init_from`: widths, depth, heads, positions read
    from its config.json) with the tokenizer's vocabulary and special ids (+ [DEC])."""
    sizes = {}
    if q.init_from is not None:
        bert = json.loads((Path(q.init_from) / "config.json").read_text())
        sizes = dict(hidden_size=bert["hidden_size"], num_layers=bert["num_hidden_layers"],
                     num_heads=bert["num_attention_heads"], intermediate_size=bert["intermediate_size"],
                     max_position_embeddings=bert["max_position_embeddings"],
                     max_text_len=min(q.max_text_len, bert["max_position_embeddings"]))
    return replace(q, vocab_size=len(tokenizer), **sizes, **qformer_token_ids(tokenizer))


def _qformer_tokenizer(folder: Optional[str], q: QFormerConfig):
    folder = folder or q.init_from
    return None if folder is None else make_qformer_tokenizer(tokenizer_from_path(folder))


def _llm_tokenizer(llm: LLMConfig):
    return None if llm.kind == "none" else tokenizer_from_path(llm.name_or_path)


def fresh(build: Blip2Config, tokenizer_folder: Optional[str]) -> tuple[Blip2, Blip2Processor]:
    """A model built from its parts: the tower (open_clip / official ViT, its `vision.weights`),
    the Q-Former from BERT (or random), the LLM from `llm.name_or_path`."""
    qtok = _qformer_tokenizer(tokenizer_folder, build.qformer)
    if qtok is None and build.qformer.text_input:
        raise ConfigError("a built model needs a Q-Former tokenizer: model.build.qformer.init_from=BERT_FOLDER "
                          "(a random Q-Former: model.qformer_tokenizer=FOLDER)")
    if qtok is not None:
        build = replace(build, qformer=qformer_from_bert(build.qformer, qtok))
    model = build_model(build)
    return model, Blip2Processor.from_config(build, qtok, _llm_tokenizer(build.llm))


def opened(source: str) -> tuple[Blip2, Blip2Processor]:
    """Anything `blip2lab.load` opens, on the CPU (accelerate moves it for training)."""
    from ..pipeline import load

    pipe = load(source)
    return pipe.model, pipe.processor


def lavis(m) -> tuple[Blip2, Blip2Processor]:
    """A LAVIS .pth described by `m.build` (LAVIS files carry no architecture)."""
    model = load_lavis(m.source, m.build, vision_weights=m.vision_weights)
    qtok = _qformer_tokenizer(m.qformer_tokenizer, m.build.qformer)
    return model, Blip2Processor.from_config(model.config, qtok, _llm_tokenizer(m.build.llm))


def with_llm(model: Blip2, proc: Blip2Processor, llm: LLMConfig) -> tuple[Blip2, Blip2Processor]:
    """A stage-1 model with a frozen LLM and a fresh projection added: every stage-1 weight kept."""
    config = replace(model.config, llm=llm)
    new = Blip2(config, image_encoder=model.image_encoder, language_model=load_llm(llm))
    missing, unexpected = new.load_state_dict(model.state_dict(), strict=False)
    if unexpected or any(not k.startswith("llm.") for k in missing):
        raise ConfigError(f"the source does not fit the stage-2 model: unexpected {unexpected[:5]}, missing "
                          f"{[k for k in missing if not k.startswith('llm.')][:5]}")
    return new, Blip2Processor.from_config(config, proc.qformer_tokenizer, _llm_tokenizer(llm))
