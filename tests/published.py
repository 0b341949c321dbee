"""Tiny random checkpoints built from the Salesforce repos' published config files
(tests/published_configs, see PROVENANCE.md there): what a real checkpoint folder holds,
at a size a CPU test runs in seconds.

`tiny_checkpoint(repo, out)` writes a folder as `save_pretrained` and the hub lay it out:
config.json with only the size fields shrunk (widths, depths, heads, FFN sizes; every other
field exactly as published, including the fields the file leaves at transformers' defaults,
the image token and `num_query_tokens`), random weights, the published processor and
generation configs, and a tokenizer of the published class and vocabulary size whose
special tokens sit at their published ids (`synthetic_tokenizer`: the real vocabularies
are megabytes and not stored). `random_model` + `write_checkpoint` do the same at any size:
benchmarks/finetune_step.py writes Salesforce/blip2-opt-2.7b's real shape so."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent / "published_configs"
REPOS = sorted(p.name for p in ROOT.iterdir() if (p / "config.json").is_file())
PROVENANCE = json.loads((ROOT / "provenance.json").read_text())

# Only these fields change: a BLIP-2 shape at a test's size.
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
QFORMER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
               encoder_hidden_size=32)
OPT = dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32)
T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4)
WORDS = ("a photo of question answer what is the in on cat dog red blue circle picture this there how many "
         "yes no color").split()


def published(repo: str, name: str = "config.json") -> dict:
    return json.loads((ROOT / repo / name).read_text())


def shrunk_config(repo: str) -> dict:
    raw = published(repo)
    raw["vision_config"] = raw.get("vision_config", {}) | VISION
    raw["qformer_config"] = raw.get("qformer_config", {}) | QFORMER
    text = raw.get("text_config")
    if text is not None and text.get("model_type") == "opt" and "Blip2ForConditionalGeneration" in raw["architectures"]:
        raw["text_config"] = text | OPT
    elif text is not None and text.get("model_type") == "t5":
        raw["text_config"] = text | T5
    return raw


def is_retrieval(repo: str) -> bool:
    return published(repo)["architectures"] == ["Blip2ForImageTextRetrieval"]


def llm_family(repo: str) -> str:
    return "bert" if is_retrieval(repo) else published(repo)["text_config"]["model_type"]


def random_model(repo: str, config: dict, seed: int = 0):
    """transformers' model of `repo`'s architecture for the config dict `config` (published or
    shrunk), random weights, built on the default device (a GPU benchmark builds on CUDA)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval

    torch.manual_seed(seed)
    cls = Blip2ForImageTextRetrieval if is_retrieval(repo) else Blip2ForConditionalGeneration
    return cls(Blip2Config.from_dict(config)).eval()


def write_checkpoint(repo: str, model, out: Path) -> Path:
    """`model` saved as `repo`'s hub folder: weights and config, the published processor and
    generation configs, the synthetic tokenizer."""
    model.save_pretrained(str(out))
    for name in ("preprocessor_config.json", "processor_config.json", "generation_config.json"):
        if (ROOT / repo / name).is_file():
            shutil.copy(ROOT / repo / name, out / name)
    synthetic_tokenizer(repo, out)
    return out


def tiny_checkpoint(repo: str, out: Path, seed: int = 0) -> Path:
    model = random_model(repo, shrunk_config(repo), seed)
    with torch.no_grad():  # decisive logits: greedy choices far from ties, every weight nonzero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return write_checkpoint(repo, model, out)


# ---------------------------------------------------------------------------------------
# Tokenizers: the published class and configs over a synthetic vocabulary
# ---------------------------------------------------------------------------------------


def _fill(vocab: dict[str, int], size: int, pieces) -> None:
    """Give ids 0..size-1 to `pieces` in order (skipping ids already taken), then fillers."""
    taken = set(vocab.values())
    free = (i for i in range(size) if i not in taken)
    for piece in pieces:
        if piece not in vocab:
            vocab[piece] = next(free)
    for i in free:
        vocab[f"<filler_{i}>"] = i


def _opt_tokenizer():
    """GPT-2 byte-level BPE of 50265 entries: <s> 0, <pad> 1, </s> 2, <unk> 3, "\\n" (Ċ) at
    50118 (OPT's "\\n", the EOS of BLIP-2 captions), the 256 byte symbols and a few words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "Ċ": 50118}
    # merges that build each word (and "Ġword"), so prompts are a few tokens long
    merges = [(w[:i], w[i]) for word in WORDS for w in (word, f"Ġ{word}") for i in range(1, len(w))]
    _fill(vocab, 50265, sorted(pre_tokenizers.ByteLevel.alphabet()) + [a + b for a, b in merges])
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # OPT's tokenizer puts BOS (</s>) first (add_bos_token in the published tokenizer_config)
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", special_tokens=[("</s>", 2)])
    return tok


def _t5_tokenizer():
    """A sentencepiece-style Unigram of 32100 pieces: <pad> 0, </s> 1, <unk> 2, the pieces,
    then <extra_id_99> .. <extra_id_0> at 32000 .. 32099 (T5's order)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789?:.,!'-"))
    pieces += [(f"▁{w}", -2.0) for w in WORDS] + [("▁", -3.0)] + [(c, -5.0) for c in chars]
    pieces += [(f"▁{c}", -4.0) for c in chars]
    pieces += [(f"<filler_{i}>", -20.0) for i in range(len(pieces), 32000)]
    pieces += [(f"<extra_id_{i}>", 0.0) for i in range(99, -1, -1)]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tok


def _bert_vocab() -> list[str]:
    """bert-base-uncased's layout: [PAD] 0, [unused0..98], [UNK] 100, [CLS] 101, [SEP] 102,
    [MASK] 103, ..., 30522 entries."""
    specials = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}
    words = list(dict.fromkeys([*WORDS, *"abcdefghijklmnopqrstuvwxyz0123456789?:.,!'-"]))
    words += [f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab, rest = [], iter(words)
    for i in range(30522):
        if i in specials:
            vocab.append(specials[i])
        elif i < 999:
            vocab.append(f"[unused{i - (1 if i < 100 else 5)}]")
        else:
            vocab.append(next(rest, f"[filler{i}]"))
    return vocab


def synthetic_tokenizer(repo: str, out: Path) -> None:
    """Write the tokenizer of `repo`'s family into `out` with its published
    tokenizer_config.json, special_tokens_map.json and added_tokens.json."""
    from transformers import PreTrainedTokenizerFast

    family = llm_family(repo)
    out.mkdir(parents=True, exist_ok=True)
    if family == "bert":
        (out / "vocab.txt").write_text("\n".join(_bert_vocab()) + "\n")
    else:
        backend = _opt_tokenizer() if family == "opt" else _t5_tokenizer()
        PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(str(out))
    for name in ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
        shutil.copy(ROOT / repo / name, out / name)
