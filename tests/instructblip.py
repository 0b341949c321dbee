"""Tiny random InstructBLIP checkpoints in the Hugging Face layout of the Salesforce/instructblip-*
repos, as far as it is known without the hub (tests/instructblip_configs/PROVENANCE.md: these
files were written from transformers' conversion script, NOT copied from the hub).

`tiny_instructblip(repo, out)` writes what `InstructBlipForConditionalGeneration.save_pretrained`
and `InstructBlipProcessor.save_pretrained` write: config.json (size fields shrunk, as
tests/published.py does), random weights, the processor configs, the LLM tokenizer in the folder
and the Q-Former's (bert-base-uncased + [DEC], truncation_side left) in `qformer_tokenizer/`,
each over a synthetic vocabulary whose special tokens sit at their published ids."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from published import QFORMER, T5, VISION, WORDS, _bert_vocab, _fill, _t5_tokenizer

ROOT = Path(__file__).resolve().parent / "instructblip_configs"
REPOS = sorted(p.name for p in ROOT.iterdir() if (p / "config.json").is_file())
LLAMA = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")


def published(repo: str, name: str = "config.json") -> dict:
    return json.loads((ROOT / repo / name).read_text())


def family(repo: str) -> str:
    return published(repo)["text_config"]["model_type"]


def shrunk_config(repo: str) -> dict:
    raw = published(repo)
    raw["vision_config"] = raw["vision_config"] | VISION
    raw["qformer_config"] = raw["qformer_config"] | QFORMER
    raw["text_config"] = raw["text_config"] | (LLAMA if family(repo) == "llama" else T5)
    return raw


def tiny_instructblip(repo: str, out: Path, seed: int = 0) -> Path:
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    config = InstructBlipConfig.from_dict(shrunk_config(repo))
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config).eval()
    with torch.no_grad():  # decisive logits, every weight nonzero (as tests/published.py)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(str(out))
    for name in ("preprocessor_config.json", "processor_config.json"):
        shutil.copy(ROOT / repo / name, out / name)
    from transformers import PreTrainedTokenizerFast

    backend = _vicuna_tokenizer() if family(repo) == "llama" else _t5_tokenizer()
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(str(out))
    qtok = out / "qformer_tokenizer"
    qtok.mkdir()
    (qtok / "vocab.txt").write_text("\n".join(_bert_vocab()) + "\n")
    for folder, target in ((ROOT / repo, out), (ROOT / repo / "qformer_tokenizer", qtok)):
        for name in _TOKENIZER_FILES:
            shutil.copy(folder / name, target / name)
    return out


def _vicuna_tokenizer():
    """LLaMA's sentencepiece BPE with byte fallback, 32000 pieces: <unk> 0, <s> 1, </s> 2, the
    byte pieces <0x00>..<0xFF> at 3..258 ("\\n" is <0x0A>, 13), "▁" and a few words. As HF's
    conversion of the Vicuna InstructBLIP set it up, BOS is "</s>" (id 2), put first."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    merges = [(w[:i], w[i]) for word in WORDS for w in (f"▁{word}",) for i in range(1, len(w))]
    chars = sorted(set("".join(WORDS)) | set("abcdefghijklmnopqrstuvwxyzQAS0123456789?:.,!'-"))
    _fill(vocab, 32000, ["▁", *chars, *(a + b for a, b in merges)])
    tok = Tokenizer(models.BPE(vocab, merges, byte_fallback=True, fuse_unk=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    return tok
