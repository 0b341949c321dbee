"""A `Blip2` with every pretrained part its config names, from where that part lives: the
frozen image encoder's weights (`vision.weights`: a file or `package:` path), the frozen
LLM (`llm.name_or_path`: a transformers folder, a hub id where a hub is reachable, a
`package:` path or a `.gguf` file) and the Q-Former's BERT initialisation
(`qformer.init_from`, as the paper starts from bert-base-uncased).

The model layer (`blip2lab.model.Blip2`) builds every box with fresh weights and never reads
a file; this is where the files come in, so the dependencies point one way.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from ..config import Blip2Config, LLMConfig
from ..dtypes import pick_dtype
from ..model import Blip2, ImageEncoder
from .bert import init_qformer_from_bert
from .sources import local_model
from .towers import pretrained_image_encoder

__all__ = ["build_model", "load_llm"]


def load_llm(cfg: LLMConfig) -> nn.Module:
    """The frozen LLM named by an `LLMConfig` (see the module docstring for the sources), in
    the precision `pick_dtype` chooses for the CPU."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForCausalLM if cfg.kind == "decoder" else AutoModelForSeq2SeqLM
    return auto.from_pretrained(local_model(cfg.name_or_path), dtype=pick_dtype(cfg.dtype, cfg.kind, "cpu"))


def build_model(config: Blip2Config, image_encoder: Optional[ImageEncoder] = None,
                language_model: Optional[nn.Module] = None, init_qformer: bool = True) -> Blip2:
    """`Blip2(config)` with its pretrained parts: `image_encoder` / `language_model` when given
    (e.g. shared with another model), else read from the config's sources; the Q-Former then
    copied from `qformer.init_from` unless `init_qformer=False` (a checkpoint is about to
    overwrite every weight anyway)."""
    if image_encoder is None:
        image_encoder = pretrained_image_encoder(config.vision)
    if language_model is None and config.llm.kind != "none":
        language_model = load_llm(config.llm)
    model = Blip2(config, image_encoder=image_encoder, language_model=language_model)
    if init_qformer and config.qformer.init_from is not None:
        init_qformer_from_bert(model.qformer, config.qformer.init_from)
    return model
