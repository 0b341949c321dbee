"""Tiny random checkpoints in the official Salesforce / Hugging Face layout, for running the
official-checkpoint code path where no hub is reachable (notebook 09, offline demos).

The folders are written by transformers itself (`Blip2ForConditionalGeneration` and
`Blip2ForImageTextRetrieval`, `save_pretrained`), exactly as a hub snapshot is laid out, with
the shapes world's tokenizers beside the weights (the LLM's in the folder, the Q-Former's in
`qformer_tokenizer/`), so `blip2lab.load(folder)` goes through `blip2lab.formats.hf` as it
would for `Salesforce/blip2-opt-2.7b`. The weights are random: outputs are noise.
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["tiny_official_checkpoints"]


def tiny_official_checkpoints(folder: str | Path, seed: int = 0, image_size: int = 64) -> tuple[Path, Path, dict]:
    """Write `folder/blip2-opt-tiny` (generation: ViT, Q-Former, OPT) and
    `folder/blip2-itm-tiny` (retrieval: ViT, Q-Former with text input and heads) in HF layout.
    Returns (generation folder, retrieval folder, the Q-Former token ids to pass to `load`)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval, OPTConfig

    from blip2lab.formats.sources import tokenizer_from_path
    from blip2lab.processor import qformer_token_ids
    from blip2lab.worlds.shapes.recipe import BACKBONES, qformer_tokenizer

    qtok = qformer_tokenizer()
    ltok = tokenizer_from_path(BACKBONES / "opt")
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=8, layer_norm_eps=1e-6)
    qformer = dict(vocab_size=len(qtok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=64, encoder_hidden_size=32, max_position_embeddings=64,
                   pad_token_id=qtok.pad_token_id)
    vocab = len(ltok) + 1  # one spare row for the image token, as the official OPT checkpoints
    text = OPTConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
                     max_position_embeddings=128, word_embed_proj_dim=32, bos_token_id=ltok.bos_token_id,
                     eos_token_id=ltok.eos_token_id, pad_token_id=ltok.pad_token_id)
    root = Path(folder)
    torch.manual_seed(seed)
    gen = Blip2ForConditionalGeneration(Blip2Config(vision_config=vision, qformer_config=qformer,
                                                    text_config=text.to_dict(), num_query_tokens=8,
                                                    image_token_index=vocab - 1))
    itm = Blip2ForImageTextRetrieval(Blip2Config(vision_config=vision,
                                                 qformer_config={**qformer, "use_qformer_text_input": True},
                                                 num_query_tokens=8, image_text_hidden_size=16))
    out = []
    for model, name in ((gen, "blip2-opt-tiny"), (itm, "blip2-itm-tiny")):
        path = root / name
        model.save_pretrained(str(path))
        if name == "blip2-opt-tiny":  # the LLM's tokenizer goes beside the LLM, as in the hub repos
            ltok.save_pretrained(str(path))
        qtok.save_pretrained(str(path / "qformer_tokenizer"))
        out.append(path)
    return out[0], out[1], qformer_token_ids(qtok)
