"""The official BLIP-2 checkpoints in Hugging Face layout (Salesforce/blip2-* repos), both ways,
and InstructBLIP's (Salesforce/instructblip-* repos, `InstructBlipForConditionalGeneration`),
read only: its instruction-aware Q-Former is blip2lab's `qformer_question` with
`qformer_instruction` (the whole prompt enters the Q-Former), without stage-1 heads.

`load_official` opens a folder (or a hub id where a hub is reachable) as transformers
writes it: config.json with whatever fields it leaves at transformers' defaults (the
published repos keep the Q-Former at BERT's 30522 words), one or several safetensors files,
a preprocessor_config.json whose normalisation the processor follows. Every tensor goes
through an explicit key table (`hf_table`, ours <- theirs, BLIP2_REFERENCE.md Sec. 6), checked
from the file headers before a byte of data is read (`streaming`); `export_hf` writes a
folder that transformers' `from_pretrained` opens with no missing or unexpected key.

Deviations from transformers' own loader, on purpose:
- a tensor in the file that no table entry uses is an error (transformers warns), except
  those the LLM class itself declares ignorable (`_keys_to_ignore_on_load_unexpected`,
  e.g. T5's unused relative-attention bias), which are named in a warning;
- the Q-Former runs in the requested dtype like the rest (transformers keeps it in fp32);
- tensors are read into memory the model owns, not served from a map of the file.

Shape legend: D_v vision width, D_q Q-Former width.
"""

from __future__ import annotations

import copy
import json
import os
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Optional

import torch
from torch import nn

from ..config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig, to_dict
from ..dtypes import as_dtype, dtype_name
from ..model import Blip2, llm_kind
from ..model.image_encoder import HFBlip2ImageEncoder, square
from ..processor import qformer_token_ids
from .keys import Keys, WeightsError, keys_of, load_strict, qformer_layer_table, remap
from .streaming import Shards, check_dtype, empty_llm, fill, finish, plan, tie_groups

__all__ = ["KNOWN_CHECKPOINTS", "INSTRUCTBLIP_CHECKPOINTS", "OfficialInfo", "HF_ABSENT", "hf_table", "config_from_hf", "vision_config_from_hf",
           "from_hf", "hf_vision_config", "resolve_checkpoint", "load_official", "load_official_tokenizers", "export_hf"]

# ---------------------------------------------------------------------------------------
# The official checkpoints (BLIP2_REFERENCE.md Sec. 6), for the pipeline and the app
# ---------------------------------------------------------------------------------------

_OPT_VQA, _T5_VQA = "Question: {} Answer:", "Question: {} Short answer:"  # BLIP2_REFERENCE.md Sec. 3


def _generation(llm: str, kind: str, finetuned: Optional[str] = None) -> dict:
    t5 = kind == "encoder_decoder"
    return dict(task="generation", architecture="Blip2ForConditionalGeneration", llm=llm, llm_kind=kind,
                finetuned=finetuned, vqa_prompt=_T5_VQA if t5 else _OPT_VQA,
                dtype="bfloat16 or float32, never float16 (T5 overflows)" if t5 else "float16, bfloat16 or float32")


# Stage-2 checkpoints (generation) carry no ITC/ITM heads; retrieval needs an itm-vit-g one.
# "-coco" = fine-tuned on COCO (captioning, or retrieval for itm), the ViT fine-tuned too;
# every other checkpoint has the same frozen EVA-CLIP ViT-g (39 of 40 blocks).
KNOWN_CHECKPOINTS: dict[str, dict] = {
    "Salesforce/blip2-opt-2.7b": _generation("facebook/opt-2.7b", "decoder"),
    "Salesforce/blip2-opt-6.7b": _generation("facebook/opt-6.7b", "decoder"),
    "Salesforce/blip2-opt-2.7b-coco": _generation("facebook/opt-2.7b", "decoder", "COCO captioning"),
    "Salesforce/blip2-opt-6.7b-coco": _generation("facebook/opt-6.7b", "decoder", "COCO captioning"),
    "Salesforce/blip2-flan-t5-xl": _generation("google/flan-t5-xl", "encoder_decoder"),
    "Salesforce/blip2-flan-t5-xl-coco": _generation("google/flan-t5-xl", "encoder_decoder", "COCO captioning"),
    "Salesforce/blip2-flan-t5-xxl": _generation("google/flan-t5-xxl", "encoder_decoder"),
    "Salesforce/blip2-itm-vit-g": dict(task="retrieval", architecture="Blip2ForImageTextRetrieval", llm=None,
                                       llm_kind=None, finetuned=None, vqa_prompt=None, dtype="any"),
    "Salesforce/blip2-itm-vit-g-coco": dict(task="retrieval", architecture="Blip2ForImageTextRetrieval", llm=None,
                                            llm_kind=None, finetuned="COCO retrieval", vqa_prompt=None, dtype="any"),
}

# InstructBLIP (Dai et al. 2023): BLIP-2 whose Q-Former also reads the instruction. HF's conversion
# script builds them with a Q-Former of 30523 words ([DEC] added), a `qformer_tokenizer/` beside the
# LLM's tokenizer, and 32 queries; Vicuna is a Llama LLM. Read, never written (export_hf refuses).
INSTRUCTBLIP_CHECKPOINTS: dict[str, dict] = {
    f"Salesforce/instructblip-{name}": dict(task="generation", architecture="InstructBlipForConditionalGeneration",
                                            llm=llm, llm_kind=kind, finetuned=None,
                                            vqa_prompt=_T5_VQA if kind == "encoder_decoder" else _OPT_VQA)
    for name, llm, kind in (("vicuna-7b", "lmsys/vicuna-7b-v1.1", "decoder"),
                            ("vicuna-13b", "lmsys/vicuna-13b-v1.1", "decoder"),
                            ("flan-t5-xl", "google/flan-t5-xl", "encoder_decoder"),
                            ("flan-t5-xxl", "google/flan-t5-xxl", "encoder_decoder"))
}
INSTRUCTBLIP = "InstructBlipForConditionalGeneration"
# LAVIS's InstructBLIP tokenises the instruction for the Q-Former up to max_txt_len = 128 tokens.
INSTRUCTION_MAX_LEN = 128

_ARCHITECTURES = ("Blip2ForConditionalGeneration", "Blip2ForImageTextRetrieval", INSTRUCTBLIP)
_SIDECAR = "blip2lab_config.json"  # what HF's config.json cannot say (Q-Former token ids ...), written by export_hf
# What a hub download fetches: config, weights (safetensors only: never a pickle) and tokenizer files.
_HUB_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "generation_config.json",
                 "tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt",
                 "spiece.model", "preprocessor_config.json", "processor_config.json", _SIDECAR]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


@dataclass
class OfficialInfo:
    """Where a model loaded by `load_official` came from (kept as `model.official`), so
    `export_hf` can write the same image token id back."""

    source: str
    architecture: str
    image_token_index: Optional[int]
    # Parts the source never carried, which got initial values (HF retrieval checkpoints drop
    # the temperature and the Q-Former LM head): nothing trained them, so nothing may read them
    # as if it had (Q-Former captions from that head would be noise).
    untrained: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------
# Key tables and configs: HF's names and fields -> ours
# ---------------------------------------------------------------------------------------


def hf_table(cfg: QFormerConfig, vision_keys: Iterable[str] = (), llm_keys: Iterable[str] = (),
             instructblip: bool = False) -> dict[str, Keys]:
    """Our `Blip2` keys <- HF BLIP-2 keys (`Blip2ForImageTextRetrieval` when the Q-Former has
    its text side, `Blip2ForConditionalGeneration` otherwise), or InstructBLIP's
    (`instructblip`: the Q-Former's word and position embeddings and the LayerNorm over
    [queries ; text] live in `qformer.embeddings`; text FFNs, no stage-1 heads). `vision_keys`:
    the keys of the HF vision tower's state dict (our `image_encoder.vision_model.*`);
    `llm_keys`: those of the language model (our `llm.model.*`)."""
    norm = "qformer.embeddings.layernorm" if instructblip else "qformer.layernorm"  # the same LayerNorm
    table: dict[str, Keys] = {
        "ln_vision.weight": "vision_model.post_layernorm.weight",  # HF's post_layernorm IS ln_vision
        "ln_vision.bias": "vision_model.post_layernorm.bias",
        "qformer.query_tokens": "query_tokens",
        "qformer.layernorm.weight": f"{norm}.weight",
        "qformer.layernorm.bias": f"{norm}.bias",
    }
    table |= {f"image_encoder.vision_model.{k}": f"vision_model.{k}" for k in vision_keys}
    for i in range(cfg.num_layers):
        for ours, theirs in qformer_layer_table(i, cfg.has_cross_attention(i), "qformer.encoder.layer", "hf").items():
            if cfg.text_input or ".text_ffn." not in ours:
                table[f"qformer.{ours}"] = theirs
    if cfg.text_input:
        emb = "qformer.embeddings" if instructblip else "embeddings"
        table["qformer.word_embeddings.weight"] = f"{emb}.word_embeddings.weight"
        table["qformer.position_embeddings.weight"] = f"{emb}.position_embeddings.weight"
    if cfg.text_input and cfg.stage1_heads:
        for ours, theirs in (("vision_proj", "vision_projection"), ("text_proj", "text_projection"),
                             ("itm_head", "itm_head")):
            for p in ("weight", "bias"):
                table[f"{ours}.{p}"] = f"{theirs}.{p}"
    if llm_keys:
        table |= {"llm.projection.weight": "language_projection.weight", "llm.projection.bias": "language_projection.bias"}
        table |= {f"llm.model.{k}": f"language_model.{k}" for k in llm_keys}
    return table


# Parts of our model that HF retrieval checkpoints do not carry (BLIP2_REFERENCE.md Sec. 6):
# the learned temperature and the Q-Former's LM head (its decoder is tied, only the rest).
HF_ABSENT = ("temp", "qformer.lm_head.bias", "qformer.lm_head.dense.weight", "qformer.lm_head.dense.bias",
                       "qformer.lm_head.norm.weight", "qformer.lm_head.norm.bias")


# bert-base-uncased's special ids plus LAVIS's added [DEC] (BLIP2_REFERENCE.md Sec. 1): what the
# official checkpoints were trained with, though their config.json does not say so.
BERT_TOKEN_IDS = dict(cls_token_id=101, sep_token_id=102, dec_token_id=30522)


def vision_config_from_hf(hf_vision_config) -> VisionConfig:
    """The VisionConfig of a transformers `Blip2VisionConfig` (e.g. `Blip2Config.vision_config`)."""
    return VisionConfig(
        backend="hf_blip2",
        image_size=square(hf_vision_config.image_size, "images"),
        patch_size=square(hf_vision_config.patch_size, "patches"),
        width=hf_vision_config.hidden_size,
        layers=hf_vision_config.num_hidden_layers,
        heads=hf_vision_config.num_attention_heads,
        mlp_dim=hf_vision_config.intermediate_size,
        layer_index=-1,  # the HF checkpoints store only the blocks BLIP-2 uses (39 of EVA's 40)
        layer_norm_eps=hf_vision_config.layer_norm_eps,
        # ln_vision *is* HF's post_layernorm, which runs with the vision config's eps (1e-6),
        # whereas LAVIS builds ln_vision with nn.LayerNorm's 1e-5. Same weights, different eps:
        # take the source checkpoint's, or outputs drift from the reference.
        ln_vision_eps=hf_vision_config.layer_norm_eps,
    )


def config_from_hf(hf_config, **qformer_overrides) -> Blip2Config:
    """Our Blip2Config for a transformers `Blip2Config`. The special token ids are not in
    HF's config: bert-base-uncased's are assumed where they fit the Q-Former's vocabulary,
    and an id outside it (the [DEC] of a generation checkpoint, whose config keeps BERT's
    30522 words) is None: the model loads and only what needs that token refuses.
    `qformer_overrides` (e.g. the ids of a tokenizer shipped beside the weights) win."""
    qc = hf_config.qformer_config
    qformer = dict(
        hidden_size=qc.hidden_size, num_layers=qc.num_hidden_layers, num_heads=qc.num_attention_heads,
        intermediate_size=qc.intermediate_size, num_queries=hf_config.num_query_tokens,
        cross_attention_freq=qc.cross_attention_frequency, vocab_size=qc.vocab_size,
        max_position_embeddings=qc.max_position_embeddings, hidden_dropout=qc.hidden_dropout_prob,
        attention_dropout=qc.attention_probs_dropout_prob, layer_norm_eps=qc.layer_norm_eps,
        init_std=qc.initializer_range, pad_token_id=qc.pad_token_id if qc.pad_token_id is not None else 0,
    )
    if hf_config.vision_config.hidden_size != qc.encoder_hidden_size:
        raise WeightsError(f"HF config: qformer encoder_hidden_size ({qc.encoder_hidden_size}) != vision "
                           f"hidden_size ({hf_config.vision_config.hidden_size})")
    qformer |= {name: (value if value < qc.vocab_size else None) for name, value in BERT_TOKEN_IDS.items()}
    return Blip2Config(vision=vision_config_from_hf(hf_config.vision_config),
                       qformer=QFormerConfig(**(qformer | qformer_overrides)),
                       embed_dim=getattr(hf_config, "image_text_hidden_size", 256))


def from_hf(hf_model, **qformer_overrides):
    """A blip2lab `Blip2` with the weights of a transformers BLIP-2 model, already built or
    loaded: `Blip2ForImageTextRetrieval` (stage-1 heads, no LLM) or
    `Blip2ForConditionalGeneration` (OPT / T5 / any LLM, no stage-1 heads). Strict: every
    HF key is used and every model key set, except the parts HF checkpoints never carry
    (`temp`, the Q-Former LM head), which keep their initial values."""
    from transformers import Blip2VisionModel

    has_llm = hasattr(hf_model, "language_model")
    text_input = bool(hf_model.config.qformer_config.use_qformer_text_input) and not has_llm
    if not has_llm and not text_input:
        raise WeightsError("this HF model has no Q-Former text FFN (use_qformer_text_input=False) and no "
                           "language model: it is neither a retrieval nor a generation checkpoint")
    config = config_from_hf(hf_model.config, text_input=text_input, **qformer_overrides)
    language_model = None
    if has_llm:
        # The frozen LLM module is shared with `hf_model`, not copied: no second copy of the
        # largest part (the load below then copies each of its tensors onto itself).
        language_model = hf_model.language_model
        config.llm = LLMConfig(kind=llm_kind(language_model), name_or_path="(converted from transformers)")
    encoder = HFBlip2ImageEncoder(Blip2VisionModel(hf_model.config.vision_config), layer_index=-1,
                                  mean=config.vision.mean, std=config.vision.std)
    model = Blip2(config, image_encoder=encoder, language_model=language_model)
    table = hf_table(config.qformer, encoder.vision_model.state_dict().keys(),
                     model.llm.model.state_dict().keys() if has_llm else ())
    converted = remap(hf_model.state_dict(), table, source=type(hf_model).__name__,
                      ignore=("embeddings.position_ids",))
    absent = HF_ABSENT if text_input else ()
    load_strict(model, converted, allowed_missing=absent, source=type(hf_model).__name__)
    return model.eval()


from_hf_retrieval = from_hf  # the name the retrieval parity tests and benchmark use


def _stored_dtype(hf_config) -> torch.dtype:
    """What `dtype="auto"` means for an HF folder, as in transformers: config.json's dtype
    (`torch_dtype` before transformers 4.56), else float32."""
    stored = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    try:
        value = as_dtype(stored, "config.json dtype") if stored is not None else None
    except ValueError:
        value = None
    return value if isinstance(value, torch.dtype) else torch.float32


# ---------------------------------------------------------------------------------------
# Locating a checkpoint: a local folder, or a hub id where the hub can be reached
# ---------------------------------------------------------------------------------------


def _hub_offline() -> bool:
    flags = [os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", "")]
    try:  # huggingface_hub reads the variable once, at import
        from huggingface_hub import constants

        flags.append(str(int(bool(constants.HF_HUB_OFFLINE))))
    except ImportError:
        pass
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def resolve_checkpoint(source: str | os.PathLike) -> Path:
    """A local folder as is; otherwise an `owner/name` hub id is fetched (config, safetensors
    and tokenizer files only) where the environment allows. Offline (`HF_HUB_OFFLINE=1`) only
    the local hub cache is looked at, so no network is ever tried."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    hint = (f"no local folder at '{text}' and the hub could not be reached: pass a local directory with the "
            f"checkpoint (config.json + *.safetensors)")
    if not _HUB_ID.match(text) or ".." in text:
        raise FileNotFoundError(f"no local folder at '{text}': pass a local directory with the checkpoint "
                                f"(config.json + *.safetensors)")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(text, allow_patterns=_HUB_PATTERNS, local_files_only=_hub_offline())
    except Exception as err:  # offline, no network, unknown repo, gated repo: all mean "not here"
        raise FileNotFoundError(f"{hint} ({type(err).__name__}: {err})") from err
    return Path(folder)


# ---------------------------------------------------------------------------------------
# Hugging Face layout -> blip2lab
# ---------------------------------------------------------------------------------------


def _read_hf_config(folder: Path):
    from transformers import Blip2Config as HFBlip2Config
    from transformers import InstructBlipConfig

    file = folder / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face BLIP-2 checkpoint folder")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise WeightsError(f"{file} is not valid JSON: {err}") from err
    arch = (raw.get("architectures") or [None])[0]
    model_type = "instructblip" if arch == INSTRUCTBLIP else "blip-2"
    if raw.get("model_type") != model_type or arch not in _ARCHITECTURES:
        raise WeightsError(f"{file}: model_type {raw.get('model_type')!r}, architectures {raw.get('architectures')}; "
                           f"supported: model_type 'blip-2' with one of {list(_ARCHITECTURES[:2])}, or "
                           f"'instructblip' with {INSTRUCTBLIP}")
    return (InstructBlipConfig if arch == INSTRUCTBLIP else HFBlip2Config).from_pretrained(str(folder)), arch


def _sidecar_overrides(folder: Path) -> tuple[dict, dict]:
    """Q-Former token ids and vision normalisation written by `export_hf` (HF's config has
    no place for them); nothing for an official checkpoint."""
    file = folder / _SIDECAR
    if not file.is_file():
        return {}, {}
    saved = json.loads(file.read_text())
    q = {k: saved["qformer"][k] for k in ("pad_token_id", "cls_token_id", "sep_token_id", "dec_token_id",
                                          "max_text_len") if k in saved.get("qformer", {})}
    v = {k: tuple(saved["vision"][k]) for k in ("mean", "std") if k in saved.get("vision", {})}
    return q, v


def _preprocessor_overrides(folder: Path, image_size: int) -> dict:
    """The image normalisation of the folder's preprocessor_config.json (BlipImageProcessor:
    what transformers' processor does to a photo), checked against the vision config."""
    file = folder / "preprocessor_config.json"
    if not file.is_file():
        return {}
    pre = json.loads(file.read_text())
    size = pre.get("size") or {}
    side = size.get("height", size.get("shortest_edge")) if isinstance(size, dict) else size
    if side is not None and (side != image_size or size.get("width", side) != side):
        raise WeightsError(f"{file}: images of {size} but the vision tower takes {image_size}x{image_size}")
    if pre.get("resample", 3) != 3:  # blip2lab resizes bicubically (PIL 3), as BlipImageProcessor by default
        warnings.warn(f"{file}: resample {pre['resample']} (blip2lab resizes bicubically)", stacklevel=3)
    return {k: tuple(float(x) for x in pre[f"image_{k}"]) for k in ("mean", "std") if f"image_{k}" in pre}


def _device_map(llm: nn.Module, device_map, dtype: torch.dtype) -> Optional[dict]:
    if device_map is None:
        return None
    if device_map == "auto":
        from accelerate import infer_auto_device_map

        llm.tie_weights()  # on the empty model: so tied tensors are counted once and kept together
        return infer_auto_device_map(llm, no_split_module_classes=list(llm._no_split_modules or []), dtype=dtype)
    if not isinstance(device_map, dict):
        raise ValueError(f"device_map must be None, 'auto' or a dict of module name -> device, got {device_map!r}")
    if "disk" in device_map.values():
        raise ValueError("device_map: offloading to 'disk' is not supported; use 'cpu' for the parts that do not fit")
    return dict(device_map)


def _llm_device(device_map: Optional[dict], key: str):
    """The device of LLM key `key` (relative to the LLM): the longest module prefix in the map."""
    best = max((m for m in device_map if m == "" or key == m or key.startswith(m + ".")), key=len, default=None)
    if best is None:
        raise ValueError(f"device_map places no module containing {key!r}")
    return device_map[best]


def _tokenizer_ids(qformer_tokenizer, vocab_size: int) -> dict:
    """The special ids of a Q-Former tokenizer shipped beside the weights, those that fit the
    checkpoint's Q-Former vocabulary (a token it lacks is None: the model refuses what needs it)."""
    if qformer_tokenizer is None:
        return {}
    ids = {name: (value if value is not None and value < vocab_size else None)
           for name, value in qformer_token_ids(qformer_tokenizer).items()}
    return ids if ids["pad_token_id"] is not None else {k: v for k, v in ids.items() if k != "pad_token_id"}


def _instructblip_overrides(hf_config) -> dict:
    """The Q-Former of an InstructBLIP checkpoint: a text side (the instruction), no stage-1
    heads, LAVIS's instruction length."""
    limit = hf_config.qformer_config.max_position_embeddings
    return dict(text_input=True, stage1_heads=False, max_text_len=min(INSTRUCTION_MAX_LEN, limit))


def _empty_model(folder: Path, hf_config, arch: str, source, dtype, qformer_overrides: dict,
                 llm_dtype=None, qformer_tokenizer=None):
    """Our `Blip2` for an HF BLIP-2 or InstructBLIP config, every parameter on the meta device (no storage)."""
    from accelerate import init_empty_weights
    from transformers import Blip2VisionModel

    retrieval, instructblip = arch == "Blip2ForImageTextRetrieval", arch == INSTRUCTBLIP
    if retrieval and not hf_config.qformer_config.use_qformer_text_input:
        raise WeightsError(f"{folder}: a retrieval checkpoint needs use_qformer_text_input=True in its config")
    saved_q, saved_vision = _sidecar_overrides(folder)
    shipped = _tokenizer_ids(qformer_tokenizer, hf_config.qformer_config.vocab_size)
    layout = _instructblip_overrides(hf_config) if instructblip else {"text_input": retrieval}
    config = config_from_hf(hf_config, **(shipped | saved_q | layout | qformer_overrides))
    if instructblip:  # the instruction-aware queries (Blip2Config.qformer_instruction)
        config = replace(config, qformer_question=True, qformer_instruction=True)
    config.vision = replace(config.vision, **(_preprocessor_overrides(folder, config.vision.image_size) | saved_vision))
    llm = None if retrieval else empty_llm(hf_config.text_config)
    kind = "none" if llm is None else llm_kind(llm)
    dtype = check_dtype(dtype, kind, auto=_stored_dtype(hf_config))
    if llm is not None:
        llm_dtype = dtype if llm_dtype is None else check_dtype(llm_dtype, kind, _stored_dtype(hf_config.text_config),
                                                                 "llm_dtype")
        # InstructBLIP's Vicuna ends its text with </s>, never "\n" (LAVIS blip2_vicuna_instruct)
        config.llm = LLMConfig(kind=kind, name_or_path=f"language_model of {source}", dtype=dtype_name(llm_dtype),
                               stop_at_newline=not instructblip)
    with init_empty_weights(include_buffers=False):
        encoder = HFBlip2ImageEncoder(Blip2VisionModel(_blip2_vision_config(hf_config.vision_config)), layer_index=-1,
                                      mean=config.vision.mean, std=config.vision.std)
        return Blip2(config, image_encoder=encoder, language_model=llm), dtype


def _blip2_vision_config(vision_config):
    """A `Blip2VisionConfig` for `Blip2VisionModel`: InstructBLIP's vision tower is the same
    EVA ViT-g code (transformers copies Blip2VisionModel), under another config class."""
    from transformers import Blip2VisionConfig

    if isinstance(vision_config, Blip2VisionConfig):
        return vision_config
    fields = {k: v for k, v in vision_config.to_dict().items() if k not in ("model_type", "transformers_version")}
    return Blip2VisionConfig(**fields)


def load_official(source: str | os.PathLike, *, device_map=None, dtype=None, llm_dtype=None,
                  qformer_tokenizer=None, **qformer_overrides):
    """A blip2lab `Blip2` from a Salesforce BLIP-2 checkpoint in Hugging Face layout: a local
    folder with config.json + model.safetensors (or sharded model-0000x-of-0000y.safetensors
    with model.safetensors.index.json), or a hub id where the hub can be reached.

    `Blip2ForConditionalGeneration` (OPT, FlanT5 or any transformers LLM; no stage-1 heads),
    `Blip2ForImageTextRetrieval` (stage-1 heads, no LLM) and InstructBLIP's
    `InstructBlipForConditionalGeneration` (Vicuna / FlanT5; a Q-Former text side for the
    instruction, no stage-1 heads) are told apart by config.json's `architectures`. Strict: every tensor of the file is used and every model tensor set,
    except the parts HF retrieval checkpoints never carry (`temp`, the Q-Former LM head: see
    `weights.HF_ABSENT`), which get their initial values (temp = `temp_init`).

    dtype: of every floating tensor, a torch dtype or its name (default float32; "auto": the
    dtype config.json names, as transformers; float16 is refused for T5).
    llm_dtype: the frozen LLM's instead, when given: each LLM tensor is read straight into it,
    so e.g. bf16 for OPT-2.7B on a CPU never holds its 10.6 GB fp32 copy (5.3 GB instead).
    qformer_tokenizer: a Q-Former tokenizer shipped with the checkpoint, whose special ids the
    model then uses (where they fit its vocabulary; `load_official_tokenizers` finds it).
    device_map: "auto" or an accelerate dict (module name -> device) for the LLM, applied with
    `accelerate.dispatch_model`; the rest of the model goes to the device of the LLM's input
    embeddings (inputs go there too). Without an LLM: "auto" or {"": device}.
    qformer_overrides: QFormerConfig fields HF's config lacks, the special token ids above all
    (bert-base-uncased's are assumed; a folder written by `export_hf` brings its own)."""
    folder = resolve_checkpoint(source)
    hf_config, arch = _read_hf_config(folder)
    shards = Shards(folder)  # headers checked here: a damaged file fails before any building
    retrieval = arch == "Blip2ForImageTextRetrieval"
    model, dtype = _empty_model(folder, hf_config, arch, source, dtype, qformer_overrides, llm_dtype,
                                qformer_tokenizer)
    llm = None if retrieval else model.llm.model
    llm_dtype = None if llm is None else getattr(torch, model.config.llm.dtype)
    llm_map = None if llm is None else _device_map(llm, device_map, llm_dtype)
    main = _main_device(device_map) if llm is None else "cpu" if llm_map is None else \
        _llm_device(llm_map, _embedding_key(llm))

    todo = _plan_hf(model, llm, shards, folder, instructblip=arch == INSTRUCTBLIP)

    def device_of(ours: str):
        if llm_map and ours.startswith("llm.model."):
            return _llm_device(llm_map, ours.removeprefix("llm.model."))
        return main

    try:
        fill(model, todo, shards.get, dtype, device_of, order=shards.order, llm_dtype=llm_dtype)
    finally:
        shards.close()
    finish(model, todo, HF_ABSENT if retrieval else (), dtype, main, str(folder))
    if llm_map is not None:
        from accelerate import dispatch_model

        dispatch_model(llm, device_map=llm_map)
    model.official = OfficialInfo(str(source), arch, getattr(hf_config, "image_token_index", None),
                                  untrained=HF_ABSENT if retrieval else ())
    return model.eval()


def _plan_hf(model: nn.Module, llm: Optional[nn.Module], shards: Shards, folder: Path,
             instructblip: bool = False) -> dict:
    """The key plan of an HF folder (`streaming.plan` through `hf_table`): every tensor used,
    but those the LLM class itself declares unused (named in a warning)."""
    table = hf_table(model.config.qformer, model.image_encoder.vision_model.state_dict().keys(),
                     llm.state_dict().keys() if llm is not None else (), instructblip=instructblip)
    groups = tie_groups(model)
    ignorable = [re.compile(p) for p in (getattr(llm, "_keys_to_ignore_on_load_unexpected", None) or [])]

    def ignore(k: str) -> bool:
        return k.endswith("embeddings.position_ids") or (k.startswith("language_model.") and any(
            p.search(k.removeprefix("language_model.")) for p in ignorable))

    todo = plan(table, shards.shapes, model.state_dict(), str(folder),
                optional=set().union(*groups), tie_groups=groups, ignore=ignore)
    skipped = sorted(k for k in shards.shapes if ignore(k) and not k.endswith("embeddings.position_ids"))
    if skipped:
        warnings.warn(f"{folder}: not loaded, as {type(llm).__name__} declares them unused: {skipped}", stacklevel=3)
    return todo


def _main_device(device_map) -> str:
    """Where a model without an LLM goes: it is small, so one device."""
    if device_map is None:
        return "cpu"
    if device_map == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    devices = set(device_map.values()) if isinstance(device_map, dict) else set()
    if len(devices) != 1 or "disk" in devices:
        raise ValueError(f"a model without an LLM goes to one device: device_map 'auto' or {{'': device}}, "
                         f"got {device_map!r}")
    return devices.pop()


def _embedding_key(llm: nn.Module) -> str:
    emb = llm.get_input_embeddings()
    return next(name for name, module in llm.named_modules() if module is emb) + ".weight"


def load_official_tokenizers(source: str | os.PathLike):
    """(qformer_tokenizer or None, llm_tokenizer or None) shipped with a checkpoint folder.

    The Salesforce BLIP-2 repos ship the LLM's tokenizer only (in the folder itself). The
    Q-Former's tokenizer is bert-base-uncased plus one added `[DEC]` token (id 30522, the BOS
    of Q-Former captioning, BLIP2_REFERENCE.md Sec. 1): build it from a local
    bert-base-uncased with `add_special_tokens({"bos_token": "[DEC]"})`. A `qformer_tokenizer/`
    subfolder (the layout transformers' InstructBLIP processor saves) is read when present."""
    from transformers import AutoTokenizer

    folder = resolve_checkpoint(source)

    def load(where: Path):
        if any((where / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json")):
            return AutoTokenizer.from_pretrained(str(where), local_files_only=True)
        return None

    config = folder / "config.json"
    arch = (json.loads(config.read_text()).get("architectures") or [None])[0] if config.is_file() else None
    if arch == "Blip2ForImageTextRetrieval":  # no LLM: the folder's own tokenizer is the Q-Former's
        return load(folder / "qformer_tokenizer") or load(folder), None
    return load(folder / "qformer_tokenizer"), load(folder)


# ---------------------------------------------------------------------------------------
# blip2lab -> Hugging Face layout
# ---------------------------------------------------------------------------------------


def hf_vision_config(model):
    encoder = model.image_encoder
    if not isinstance(encoder, HFBlip2ImageEncoder):
        raise WeightsError(f"the HF and LAVIS layouts need the EVA / Blip2VisionModel tower (vision.backend "
                           f"'hf_blip2'); this model has {type(encoder).__name__}")
    vc = copy.deepcopy(encoder.vision_model.config)
    vc.num_hidden_layers = len(encoder.vision_model.encoder.layers)  # the blocks actually kept
    return vc


def _hf_qformer_config(q: QFormerConfig, vision_width: int) -> dict:
    return dict(vocab_size=q.vocab_size, hidden_size=q.hidden_size, num_hidden_layers=q.num_layers,
                num_attention_heads=q.num_heads, intermediate_size=q.ffn_size, hidden_act="gelu",
                hidden_dropout_prob=q.hidden_dropout, attention_probs_dropout_prob=q.attention_dropout,
                max_position_embeddings=q.max_position_embeddings, initializer_range=q.init_std,
                layer_norm_eps=q.layer_norm_eps, pad_token_id=q.pad_token_id,
                cross_attention_frequency=q.cross_attention_freq, encoder_hidden_size=vision_width,
                use_qformer_text_input=q.text_input)


def _tied_copies(model) -> set[str]:
    """Our LLM keys that are tied copies of another (transformers saves those once)."""
    llm = model.llm.model
    params = dict(llm.named_parameters(remove_duplicate=False))
    return {f"llm.model.{t}" for t, s in getattr(llm, "all_tied_weights_keys", {}).items()
            if t in params and s in params and params[t] is params[s]}


def export_hf(model, path: str | os.PathLike, *, image_token_index: Optional[int] = None) -> Path:
    """Write `model` as a transformers BLIP-2 checkpoint folder (config.json +
    model.safetensors), opened by `Blip2ForConditionalGeneration.from_pretrained` (a model with
    an LLM) or `Blip2ForImageTextRetrieval.from_pretrained` (stage-1 heads, no LLM).

    Lost on the way (HF has no place for them, a warning says so): the temperature and the
    Q-Former LM head of a retrieval model. HF runs `ln_vision` (its vision `post_layernorm`)
    with the vision tower's eps: if our `ln_vision_eps` differs, outputs will differ slightly
    (warned). image_token_index: the LLM token id HF's processor puts where the query outputs
    go; default the one of the checkpoint the model was loaded from, else the last row of the
    LLM's embedding matrix (the official repos use the first id past the tokenizer, 50265 for
    OPT and 32100 for FlanT5, both in the unused padding rows of the embedding matrix, as is
    the last row). Our Q-Former token ids go to `blip2lab_config.json` beside, which
    `load_official` reads back. A sharded checkpoint already in `path` is replaced."""
    config: Blip2Config = model.config
    q = config.qformer
    has_llm = model.llm is not None
    if config.qformer_instruction or not q.stage1_heads:
        raise WeightsError("export_hf writes BLIP-2 layouts only; this model has InstructBLIP's instruction-aware "
                           "Q-Former (qformer_instruction / no stage-1 heads): save it with Blip2Pipeline.save")
    if has_llm == q.text_input:
        raise WeightsError("the HF layout holds either a generation model (LLM, no Q-Former text side: "
                           "Blip2ForConditionalGeneration) or a retrieval model (Q-Former text side, no LLM: "
                           f"Blip2ForImageTextRetrieval); this model has llm={has_llm}, text_input={q.text_input}")
    hf_config = _hf_config(model, image_token_index)
    own = model.state_dict()
    encoder_keys = [k.removeprefix("image_encoder.vision_model.") for k in own if k.startswith("image_encoder.")]
    llm_keys = [k.removeprefix("llm.model.") for k in own if k.startswith("llm.model.")]
    table = hf_table(q, encoder_keys, llm_keys)
    dropped = sorted(set(own) - set(table))
    if set(dropped) - set(HF_ABSENT):
        raise WeightsError(f"no HF name for {sorted(set(dropped) - set(HF_ABSENT))}")
    if dropped:
        warnings.warn(f"the HF layout has no place for {dropped}: not exported", stacklevel=2)
    tied = _tied_copies(model) if has_llm else set()
    tensors = {}
    for ours, theirs in table.items():
        if ours in tied:
            continue
        value = own[ours].detach()
        parts = value.chunk(len(keys_of(theirs))) if not isinstance(theirs, str) else (value,)  # fused q;k;v rows
        for name, part in zip(keys_of(theirs), parts):
            tensors[name] = part.contiguous().cpu()
    path = _write_safetensors(tensors, Path(path))
    hf_config.save_pretrained(str(path))
    (path / _SIDECAR).write_text(json.dumps(to_dict(config), indent=2) + "\n")
    return path


def _hf_config(model, image_token_index: Optional[int]):
    """transformers' Blip2Config of our model (HF's `post_layernorm` runs with the vision
    eps: a different `ln_vision_eps` is warned about)."""
    from transformers import Blip2Config as HFBlip2Config

    config, has_llm = model.config, model.llm is not None
    vc = hf_vision_config(model)
    if config.vision.ln_vision_eps != vc.layer_norm_eps:
        warnings.warn(f"ln_vision_eps ({config.vision.ln_vision_eps}) != the vision layer_norm_eps "
                      f"({vc.layer_norm_eps}): HF applies ln_vision (post_layernorm) with the latter", stacklevel=3)
    if image_token_index is None and has_llm:
        info = getattr(model, "official", None)
        image_token_index = info.image_token_index if info is not None and info.image_token_index is not None \
            else model.llm.model.get_input_embeddings().num_embeddings - 1
    hf_config = HFBlip2Config(vision_config=vc.to_dict(),
                              qformer_config=_hf_qformer_config(config.qformer, vc.hidden_size),
                              text_config=model.llm.model.config.to_dict() if has_llm else None,
                              num_query_tokens=config.qformer.num_queries, image_text_hidden_size=config.embed_dim,
                              image_token_index=image_token_index)
    hf_config.architectures = ["Blip2ForConditionalGeneration" if has_llm else "Blip2ForImageTextRetrieval"]
    return hf_config


def _write_safetensors(tensors: dict, path: Path) -> Path:
    """`tensors` as path/model.safetensors, atomically; a sharded checkpoint there goes (its
    index would shadow the new file)."""
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    index = path / "model.safetensors.index.json"
    if index.is_file():  # a sharded checkpoint was here: it would shadow the new file, so it goes
        for shard in set(json.loads(index.read_text())["weight_map"].values()):
            (path / shard).unlink(missing_ok=True)
        index.unlink()
    tmp = path / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path / "model.safetensors")  # a crash never leaves half a file under the real name
    return path
