"""The frozen text backbones of the shapes world: a small OPT, a small T5 and a small BERT,
with their tokenizers, all trained here on the world's text.

BLIP-2 freezes an LLM that already reads and writes (OPT / FlanT5) and starts its Q-Former
from BERT-base (paper Sec. 3.1-3.3). The shapes world has no such checkpoints, so this module
pretrains miniature stand-ins on text drawn from the world's TRAIN split only (no purple
triangle or orange square is ever named), and measures the ability stage 2 rides on:
answering a question about a scene that the context describes (SHAPES_WORLD_NOTES.md, point 3).

Corpus layouts (what stage 2 will ask, with a text description where the visual prefix goes):

    decoder, in context:  </s>{description}. Question: {q1} Answer: {a1}. Question: ... Answer: {ak}\\n
    decoder, as stage 2:  {description}</s>Question: {q1} Answer: {a1}. ... Answer: {ak}\\n
                          {description}</s>a photo of {caption}\\n
    decoder, text only:   </s>a photo of {caption}\\n   and   </s>{paraphrase}\\n
    T5 (input -> target): "{description}. Question: {q} Short answer:" -> "{a}" (with earlier turns
                          sometimes), "{description}. a photo of" -> caption, and the prefix LM
                          "{description}. {caption[:k]}" -> caption[k:] (paper Sec. 3.3)
    BERT (MLM):           captions, paraphrases, questions with their answers

Stage 2 lays out a decoder row as [visual][BOS][prompt][text]["\\n"] (llm.py, LAVIS
blip2_opt), so the "as stage 2" passages put the description exactly where the visual tokens
will be: before the BOS. The in-context layout is the one the QA metric uses.
Answer tokens (with the "." or "\\n" that ends them) and the caption after "a photo of" are
the passage's targets; the loss up-weights them (`target_weight`), which is what made the
prototype's LM learn to read its context at all.

Shapes: B batch, T text length, L target length, V vocabulary.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from blip2lab.worlds.shapes.world import (
    NUMBER_WORDS,
    QUESTION_TYPES,
    VOCABULARY,
    Scene,
    caption,
    make_split,
    paraphrases,
    questions,
    stable_seed,
)

__all__ = [
    "BOS", "EXTRA_WORDS", "Passage", "world_corpus", "t5_corpus", "bert_corpus",
    "train_opt_tokenizer", "train_t5_tokenizer", "train_bert_tokenizer",
    "opt_config", "t5_config", "bert_config",
    "CausalLMPretraining", "Seq2SeqPretraining", "MaskedLMPretraining",
    "in_context_qa_accuracy", "in_context_caption_accuracy", "masked_token_accuracy",
    "pretrain_opt", "pretrain_t5", "pretrain_bert", "load_text_backbone",
]

BOS = "</s>"  # OPT's BOS (= its EOS), written into passages where the layout puts one
EXTRA_WORDS = ("Question", "Answer", "Short", "answer", "photo", "of")  # prompt words beside VOCABULARY
CAPTION_PROMPT = "a photo of"  # the paper's captioning prompt (processor.py)
DECODER_KINDS = ("qa_context", "qa_visual", "caption_visual", "caption")
T5_KINDS = ("qa", "caption", "prefix")


# -- corpus ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Passage:
    """One decoder-only training text. `text` may hold BOS ("</s>") where its layout puts
    one; `targets` are character spans (answers with their terminator, captions after the
    prompt) whose tokens the loss up-weights; `context` is the span of the scene's description
    (random by construction), whose tokens it down-weights."""

    text: str
    targets: tuple[tuple[int, int], ...]
    kind: str
    context: tuple[int, int] = (0, 0)
    target_types: tuple[str, ...] = ()  # per target: its question type, or "caption"


def _description(scene: Scene, rng: random.Random, canonical_share: float) -> str:
    """The scene told in words: the canonical caption, else a random paraphrase template."""
    return caption(scene) if rng.random() < canonical_share else paraphrases(scene, rng)


def _asked_object(scene: Scene, question: str, answer: str, kind: str) -> Optional[int]:
    """Which object (index in reading order) a question of `questions()` is about; None for
    "how many" and for "is there" questions answered "no"."""
    for i, o in enumerate(scene.ordered):
        if ((kind == "color" and question.endswith(f" {o.shape}?"))
                or (kind == "shape" and question.endswith(f" {o.row} {o.column}?"))
                or (kind in ("size", "where") and question.endswith(f" {o.color} {o.shape}?"))
                or (kind == "exists" and answer == "yes" and question.endswith(f" {o.color} {o.shape}?"))):
            return i
    return None


def shape_keyed_questions(scene: Scene) -> list[tuple[str, str, str]]:
    """Questions beyond the world's own templates that name an object by its shape alone,
    for shapes present once: "what size is the circle?", "where is the circle?". In the
    world's templates only colour questions key on the shape; every other question names the
    colour, and a colour lookup answers it, so an LM learns to route colours from the question
    and colour questions stay at the level of guessing which object is meant. These give the
    shape route more signal. (LM corpus only; stage 2 and the metric use `questions()`.)"""
    objs = scene.ordered
    unique = [o for o in objs if sum(p.shape == o.shape for p in objs) == 1]
    return ([(f"what size is the {o.shape}?", o.size, "size_by_shape") for o in unique]
            + [(f"where is the {o.shape}?", f"{o.row} {o.column}", "where_by_shape") for o in unique])


def _balanced_pairs(scene: Scene, qa: list[tuple[str, str, str]], k: int, rng: random.Random,
                    once_per_object: bool = False) -> list[tuple[str, str, str]]:
    """Up to k QA pairs, question types taken in turn (so the many "is there" pairs do not
    crowd out the rest), in random order. With `once_per_object` no object is asked about
    twice: otherwise a later answer can be copied from an earlier turn ("is there a red
    circle? yes. ... what color is the circle? red"), a shortcut that teaches reading the
    chat history instead of the description, and one the QA metric (a single question) never offers."""
    by_type: dict[str, list] = {}
    for item in qa:
        by_type.setdefault(item[2], []).append(item)
    for items in by_type.values():
        rng.shuffle(items)
    types = sorted(by_type)
    rng.shuffle(types)
    picked: list[tuple[str, str, str]] = []
    used: set[int] = set()
    while len(picked) < k and any(by_type.values()):
        for t in types:
            if by_type[t] and len(picked) < k:
                q, a, kind = by_type[t].pop()
                obj = _asked_object(scene, q, a, kind) if once_per_object else None
                if obj is None or obj not in used:
                    picked.append((q, a, kind))
                    used.add(obj)
    rng.shuffle(picked)
    return picked


def _qa_chain(pairs: Sequence[tuple[str, str, str]], answer_word: str, offset: int) -> tuple[str, list[tuple[int, int]]]:
    """"Question: q1 Answer: a1. Question: q2 Answer: a2\\n" (the chat layout of processor.py),
    with the character spans of each answer and its terminator, shifted by `offset`."""
    text, spans = "", []
    for i, (q, a, _) in enumerate(pairs):
        text += ("" if i == 0 else " ") + f"Question: {q} {answer_word} "
        start = len(text)
        text += a + ("." if i < len(pairs) - 1 else "\n")
        spans.append((offset + start, offset + len(text)))
    return text, spans


def _decoder_passage(scene: Scene, kind: str, rng: random.Random, pairs: tuple[int, int],
                     canonical_share: float, once_per_object: bool, shape_keyed: bool = False) -> Passage:
    desc = _description(scene, rng, canonical_share)
    if kind in ("qa_context", "qa_visual"):
        qa = questions(scene, rng, allow_held_out=False) + (shape_keyed_questions(scene) if shape_keyed else [])
        qa = _balanced_pairs(scene, qa, rng.randint(*pairs), rng, once_per_object)
        start = len(BOS) if kind == "qa_context" else 0
        head = f"{BOS}{desc}. " if kind == "qa_context" else f"{desc}{BOS}"
        chain, spans = _qa_chain(qa, "Answer:", len(head))
        return Passage(head + chain, tuple(spans), kind, (start, start + len(desc)), tuple(t for _, _, t in qa))
    if kind == "caption_visual":
        # Mostly the canonical caption (stage 2's default target), sometimes a paraphrase.
        text = caption(scene) if rng.random() < 0.7 else paraphrases(scene, rng)
        head = f"{desc}{BOS}{CAPTION_PROMPT} "
        return Passage(f"{head}{text}\n", ((len(head), len(head) + len(text) + 1),), kind, (0, len(desc)), ("caption",))
    if kind == "caption":  # the text-only prior: captions after the prompt, or alone; no target
        head = f"{BOS}{CAPTION_PROMPT} " if rng.random() < 0.5 else BOS
        text = caption(scene) if head != BOS else desc
        return Passage(f"{head}{text}\n", (), kind, (len(head), len(head) + len(text)))
    raise ValueError(f"kind={kind!r}; expected one of {DECODER_KINDS}")


def _pick(mix: dict[str, float], rng: random.Random) -> str:
    kinds = sorted(mix)
    return rng.choices(kinds, weights=[mix[k] for k in kinds])[0]


DEFAULT_DECODER_MIX = {"qa_context": 0.45, "qa_visual": 0.3, "caption_visual": 0.2, "caption": 0.05}


def world_corpus(n_scenes: int, seed: int, *, mix: Optional[dict[str, float]] = None, min_pairs: int = 1,
                 max_pairs: int = 8, canonical_share: float = 0.5, max_objects: int = 3,
                 qa_min_objects: int = 1, once_per_object: bool = False, shape_keyed: bool = False) -> list[Passage]:
    """Decoder-only training passages, one per scene of `make_split("train", n_scenes, seed)`
    (held-out pairs never appear, not even in "is there" questions), each of a layout drawn
    from `mix` (DECODER_KINDS; see the module docstring). QA passages hold min_pairs..max_pairs
    (uniform, capped by what the scene offers) type-balanced pairs; a scene of fewer than
    `qa_min_objects` objects drawn for a QA layout becomes a "caption_visual" passage instead
    (one object needs no binding: its QA only teaches "copy the one colour word").
    Deterministic in all arguments."""
    mix = DEFAULT_DECODER_MIX if mix is None else mix
    if not mix or set(mix) - set(DECODER_KINDS) or min(mix.values()) < 0:
        raise ValueError(f"mix={mix!r}; expected non-negative weights over {DECODER_KINDS}")
    rng = random.Random(stable_seed("world_corpus", seed))
    scenes = make_split("train", n_scenes, seed, max_objects=max_objects)
    if not 1 <= min_pairs <= max_pairs:
        raise ValueError(f"min_pairs={min_pairs}, max_pairs={max_pairs}; need 1 <= min_pairs <= max_pairs")
    out = []
    for scene in scenes:
        kind = _pick(mix, rng)
        if kind.startswith("qa") and len(scene.objects) < qa_min_objects:
            kind = "caption_visual"
        out.append(_decoder_passage(scene, kind, rng, (min_pairs, max_pairs), canonical_share, once_per_object,
                                    shape_keyed))
    return out


DEFAULT_T5_MIX = {"qa": 0.6, "caption": 0.2, "prefix": 0.2}


def t5_corpus(n_scenes: int, seed: int, *, mix: Optional[dict[str, float]] = None, max_history: int = 2,
              canonical_share: float = 0.5, max_objects: int = 3) -> list[tuple[str, str, str]]:
    """Encoder-decoder examples (input, target, kind) from the train split, mirroring what
    stage 2 feeds T5 (LAVIS blip2_t5) with a description where the visual prefix goes:
    "qa": "{d}. [Question: q Short answer: a. ]*Question: q Short answer:" -> "a" (0..max_history
    earlier turns, the chat layout); "caption": "{d}. a photo of" -> the caption;
    "prefix": "{d}. {first k words}" -> the rest of the canonical caption (the prefix LM of
    stage-2 pretraining, split by Blip2Processor.prefix_split's rule)."""
    from blip2lab.processor import Blip2Processor

    mix = DEFAULT_T5_MIX if mix is None else mix
    if not mix or set(mix) - set(T5_KINDS) or min(mix.values()) < 0:
        raise ValueError(f"mix={mix!r}; expected non-negative weights over {T5_KINDS}")
    rng = random.Random(stable_seed("t5_corpus", seed))
    out = []
    for scene in make_split("train", n_scenes, seed, max_objects=max_objects):
        kind, desc = _pick(mix, rng), _description(scene, rng, canonical_share)
        if kind == "qa":
            pairs = _balanced_pairs(scene, questions(scene, rng, allow_held_out=False), 1 + rng.randint(0, max_history),
                                    rng, once_per_object=False)
            history = "".join(f"Question: {q} Short answer: {a}. " for q, a, _ in pairs[:-1])
            q, a, _ = pairs[-1]
            out.append((f"{desc}. {history}Question: {q} Short answer:", a, kind))
        elif kind == "caption":
            out.append((f"{desc}. {CAPTION_PROMPT}", caption(scene), kind))
        else:
            head, tail = Blip2Processor.prefix_split(caption(scene), rng)
            out.append((f"{desc}. {head}", tail, kind))
    return out


def bert_corpus(n_scenes: int, seed: int, *, split: Literal["train", "val", "test"] = "train",
                max_objects: int = 3) -> list[tuple[str, str]]:
    """MLM examples (text_a, text_b), text_b "" for a single text. Per scene one of:
    a caption alone (canonical or paraphrase: what the Q-Former's text side reads, 40%), two
    descriptions of the same scene (30%), or a description and a question with its answer
    (30%). In a pair a masked attribute word of one text can be read off the other, so MLM
    teaches binding instead of only pushing interchangeable words ("small" / "large") onto
    one embedding, as MLM on single captions does (their attributes are random)."""
    rng = random.Random(stable_seed("bert_corpus", split, seed))
    out = []
    for scene in make_split(split, n_scenes, seed, max_objects=max_objects):
        desc, u = _description(scene, rng, 0.5), rng.random()
        if u < 0.4:
            out.append((desc, ""))
        elif u < 0.7:
            out.append((desc, paraphrases(scene, rng)))
        else:
            q, a, _ = rng.choice(questions(scene, rng, allow_held_out=False))
            out.append((desc, f"{q} {a}"))
    return out


def _lexicon_lines(words: Sequence[str], repeats: int) -> list[str]:
    """Every world word alone and after a space, `repeats` times: makes BPE / WordPiece give
    each one a token of its own even where the corpus rarely uses it ("six", "zero")."""
    return [" ".join(words)] * repeats + list(words) * repeats


def _world_words() -> list[str]:
    return list(dict.fromkeys(list(VOCABULARY) + list(NUMBER_WORDS) + list(EXTRA_WORDS)))


# -- tokenizers ---------------------------------------------------------------------------------


def train_opt_tokenizer(texts: Sequence[str], vocab_size: int = 512):
    """OPT-like byte-level BPE (GPT-2 pre-tokenisation, no prefix space): "<s>" 0,
    "<pad>" 1, "</s>" 2 (BOS = EOS, as OPT), "<unk>" 3; every world word one token, "\\n" one
    token; encoding with special tokens prepends "</s>" as OPT's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "<pad>", BOS, "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2,
                                  show_progress=False)
    lines = [t.replace(BOS, "\n") for t in texts] + _lexicon_lines(_world_words(), 50)
    tok.train_from_iterator(lines, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=BOS, pad_token="<pad>",
                                   unk_token="<unk>", add_prefix_space=False)


def train_t5_tokenizer(texts: Sequence[str], min_count: int = 5):
    """T5-like SentencePiece-style unigram tokenizer (Metaspace "▁" word starts): "<pad>" 0,
    "</s>" 1, "<unk>" 2, and "</s>" appended to every encoding, as T5's tokenizer does.

    The unigram model is estimated here from the corpus's counts: one piece "▁word" per word
    seen `min_count` times or more, scored by its log frequency, and every character seen
    (alone and after "▁") as a low-scored fallback, so any text can be encoded and each world
    word is one piece. (The UnigramTrainer of `tokenizers` 0.23 prunes this tiny, repetitive
    corpus to ~110 pieces and splits "top", "what", "is" into characters, whatever vocab_size asks.)"""
    import re
    import string
    from collections import Counter

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    lines = list(texts) + _lexicon_lines(_world_words(), min_count)
    words = Counter(w for t in lines for w in re.findall(r"[A-Za-z]+", t))
    chars = set(string.ascii_letters + string.digits + string.punctuation)
    chars |= {c for t in lines for c in t if not c.isspace()}
    total = sum(words.values())
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    kept = [(w, math.log(n / total)) for w, n in sorted(words.items()) if n >= min_count]
    # "▁word" where a word starts after a space; "word" after punctuation ("(small)"), costlier.
    pieces += [("▁" + w, score) for w, score in kept] + [(w, score - 2.0) for w, score in kept]
    fallback = math.log(1 / total) - 10.0  # below any word: characters only where no word fits
    pieces += [("▁", fallback)] + [(c, fallback) for c in sorted(chars)] + [("▁" + c, fallback) for c in sorted(chars)]
    seen, vocab = set(), []  # first occurrence wins: a word piece "▁a" keeps its word score
    for piece, score in pieces:
        if piece not in seen:
            seen.add(piece)
            vocab.append((piece, score))
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(r"\s+"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def train_bert_tokenizer(texts: Sequence[str], vocab_size: int = 200):
    """bert-base-uncased-like WordPiece: lower case, [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3,
    [MASK] 4; "[CLS] a [SEP] (b [SEP])" with token types 0/1. `make_qformer_tokenizer`
    then adds [DEC] (id = this vocabulary's size)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False)
    tok.train_from_iterator(list(texts) + _lexicon_lines([w.lower() for w in _world_words()], 50), trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", do_lower_case=True,
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


# -- model configurations --------------------------------------------------------------------------


def opt_config(tokenizer, **overrides):
    """A miniature OPT (4 layers, width 128, FFN 512, 4 heads: 0.94M parameters). 256
    positions: stage 2 puts up to 32 visual tokens before prompts, chat histories and answers.

    Three deliberate deviations from OPT's own settings, each measured (see pretrain_opt):
    init_std 0.09 (~1/sqrt(128); OPT's 0.02 suits width 768+ and leaves attention uniform for
    hundreds of steps), untied input / output embeddings (tied, the LM loss on random
    attribute words merges "small"/"large" and "yes"/"no" into one vector), no dropout
    (the corpus is endless; dropout only slowed learning)."""
    from transformers import OPTConfig

    kw = dict(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=4, ffn_dim=512, num_attention_heads=4,
              max_position_embeddings=256, word_embed_proj_dim=128, do_layer_norm_before=True, dropout=0.0,
              attention_dropout=0.0, activation_function="relu", layerdrop=0.0, init_std=0.09,
              pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
              eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    return OPTConfig(**(kw | overrides))


def t5_config(tokenizer, **overrides):
    """A miniature FlanT5 (T5 v1.1 layout: gated-GELU FFN, untied head): width 128, FFN 512,
    3 + 3 layers, 4 heads; decoder_start = pad = 0, EOS = 1, as T5."""
    from transformers import T5Config

    kw = dict(vocab_size=len(tokenizer), d_model=128, d_kv=32, d_ff=512, num_layers=3, num_decoder_layers=3,
              num_heads=4, relative_attention_num_buckets=32, relative_attention_max_distance=128,
              dropout_rate=0.0, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
              decoder_start_token_id=tokenizer.pad_token_id)
    return T5Config(**(kw | overrides))


@torch.no_grad()
def local_position_bias_(model, slopes: Sequence[float]) -> None:
    """Start T5's learned relative-position biases (encoder and decoder self-attention) as
    ALiBi's (Press et al. 2022): head h adds -slopes[h] * |distance| to its logits, with the
    distance of each bucket its smallest |offset|. T5 draws them at random, near zero (std
    d_model^-0.5): the miniature T5 then trains into a nearly permutation-invariant encoder
    (a bag of words: `order_sensitivity` 0.013) that answers and copies without knowing which
    attribute belongs to which object."""
    from transformers.models.t5.modeling_t5 import T5Attention

    cfg = model.config
    for stack, bidirectional in ((model.encoder, True), (model.decoder, False)):
        attn = stack.block[0].layer[0].SelfAttention  # the one layer that holds the table
        offsets = torch.arange(-cfg.relative_attention_max_distance, cfg.relative_attention_max_distance + 1)
        buckets = T5Attention._relative_position_bucket(offsets, bidirectional=bidirectional,
                                                        num_buckets=cfg.relative_attention_num_buckets,
                                                        max_distance=cfg.relative_attention_max_distance)
        distance = torch.full((cfg.relative_attention_num_buckets,), float(cfg.relative_attention_max_distance))
        distance.scatter_reduce_(0, buckets, offsets.abs().float(), reduce="amin")
        slope = torch.tensor(list(slopes), dtype=torch.float32)  # (heads,)
        attn.relative_attention_bias.weight.copy_(-distance[:, None] * slope[None, :])  # (buckets, heads)


def bert_config(tokenizer, **overrides):
    """A miniature BERT shaped like the shapes-world Q-Former (hidden 128, 4 layers, 4 heads,
    FFN 512, 64 positions), so `weights.init_qformer_from_bert` accepts it."""
    from transformers import BertConfig

    kw = dict(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
              intermediate_size=512, max_position_embeddings=64, type_vocab_size=2, hidden_dropout_prob=0.1,
              attention_probs_dropout_prob=0.1, pad_token_id=tokenizer.pad_token_id)
    return BertConfig(**(kw | overrides))


def sinusoidal_positions_(model, amplitude: float = 0.05) -> None:
    """Overwrite the learned position table of an OPT with sinusoids (Vaswani et al. 2017),
    scaled to `amplitude`; they stay learned. Reading the scene from the context needs heads
    that look a fixed number of tokens back ("large" two tokens before "circle"); from
    sinusoids such a head is a linear map away at step 0, from random rows it must first be
    learned for every position. The architecture is untouched (still an OPT checkpoint)."""
    table = model.model.decoder.embed_positions.weight  # (offset + P, D); OPT offsets positions by 2
    offset = getattr(model.model.decoder.embed_positions, "offset", 2)
    P, D = table.shape[0] - offset, table.shape[1]
    pos = torch.arange(P, dtype=torch.float32)[:, None]  # (P, 1)
    freq = torch.exp(-math.log(10_000.0) * torch.arange(0, D, 2, dtype=torch.float32) / D)  # (D/2,)
    with torch.no_grad():
        table[offset:, 0::2] = amplitude * torch.sin(pos * freq)
        table[offset:, 1::2] = amplitude * torch.cos(pos * freq)


def same_token_attention_(model, heads: Sequence[int], layers: Sequence[int]) -> None:
    """Set the query projection of the given heads equal to their key projection (biases
    zeroed), so at step 0 those heads attend to tokens like the current one: the "find the
    same word in the description" half of an answer lookup starts on, instead of having to
    emerge from uniform attention. Only the init changes; everything stays trainable."""
    for i in layers:
        attn = model.model.decoder.layers[i].self_attn
        hd = attn.head_dim
        with torch.no_grad():
            for h in heads:
                rows = slice(h * hd, (h + 1) * hd)
                attn.q_proj.weight[rows] = attn.k_proj.weight[rows]
                attn.q_proj.bias[rows] = 0.0
                attn.k_proj.bias[rows] = 0.0


# -- pretraining objectives (nn.Modules the training loop of train.py drives) ----------------------


def weighted_token_loss(logits: Tensor, targets: Tensor, weights: Tensor) -> Tensor:
    """Cross-entropy per token, averaged with `weights` (0 = ignored).
    logits (B, T, V), targets (B, T), weights (B, T)."""
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), reduction="none")  # (B*T,)
    w = weights.reshape(-1).to(ce.dtype)
    return (ce * w).sum() / w.sum().clamp(min=1e-8)


class CausalLMPretraining(nn.Module):
    """Next-token prediction with per-token weights (targets up-weighted). Returns lm_loss
    (what the loop optimises) and target_ce, the plain cross-entropy on target tokens."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, loss_weights: Tensor, is_target: Tensor,
                **_loop_kwargs) -> dict[str, Tensor]:
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
        logits, targets = logits[:, :-1], input_ids[:, 1:]  # position t predicts token t + 1
        with torch.no_grad():
            target_ce = weighted_token_loss(logits, targets, is_target[:, 1:])
        return {"lm_loss": weighted_token_loss(logits, targets, loss_weights[:, 1:]), "target_ce": target_ce}


class Seq2SeqPretraining(nn.Module):
    """T5's teacher-forced cross-entropy on the target (decoder inputs = targets shifted right
    from decoder_start, as transformers does from `labels`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, attention_mask: Tensor, labels: Tensor, **_loop_kwargs) -> dict[str, Tensor]:
        decoder_ids = self.model._shift_right(labels)  # (B, L): [start] + targets, -100 -> pad
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            decoder_input_ids=decoder_ids).logits  # (B, L, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
        return {"lm_loss": loss}


def mask_tokens(input_ids: Tensor, special: Tensor, mask_id: int, vocab_size: int, first_word: int,
                generator: Optional[torch.Generator], p: float = 0.15) -> tuple[Tensor, Tensor]:
    """BERT's masking (Devlin et al. 2019): each non-special token is chosen with probability
    p; of those 80% become [MASK], 10% a random word, 10% stay. Returns (inputs, labels) with
    labels -100 where nothing is predicted. input_ids / special (B, T)."""
    u = torch.rand(input_ids.shape, generator=generator)  # (B, T)
    chosen = (u < p) & ~special
    how = torch.rand(input_ids.shape, generator=generator)
    randoms = torch.randint(first_word, vocab_size, input_ids.shape, generator=generator)
    inputs = torch.where(chosen & (how < 0.8), torch.full_like(input_ids, mask_id), input_ids)
    inputs = torch.where(chosen & (how >= 0.8) & (how < 0.9), randoms, inputs)
    return inputs, input_ids.masked_fill(~chosen, -100)


class MaskedLMPretraining(nn.Module):
    """Masked language modelling (15%, 80/10/10), masks drawn from the loop's per-step
    generator, so a run is reproducible and resumable."""

    def __init__(self, model: nn.Module, mask_id: int, first_word: int):
        super().__init__()
        self.model, self.mask_id, self.first_word = model, mask_id, first_word

    def forward(self, input_ids: Tensor, attention_mask: Tensor, special_mask: Tensor, token_type_ids: Tensor,
                generator: Optional[torch.Generator] = None, **_loop_kwargs) -> dict[str, Tensor]:
        inputs, labels = mask_tokens(input_ids, special_mask.bool(), self.mask_id, self.model.config.vocab_size,
                                     self.first_word, generator)
        logits = self.model(input_ids=inputs, attention_mask=attention_mask, token_type_ids=token_type_ids).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
        return {"lm_loss": loss}


# -- tokenised datasets ----------------------------------------------------------------------------


def length_buckets(rows: Sequence, batch_size: int, seed: int, window: int = 64,
                   length: Callable[[Any], int] = lambda row: len(row["ids"])) -> list[list]:
    """Rows grouped into batches of similar length (shuffled, then sorted inside windows of
    `window` batches), batches in random order: padding drops from ~2x to a few percent,
    which on one CPU core is the difference between 0.6 and 0.3 s a step."""
    rng = random.Random(stable_seed("buckets", seed))
    order = list(range(len(rows)))
    rng.shuffle(order)
    batches = []
    span = window * batch_size
    for i in range(0, len(order) - batch_size + 1, span):
        chunk = sorted(order[i: i + span], key=lambda j: length(rows[j]))
        batches += [[rows[j] for j in chunk[k: k + batch_size]] for k in range(0, len(chunk) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches


class _Rows(Dataset):
    def __init__(self, rows: list):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.rows[i]


def _pad_right(rows: Sequence[Sequence], value) -> Tensor:
    T = max(len(r) for r in rows)
    return torch.tensor([list(r) + [value] * (T - len(r)) for r in rows])  # (B, T)


def decoder_rows(passages: Sequence[Passage], tokenizer, target_weight: float, context_weight: float,
                 max_len: int, other_weight: float = 1.0, type_weights: Optional[dict[str, float]] = None) -> list[dict]:
    """Token ids, per-token loss weights and a 0/1 target flag per passage. A token whose
    characters overlap a target span weighs `target_weight` times its type's entry in
    `type_weights` (question types and "caption"; default 1), one inside the context span
    `context_weight`, any other (prompts, questions, BOS) `other_weight`."""
    type_weights = type_weights or {}
    enc = tokenizer([p.text for p in passages], add_special_tokens=False, return_offsets_mapping=True)
    rows = []
    for p, ids, offsets in zip(passages, enc["input_ids"], enc["offset_mapping"]):
        spans = [(s0, s1, target_weight * type_weights.get(t, 1.0))
                 for (s0, s1), t in zip(p.targets, p.target_types or ("",) * len(p.targets))]
        weights, flags = [], []
        for s, e in offsets:
            hit = next((w for s0, s1, w in spans if s < s1 and e > s0), None)
            flags.append(float(hit is not None))
            in_context = s < p.context[1] and e > p.context[0]
            weights.append(hit if hit is not None else context_weight if in_context else other_weight)
        rows.append({"ids": ids[:max_len], "weights": weights[:max_len], "targets": flags[:max_len]})
    return rows


def decoder_collate(pad_id: int):
    def collate(items: list[dict]) -> dict[str, Tensor]:
        ids = _pad_right([it["ids"] for it in items], pad_id)  # (B, T)
        return {"input_ids": ids, "attention_mask": _pad_right([[1] * len(it["ids"]) for it in items], 0),
                "loss_weights": _pad_right([it["weights"] for it in items], 0.0),
                "is_target": _pad_right([it["targets"] for it in items], 0.0)}
    return collate


def seq2seq_collate(tokenizer, max_len: int = 96):
    def collate(items: list[tuple[str, str, str]]) -> dict[str, Tensor]:
        src = tokenizer([i for i, _, _ in items], truncation=True, max_length=max_len)["input_ids"]
        tgt = tokenizer([t for _, t, _ in items], truncation=True, max_length=max_len)["input_ids"]
        return {"input_ids": _pad_right(src, tokenizer.pad_token_id),
                "attention_mask": _pad_right([[1] * len(s) for s in src], 0), "labels": _pad_right(tgt, -100)}
    return collate


def mlm_collate(tokenizer, max_len: int = 64):
    def collate(items: list[tuple[str, str]]) -> dict[str, Tensor]:
        enc = [tokenizer(a, b, truncation=True, max_length=max_len, return_special_tokens_mask=True) if b else
               tokenizer(a, truncation=True, max_length=max_len, return_special_tokens_mask=True) for a, b in items]
        return {"input_ids": _pad_right([e["input_ids"] for e in enc], tokenizer.pad_token_id),
                "attention_mask": _pad_right([e["attention_mask"] for e in enc], 0),
                "token_type_ids": _pad_right([e["token_type_ids"] for e in enc], 0),
                "special_mask": _pad_right([e["special_tokens_mask"] for e in enc], 1)}
    return collate


# -- evaluation ---------------------------------------------------------------------------------------


def _qa_items(scenes: Sequence[Scene], allow_held_out: bool, limit: Optional[int]) -> list[tuple[Scene, str, str, str]]:
    items = [(s, q, a, t) for s in scenes for q, a, t in questions(s, allow_held_out=allow_held_out)]
    return items if limit is None else items[:limit]


@torch.no_grad()
def _greedy(model, rows: list[list[int]], kind: str, pad_id: int, stop_ids: Sequence[int], max_new_tokens: int,
            batch_size: int) -> list[list[int]]:
    """Greedy continuations (new tokens, cut before the first stop id) of token rows:
    left padded for a decoder, right padded (the encoder input) for T5."""
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    try:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i: i + batch_size]
            T = max(len(r) for r in chunk)
            if kind == "decoder":  # left padding: every prompt ends in the last column
                ids = torch.tensor([[pad_id] * (T - len(r)) + r for r in chunk])  # (B, T)
                mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in chunk])  # (B, T)
            else:
                ids = torch.tensor([r + [pad_id] * (T - len(r)) for r in chunk])
                mask = torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in chunk])
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 num_beams=1, eos_token_id=list(stop_ids), pad_token_id=pad_id)
            new = gen[:, ids.shape[1]:] if kind == "decoder" else gen[:, 1:]  # (B, L)
            for row in new.tolist():
                cut = next((j for j, t in enumerate(row) if t in stop_ids), len(row))
                out.append(row[:cut])
    finally:
        model.train(was_training)
    return out


def _kind_of(model) -> str:
    return "encoder_decoder" if getattr(model.config, "is_encoder_decoder", False) else "decoder"


def _decoder_stop_ids(tokenizer) -> list[int]:
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("Ċ", ".")] + [tokenizer.eos_token_id]
    return list(dict.fromkeys(i for i in ids if i is not None and i != tokenizer.unk_token_id))


def in_context_qa_accuracy(model, tokenizer, scenes: Sequence[Scene], kind: Optional[str] = None, *,
                           layout: Literal["context", "visual"] = "context", allow_held_out: Optional[bool] = None,
                           limit: Optional[int] = None, batch_size: int = 256) -> dict[str, Any]:
    """Exact-match accuracy of greedy answers to every question of `scenes` when the
    canonical caption is in the context:

    decoder, layout "context": "</s>{caption}. Question: {q} Answer:" (stop at "\\n" or ".");
    decoder, layout "visual":  "{caption}</s>Question: {q} Answer:" (stage 2's layout);
    encoder_decoder:           "{caption}. Question: {q} Short answer:</s>" -> answer</s>.

    Returns {"overall", "n", "per_type": {type: acc}, "min_type"}. `allow_held_out` (default:
    whether any scene holds a held-out pair) lets "is there" questions name held-out pairs."""
    kind = _kind_of(model) if kind is None else kind
    if allow_held_out is None:
        allow_held_out = any(s.has_held_out for s in scenes)
    items = _qa_items(scenes, allow_held_out, limit)
    if kind == "decoder":
        prompts = [f"{BOS}{caption(s)}. Question: {q} Answer:" if layout == "context"
                   else f"{caption(s)}{BOS}Question: {q} Answer:" for s, q, _, _ in items]
        rows = tokenizer(prompts, add_special_tokens=False)["input_ids"]
        stops = _decoder_stop_ids(tokenizer)
        new = _greedy(model, rows, kind, tokenizer.pad_token_id, stops, 6, batch_size)
    else:
        rows = tokenizer([f"{caption(s)}. Question: {q} Short answer:" for s, q, _, _ in items])["input_ids"]
        new = _greedy(model, rows, kind, tokenizer.pad_token_id, [tokenizer.eos_token_id], 6, batch_size)
    answers = [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    hits: dict[str, list[bool]] = {t: [] for t in QUESTION_TYPES}
    for (_, _, a, t), got in zip(items, answers):
        hits[t].append(got == a)
    per_type = {t: sum(h) / len(h) for t, h in hits.items() if h}
    n = sum(len(h) for h in hits.values())
    return {"overall": sum(sum(h) for h in hits.values()) / max(1, n), "n": n, "per_type": per_type,
            "min_type": min(per_type.values()) if per_type else 0.0}


def in_context_caption_accuracy(model, tokenizer, scenes: Sequence[Scene], *, batch_size: int = 128,
                                seed: int = 0) -> dict[str, float]:
    """How often the LM writes the exact canonical caption after a description of the scene
    (a random paraphrase, seeded) and the caption prompt: "{description}</s>a photo of" for a
    decoder (stage 2's layout), "{description}. a photo of" for T5. The copy skill stage-2
    captioning rides on. Returns {"exact", "object_f1"}."""
    from blip2lab.worlds.shapes.world import caption_f1

    kind = _kind_of(model)
    rng = random.Random(stable_seed("caption_eval", seed))
    descs = [paraphrases(s, rng) for s in scenes]
    if kind == "decoder":
        rows = tokenizer([f"{d}{BOS}{CAPTION_PROMPT}" for d in descs], add_special_tokens=False)["input_ids"]
        new = _greedy(model, rows, kind, tokenizer.pad_token_id, _decoder_stop_ids(tokenizer)[:1] + [tokenizer.eos_token_id],
                      48, batch_size)
    else:
        rows = tokenizer([f"{d}. {CAPTION_PROMPT}" for d in descs])["input_ids"]
        new = _greedy(model, rows, kind, tokenizer.pad_token_id, [tokenizer.eos_token_id], 48, batch_size)
    texts = [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    exact = sum(t == caption(s) for t, s in zip(texts, scenes)) / len(scenes)
    f1 = sum(caption_f1(t, s)["f1"] for t, s in zip(texts, scenes)) / len(scenes)
    return {"exact": exact, "object_f1": f1}


@torch.no_grad()
def order_sensitivity(model, tokenizer, texts: Sequence[str], seed: int = 0) -> float:
    """How much the T5 encoder's outputs depend on word order: the mean, over `texts`, of
    |h(shuffled) - h|.mean() / |h|.mean(), with h(shuffled) the outputs of the same tokens in
    a random order (EOS kept last) put back in the original order. 0: a bag of words, whatever
    the order; the order then reaches no one (T5's cross-attention has no positions)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for text in texts:
        ids = tokenizer([text], return_tensors="pt")["input_ids"]  # (1, L), EOS last
        n = ids.shape[1]
        perm = torch.cat([torch.randperm(n - 1, generator=gen), torch.tensor([n - 1])])
        h = model.encoder(input_ids=ids).last_hidden_state[0]  # (L, D)
        h_shuffled = model.encoder(input_ids=ids[:, perm]).last_hidden_state[0]
        back = torch.empty_like(h_shuffled)
        back[perm] = h_shuffled  # row i: the token that sat at i, now read in shuffled order
        out.append(((back - h).abs().mean() / h.abs().mean()).item())
    return sum(out) / len(out)


@torch.no_grad()
def masked_token_accuracy(model, tokenizer, examples: Sequence[tuple[str, str] | str], seed: int = 0,
                          batch_size: int = 256) -> dict[str, float]:
    """Top-1 accuracy on the masked positions of `examples` ((text_a, text_b) pairs, or plain
    texts), masked as in training (15%, 80/10/10) from `seed`. "masked_accuracy" counts every
    masked token; "attribute_accuracy_pairs" only the scene's attribute words (sizes, colours,
    shapes, rows, columns) in pairs, where the other text tells them: the binding part."""
    from blip2lab.worlds.shapes.world import COLORS, COLUMNS, ROWS, SHAPES, SIZES

    examples = [(e, "") if isinstance(e, str) else tuple(e) for e in examples]
    attribute_ids = torch.tensor(sorted({i for w in (*SIZES, *COLORS, *SHAPES, *ROWS, *COLUMNS)
                                         for i in tokenizer(w, add_special_tokens=False)["input_ids"]}))
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    collate = mlm_collate(tokenizer)
    hits = total = attr_hits = attr_total = 0
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i: i + batch_size]
            b = collate(chunk)
            inputs, labels = mask_tokens(b["input_ids"], b["special_mask"].bool(), tokenizer.mask_token_id,
                                         model.config.vocab_size, _bert_first_word(tokenizer), g)
            logits = model(input_ids=inputs, attention_mask=b["attention_mask"],
                           token_type_ids=b["token_type_ids"]).logits  # (B, T, V)
            keep = labels != -100  # (B, T)
            right = logits.argmax(-1) == labels  # (B, T)
            hits += int(right[keep].sum())
            total += int(keep.sum())
            paired = torch.tensor([bool(t) for _, t in chunk])[:, None]  # (B, 1)
            attr = keep & paired & torch.isin(labels, attribute_ids)
            attr_hits += int(right[attr].sum())
            attr_total += int(attr.sum())
    finally:
        model.train(was_training)
    return {"masked_accuracy": hits / max(1, total), "attribute_accuracy_pairs": attr_hits / max(1, attr_total),
            "n": total}


def embedding_cosines(model, tokenizer) -> dict[str, float]:
    """Mean cosine between the input embeddings of the values of each attribute (and of yes /
    no). Near 1 means the model has merged them and cannot tell a small shape from a large
    one: what plain LM / MLM loss on random attribute words drives tied embeddings to."""
    from blip2lab.worlds.shapes.world import COLORS, COLUMNS, ROWS, SHAPES, SIZES

    E = model.get_input_embeddings().weight.detach()  # (V, D)
    out = {}
    for name, words in (("size", SIZES), ("color", tuple(COLORS)), ("shape", SHAPES), ("row", ROWS),
                        ("column", COLUMNS), ("yes/no", ("yes", "no"))):
        ids = [tokenizer(" " + w, add_special_tokens=False)["input_ids"][-1] for w in words]
        v = F.normalize(E[ids], dim=-1)  # (n, D)
        sims = v @ v.T  # (n, n)
        n = len(ids)
        out[name] = round(float((sims.sum() - n) / (n * (n - 1))), 3)
    return out


def _bert_first_word(tokenizer) -> int:
    return 1 + max(tokenizer.convert_tokens_to_ids(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"))


# -- pretraining --------------------------------------------------------------------------------------


def _train_config(steps: int, batch_size: int, lr: float, warmup: int, seed: int, min_lr_ratio: float,
                  weight_decay: float):
    from blip2lab.config import TrainConfig

    return TrainConfig(stage=2, losses=("lm",), lr=lr, min_lr=lr * min_lr_ratio, warmup_steps=warmup,
                       max_steps=steps, batch_size=batch_size, weight_decay=weight_decay, seed=seed,
                       betas=(0.9, 0.98), grad_clip=1.0)


def _run(objective: nn.Module, stream, cfg, eval_fn, eval_every: int, log_path: Optional[Path],
         progress: bool) -> tuple[list[dict], list[dict], float]:
    """The shared loop (train.py) plus periodic evaluation; returns (history, curve, seconds)."""
    from blip2lab.training.loop import train

    curve: list[dict] = []
    start = time.perf_counter()
    log = open(log_path, "a") if log_path is not None else None

    def on_step(step: int, logs: dict[str, float]) -> None:
        done = step + 1
        if log is not None and (done % 50 == 0 or done == cfg.max_steps):
            log.write(json.dumps({"step": done, "s": round(time.perf_counter() - start, 1),
                                  **{k: round(v, 4) for k, v in logs.items()}}) + "\n")
            log.flush()
        if eval_fn is not None and eval_every and done % eval_every == 0 and done < cfg.max_steps:
            point = {"step": done, "s": round(time.perf_counter() - start, 1), **eval_fn()}
            curve.append(point)
            objective.train()
            if log is not None:
                log.write(json.dumps({"eval": point}) + "\n")
                log.flush()

    try:
        history = train(objective, stream, cfg, on_step=on_step, progress=progress)
    finally:
        if log is not None:
            log.close()
    return history, curve, time.perf_counter() - start


def _loss_curve(history: list[dict], every: int = 100) -> list[dict]:
    """Mean loss (and target CE where logged) over each window of `every` steps."""
    out = []
    for i in range(0, len(history), every):
        window = history[i: i + every]
        point = {"step": i + len(window), "loss": round(sum(h["loss"] for h in window) / len(window), 4)}
        if "target_ce" in window[0]:
            point["target_ce"] = round(sum(h["target_ce"] for h in window) / len(window), 4)
        out.append(point)
    return out


def _save(model, tokenizer, out_dir: str | Path, recipe: dict) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")


def _recipe(function: str, call: dict, seconds: float, n_params: int, metrics: dict, history: list[dict],
            curve: list[dict]) -> dict:
    import transformers

    return {"function": f"blip2lab.worlds.shapes.text_backbones.{function}", "call": call,
            "command": " ".join(sys.argv) if sys.argv and sys.argv[0].endswith("text.py") else None,
            "train_seconds": round(seconds, 1), "threads": torch.get_num_threads(), "params": n_params,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "metrics": metrics, "eval_curve": curve, "loss_curve": _loss_curve(history)}


def _train_and_save(function: str, call: dict, objective: nn.Module, tokenizer, stream, cfg, quick_eval,
                    eval_every: int, log_path, progress: bool, metrics_fn, final_eval: bool, seed: int, out_dir) -> dict:
    """What every pretrain_* ends with: train on the shared loop, evaluate with `metrics_fn`,
    save the model, tokenizer and recipe.json, and return the figures."""
    model = objective.model
    history, curve, seconds = _run(objective, stream, cfg, quick_eval, eval_every,
                                   None if log_path is None else Path(log_path), progress)
    model.eval()
    metrics = metrics_fn(model, tokenizer, seed) if final_eval else {}
    metrics["final_loss"] = round(sum(h["loss"] for h in history[-50:]) / min(50, len(history)), 4)
    n_params = sum(p.numel() for p in model.parameters())
    if out_dir is not None:
        _save(model, tokenizer, out_dir, _recipe(function, call, seconds, n_params, metrics, history, curve))
    return {**metrics, "train_seconds": seconds, "params": n_params, "eval_curve": curve,
            "history": history, "_objects": (model, tokenizer)}


def _qa_quick_eval(model, tokenizer, scenes, **kwargs):
    """The periodic check of the OPT and T5 runs: in-context QA (overall and per type) and
    caption copying (exact), the two skills stage 2 rides on."""
    def quick_eval() -> dict:
        r = in_context_qa_accuracy(model, tokenizer, scenes, **kwargs)
        copy = in_context_caption_accuracy(model, tokenizer, scenes)["exact"]
        return {"qa": round(r["overall"], 4), **{t: round(v, 3) for t, v in r["per_type"].items()},
                "copy": round(copy, 3)}
    return quick_eval


def opt_metrics(model, tokenizer, seed: int = 0, n_test: int = 300, n_novel: int = 150, n_caption: int = 200) -> dict:
    """The OPT's scorecard on test scenes (never the training stream): in-context QA in both
    layouts, on the seen and the novel (held-out pair) parts, and caption copying."""
    test = make_split("test", n_test, seed)
    novel = make_split("test", n_novel, seed, novel=True)
    return {"qa_context": in_context_qa_accuracy(model, tokenizer, test, layout="context"),
            "qa_visual": in_context_qa_accuracy(model, tokenizer, test, layout="visual"),
            "qa_context_novel": in_context_qa_accuracy(model, tokenizer, novel, layout="context"),
            "caption_copy": in_context_caption_accuracy(model, tokenizer, test[:n_caption]),
            "embedding_cosine": embedding_cosines(model, tokenizer)}


def pretrain_opt(out_dir: Optional[str | Path], steps: int = 5000, seed: int = 0, batch_size: int = 32,
                 lr: float = 3e-3, warmup: int = 200, min_lr_ratio: float = 0.1, weight_decay: float = 0.05,
                 target_weight: float = 4.0, type_weights: Optional[dict[str, float]] = None, context_weight: float = 0.1,
                 other_weight: float = 1.0,
                 n_scenes: int = 100_000, min_pairs: int = 1, max_pairs: int = 8,
                 mix: Optional[dict[str, float]] = None, canonical_share: float = 0.5, max_objects: int = 3,
                 qa_min_objects: int = 1, once_per_object: bool = False, shape_keyed: bool = False,
                 vocab_size: int = 512,
                 max_len: int = 160, model_overrides: Optional[dict] = None, position_init: float = 0.0,
                 same_token_heads: Optional[Sequence[int]] = None,
                 eval_every: int = 0,
                 eval_scenes: int = 60, final_eval: bool = True, log_path: Optional[str | Path] = None,
                 progress: bool = False) -> dict:
    """Train the tokenizer and the miniature OPT on `world_corpus`, evaluate, and save model,
    tokenizer and recipe.json to `out_dir` (None: nothing saved). Returns the metrics (with
    "model"/"tokenizer" objects under "_objects" for callers that keep them in memory)."""
    from transformers import OPTForCausalLM

    from blip2lab.training.loop import BatchStream

    call = {k: v for k, v in locals().items() if k not in ("OPTForCausalLM", "BatchStream", "progress", "log_path")}
    call["out_dir"] = None if out_dir is None else str(out_dir)
    passages = world_corpus(n_scenes, seed, mix=mix, min_pairs=min_pairs, max_pairs=max_pairs,
                            canonical_share=canonical_share, max_objects=max_objects, qa_min_objects=qa_min_objects,
                            once_per_object=once_per_object, shape_keyed=shape_keyed)
    tokenizer = train_opt_tokenizer([p.text for p in passages[:20_000]], vocab_size=vocab_size)
    torch.manual_seed(seed)
    model = OPTForCausalLM(opt_config(tokenizer, **(model_overrides or {})))
    if position_init:
        sinusoidal_positions_(model, position_init)
    if same_token_heads:
        same_token_attention_(model, same_token_heads, range(1, model.config.num_hidden_layers))
    rows = decoder_rows(passages, tokenizer, target_weight, context_weight, max_len, other_weight, type_weights)
    collate = decoder_collate(tokenizer.pad_token_id)
    stream = BatchStream(_Rows(length_buckets(rows, batch_size, seed)), 1, lambda items: collate(items[0]), seed=seed)
    cfg = _train_config(steps, batch_size, lr, warmup, seed, min_lr_ratio, weight_decay)
    quick_eval = _qa_quick_eval(model, tokenizer, make_split("test", eval_scenes, seed + 1), layout="context")
    return _train_and_save("pretrain_opt", call, CausalLMPretraining(model), tokenizer, stream, cfg, quick_eval,
                           eval_every, log_path, progress, opt_metrics, final_eval, seed, out_dir)


def t5_metrics(model, tokenizer, seed: int = 0, n_test: int = 300, n_novel: int = 150, n_caption: int = 200) -> dict:
    test = make_split("test", n_test, seed)
    novel = make_split("test", n_novel, seed, novel=True)
    return {"qa_context": in_context_qa_accuracy(model, tokenizer, test),
            "qa_context_novel": in_context_qa_accuracy(model, tokenizer, novel),
            "caption_copy": in_context_caption_accuracy(model, tokenizer, test[:n_caption]),
            "order_sensitivity": round(order_sensitivity(model, tokenizer, [caption(s) for s in test[:50]], seed), 4),
            "embedding_cosine": embedding_cosines(model, tokenizer)}


def pretrain_t5(out_dir: Optional[str | Path], steps: int = 3000, seed: int = 0, batch_size: int = 32,
                lr: float = 1e-3, warmup: int = 200, min_lr_ratio: float = 0.1, weight_decay: float = 0.05,
                n_scenes: int = 100_000, mix: Optional[dict[str, float]] = None, max_history: int = 2,
                canonical_share: float = 0.5, model_overrides: Optional[dict] = None,
                position_slopes: Optional[Sequence[float]] = None,
                eval_every: int = 0, eval_scenes: int = 60, final_eval: bool = True,
                log_path: Optional[str | Path] = None, progress: bool = False) -> dict:
    """Train the Unigram tokenizer and the miniature T5 on `t5_corpus`; evaluate; save.

    `position_slopes` (one per head, e.g. [1, 0.5, 0.25, 0]) starts the relative-position
    biases as ALiBi's (`local_position_bias_`), a deviation from T5's random start. With
    T5's start (the default) this miniature trains into a nearly order-blind encoder;
    with the slopes (the shipped backbone) it learns word order (README)."""
    from transformers import T5ForConditionalGeneration

    from blip2lab.training.loop import BatchStream

    call = {k: v for k, v in locals().items()
            if k not in ("T5ForConditionalGeneration", "BatchStream", "progress", "log_path")}
    call["out_dir"] = None if out_dir is None else str(out_dir)
    examples = t5_corpus(n_scenes, seed, mix=mix, max_history=max_history, canonical_share=canonical_share)
    tokenizer = train_t5_tokenizer([f"{i} {t}" for i, t, _ in examples[:20_000]])
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(t5_config(tokenizer, **(model_overrides or {})))
    with torch.no_grad():  # transformers draws the untied head with std 1: first logits ~ +-50, loss ~60
        model.lm_head.weight.normal_(0.0, model.config.d_model ** -0.5)
    if position_slopes is not None:
        local_position_bias_(model, position_slopes)
    collate = seq2seq_collate(tokenizer)
    buckets = length_buckets(examples, batch_size, seed, length=lambda ex: len(ex[0]) + len(ex[1]))  # characters
    stream = BatchStream(_Rows(buckets), 1, lambda items: collate(items[0]), seed=seed)
    cfg = _train_config(steps, batch_size, lr, warmup, seed, min_lr_ratio, weight_decay)
    quick_eval = _qa_quick_eval(model, tokenizer, make_split("test", eval_scenes, seed + 1))
    return _train_and_save("pretrain_t5", call, Seq2SeqPretraining(model), tokenizer, stream, cfg, quick_eval,
                           eval_every, log_path, progress, t5_metrics, final_eval, seed, out_dir)


def bert_metrics(model, tokenizer, seed: int = 0, n_test: int = 1000) -> dict:
    return {**masked_token_accuracy(model, tokenizer, bert_corpus(n_test, seed, split="test"), seed=seed),
            "embedding_cosine": embedding_cosines(model, tokenizer)}


def pretrain_bert(out_dir: Optional[str | Path], steps: int = 1500, seed: int = 0, batch_size: int = 64,
                  lr: float = 1e-3, warmup: int = 150, min_lr_ratio: float = 0.1, weight_decay: float = 0.05,
                  n_scenes: int = 60_000, vocab_size: int = 200, model_overrides: Optional[dict] = None,
                  eval_every: int = 0, final_eval: bool = True, log_path: Optional[str | Path] = None,
                  progress: bool = False) -> dict:
    """Train the WordPiece tokenizer and the miniature BERT with MLM on `bert_corpus`; save."""
    from transformers import BertForMaskedLM

    from blip2lab.training.loop import BatchStream

    call = {k: v for k, v in locals().items() if k not in ("BertForMaskedLM", "BatchStream", "progress", "log_path")}
    call["out_dir"] = None if out_dir is None else str(out_dir)
    texts = bert_corpus(n_scenes, seed)
    tokenizer = train_bert_tokenizer([f"{a} {b}" for a, b in texts[:20_000]], vocab_size=vocab_size)
    torch.manual_seed(seed)
    model = BertForMaskedLM(bert_config(tokenizer, **(model_overrides or {})))
    stream = BatchStream(_Rows(texts), batch_size, mlm_collate(tokenizer), seed=seed)
    cfg = _train_config(steps, batch_size, lr, warmup, seed, min_lr_ratio, weight_decay)
    held_out = bert_corpus(200, seed + 1, split="val")

    def quick_eval() -> dict:
        return {"masked_accuracy": round(masked_token_accuracy(model, tokenizer, held_out)["masked_accuracy"], 4)}

    objective = MaskedLMPretraining(model, tokenizer.mask_token_id, _bert_first_word(tokenizer))
    return _train_and_save("pretrain_bert", call, objective, tokenizer, stream, cfg, quick_eval,
                           eval_every, log_path, progress, bert_metrics, final_eval, seed, out_dir)


# -- loading ------------------------------------------------------------------------------------------


def load_text_backbone(path: str | Path):
    """(model, tokenizer, recipe) of a backbone folder, offline; the model in eval mode.
    The model class follows config.json: OPT -> causal LM, T5 -> seq2seq LM, BERT -> masked LM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    from blip2lab.formats.sources import tokenizer_from_path

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json: not a backbone folder")
    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    auto = {"opt": AutoModelForCausalLM, "t5": AutoModelForSeq2SeqLM, "bert": AutoModelForMaskedLM}.get(config.model_type)
    if auto is None:
        raise ValueError(f"{path}: model_type {config.model_type!r}; expected opt, t5 or bert")
    model = auto.from_pretrained(str(path), local_files_only=True).eval()
    recipe_path = path / "recipe.json"
    recipe = json.loads(recipe_path.read_text()) if recipe_path.is_file() else {}
    return model, tokenizer_from_path(path), recipe


# -- command line -------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """python -m blip2lab.worlds.shapes.text_backbones {opt,t5,bert} --out DIR [--steps N] [--key=value ...]:
    any keyword of the pretrain_* function, values parsed as JSON where they parse."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("which", choices=("opt", "t5", "bert"))
    parser.add_argument("--out", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log", default=None)
    args, rest = parser.parse_known_args(argv)
    kwargs: dict[str, Any] = {}
    for item in rest:
        if not item.startswith("--") or "=" not in item:
            raise SystemExit(f"expected --key=value, got {item!r}")
        key, value = item[2:].split("=", 1)
        try:
            kwargs[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key.replace("-", "_")] = value
    torch.set_num_threads(args.threads)
    fn = {"opt": pretrain_opt, "t5": pretrain_t5, "bert": pretrain_bert}[args.which]
    result = fn(args.out, log_path=args.log, **kwargs)
    summary = {k: v for k, v in result.items() if k not in ("history", "_objects")}
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
