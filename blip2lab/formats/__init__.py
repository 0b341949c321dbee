"""Checkpoints in and out, and the pretrained parts a model is built from. Every module here
depends on `blip2lab.model`, never the reverse.

    build.py      build_model(config): a Blip2 with the pretrained parts its config names
    native.py     blip2lab's own folders (config.json + model.safetensors)
    hf.py         the official Salesforce checkpoints in Hugging Face layout, both ways
    lavis.py      LAVIS's .pth checkpoints, both ways
    bert.py       the Q-Former initialised from a BERT checkpoint
    towers.py     frozen towers' weights in other layouts (EfficientNet's lukemelas names)
    sources.py    where weights live offline: `package:` paths, GGUF files, tokenizers
    keys.py       strict loading and the key tables; streaming.py, tensor-by-tensor filling
"""

from .build import build_model, load_llm
from .hf import KNOWN_CHECKPOINTS, export_hf, from_hf, load_official, load_official_tokenizers
from .keys import WeightsError
from .lavis import export_lavis, load_lavis, save_lavis
from .native import load_pretrained, load_weights_into, save_pretrained

__all__ = ["build_model", "load_llm", "KNOWN_CHECKPOINTS", "load_official", "load_official_tokenizers", "export_hf",
           "from_hf", "load_lavis", "export_lavis", "save_lavis", "load_pretrained", "save_pretrained",
           "load_weights_into", "WeightsError"]
