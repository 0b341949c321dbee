"""The high-level API: `blip2lab.load(name_or_path)` -> a pipeline that captions, answers,
matches and embeds, taking PIL images, numpy arrays or paths and returning strings and
named scores. It holds a model and its processor and no model logic of its own: the app,
the CLI and the notebooks all go through it.

Sources `load` understands, in this order:
1. a shipped model name (`PRESETS`, the trained models under `models/`);
2. a blip2lab checkpoint folder (`config.json` + `model.safetensors`, tokenizers beside them);
   one saved with `rebuild_frozen=True` (mini-real) holds only the trained parts, and its
   frozen encoder, LLM and word embeddings are rebuilt from the packages its config names;
3. an official Salesforce checkpoint in Hugging Face layout: a local folder, or a hub id
   where a hub is reachable (`blip2lab.formats.hf`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from blip2lab.decoding.generation import DecodingConfig
from blip2lab.dtypes import as_dtype
from blip2lab.explain import CrossAttentionMaps, GradCam, cross_attention_maps, itm_gradcam
from blip2lab.formats.native import CONFIG_NAME, load_pretrained, save_pretrained
from blip2lab.formats.sources import tokenizer_from_path
from blip2lab.model.blip2 import Blip2
from blip2lab.paths import MODELS_DIR  # noqa: E402 (the shipped models)
from blip2lab.processor import Blip2Processor

QFORMER_TOKENIZER_DIR, LLM_TOKENIZER_DIR = "qformer_tokenizer", "llm_tokenizer"
# A pipeline folder may name its retrieval model: {"retrieval": "<folder, relative to this one>"}.
PIPELINE_NAME = "pipeline.json"

# Shipped, trained models (a name -> a folder under models/). Filled as models are trained
# and committed; each folder says how it was built.
PRESETS: dict[str, Path] = {p.name: p for p in sorted(MODELS_DIR.glob("*")) if (p / CONFIG_NAME).is_file()}

# Decoding defaults of the paper / LAVIS (BLIP2_REFERENCE.md Sec. 3); max_new_tokens counts new tokens only.
CAPTION_DECODING = dict(strategy="beam", num_beams=5, max_new_tokens=30, min_new_tokens=1)
VQA_DECODING = dict(strategy="beam", num_beams=5, max_new_tokens=10, length_penalty=-1.0)
QFORMER_CAPTION_DECODING = dict(strategy="beam", num_beams=3, max_new_tokens=29, min_new_tokens=9)
# An instruction-tuned chat LLM answering in sentences (mini-real's SmolLM2-135M) falls into
# loops ("tramp tramp tramp ...", "2019-01-22 2019-01-23 ..."): InstructBLIP's repetition
# penalty (LAVIS blip2_vicuna_instruct.generate: 1.5) and no 3-gram twice. The paper's
# decoding for OPT / FlanT5 has neither, and `no_loops` leaves those models alone.
NO_LOOP_DECODING = dict(repetition_penalty=1.5, no_repeat_ngram_size=3)


# transformers' `generate` keywords that caption / answer / the CLI take, with transformers'
# meaning, so code written for `model.generate(...)` runs unchanged; any other transformers
# keyword is refused by name (a silently ignored `max_length` would change the results).
HF_GENERATE_KEYWORDS = ("do_sample", "num_beams", "max_new_tokens", "min_new_tokens", "top_p", "top_k",
                        "temperature", "repetition_penalty", "length_penalty", "no_repeat_ngram_size")
# blip2lab's own names beside them: DecodingConfig fields, and LAVIS's sampling switch.
OWN_DECODING_KEYWORDS = ("strategy", "early_stopping", "seed", "use_nucleus_sampling")
HF_SAMPLING_TOP_K = 50  # transformers samples with top_k 50 when none is set (GenerationConfig defaults)
_LENGTH_HINTS = {"max_length": "max_new_tokens", "min_length": "min_new_tokens"}


def decoding_config(defaults: dict, **overrides: Any) -> DecodingConfig:
    """Defaults + user overrides: transformers' generate keywords (HF_GENERATE_KEYWORDS) or
    DecodingConfig's field names. `num_beams=1` means greedy, `num_beams>1` beam search;
    `do_sample=True` samples as transformers does (top_k 50 unless given, one beam);
    `do_sample=False` keeps the defaults' search; `use_nucleus_sampling=True` is LAVIS's
    sampling (top_p 0.9)."""
    _refuse_unknown(overrides)
    args = dict(defaults)
    if overrides.pop("use_nucleus_sampling", False):
        if overrides.get("do_sample") is False:
            raise ValueError("use_nucleus_sampling=True and do_sample=False contradict each other")
        args.update(strategy="sample", top_p=overrides.pop("top_p", 0.9))
    do_sample = overrides.pop("do_sample", None)
    if do_sample is not None and not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be True or False, got {do_sample!r}")
    if do_sample:
        if overrides.get("num_beams", 1) != 1:
            raise ValueError(f"do_sample=True with num_beams={overrides['num_beams']} is transformers' beam "
                             "sampling, which blip2lab does not implement: sample with num_beams=1, or search "
                             "with do_sample=False")
        args.update(strategy="sample", num_beams=1, top_k=overrides.pop("top_k", HF_SAMPLING_TOP_K))
    elif do_sample is False and args["strategy"] == "sample" and "strategy" not in overrides:
        args["strategy"] = "beam" if overrides.get("num_beams", args["num_beams"]) > 1 else "greedy"
    args.update(overrides)
    if "num_beams" in overrides and "strategy" not in overrides and args["strategy"] != "sample":
        args["strategy"] = "beam" if args["num_beams"] > 1 else "greedy"
    return DecodingConfig(**args)


def _refuse_unknown(overrides: dict) -> None:
    unknown = sorted(set(overrides) - set(HF_GENERATE_KEYWORDS) - set(OWN_DECODING_KEYWORDS))
    if not unknown:
        return
    hints = [f"{k}: lengths count new tokens only here, use {_LENGTH_HINTS[k]}" for k in unknown if k in _LENGTH_HINTS]
    raise TypeError(f"unsupported decoding keyword(s) {unknown}" + (f" ({'; '.join(hints)})" if hints else "")
                    + f"; transformers' keywords taken: {list(HF_GENERATE_KEYWORDS)}; blip2lab's own: "
                    f"{list(OWN_DECODING_KEYWORDS)}")


def lavis_decoding(use_nucleus_sampling: bool, num_beams: int, max_new_tokens: int, min_length: int = 0,
                   temperature: float = 1.0, top_p: float = 0.9, length_penalty: float = 1.0,
                   repetition_penalty: float = 1.0, seed: Optional[int] = None) -> dict[str, Any]:
    """LAVIS's generate() arguments (its demo's controls) -> `decoding_config` overrides. Each
    strategy keeps only what it reads (beams and length penalty: beam search; temperature,
    top-p and seed: sampling), and min_length, in new tokens, is capped at max_new_tokens."""
    common = dict(max_new_tokens=max_new_tokens, min_new_tokens=min(min_length, max_new_tokens),
                  repetition_penalty=repetition_penalty)
    if use_nucleus_sampling:
        return common | dict(use_nucleus_sampling=True, top_p=top_p, temperature=temperature, seed=seed)
    return common | dict(num_beams=num_beams, length_penalty=length_penalty)


def no_loops(processor: Blip2Processor, decoding: dict[str, Any]) -> dict[str, Any]:
    """`decoding` (overrides of `decoding_config`) for a model whose LLM answers through a
    chat template: at least NO_LOOP_DECODING's penalties, and beam search's length penalty at
    least 1 (VQA's -1 picks the shortest finished beam: a sentence then stops at "you can see:"
    whatever max_new_tokens allows). Unchanged for every other model."""
    if not processor.chat_template:
        return dict(decoding)
    out = dict(decoding)
    out["repetition_penalty"] = max(float(out.get("repetition_penalty", 1.0)), NO_LOOP_DECODING["repetition_penalty"])
    out["no_repeat_ngram_size"] = out.get("no_repeat_ngram_size") or NO_LOOP_DECODING["no_repeat_ngram_size"]
    if not out.get("use_nucleus_sampling"):
        out["length_penalty"] = max(float(out.get("length_penalty", 1.0)), 1.0)
    return out


class Blip2Pipeline:
    """A model + its processor. `retrieval`: an optional second model with ITC/ITM heads for
    `match` / `embed_*` when `model` (a stage-2 checkpoint) has none; it shares the frozen
    image encoder with `model` instead of holding a second copy."""

    def __init__(self, model: Blip2, processor: Blip2Processor, retrieval: Optional[Blip2] = None,
                 retrieval_processor: Optional[Blip2Processor] = None, name: str = ""):
        self.model = model.eval()
        self.processor = processor
        self.retrieval = retrieval.eval() if retrieval is not None else None
        self.retrieval_processor = retrieval_processor or processor
        self.name = name

    @property
    def device(self) -> torch.device:
        return self.model.ln_vision.weight.device

    def set_llm_dtype(self, llm_dtype: Optional[str | torch.dtype]) -> Optional[torch.dtype]:
        """The frozen LLM's precision for inference: None keeps the checkpoint's (fp32 on the
        CPU, what every evaluation here ran in); "auto" is bf16 where this device runs it
        natively (a CPU with AVX512-BF16 or AMX, most GPUs), else unchanged; or a torch dtype
        (or its name). Decoding is bound by reading the LLM's weights, so bf16 roughly halves it (the
        README's mini-real latency). Returns the LLM's dtype (None without an LLM)."""
        llm = self.model.llm
        dtype = _llm_dtype(llm_dtype, self.device)
        if llm is None:
            return None
        if dtype is not None and dtype != llm.model.dtype:
            llm.to_dtype(dtype)
        return llm.model.dtype

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.model.parameters())
        llm = self.model.config.llm.kind
        return f"Blip2Pipeline({self.name or 'model'}: {n / 1e6:.1f}M parameters, llm={llm}, device={self.device})"

    # -- images -> model space -------------------------------------------------------------

    def _image(self, images: Any, model: Optional[Blip2] = None) -> Tensor:
        """Anything `load_image` takes (or a list of them), or pixels (B, 3, S, S) already made by
        `processor.images` (the evaluation runner prepares them ahead) -> ln_vision output (B, N, D_v)."""
        model = model or self.model
        if isinstance(images, Tensor) and images.ndim == 4:  # load_image takes no tensor: never ambiguous
            return model.encode_image(images.to(self.device))
        batch = images if isinstance(images, (list, tuple)) else [images]
        pixels = self.processor.images(batch).to(self.device)
        return model.encode_image(pixels)

    # -- generation ------------------------------------------------------------------------

    @torch.no_grad()
    def caption(self, images: Any, prompt: Optional[str] = None, **decoding: Any) -> list[str]:
        """One caption per image. With an LLM: prompted by `prompt` (default: the model's
        captioning prompt, "a photo of"), beams 5, up to 30 new tokens. Without one: the
        Q-Former's own ITG decoder (LAVIS defaults, beams 3). `decoding`: transformers'
        generate keywords (HF_GENERATE_KEYWORDS) or DecodingConfig's (`decoding_config`)."""
        image = self._image(images)
        if self.model.llm is None:
            untrained = getattr(getattr(self.model, "official", None), "untrained", ())
            if any(k.startswith("qformer.lm_head.") for k in untrained):
                raise ValueError(f"{self.name or 'this model'} cannot caption: it has no language model, and its "
                                 "Q-Former LM head was never trained (Hugging Face retrieval checkpoints do not store "
                                 "it); it can match and embed")
            ids = self.model.generate_captions(image, decoding_config(QFORMER_CAPTION_DECODING, **decoding))
            return self.processor.decode_qformer(ids)
        prompt = self.processor.caption_prompt if prompt is None else prompt
        prompts = [prompt] * image.shape[0]
        return self._generate(image, prompts, decoding_config(CAPTION_DECODING, **decoding),
                              self._qformer_text(None, prompts))

    @torch.no_grad()
    def answer(self, images: Any, questions: str | Sequence[str],
               history: Optional[Sequence[Sequence[tuple[str, str]]]] = None, **decoding: Any) -> list[str]:
        """Answers, one per (image, question). `history`: per image, earlier (question,
        answer) turns of a chat, concatenated as the reference does. A single image or
        question is broadcast over the other. Decoding: beams 5, up to 10 new tokens, length
        penalty -1, overridden as in `caption`."""
        if self.model.llm is None:
            raise ValueError(f"{self.name or 'this model'} has no language model: it can caption and match, "
                             "not answer questions")
        image, questions = _pair_up(self._image(images), questions, "questions")
        B = image.shape[0]
        history = history or [[] for _ in range(B)]
        prompts = [self.processor.chat_prompt(h, q) if h else self.processor.vqa_prompt(q)
                   for h, q in zip(history, questions)]
        return self._generate(image, prompts, decoding_config(VQA_DECODING, **decoding),
                              self._qformer_text(questions, prompts), answer=True)

    def _qformer_text(self, questions: Optional[list[str]], prompts: list[str]) -> Optional[dict]:
        """What the Q-Former reads beside the queries: nothing (BLIP-2), the question (the
        paper's VQA fine-tuning, `qformer_question`) or the whole LLM prompt (InstructBLIP,
        `qformer_instruction`)."""
        config = self.model.config
        if config.qformer_instruction:
            return self.processor.qformer_instructions(prompts)
        if config.qformer_question and questions is not None:
            return self.processor.qformer_questions(questions)
        return None

    def _generate(self, image: Tensor, prompts: list[str], decoding: DecodingConfig,
                  question_batch: Optional[dict] = None, answer: bool = False) -> list[str]:
        """`answer`: the text ends where an answer ends (Blip2Processor.answer_stop_token_ids)."""
        proc = self.processor
        batch = {k: v.to(self.device) for k, v in proc.generation_batch(prompts).items()}
        q = {} if question_batch is None else {k: v.to(self.device) for k, v in question_batch.items()}
        tokens = self.model.generate_text(image, batch["llm_ids"], batch["llm_mask"], decoding,
                                          eos_token_id=proc.answer_stop_token_ids if answer else proc.llm_stop_token_ids,
                                          pad_token_id=proc.llm_pad_token_id, **q)
        return proc.decode_answers(tokens) if answer else proc.decode_llm(tokens)

    # -- matching and embeddings ---------------------------------------------------------

    def scorer(self) -> tuple[Blip2, Blip2Processor]:
        """The (model, processor) that matches, embeds and retrieves: a retrieval model, when
        given, wins over the model's own heads: after stage 2 the Q-Former has moved on from
        the stage-1 heads it kept (BLIP-2 retrieves with the stage-1 model, never the stage-2 one)."""
        if self.retrieval is not None:
            return self.retrieval, self.retrieval_processor
        if self.model.has_stage1_heads:
            return self.model, self.processor
        raise ValueError(f"{self.name or 'this model'} has no ITC/ITM heads (a stage-2 checkpoint): load it with "
                         "retrieval=... (e.g. an itm-vit-g checkpoint) to match and embed")

    @torch.no_grad()
    def match(self, images: Any, texts: str | Sequence[str]) -> dict[str, Tensor]:
        """Scores of image i with text i (a single image or text is broadcast):
        `itm_prob` (ITM head, softmax probability of "match"), `itm_logit` (its raw
        positive logit) and `itc_cosine` (the ITC cosine, max over queries; not a probability)."""
        model, proc = self.scorer()
        image, texts = _pair_up(self._image(images, model), texts, "texts")
        t = {k: v.to(self.device) for k, v in proc.qformer_text(texts).items()}
        logits = model.itm_logits(image, t["text_ids"], t["text_mask"])  # (B, 2)
        img = model.image_features(image).proj  # (B, Q, E)
        txt = model.text_features(t["text_ids"], t["text_mask"]).proj  # (B, E)
        cosine = torch.einsum("bqe,be->bq", img, txt).amax(dim=-1)  # (B,)
        return {"itm_prob": logits.softmax(-1)[:, 1], "itm_logit": logits[:, 1], "itc_cosine": cosine}

    @torch.no_grad()
    def embed_images(self, images: Any) -> Tensor:
        """ITC image embeddings, L2-normalised, one per query: (B, Q, E)."""
        model, _ = self.scorer()
        return model.image_features(self._image(images, model)).proj

    @torch.no_grad()
    def embed_texts(self, texts: str | Sequence[str]) -> Tensor:
        """ITC text embeddings ([CLS] projection), L2-normalised: (B, E)."""
        model, proc = self.scorer()
        t = {k: v.to(self.device) for k, v in proc.qformer_text([texts] if isinstance(texts, str) else texts).items()}
        return model.text_features(t["text_ids"], t["text_mask"]).proj

    # -- where the Q-Former looks (blip2lab.explain) ------------------------------------------

    @torch.no_grad()
    def attention_maps(self, image: Any) -> CrossAttentionMaps:
        """The queries' cross-attention over one image's patches, every layer and head (the
        queries the LLM is shown, or the ITC image side of a stage-1 model)."""
        return cross_attention_maps(self.model, self._image([image]))

    def gradcam(self, image: Any, text: str, layer: Optional[int] = None) -> GradCam:
        """Grad-CAM of the ITM score of (image, text), per word, at one cross-attention layer."""
        model, proc = self.scorer()
        t = {k: v.to(self.device) for k, v in proc.qformer_text([text]).items()}
        tok = proc.qformer_tokenizer
        tokens = tok.convert_ids_to_tokens(t["text_ids"][0].tolist())
        special = {tok.cls_token, tok.sep_token, tok.pad_token, "[DEC]"}
        with torch.no_grad():
            image_tokens = self._image([image], model)  # (1, N, D_v); the gradient starts at ln_vision's output
        return itm_gradcam(model, image_tokens, t["text_ids"], t["text_mask"], tokens, special, layer)

    # -- persistence -----------------------------------------------------------------------

    def save(self, path: str | Path, dtype: Optional[torch.dtype] = None, retrieval: Optional[str] = None,
             rebuild_frozen: bool = False) -> Path:
        """A blip2lab checkpoint folder that `load` reopens offline: weights (at `dtype` if
        given), config, tokenizers, and optionally a link to a retrieval model folder
        (`retrieval`, relative to this folder), which `load` then opens beside it.
        `rebuild_frozen=True` stores only what trained: the frozen parts are rebuilt from
        their sources when the folder is loaded (weights.save_pretrained; mini-real)."""
        path = save_pretrained(self.model, path, dtype, rebuild_frozen=rebuild_frozen)
        if retrieval is not None:
            (path / PIPELINE_NAME).write_text(json.dumps({"retrieval": retrieval}, indent=2) + "\n")
        if self.processor.qformer_tokenizer is not None:
            self.processor.qformer_tokenizer.save_pretrained(path / QFORMER_TOKENIZER_DIR)
        if self.processor.llm_tokenizer is not None:
            self.processor.llm_tokenizer.save_pretrained(path / LLM_TOKENIZER_DIR)
        return path


def _pair_up(image: Tensor, texts: str | Sequence[str], what: str) -> tuple[Tensor, list[str]]:
    """Image i with text i; a single image or a single text is repeated to match the other."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    B = max(image.shape[0], len(texts))
    if image.shape[0] == 1 and B > 1:
        image = image.expand(B, -1, -1)
    if len(texts) == 1 and B > 1:
        texts = texts * B
    if len(texts) != image.shape[0]:
        raise ValueError(f"{image.shape[0]} images but {len(texts)} {what}")
    return image, texts


def _is_blip2lab_folder(path: Path) -> bool:
    if not (path / CONFIG_NAME).is_file():
        return False
    config = json.loads((path / CONFIG_NAME).read_text())
    return "qformer" in config and "vision" in config


def _load_blip2lab(path: Path, device: str, dtype=None, **unknown: Any) -> Blip2Pipeline:
    """A blip2lab folder; `dtype` casts every floating tensor after loading ("auto" or None:
    as trained, fp32)."""
    if unknown:
        raise TypeError(f"{path} is a blip2lab folder: load() options {sorted(unknown)} apply to official "
                        f"checkpoints only")
    model = load_pretrained(path, map_location=device)
    dtype = as_dtype(dtype)
    if isinstance(dtype, torch.dtype):
        if model.llm is not None:
            model.llm.to_dtype(dtype)  # refuses float16 for T5
        model.to(dtype)
    qtok = tokenizer_from_path(path / QFORMER_TOKENIZER_DIR) if (path / QFORMER_TOKENIZER_DIR).is_dir() else None
    ltok = tokenizer_from_path(path / LLM_TOKENIZER_DIR) if (path / LLM_TOKENIZER_DIR).is_dir() else None
    return Blip2Pipeline(model, Blip2Processor.from_config(model.config, qtok, ltok), name=path.name)


def _load_official(source: str, device: str, **kwargs: Any) -> Blip2Pipeline:
    from blip2lab.formats import hf as official

    qtok, ltok = official.load_official_tokenizers(source)
    model = official.load_official(source, qformer_tokenizer=qtok, **kwargs).to(device)
    return Blip2Pipeline(model, Blip2Processor.from_config(model.config, qtok, ltok, check=qtok is not None),
                         name=str(source))


def load(name_or_path: str | Path, retrieval: Optional[str | Path] = None, device: str = "cpu",
         llm_dtype: Optional[str] = None, **kwargs: Any) -> Blip2Pipeline:
    """A ready pipeline for a shipped model name, a blip2lab folder, or an official
    checkpoint (folder or hub id). `retrieval`: a second source with ITC/ITM heads, used by
    `match` / `embed_*`; it shares the frozen image encoder with the first when both
    towers hold the same weights. `llm_dtype`: the frozen LLM's precision
    (`Blip2Pipeline.set_llm_dtype`: None keeps the checkpoint's, "auto" bf16 where native)."""
    dtype = _llm_dtype(llm_dtype, device)
    pipe = _load_one(name_or_path, device, llm_dtype=dtype, **kwargs)
    pipe.set_llm_dtype(dtype)  # a blip2lab folder's LLM (an official one was read in it already)
    if retrieval is None:
        retrieval = _linked_retrieval(name_or_path)
    if retrieval is not None:
        other = _load_one(retrieval, device, **kwargs)
        if _same_weights(pipe.model.image_encoder, other.model.image_encoder):
            other.model.image_encoder = pipe.model.image_encoder  # one copy of the frozen tower
        pipe.retrieval, pipe.retrieval_processor = other.model, other.processor
    return pipe


def _linked_retrieval(name_or_path: str | Path) -> Optional[Path]:
    """The retrieval folder a blip2lab folder links to in its pipeline.json, if any."""
    folder = PRESETS.get(str(name_or_path), Path(name_or_path).expanduser())
    link = folder / PIPELINE_NAME
    if not link.is_file():
        return None
    target = (folder / json.loads(link.read_text())["retrieval"]).resolve()
    if not _is_blip2lab_folder(target):
        raise ValueError(f"{link} links to {target}, which is not a blip2lab checkpoint folder")
    return target


def _llm_dtype(llm_dtype: Optional[str | torch.dtype], device: torch.device | str) -> Optional[torch.dtype]:
    """`llm_dtype` of `load` / `set_llm_dtype` -> the dtype for the frozen LLM (None: keep its own)."""
    dtype = as_dtype(llm_dtype, "llm_dtype")
    if dtype == "auto":
        from blip2lab.dtypes import native_bf16

        return torch.bfloat16 if native_bf16(device) else None
    return dtype


def _load_one(name_or_path: str | Path, device: str, llm_dtype: Optional[torch.dtype] = None,
              **kwargs: Any) -> Blip2Pipeline:
    """One source. An official checkpoint reads its LLM straight into `llm_dtype` (no fp32 copy
    first); a blip2lab folder's LLM is cast after loading (`load`)."""
    source = str(name_or_path)
    if source in PRESETS:
        return _load_blip2lab(PRESETS[source], device, **kwargs)
    path = Path(source).expanduser()
    if path.is_dir() and _is_blip2lab_folder(path):
        return _load_blip2lab(path, device, **kwargs)
    if path.is_dir() or (source.count("/") == 1 and not path.exists() and not source.startswith((".", "/"))):
        return _load_official(source, device, llm_dtype=llm_dtype, **kwargs)
    raise ValueError(f"unknown model {source!r}: not a shipped model ({sorted(PRESETS) or 'none shipped yet'}), "
                     "not a blip2lab checkpoint folder, and not a Hugging Face folder or hub id "
                     f"(e.g. one of {_official_ids()})")


def _official_ids() -> list[str]:
    try:
        from blip2lab.formats.hf import KNOWN_CHECKPOINTS

        return sorted(KNOWN_CHECKPOINTS)[:3] + ["..."]
    except ImportError:
        return []


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)
