"""Typed, nested configuration for every part of BLIP-2.

One dataclass per component (vision, Q-Former, LLM), one for the whole model and one
for training. Derived values are properties, never frozen defaults; every config
validates itself in ``__post_init__`` with errors that name the field.

Overrides use one syntax for any field of any of these configs or of a recipe's preset,
``a.b=value`` (``--set train.lr=3e-4`` on every command line), parsed against the field's
declared type; unknown keys are rejected with a message naming the key (`apply_overrides`,
`from_preset`). Configs round-trip through JSON (``to_dict`` / ``from_dict``), which is how a
checkpoint's ``config.json`` and a run's resolved config are written and read.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Optional, Sequence

__all__ = [
    "ConfigError",
    "VisionConfig",
    "QFormerConfig",
    "LLMConfig",
    "Blip2Config",
    "TrainConfig",
    "to_dict",
    "from_dict",
    "apply_overrides",
    "from_preset",
    "save_json",
    "load_json",
]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # the normalisation EVA-CLIP and BLIP-2 use
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LOSS_NAMES = ("itc", "itm", "itg", "lm")  # stage 1: itc, itm, itg; stage 2: lm


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the field."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass
class VisionConfig:
    """The frozen image encoder (paper Sec. 3.1: EVA-CLIP ViT-g without its last block)."""

    # "open_clip": any open_clip vision tower (custom sizes below, or `model_name`);
    # "hf_blip2": transformers' Blip2VisionModel, the layout of the official checkpoints;
    # "efficientnet": a timm EfficientNet CNN (`model_name`), its feature map as tokens. For
    # it `layers` counts the feature taps (the stages, then the head conv), `patch_size` is
    # the chosen tap's stride and `width` its channels; heads, mlp_dim and the LayerNorm
    # eps do not apply.
    backend: Literal["open_clip", "hf_blip2", "efficientnet"] = "open_clip"
    # An open_clip architecture name (e.g. "ViT-B-16"; None builds the ViT described below),
    # or the timm name of the EfficientNet (e.g. "tf_efficientnet_lite0").
    model_name: Optional[str] = None
    # Pretrained tower weights loaded when the encoder is built: a state-dict file, or
    # `package:NAME/path` inside an installed package (blip2lab.formats.sources). None: random
    # weights, for a checkpoint to fill (the open_clip and HF backends always start so).
    weights: Optional[str] = None
    image_size: int = 224  # the paper pre-trains at 224 px
    # The size the tower's position embeddings were learned at, when fine-tuning moved them
    # to `image_size` (bicubic over the patch grid, [CLS] kept: training/resolution.py; the
    # paper fine-tunes at 364 px a tower pre-trained at 224, Sec. 4). None: not resized. A
    # named open_clip architecture is then built at `image_size`, not its own size.
    resized_from: Optional[int] = None
    patch_size: int = 14  # EVA ViT-g: 14 -> 16x16 patches + [CLS] = 257 tokens
    width: int = 1408  # D_v; 1408 for EVA ViT-g, 1024 for CLIP ViT-L
    layers: int = 39  # blocks the tower is built with
    heads: int = 16
    mlp_dim: Optional[int] = None  # FFN width; None -> 4 * width (EVA ViT-g uses 6144)
    # Which block's output feeds the Q-Former. The paper removes the last layer of the ViT
    # and uses the second-to-last layer's output (Sec. 3.1), hence -2 for a full tower.
    # The official HF checkpoints already dropped that block (39 of 40): use -1 there.
    layer_index: int = -2
    layer_norm_eps: float = 1e-6  # the tower's own LayerNorms (EVA / HF: 1e-6)
    # eps of the trainable `ln_vision` after the frozen tower. LAVIS uses 1e-5; HF's
    # `post_layernorm` (the same weights) uses the vision config's 1e-6: a parity trap, so
    # loaders set it to whatever the source checkpoint was trained with.
    ln_vision_eps: float = 1e-5
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    # Recompute each block's activations in the backward pass instead of keeping them:
    # less memory for a slower step. Matters only for an unfrozen tower (fine-tuning the ViT,
    # LAVIS `use_grad_checkpoint`); a frozen one runs without gradients and keeps nothing.
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        _check(self.backend in ("open_clip", "hf_blip2", "efficientnet"),
               f"vision.backend must be 'open_clip', 'hf_blip2' or 'efficientnet', got {self.backend!r}")
        for name in ("image_size", "patch_size", "width", "layers", "heads"):
            _check(getattr(self, name) > 0, f"vision.{name} must be > 0, got {getattr(self, name)}")
        _check(self.resized_from is None or (self.resized_from > 0 and self.resized_from != self.image_size),
               f"vision.resized_from must be None or a size > 0 other than vision.image_size, got {self.resized_from}")
        _check(self.image_size % self.patch_size == 0,
               f"vision.image_size ({self.image_size}) must be a multiple of vision.patch_size ({self.patch_size})")
        _check(self.backend == "efficientnet" or self.width % self.heads == 0,
               f"vision.width ({self.width}) must be divisible by vision.heads ({self.heads})")
        _check(-self.layers <= self.layer_index < self.layers,
               f"vision.layer_index ({self.layer_index}) is outside a tower of {self.layers} layers")
        _check(len(self.mean) == 3 and len(self.std) == 3, "vision.mean and vision.std need 3 values")

    @property
    def intermediate_size(self) -> int:
        return self.mlp_dim if self.mlp_dim is not None else 4 * self.width

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        """N: patch tokens plus [CLS] (257 at 224 px / 14). A CNN's first token is its
        feature map's mean, in [CLS]'s place (50 for EfficientNet's 7x7 head map)."""
        return self.grid_size**2 + 1

    @property
    def used_layers(self) -> int:
        """How many blocks actually run: the ones after `layer_index` are never computed."""
        return self.layer_index % self.layers + 1


@dataclass
class QFormerConfig:
    """The Querying Transformer (paper Sec. 3.1): BERT-base shaped by default."""

    hidden_size: int = 768  # D_q
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: Optional[int] = None  # FFN width; None -> 4 * hidden_size (3072)
    num_queries: int = 32  # Q, the learned query embeddings
    cross_attention_freq: int = 2  # cross-attention on layers 0, 2, 4, ... (LAVIS default)
    vocab_size: int = 30523  # bert-base-uncased (30522) + the added [DEC] token
    max_position_embeddings: int = 512
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12  # BERT's
    init_std: float = 0.02  # normal init of queries and fresh (cross-attention) weights
    max_text_len: int = 32  # the paper's text length for stage 1
    # Special token ids of bert-base-uncased: [PAD] 0, [CLS] 101, [SEP] 102 (EOS), [DEC] 30522 (BOS for ITG).
    # None: the vocabulary has no such token. The official generation checkpoints keep BERT's
    # 30522 words without LAVIS's added [DEC] (their config leaves vocab_size at its default,
    # and they carry no Q-Former word embeddings at all): such a model loads, and only what
    # needs the token refuses, by name (ITG and Q-Former captioning need [DEC]; the ITC text
    # side [CLS]; Q-Former captions end at [SEP]).
    pad_token_id: int = 0
    cls_token_id: Optional[int] = 101
    sep_token_id: Optional[int] = 102
    dec_token_id: Optional[int] = 30522
    # A BERT-like checkpoint in transformers format on disk to copy self-attention, FFNs and
    # embeddings from (the paper starts from bert-base-uncased). None: random init.
    init_from: Optional[str] = None
    # How the learned queries start. "normal": normal(0, init_std), as LAVIS. "text" (a
    # deviation, needs init_from): query i starts as the checkpoint's embedding of a fixed
    # random word at position i, so the copied self-attention sees a sentence of distinct
    # tokens, not Q random directions. With all-MiniLM-L6-v2 (a sentence encoder trained for
    # mean pooling) random queries leave the Q-Former as one vector (outputs' cosine 0.84 on
    # a photo before training); "text" queries leave them 0.27 apart (recipes/minireal.py).
    query_init: str = "normal"
    # The text side (word/position embeddings, text FFNs, LM head). Stage-2 checkpoints of
    # LAVIS and HF drop it (HF `use_qformer_text_input=False`); stage 1, retrieval and the
    # question-aware VQA variant need it.
    text_input: bool = True
    # With text_input: the heads stage 1 trains beside the text side, the LM head of ITG and
    # Q-Former captions and the ITC / ITM heads (vision_proj, text_proj, itm_head, temp).
    # InstructBLIP's Q-Former reads text (the instruction) but its checkpoints carry none of
    # these heads (HF `InstructBlipQFormerModel`): False there.
    stage1_heads: bool = True
    # A deviation, off in the paper (which trains every Q-Former weight): keep the word
    # embeddings copied from `init_from` frozen, and the rows it lacks ([DEC]) at a fixed
    # draw, so building the model from this config rebuilds the whole table and a checkpoint
    # need not store it (weights.save_pretrained(rebuild_frozen=True)). For a 30k-word
    # vocabulary that is a third of a small Q-Former: 11.7M of mini-real's 33.7M.
    freeze_word_embeddings: bool = False
    # Recompute each layer's activations in the backward pass instead of keeping them (HF's
    # gradient_checkpointing): peak training memory drops by about the activations of all
    # layers but one, for roughly one more forward pass of compute. Training only.
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_queries", "cross_attention_freq",
                     "vocab_size", "max_position_embeddings", "max_text_len"):
            _check(getattr(self, name) > 0, f"qformer.{name} must be > 0, got {getattr(self, name)}")
        _check(self.hidden_size % self.num_heads == 0,
               f"qformer.hidden_size ({self.hidden_size}) must be divisible by qformer.num_heads ({self.num_heads})")
        _check(0.0 <= self.hidden_dropout < 1.0, f"qformer.hidden_dropout must be in [0, 1), got {self.hidden_dropout}")
        _check(0.0 <= self.attention_dropout < 1.0,
               f"qformer.attention_dropout must be in [0, 1), got {self.attention_dropout}")
        _check(self.max_text_len <= self.max_position_embeddings,
               f"qformer.max_text_len ({self.max_text_len}) exceeds qformer.max_position_embeddings "
               f"({self.max_position_embeddings})")
        _check(not self.freeze_word_embeddings or (self.text_input and self.init_from is not None),
               "qformer.freeze_word_embeddings needs qformer.text_input=True and qformer.init_from (the "
               "checkpoint the frozen table is copied from)")
        _check(self.query_init in ("normal", "text"), f"qformer.query_init must be 'normal' or 'text', got "
                                                         f"{self.query_init!r}")
        _check(self.query_init == "normal" or (self.text_input and self.init_from is not None),
               "qformer.query_init='text' needs qformer.text_input=True and qformer.init_from (whose embeddings "
               "the queries start from)")
        for name in ("pad_token_id", "cls_token_id", "sep_token_id", "dec_token_id"):
            value = getattr(self, name)
            _check(value is None or 0 <= value < self.vocab_size,
                   f"qformer.{name} ({value}) must be a valid id below qformer.vocab_size ({self.vocab_size}), "
                   f"or None when the vocabulary has no such token")
        _check(self.pad_token_id is not None, "qformer.pad_token_id must be an id (padding is always needed)")

    def token_id(self, name: str, needed_for: str) -> int:
        """The id of special token `name` ("dec", "cls", "sep"), or an error naming what needs
        it, when this Q-Former's vocabulary has none (`*_token_id` None)."""
        value = getattr(self, f"{name}_token_id")
        if value is None:
            raise ValueError(f"{needed_for} needs the Q-Former's [{name.upper()}] token, which this model's vocabulary "
                             f"lacks (qformer.{name}_token_id is None; qformer.vocab_size {self.vocab_size}). "
                             f"Official generation checkpoints keep BERT's words without LAVIS's [DEC]: use a "
                             f"retrieval checkpoint (Salesforce/blip2-itm-vit-g) or a blip2lab stage-1 model")
        return value

    @property
    def ffn_size(self) -> int:
        return self.intermediate_size if self.intermediate_size is not None else 4 * self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_freq == 0

    @property
    def cross_attention_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.has_cross_attention(i)]


@dataclass
class LLMConfig:
    """The frozen LLM of stage 2 (paper Sec. 3.3). `kind="none"` is a stage-1-only model."""

    kind: Literal["none", "decoder", "encoder_decoder"] = "none"
    name_or_path: Optional[str] = None  # a transformers model folder (or hub id where a hub is reachable)
    # Frozen-LLM precision: "auto" = fp32 on CPU, bf16 (else fp16; T5 never fp16) on GPU.
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    prompt: str = "a photo of"  # the captioning prompt of the paper
    max_text_len: int = 32  # LLM tokens of prompt + text in stage 2
    # Questions (VQA and chat) through the LLM tokenizer's chat template instead of the
    # paper's "Question: {q} Answer:": for instruction-tuned LLMs (SmolLM2-Instruct), which
    # answer as the assistant they were tuned to be. Captioning keeps the plain prompt.
    chat_template: bool = False
    # Decoder-only LLMs: the text ends at "\n" (BLIP-2's OPT rows end with it, LAVIS blip2_opt:
    # generation stops there and the text is cut there), or, False, at the tokenizer's EOS only
    # (InstructBLIP's Vicuna: LAVIS blip2_vicuna_instruct ends its targets with </s>).
    stop_at_newline: bool = True
    # A deviation, "none" in the paper (the projection's output goes to the LLM as it is):
    # "embedding" rescales each visual prompt vector to the mean norm of the LLM's word
    # embeddings (a fixed scale; the direction stays the projection's). In the shapes world the
    # caption-trained prompt grows to ~12x a word's norm, and the small pre-LN OPT then stops
    # reading it when it answers a question (docs/ablations.md, zero-shot VQA).
    visual_prompt_norm: Literal["none", "embedding"] = "none"

    def __post_init__(self) -> None:
        _check(self.kind in ("none", "decoder", "encoder_decoder"),
               f"llm.kind must be 'none', 'decoder' or 'encoder_decoder', got {self.kind!r}")
        _check(self.kind == "none" or self.name_or_path is not None,
               f"llm.name_or_path is required when llm.kind is {self.kind!r}")
        _check(self.max_text_len > 0, f"llm.max_text_len must be > 0, got {self.max_text_len}")


@dataclass
class Blip2Config:
    """The whole model: frozen encoder -> ln_vision -> Q-Former -> heads (-> LLM)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    embed_dim: int = 256  # ITC space of vision_proj / text_proj (paper: 256)
    temp_init: float = 0.07  # learnable ITC temperature, as CLIP / BLIP
    # LAVIS never clamps `temp`; BLIP-1 clamped it to [0.001, 0.5]. We clamp, as BLIP-1 did,
    # so the logits cannot blow up when the temperature is learned.
    temp_min: float = 0.001
    temp_max: float = 0.5
    # VQA fine-tuning as the paper describes it: the question also enters the Q-Former (text
    # tokens in the ITM-style joint pass) so the queries extract question-relevant features.
    # LAVIS's BLIP-2 code lacks this (InstructBLIP has it); off by default.
    qformer_question: bool = False
    # With qformer_question: the Q-Former reads the whole LLM prompt ("Question: {q} Answer:",
    # the caption prompt too), not the bare question: InstructBLIP's instruction-aware queries
    # (Dai et al. 2023, Sec. 2.2; HF `InstructBlipProcessor` gives both tokenizers the same text).
    qformer_instruction: bool = False
    # A deviation, off in the paper: a trainable position embedding added to the image tokens
    # after ln_vision, so the Q-Former's cross-attention can select by location even when a
    # small frozen tower's token contents carry position only weakly (the shapes world).
    image_pos_embed: bool = False

    def __post_init__(self) -> None:
        _check(not self.qformer_question or self.qformer.text_input,
               "qformer_question needs qformer.text_input=True (the question enters the Q-Former as text)")
        _check(not self.qformer_instruction or self.qformer_question,
               "qformer_instruction needs qformer_question=True (it says which text the Q-Former reads)")
        _check(self.embed_dim > 0, f"embed_dim must be > 0, got {self.embed_dim}")
        _check(0 < self.temp_min <= self.temp_init <= self.temp_max,
               f"need 0 < temp_min ({self.temp_min}) <= temp_init ({self.temp_init}) <= temp_max ({self.temp_max})")


@dataclass
class TrainConfig:
    """One training loop for both stages (paper Sec. 4 recipe; LAVIS defaults noted)."""

    stage: Literal[1, 2] = 1
    # Stage-1 losses; the paper's Table 6 ablation runs ("itc",), ("itc", "itm"), all three.
    losses: tuple[str, ...] = ("itc", "itm", "itg")  # stage 2: ("lm",)
    label_smoothing: float = 0.1  # ITC and ITG (LAVIS)
    lr: float = 1e-4  # peak
    min_lr: float = 1e-5  # cosine floor (stage 2 of the paper: 5e-5)
    warmup_steps: int = 2000
    max_steps: int = 250_000
    batch_size: int = 64
    grad_accum_steps: int = 1
    weight_decay: float = 0.05  # not applied to biases and norms
    betas: tuple[float, float] = (0.9, 0.98)  # the paper's; LAVIS defaults to (0.9, 0.999)
    grad_clip: Optional[float] = 1.0  # None: no clipping
    # accelerate's mixed precision: "bf16" on GPUs that have it; "no" (fp32) on the CPU.
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    save_every: int = 0  # checkpoint every N steps (0: only at the end)
    max_bad_steps: int = 10  # steps skipped for a non-finite loss/gradient before the run stops
    # A deviation from the paper (which sums all three losses from step 0), off by default:
    # "name@step" entries make a loss join only from that step, e.g. ("itm@200", "itg@100")
    # for an ITC-first warm-up against ITM collapsing to its class prior early on.
    loss_schedule: tuple[str, ...] = ()
    # A deviation, 0 in the paper: the share of ITM negatives drawn at random instead of by
    # ITC hardness (losses.sample_hard_negatives), against the same collapse.
    itm_easy_negatives: float = 0.0
    # A deviation, False in the paper (LAVIS / HF average over all tokens of a batch): stage 2's
    # LM loss averaged per item, then over items, so captions and short answers weigh alike.
    lm_per_item: bool = False
    seed: int = 0
    log_every: int = 10
    out_dir: str = "runs/default"

    def __post_init__(self) -> None:
        _check(self.stage in (1, 2), f"train.stage must be 1 or 2, got {self.stage!r}")
        unknown = [name for name in self.losses if name not in LOSS_NAMES]
        _check(not unknown, f"train.losses has unknown loss(es) {unknown}; known: {list(LOSS_NAMES)}")
        _check(len(self.losses) > 0, "train.losses must name at least one loss")
        _check(0.0 <= self.label_smoothing < 1.0, f"train.label_smoothing must be in [0, 1), got {self.label_smoothing}")
        _check(self.lr > 0 and 0 <= self.min_lr <= self.lr, f"need 0 <= train.min_lr ({self.min_lr}) <= train.lr ({self.lr})")
        for name in ("max_steps", "batch_size", "grad_accum_steps"):
            _check(getattr(self, name) > 0, f"train.{name} must be > 0, got {getattr(self, name)}")
        _check(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(0.0 <= self.itm_easy_negatives <= 1.0,
               f"train.itm_easy_negatives must be in [0, 1], got {self.itm_easy_negatives}")
        _check(self.save_every >= 0 and self.max_bad_steps >= 0, "train.save_every and train.max_bad_steps must be >= 0")
        for entry in self.loss_schedule:
            name, _, step = entry.partition("@")
            _check(name in self.losses and step.isdigit(),
                   f"train.loss_schedule entry {entry!r} must be 'loss@step' with a loss of train.losses")
        _check(all(0.0 <= b < 1.0 for b in self.betas), f"train.betas must be in [0, 1), got {self.betas}")

    def losses_at(self, step: int) -> tuple[str, ...]:
        """The losses active at `step` (all of `losses`, less those `loss_schedule` starts later)."""
        start = {name: int(at) for name, _, at in (e.partition("@") for e in self.loss_schedule)}
        return tuple(name for name in self.losses if start.get(name, 0) <= step)


# ---------------------------------------------------------------------------------------
# dict / JSON round trip with type checking
# ---------------------------------------------------------------------------------------


def to_dict(cfg: Any) -> dict:
    """A plain JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert) `value` against the annotation `tp`; errors name `key`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{key} must have {len(args)} values, got {len(value)}")
            items = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return _from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be a bool, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an int, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a float, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key(s) {[prefix + k for k in unknown]}; "
                          f"known keys of {prefix.rstrip('.') or cls.__name__}: {sorted(names)}")
    kwargs = {name: _coerce(value, hints[name], prefix + name) for name, value in data.items()}
    return cls(**kwargs)


def from_dict(cls: type, data: dict) -> Any:
    """Build `cls` from a (possibly partial) dict; unknown keys and wrong types are errors."""
    return _from_dict(cls, data)


def save_json(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(to_dict(cfg), indent=2) + "\n")


def load_json(cls: type, path: str | Path) -> Any:
    return from_dict(cls, json.loads(Path(path).read_text()))


# ---------------------------------------------------------------------------------------
# --a.b=value overrides
# ---------------------------------------------------------------------------------------


def _field_type(cls: type, dotted: str) -> Any:
    """The annotation of a dotted field path; raises ConfigError naming an unknown key."""
    tp: Any = cls
    walked = []
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(tp):
            raise ConfigError(f"unknown config key '{dotted}': '{'.'.join(walked)}' has no sub-fields")
        hints = typing.get_type_hints(tp)
        if part not in hints:
            where = ".".join(walked) or "the top level"
            raise ConfigError(f"unknown config key '{dotted}': no field '{part}' in {where} "
                              f"(known: {sorted(hints)})")
        tp = hints[part]
        walked.append(part)
    return tp


def _parse_text(text: str, tp: Any, key: str) -> Any:
    """Turn the text of an override into a value of annotation `tp` (then type-checked)."""
    if text.lower() in ("none", "null"):
        return None
    base = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) in (
        typing.Union, types.UnionType) else [tp]
    target = base[0] if len(base) == 1 else None
    if target is str or (typing.get_origin(target) is Literal and all(isinstance(a, str) for a in typing.get_args(target))):
        return text
    if target is bool:
        if text.lower() in ("true", "1", "yes"):
            return True
        if text.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"{key} must be a bool (true/false), got {text!r}")
    if typing.get_origin(target) in (tuple, list) and not text.lstrip().startswith("["):
        items = [t.strip() for t in text.split(",") if t.strip()]
        item_args = typing.get_args(target)
        item_tp = item_args[0] if item_args else str
        return [_parse_text(t, item_tp, key) for t in items]
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # a bare string; the type check below decides


def apply_overrides(cfg: Any, overrides: Sequence[str]) -> Any:
    """A new config with `a.b=value` overrides applied (a leading `--` is allowed, nanoGPT's
    `--a.b=value`), each checked against the field's type, then validated as a whole."""
    data = to_dict(cfg)
    for arg in overrides:
        text_arg = arg[2:] if arg.startswith("--") else arg
        if "=" not in text_arg or not text_arg.split("=", 1)[0]:
            raise ConfigError(f"override {arg!r} must look like a.b=value")
        key, text = text_arg.split("=", 1)
        tp = _field_type(type(cfg), key)
        value = _coerce(_parse_text(text, tp, key), tp, key)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        node = data
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = list(value) if isinstance(value, tuple) else value
    return from_dict(type(cfg), data)


def from_preset(presets: Mapping[str, Any], name: str, overrides: Sequence[str] = ()) -> Any:
    """`presets[name]` (a typed config) with `overrides` applied: the one way every recipe and
    command turns `--preset NAME --set a.b=value ...` into a config."""
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; known: {sorted(presets)}")
    return apply_overrides(presets[name], overrides)
