"""Strings and image files in, tensors out, and back: the one processor of blip2lab.

Everything that is not a tensor stops here (STYLE.md point 7): images (through the one
transform of `blip2lab.images`), Q-Former tokenisation, the stage-2 LLM sequences with their
label masks, the prompts of the paper, and decoding generated tokens back to text. Datasets, evaluation,
the pipeline, notebooks and the app all call the same methods, so training and serving
cannot drift apart.

Sources: the paper (Li et al. 2023, Sec. 3.3 and 4), LAVIS `blip2_qformer.py`,
`blip2_opt.py`, `blip2_t5.py` (sequence layout, label masking, EOS = "\\n" for OPT), and the
facts collected in shared/design/BLIP2_REFERENCE.md Sec. 1, 3 and 8.

Shapes: B batch, S image side, T text length (Q-Former or LLM input), L target / generated length.
"""

from __future__ import annotations

import copy
import random
import re
import warnings
from typing import Any, Literal, Optional, Sequence

import torch
from torch import Tensor

from .images import DEFAULT_MAX_PIXELS, CropConfig, ImageTransform, crop_params, load_image

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "load_image",
    "CropConfig",
    "crop_params",
    "ImageTransform",
    "Blip2Processor",
    "make_qformer_tokenizer",
    "qformer_token_ids",
    "clean_caption",
]

# -- tokenizers ----------------------------------------------------------------------------


def make_qformer_tokenizer(base):
    """A copy of a bert-base-uncased-like tokenizer with `[DEC]` as its BOS, the token the
    Q-Former's image-grounded text generation starts from (LAVIS `init_tokenizer`:
    `add_special_tokens({"bos_token": "[DEC]"})`, id 30522 for bert-base-uncased).
    Idempotent: a tokenizer that already has it gets no second one."""
    tok = copy.deepcopy(base)
    if tok.bos_token != "[DEC]":
        tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def qformer_token_ids(qformer_tokenizer) -> dict[str, Optional[int]]:
    """A Q-Former tokenizer's special ids by their QFormerConfig names; dec_token_id None when
    it has no [DEC] (see make_qformer_tokenizer)."""
    tok = qformer_tokenizer
    dec = tok.convert_tokens_to_ids("[DEC]") if "[DEC]" in tok.get_vocab() else None
    return dict(cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
                dec_token_id=dec)


def clean_caption(text: str, max_words: int = 50) -> str:
    """LAVIS's caption cleaning (`BlipCaptionProcessor.pre_caption`), for training data that
    should match the reference: lower case, the characters .!"()*#:;~ become spaces,
    whitespace collapsed, at most `max_words` words."""
    text = re.sub(r"([.!\"()*#:;~])", " ", text.lower())
    text = re.sub(r"\s{2,}", " ", text).strip()
    return " ".join(text.split(" ")[:max_words])


def _batch_list(x: Sequence[str] | str, what: str) -> list[str]:
    if isinstance(x, str):
        raise TypeError(f"{what} must be a list of strings, got a single string")
    x = list(x)
    if not x:
        raise ValueError(f"empty batch: got 0 {what}")
    for s in x:
        if not isinstance(s, str):
            raise TypeError(f"{what} must be strings, got {type(s).__name__}")
    return x


def _pad(rows: list[list[int]], pad_id: int, side: str) -> tuple[Tensor, Tensor]:
    """Ragged id lists -> ids (B, T) and mask (B, T), padded on `side` ("left" / "right")."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T), 1 = real token
    for i, r in enumerate(rows):
        if not r:
            continue
        span = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


# -- the processor ----------------------------------------------------------------------------


class Blip2Processor:
    """Images and strings -> model tensors, and generated ids -> strings.

    image_size, mean, std: the frozen image tower's eval transform (VisionConfig).
    qformer_tokenizer: bert-base-uncased-like with `[DEC]` (see make_qformer_tokenizer);
        None for a processor that never feeds text to the Q-Former.
    llm_tokenizer, llm_kind: the frozen LLM's tokenizer and family ("decoder": OPT, Llama,
        GPT-2; "encoder_decoder": T5 / FlanT5; "none": a stage-1 model).
    qformer_max_len: Q-Former text length, [CLS] and [SEP] included (paper / LAVIS: 32).
    llm_max_len: LLM training sequence length without the visual tokens (LAVIS max_txt_len 32).
    max_question_chars: longer questions are cut (with a warning) so a pasted essay
        cannot blow up the prompt.
    max_pixels: larger images are refused (see load_image).
    caption_prompt: the captioning prompt (paper: "a photo of").
    chat_template: questions through the LLM tokenizer's chat template (instruction-tuned
        decoder-only LLMs), not "Question: {q} Answer:".
    stop_at_newline: decoder-only text ends at "\n" (BLIP-2) or, False, at EOS only (InstructBLIP's Vicuna).
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], qformer_tokenizer=None,
                 llm_tokenizer=None, llm_kind: Literal["none", "decoder", "encoder_decoder"] = "none",
                 qformer_max_len: int = 32, llm_max_len: int = 32, max_question_chars: int = 1000,
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, caption_prompt: str = "a photo of",
                 chat_template: bool = False, stop_at_newline: bool = True):
        if image_size <= 0:
            raise ValueError(f"image_size must be > 0, got {image_size}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be > 0, got {tuple(std)}")
        if llm_kind not in ("none", "decoder", "encoder_decoder"):
            raise ValueError(f"llm_kind must be 'none', 'decoder' or 'encoder_decoder', got {llm_kind!r}")
        if (llm_kind == "none") != (llm_tokenizer is None):
            raise ValueError(f"llm_tokenizer is required when llm_kind is 'decoder' or 'encoder_decoder' and "
                             f"must be None when it is 'none' (llm_kind={llm_kind!r})")
        if qformer_max_len < 2:
            raise ValueError(f"qformer_max_len must be >= 2 ([CLS] and [SEP]), got {qformer_max_len}")
        if llm_max_len < 2:
            raise ValueError(f"llm_max_len must be >= 2, got {llm_max_len}")
        if max_question_chars <= 0:
            raise ValueError(f"max_question_chars must be > 0, got {max_question_chars}")
        if max_pixels is not None and max_pixels <= 0:
            raise ValueError(f"max_pixels must be > 0 or None, got {max_pixels}")
        self.transform = ImageTransform(image_size, mean, std, max_pixels)
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.qformer_tokenizer = qformer_tokenizer
        self.llm_tokenizer = llm_tokenizer
        self.llm_kind = llm_kind
        self.qformer_max_len = int(qformer_max_len)
        self.llm_max_len = int(llm_max_len)
        self.max_question_chars = int(max_question_chars)
        self.max_pixels = max_pixels
        self.caption_prompt = caption_prompt
        self.chat_template = bool(chat_template)
        self.stop_at_newline = bool(stop_at_newline)
        if self.chat_template and (llm_kind != "decoder" or not getattr(llm_tokenizer, "chat_template", None)):
            raise ValueError("chat_template needs a decoder-only LLM whose tokenizer has a chat template")
        if qformer_tokenizer is not None:
            self._check_qformer_tokenizer()
        if llm_kind == "decoder":
            self._newline_id = self._find_newline_id()
            self._joiner = self._find_joiner()
        if llm_kind == "encoder_decoder" and llm_tokenizer.eos_token_id is None:
            raise ValueError("llm_tokenizer has no eos_token: an encoder-decoder target must end with EOS")

    @classmethod
    def from_config(cls, config, qformer_tokenizer=None, llm_tokenizer=None, check: bool = True,
                    **kwargs) -> "Blip2Processor":
        """The processor matching a Blip2Config (image side and normalisation, text length,
        LLM kind and prompt). `check` compares the Q-Former tokenizer's special ids and size
        with config.qformer, the mismatch that otherwise trains on the wrong tokens."""
        proc = cls(config.vision.image_size, config.vision.mean, config.vision.std, qformer_tokenizer,
                   llm_tokenizer, config.llm.kind, qformer_max_len=config.qformer.max_text_len,
                   caption_prompt=config.llm.prompt, chat_template=config.llm.chat_template,
                   stop_at_newline=config.llm.stop_at_newline, **kwargs)
        if check and qformer_tokenizer is not None and config.qformer.text_input:  # else no vocabulary to check
            proc.check_qformer_config(config.qformer)
        return proc

    # -- images ------------------------------------------------------------------------------

    def image(self, image: Any) -> Tensor:
        """One image (anything load_image takes) -> normalised pixels (3, S, S), float32:
        the whole image squashed to S x S (`ImageTransform`), as LAVIS's `blip_image_eval`."""
        self.transform.max_pixels = self.max_pixels  # callers (the app) may tighten the limit after building
        return self.transform(image)

    def images(self, images: Sequence[Any]) -> Tensor:
        """A list of images -> pixels (B, 3, S, S), float32, normalised."""
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"images() takes a list of images, got {type(images).__name__}; use image() for one")
        if not images:
            raise ValueError("empty batch: got 0 images")
        return torch.stack([self.image(x) for x in images])  # (B, 3, S, S)

    # -- Q-Former text ------------------------------------------------------------------------

    def _check_qformer_tokenizer(self) -> None:
        tok = self.qformer_tokenizer
        for attr, token in (("cls_token", "[CLS]"), ("sep_token", "[SEP]"), ("pad_token", "[PAD]")):
            if getattr(tok, attr + "_id") is None:
                raise ValueError(f"qformer_tokenizer has no {attr} ({token})")

    def _need_qformer(self):
        if self.qformer_tokenizer is None:
            raise ValueError("this processor has no qformer_tokenizer")
        return self.qformer_tokenizer

    @property
    def cls_token_id(self) -> int:
        return self._need_qformer().cls_token_id

    @property
    def sep_token_id(self) -> int:
        return self._need_qformer().sep_token_id

    @property
    def pad_token_id(self) -> int:
        return self._need_qformer().pad_token_id

    @property
    def dec_token_id(self) -> Optional[int]:
        """[DEC], the BOS of ITG and Q-Former captions; None for a tokenizer without it (a
        retrieval checkpoint's plain BERT tokenizer: such a model matches but cannot caption)."""
        return qformer_token_ids(self._need_qformer())["dec_token_id"]

    def check_qformer_config(self, qformer_config) -> None:
        """ValueError naming the field when the tokenizer disagrees with a QFormerConfig."""
        tok = self._need_qformer()
        # The words (added tokens aside: an LLM-side `<image>` past the table is never Q-Former
        # text); the special ids are checked one by one below.
        if tok.vocab_size > qformer_config.vocab_size:
            raise ValueError(f"qformer.vocab_size ({qformer_config.vocab_size}) is smaller than the "
                             f"qformer_tokenizer's {tok.vocab_size} words")
        for name in ("cls_token_id", "sep_token_id", "pad_token_id", "dec_token_id"):
            mine, theirs = getattr(self, name), getattr(qformer_config, name)
            if mine != theirs:
                hint = " (it has no [DEC]: wrap it with make_qformer_tokenizer())" if mine is None else ""
                raise ValueError(f"qformer.{name} is {theirs} but the qformer_tokenizer's is {mine}{hint}")

    def qformer_text(self, texts: Sequence[str], max_len: Optional[int] = None) -> dict[str, Tensor]:
        """Texts -> text_ids (B, T) = [CLS] tokens [SEP] [PAD]..., text_mask (B, T).
        Right padding to the longest row; tokens cut so the row fits `max_len`
        (default qformer_max_len), [SEP] kept; from the left when the tokenizer says
        truncation_side "left". [CLS] is the row LAVIS swaps for [ENC]/[DEC]
        per task; the model does that."""
        tok = self._need_qformer()
        texts = _batch_list(texts, "texts")
        max_len = self.qformer_max_len if max_len is None else int(max_len)
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 ([CLS] and [SEP]), got {max_len}")
        pieces = tok([t.strip() for t in texts], add_special_tokens=False)["input_ids"]
        room = max_len - 2
        # A tokenizer saved with truncation_side "left" (InstructBLIP's) keeps a long prompt's end,
        # where the question and "Answer:" are.
        keep = (lambda p: p[len(p) - room:] if len(p) > room else p) if tok.truncation_side == "left" \
            else (lambda p: p[:room])
        rows = [[tok.cls_token_id, *keep(p), tok.sep_token_id] for p in pieces]
        ids, mask = _pad(rows, tok.pad_token_id, "right")
        return {"text_ids": ids, "text_mask": mask}

    def qformer_questions(self, questions: Sequence[str]) -> dict[str, Tensor]:
        """Questions for question-aware queries (paper Sec. 4.3 VQA fine-tuning):
        question_ids (B, T), question_mask (B, T), tokenised as qformer_text."""
        out = self.qformer_text([self._clean_question(q) for q in _batch_list(questions, "questions")])
        return {"question_ids": out["text_ids"], "question_mask": out["text_mask"]}

    def qformer_instructions(self, prompts: Sequence[str]) -> dict[str, Tensor]:
        """LLM prompts given to the Q-Former too (InstructBLIP's instruction-aware queries):
        question_ids (B, T), question_mask (B, T), tokenised as qformer_text (an empty prompt
        is [CLS][SEP], as transformers' processor makes it)."""
        out = self.qformer_text(prompts)
        return {"question_ids": out["text_ids"], "question_mask": out["text_mask"]}

    def decode_qformer(self, token_ids: Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Q-Former ids (B, L) -> texts, special tokens ([DEC], [SEP], [PAD]) dropped."""
        rows = token_ids.tolist() if isinstance(token_ids, Tensor) else [list(r) for r in token_ids]
        return [t.strip() for t in self._need_qformer().batch_decode(rows, skip_special_tokens=True)]

    # -- LLM tokens ---------------------------------------------------------------------------

    def _need_llm(self, kind: Optional[str] = None):
        if self.llm_tokenizer is None:
            raise ValueError("this processor has no LLM (llm_kind is 'none')")
        if kind is not None and self.llm_kind != kind:
            raise ValueError(f"this needs llm_kind={kind!r}, the processor has {self.llm_kind!r}")
        return self.llm_tokenizer

    def _encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids without any special token: those are placed by hand below, so the
        layout does not depend on each tokenizer's post-processing template."""
        return self.llm_tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _find_newline_id(self) -> int:
        # LAVIS blip2_opt: `eos_token_id = tokenizer("\n", add_special_tokens=False).input_ids[0]`.
        # The last id, so a sentencepiece tokenizer's leading "▁" piece is skipped (Llama).
        ids = self._encode(["\n"])[0]
        if not ids or "\n" not in self.llm_tokenizer.decode([ids[-1]]):
            raise ValueError(f"llm_tokenizer has no token for '\\n' (got ids {ids}); decoder-only LLMs "
                             f"end their text with it")
        return ids[-1]

    def _find_joiner(self) -> str:
        """What goes between a prompt and its text when they are tokenised apart, so the ids
        equal those of the joined string: " " for byte-level BPE (OPT, GPT-2: "Ġa" is a
        different token from "a"), "" for tokenizers that add their own word-start marker.
        Tokenising apart is what makes the prompt length exact (LAVIS's `prompt_length`
        silently assumes no merge across the boundary)."""
        prompt, text = "a photo of", "a dog"
        joint = self._encode([f"{prompt} {text}"])[0]
        head = self._encode([prompt])[0]
        for joiner in (" ", ""):
            if head + self._encode([joiner + text])[0] == joint:
                return joiner
        return " "

    @property
    def llm_bos_token_id(self) -> Optional[int]:
        return self._need_llm().bos_token_id

    @property
    def llm_pad_token_id(self) -> int:
        """The tokenizer's pad; GPT-2 and Llama have none, so their EOS pads (masked anyway)."""
        tok = self._need_llm()
        for value in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id):
            if value is not None:
                return value
        return 0

    @property
    def _newline_ends_text(self) -> bool:
        return self.llm_kind == "decoder" and self.stop_at_newline

    @property
    def _paper_answers(self) -> bool:
        """Answers in the paper's chat format, each ended by ".": a decoder-only BLIP-2 prompted
        the paper's way; not a chat template, not InstructBLIP's Vicuna (stop_at_newline off),
        whose answers run to its EOS (LAVIS blip2_vicuna_instruct)."""
        return self.llm_kind == "decoder" and not self.chat_template and self.stop_at_newline

    @property
    def llm_eos_token_id(self) -> int:
        """Where generated text ends: the id of "\\n" for decoder-only LLMs (what they are
        trained to emit after the text, LAVIS blip2_opt), EOS for encoder-decoders and for a
        decoder-only LLM with stop_at_newline off (InstructBLIP's Vicuna)."""
        tok = self._need_llm()
        return self._newline_id if self._newline_ends_text else tok.eos_token_id

    @property
    def llm_stop_token_ids(self) -> list[int]:
        """llm_eos_token_id plus the tokenizer's own EOS: a model that emits </s> instead of
        "\\n" (quantised or lightly trained) then stops rather than rambling."""
        ids = [self.llm_eos_token_id]
        eos = self._need_llm().eos_token_id
        if eos is not None and eos not in ids:
            ids.append(eos)
        return ids

    @property
    def answer_stop_token_ids(self) -> list[int]:
        """Where a generated answer ends: `llm_stop_token_ids` and, for a decoder-only LLM
        prompted the paper's way, the token of "." - the paper's multi-turn format ends every
        answer with one ("Question: {q} Answer: {a}."), so an LLM that learned that format goes
        on with the next "Question:" after it (`decode_answers` cuts there too)."""
        ids = list(self.llm_stop_token_ids)
        if self._paper_answers:
            dot = self._encode(["."])[0]
            if len(dot) == 1 and dot[0] not in ids:
                ids.append(dot[0])
        return ids

    def decode_answers(self, token_ids: Tensor | Sequence[Sequence[int]]) -> list[str]:
        """`decode_llm`, then (decoder-only, the paper's prompt) each answer cut at its first
        "." that ends a sentence (not the point of a number such as 2.5)."""
        texts = self.decode_llm(token_ids)
        if not self._paper_answers:
            return texts
        return [re.split(r"\.(?!\d)", t, maxsplit=1)[0].strip() for t in texts]

    def _join(self, prompt: str, text: str) -> str:
        return (self._joiner if prompt and text else "") + text

    def decoder_batch(self, prompts: Sequence[str], texts: Sequence[str]) -> dict[str, Tensor]:
        """Decoder-only LLM training rows (paper Sec. 3.3, LAVIS blip2_opt):

            llm_ids    [BOS][prompt][text]["\\n"][PAD]...   (B, T), right padded ([EOS] for "\\n"
                                                        with stop_at_newline off)
            llm_mask   1 on real tokens                      (B, T)
            llm_labels llm_ids, -100 on BOS, prompt, padding (B, T)

        The model prepends the Q visual tokens (label -100). Prompt and text are stripped and
        tokenised apart, so the number of masked prompt tokens is exact. Rows longer than
        llm_max_len lose the end of their text (and "\\n": the text did not end there), never
        the prompt; a prompt that leaves no room for text is an error.
        """
        tok = self._need_llm("decoder")
        prompts, texts = _batch_list(prompts, "prompts"), _batch_list(texts, "texts")
        if len(prompts) != len(texts):
            raise ValueError(f"got {len(prompts)} prompts for {len(texts)} texts")
        prompts = [p.strip() for p in prompts]
        bos = [] if tok.bos_token_id is None else [tok.bos_token_id]
        heads = [bos + p for p in self._encode(prompts)]
        end = "\n" if self.stop_at_newline else ""
        tails = self._encode([self._join(p, t.strip()) + end for p, t in zip(prompts, texts)])
        if not self.stop_at_newline:  # the text ends with EOS instead (LAVIS blip2_vicuna_instruct)
            tails = [t + [tok.eos_token_id] for t in tails]
        rows, n_masked = [], []
        for i, (head, tail) in enumerate(zip(heads, tails)):
            room = self.llm_max_len - len(head)
            if room < 1:
                raise ValueError(f"prompt {i} is {len(head)} tokens with BOS, leaving no room for text within "
                                 f"llm_max_len = {self.llm_max_len}; raise llm_max_len or shorten the prompt")
            rows.append(head + tail[:room])
            n_masked.append(len(head))
        ids, mask = _pad(rows, self.llm_pad_token_id, "right")  # (B, T)
        labels = ids.masked_fill(mask == 0, -100)  # (B, T); by mask, as pad may equal EOS (GPT-2)
        for i, n in enumerate(n_masked):
            labels[i, :n] = -100
        return {"llm_ids": ids, "llm_mask": mask, "llm_labels": labels}

    def encoder_decoder_batch(self, inputs: Sequence[str], targets: Sequence[str]) -> dict[str, Tensor]:
        """Encoder-decoder LLM training rows (paper Sec. 3.3, LAVIS blip2_t5):

            llm_ids, llm_mask                 encoder input  [input][EOS][PAD]...  (B, T)
            llm_target_ids, llm_target_mask   decoder target [target][EOS][PAD]... (B, L)
            llm_labels                        llm_target_ids, -100 on padding       (B, L)

        Both right padded, each cut to llm_max_len with EOS kept (the tokenizer truncation
        LAVIS uses). The model builds the decoder inputs by shifting the targets right.
        For pre-training, `inputs`/`targets` come from prefix_split; for captioning, the
        input is the caption prompt and the target the caption."""
        tok = self._need_llm("encoder_decoder")
        inputs, targets = _batch_list(inputs, "inputs"), _batch_list(targets, "targets")
        if len(inputs) != len(targets):
            raise ValueError(f"got {len(inputs)} inputs for {len(targets)} targets")
        eos, n = tok.eos_token_id, self.llm_max_len - 1
        src = [p[:n] + [eos] for p in self._encode([s.strip() for s in inputs])]
        tgt = [p[:n] + [eos] for p in self._encode([t.strip() for t in targets])]
        ids, mask = _pad(src, self.llm_pad_token_id, "right")  # (B, T)
        target_ids, target_mask = _pad(tgt, self.llm_pad_token_id, "right")  # (B, L)
        labels = target_ids.masked_fill(target_mask == 0, -100)  # (B, L)
        return {"llm_ids": ids, "llm_mask": mask, "llm_target_ids": target_ids,
                "llm_target_mask": target_mask, "llm_labels": labels}

    @staticmethod
    def prefix_split(text: str, rng: random.Random) -> tuple[str, str]:
        """The prefix-LM split of encoder-decoder pre-training (paper Sec. 3.3: "we split a
        text into two parts; the prefix text is concatenated with the visual representation
        as input to the LLM's encoder; the suffix text is the generation target").

        The paper does not say where to split. Here, as recorded in BLIP2_REFERENCE.md
        Sec. 3: at a word boundary, the prefix being k words with k uniform in
        [1, n_words // 2], so at least one word is given and at least half is generated.
        A text of fewer than 2 words has an empty prefix and is all suffix. Spacing inside
        each part is kept: for single-spaced text, prefix + " " + suffix == text.
        """
        spans = [m.span() for m in re.finditer(r"\S+", text)]  # (start, end) of each word
        if len(spans) < 2:
            return "", text.strip()
        k = rng.randint(1, len(spans) // 2)
        return text[spans[0][0]: spans[k - 1][1]], text[spans[k][0]: spans[-1][1]]

    # -- prompts ---------------------------------------------------------------------------

    def _clean_question(self, question: str) -> str:
        if not isinstance(question, str):
            raise TypeError(f"a question must be a string, got {type(question).__name__}")
        question = question.strip()
        if not question:
            raise ValueError("empty question")
        if len(question) > self.max_question_chars:
            warnings.warn(f"question truncated to max_question_chars = {self.max_question_chars} characters",
                          stacklevel=3)
            question = question[: self.max_question_chars].rstrip()
        return question

    def _answer_word(self) -> str:
        # Paper Sec. 4.2 / LAVIS: OPT is prompted "Answer:", FlanT5 "Short answer:".
        self._need_llm()
        return "Short answer:" if self.llm_kind == "encoder_decoder" else "Answer:"

    def vqa_prompt(self, question: str) -> str:
        """"Question: {q} Answer:" (decoder-only) or "Question: {q} Short answer:" (encoder-decoder);
        with `chat_template`, the question as the user's turn of the LLM's chat template."""
        if self.chat_template:
            return self.chat_prompt([], question)
        return f"Question: {self._clean_question(question)} {self._answer_word()}"

    def chat_prompt(self, history: Sequence[tuple[str, str]], question: str) -> str:
        """Multi-turn chat as in the paper's demos: past turns as "Question: {q} Answer: {a}."
        joined by spaces, then " Question: {q} Answer:" ("Short answer:" for T5). The caller
        keeps the history short: nothing is truncated here but each question.

        With `chat_template`: user / assistant messages rendered by the tokenizer's template,
        ending in the assistant's opening (SmolLM2: "...<|im_start|>assistant\n"). The
        template's leading BOS is dropped: `generation_batch` places BOS itself, after the
        visual prompt, as for every decoder-only row."""
        if self.chat_template:
            messages = []
            for q, a in history:
                messages += [{"role": "user", "content": self._clean_question(q)},
                             {"role": "assistant", "content": a.strip()}]
            messages.append({"role": "user", "content": self._clean_question(question)})
            text = self.llm_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            bos = self.llm_tokenizer.bos_token
            return text[len(bos):] if bos and text.startswith(bos) else text
        word = self._answer_word()
        turns = [f"Question: {self._clean_question(q)} {word} {a.strip()}." for q, a in history]
        return " ".join(turns + [self.vqa_prompt(question)])

    # -- generation ---------------------------------------------------------------------------

    def generation_batch(self, prompts: Sequence[str] | str) -> dict[str, Tensor]:
        """Prompts for LLM generation -> llm_ids (B, T), llm_mask (B, T); a single string is
        a batch of one. Decoder-only rows are [PAD]...[BOS][prompt], LEFT padded: every row's
        last prompt token sits in the last column, where the first new token follows (right
        padding would make short rows continue after their pads). Encoder-decoder rows are
        [prompt][EOS][PAD]..., right padded. Prompts are not truncated (LAVIS cuts them at
        max_txt_len from the right, which drops the "Answer:" of a long question). A chat-
        template prompt keeps its trailing newline (the assistant's turn opens with it)."""
        tok = self._need_llm()
        prompts = _batch_list([prompts] if isinstance(prompts, str) else prompts, "prompts")
        pieces = self._encode([p.lstrip() if self.chat_template and p.endswith("\n") else p.strip() for p in prompts])
        if self.llm_kind == "decoder":
            bos = [] if tok.bos_token_id is None else [tok.bos_token_id]
            rows = [bos + p for p in pieces]
            if not any(rows):
                raise ValueError("empty prompts and a tokenizer without BOS leave nothing to generate from")
            ids, mask = _pad(rows, self.llm_pad_token_id, "left")
        else:
            ids, mask = _pad([p + [tok.eos_token_id] for p in pieces], self.llm_pad_token_id, "right")
        return {"llm_ids": ids, "llm_mask": mask}

    def decode_llm(self, token_ids: Tensor | Sequence[Sequence[int]], prompt_width: int = 0) -> list[str]:
        """Generated ids (B, L) -> texts. `token_ids` are the new tokens only (what
        Blip2.generate_text returns); for full sequences pass `prompt_width` = the prompt's
        padded width to drop it, so the prompt is never echoed. Special tokens are skipped,
        decoder-only output is cut at the first "\\n" (its EOS), and whitespace stripped."""
        tok = self._need_llm()
        rows = token_ids.tolist() if isinstance(token_ids, Tensor) else [list(r) for r in token_ids]
        if rows and isinstance(rows[0], int):
            rows = [rows]  # one 1-D sequence
        rows = [r[prompt_width:] for r in rows]
        if self._newline_ends_text:
            rows = [r[: r.index(self._newline_id)] if self._newline_id in r else r for r in rows]
        texts = tok.batch_decode(rows, skip_special_tokens=True)
        if self._newline_ends_text:
            texts = [t.split("\n", 1)[0] for t in texts]  # a merged token ("\n\n", ".\n") may hide one
        return [t.strip() for t in texts]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(image_size={self.image_size}, llm_kind={self.llm_kind!r}, "
                f"qformer_max_len={self.qformer_max_len}, llm_max_len={self.llm_max_len})")
