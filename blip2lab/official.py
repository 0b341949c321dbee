"""The official BLIP-2 checkpoints in and out: Hugging Face layout (Salesforce/blip2-* repos)
and LAVIS layout (`.pth` files of salesforce/LAVIS), both ways.

Every load goes through an explicit key table (ours <- theirs, BLIP2_REFERENCE.md Sec. 6):
shapes are checked from the file headers before a byte of data is read, and every key
left over or missing is an error naming it (STYLE.md point 8; nanoGPT `from_pretrained`).

Memory: `load_official` never holds the weights twice. The model is first built with its
parameters on the meta device (accelerate `init_empty_weights`: shapes, no storage), then
each tensor is read from the safetensors files (`safe_open`) one at a time and put in
place (`nn.Module._parameters[...] = ...`, the `assign=True` of `load_state_dict`); the
Q-Former's fused q/k/v is concatenated per layer. Peak memory is the model itself.
Tensors are read with `pread` into memory the model owns, not served from a memory map
(safetensors' default): a model backed by the file's mapping would see the file change
under it, and die of SIGBUS if the file were truncated or rewritten in place (e.g. by
saving into the folder it was loaded from).

Deviations from transformers' own loader, on purpose:
- a tensor in the file that no table entry uses is an error (transformers warns), except
  those the LLM class itself declares ignorable (`_keys_to_ignore_on_load_unexpected`,
  e.g. T5's unused relative-attention bias), which are named in a warning;
- the Q-Former runs in the requested dtype like the rest (transformers keeps it in fp32).

Shape legend: D_v vision width, D_q Q-Former width.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from .config import Blip2Config, LLMConfig, QFormerConfig, to_dict
from .weights import HF_ABSENT, WeightsError, _qformer_layer_table, config_from_hf, hf_table, raise_load_problems

__all__ = [
    "KNOWN_CHECKPOINTS",
    "OfficialInfo",
    "load_official",
    "load_official_tokenizers",
    "resolve_checkpoint",
    "export_hf",
    "lavis_table",
    "load_lavis",
    "export_lavis",
    "save_lavis",
]

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

_ARCHITECTURES = ("Blip2ForConditionalGeneration", "Blip2ForImageTextRetrieval")
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
# Safetensors files read lazily: headers first (shapes, completeness), data tensor by tensor
# ---------------------------------------------------------------------------------------


# safetensors dtype names -> torch (the ones checkpoints hold; others go through safe_open)
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _safetensors_header(file: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape from a safetensors header, checking the file holds all the data the
    header promises (a truncated download fails here, before anything is loaded)."""
    return {k: tuple(v["shape"]) for k, v in _safetensors_entries(file)[1].items()}


def _safetensors_entries(file: Path) -> tuple[int, dict[str, dict]]:
    """(offset of the data, key -> {"dtype", "shape", "data_offsets"}) of a safetensors file,
    checked as `_safetensors_header` says."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if size < 8 or n <= 0 or 8 + n > size:
                raise ValueError(f"header of {n} bytes in a file of {size} bytes")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if 8 + n + end > size:
            raise ValueError(f"the header promises {8 + n + end} bytes, the file has {size}")
        return 8 + n, header
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise WeightsError(f"cannot read {file}: it is not a complete safetensors file ({err}); "
                           f"download it again") from err


class _Shards:
    """The safetensors files of a checkpoint folder: one `model.safetensors` or the shards
    of `model.safetensors.index.json`. Tensors are read one at a time, each straight into
    memory of its own with one positioned read (no mapping of the file, so the model never
    depends on it; about 4x faster than safetensors' own pread backend, which reads in
    small pieces), keeping at most one file open."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted({folder / name for name in weight_map.values()})
        elif single.is_file():
            weight_map, files = None, [single]
        else:
            found = sorted(p.name for p in folder.iterdir())
            raise FileNotFoundError(f"{folder} has neither model.safetensors nor model.safetensors.index.json "
                                    f"(found {found}); only safetensors are read, never pickled .bin files")
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"shard {file} named in {index} is missing")
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.file_of: dict[str, Path] = {}
        self._entry: dict[str, tuple[int, dict]] = {}  # key -> (data offset of its file, header entry)
        for file in files:
            start, entries = _safetensors_entries(file)
            for key, entry in entries.items():
                if key in self.file_of:
                    raise WeightsError(f"{key} is stored twice: in {self.file_of[key]} and {file}")
                self.shapes[key], self.file_of[key] = tuple(entry["shape"]), file
                self._entry[key] = (start, entry)
        if weight_map is not None:
            wrong = sorted(k for k in set(weight_map) | set(self.file_of)
                           if k not in self.file_of or self.file_of[k].name != weight_map.get(k))
            if wrong:
                raise WeightsError(f"{index} does not match the shards' contents for keys {wrong}")
        self._open: Optional[tuple[Path, object]] = None

    def order(self, key: str) -> str:
        return str(self.file_of[key])

    def get(self, key: str) -> Tensor:
        file = self.file_of[key]
        start, entry = self._entry[key]
        dtype = _ST_DTYPES.get(entry["dtype"])
        try:
            if dtype is None:  # an exotic dtype (fp8, ...): safetensors' own reader
                from safetensors import safe_open

                with safe_open(str(file), framework="pt", device="cpu", backend="pread") as f:
                    return f.get_tensor(key)
            if self._open is None or self._open[0] != file:
                self.close()
                self._open = (file, os.open(file, os.O_RDONLY))
            begin, end = entry["data_offsets"]
            out = torch.empty(entry["shape"], dtype=dtype)
            view = memoryview(out.view(-1).view(torch.uint8).numpy()) if out.numel() else memoryview(b"")
            done = 0
            while done < end - begin:  # os.preadv may return short reads for large tensors
                got = os.preadv(self._open[1], [view[done:]], start + begin + done)
                if got <= 0:
                    raise OSError(f"the file ends {end - begin - done} bytes early")
                done += got
            return out
        except (OSError, RuntimeError, ValueError) as err:
            self.close()
            raise WeightsError(f"cannot read {key} from {file}: {err}") from err

    def close(self) -> None:
        if self._open is not None:
            os.close(self._open[1])
            self._open = None


# ---------------------------------------------------------------------------------------
# The generic part: plan from shapes, fill an empty model tensor by tensor, finish
# ---------------------------------------------------------------------------------------


def _keys(theirs) -> tuple[str, ...]:
    return (theirs,) if isinstance(theirs, str) else tuple(theirs)


def _tie_groups(model: nn.Module) -> list[set[str]]:
    """Groups of our keys the LLM ties together (one tensor under several names); each
    group needs one of its keys in the file, the others are tied after loading."""
    if model.llm is None:
        return []
    groups: dict[str, set[str]] = {}
    for target, source in model.llm.model.get_expanded_tied_weights_keys(all_submodels=True).items():
        groups.setdefault(source, {f"llm.model.{source}"}).add(f"llm.model.{target}")
    return list(groups.values())


def _plan(table: Mapping[str, object], shapes: Mapping[str, tuple], own: Mapping[str, Tensor], source: str,
          optional: Iterable[str] = (), tie_groups: Iterable[set[str]] = (),
          ignore: Callable[[str], bool] = lambda k: False) -> dict[str, tuple[str, ...]]:
    """Check `table` (ours <- theirs; several keys of theirs concatenate along dim 0) against
    the shapes of their tensors, before reading any data. Returns the entries to load.
    Missing keys (except our `optional` ones), leftovers (except `ignore`d ones) and shape
    mismatches are one error naming them all."""
    todo, missing, bad = {}, [], []
    optional = set(optional)
    for ours, theirs in table.items():
        theirs = _keys(theirs)
        absent = [k for k in theirs if k not in shapes]
        if absent:
            if ours not in optional or len(absent) < len(theirs):
                missing += absent
            continue
        got = shapes[theirs[0]]
        if len(theirs) > 1:  # fused: (sum of rows, *rest)
            if any(tuple(shapes[k][1:]) != tuple(got[1:]) for k in theirs):
                bad.append(f"{ours}: cannot stack {[shapes[k] for k in theirs]}")
                continue
            got = (sum(shapes[k][0] for k in theirs), *got[1:])
        if tuple(got) != tuple(own[ours].shape):
            bad.append(f"{ours} <- {'+'.join(theirs)}: {tuple(got)} in {source}, {tuple(own[ours].shape)} in model")
            continue
        todo[ours] = theirs
    for group in tie_groups:
        if not any(k in todo for k in group):
            missing += [f"one of {sorted('+'.join(_keys(table[k])) for k in group)}"]
    used = {k for theirs in table.values() for k in _keys(theirs)}
    leftover = sorted(k for k in shapes if k not in used and not ignore(k))
    raise_load_problems(source, missing, leftover, bad)
    return todo


def _assign(model: nn.Module, key: str, value: Tensor) -> None:
    """Put `value` in place of parameter/buffer `key` (no copy: the `assign=True` of
    `load_state_dict`), keeping its requires_grad."""
    owner, _, name = key.rpartition(".")
    module = model.get_submodule(owner)
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=module._parameters[name].requires_grad)
    elif name in module._buffers:
        module._buffers[name] = value
    else:
        raise WeightsError(f"{key} is neither a parameter nor a buffer of the model")


def _fill(model: nn.Module, todo: Mapping[str, tuple[str, ...]], get: Callable[[str], Tensor],
          dtype: torch.dtype, device_of: Callable[[str], torch.device | str], order=None,
          llm_dtype: Optional[torch.dtype] = None) -> None:
    """Read and place every planned tensor, one at a time (fused q/k/v: one layer at a time),
    floating ones in `dtype` (the LLM's in `llm_dtype` when given)."""
    keys = sorted(todo, key=lambda k: order(todo[k][0])) if order else list(todo)
    for ours in keys:
        parts = [get(k) for k in todo[ours]]
        value = parts[0] if len(parts) == 1 else torch.cat(parts)  # (sum of rows, ...)
        if value.is_floating_point():
            value = value.to(llm_dtype if llm_dtype is not None and ours.startswith("llm.model.") else dtype)
        _assign(model, ours, value.to(device_of(ours)))
        del parts, value


def _fresh(key: str, shape: torch.Size, config: Blip2Config) -> Tensor:
    """A sensible initial value for a part the source layout never carries (HF_ABSENT):
    the temperature at `temp_init`, the Q-Former LM head as QFormer.reset_parameters does."""
    if key == "temp":
        return torch.tensor(config.temp_init)
    if key.endswith("norm.weight"):
        return torch.ones(shape)
    if key.endswith("dense.weight"):
        return torch.randn(shape) * config.qformer.init_std
    return torch.zeros(shape)  # biases


def _finish(model: nn.Module, loaded: Iterable[str], absent_ok: Iterable[str], dtype: torch.dtype,
            device: torch.device | str, source: str) -> None:
    """Tie the LLM's shared weights, initialise the parts the source never carries, and
    verify nothing is left without storage (on the meta device)."""
    loaded = set(loaded)
    if model.llm is not None and any(k.startswith("llm.model.") for k in loaded):
        # As transformers' from_pretrained: a tensor stored under one of its tied names is tied
        # to the others; two names stored with different values stay untied (FlanT5's lm_head).
        llm_missing = {k.removeprefix("llm.model.") for k in model.state_dict()
                       if k.startswith("llm.model.") and k not in loaded}
        model.llm.model.tie_weights(missing_keys=llm_missing, recompute_mapping=False)
    own = model.state_dict()
    for key in absent_ok:
        if key in own and own[key].is_meta:
            _assign(model, key, _fresh(key, own[key].shape, model.config).to(dtype=dtype, device=device))
    meta = sorted({n for n, t in [*model.named_parameters(remove_duplicate=False),
                                  *model.named_buffers(remove_duplicate=False)] if t.is_meta})
    if meta:
        raise WeightsError(f"after loading {source}, these tensors have no value (still on the meta device): {meta}")


def _check_dtype(dtype, kind: str, auto: torch.dtype = torch.float32, what: str = "dtype") -> torch.dtype:
    """`dtype` (a torch dtype, its name, "auto" or None) -> the torch dtype to load in: None is
    float32, "auto" the checkpoint's own (`auto`); float16 is refused for T5."""
    from .dtypes import as_dtype, dtype_name
    from .llm import pick_dtype

    dtype = as_dtype(dtype, what)
    dtype = torch.float32 if dtype is None else auto if dtype == "auto" else dtype
    if kind != "none":
        pick_dtype(dtype_name(dtype), kind, "cpu")  # refuses float16 for T5
    return dtype


def _stored_dtype(hf_config) -> torch.dtype:
    """What `dtype="auto"` means for an HF folder, as in transformers: config.json's dtype
    (`torch_dtype` before transformers 4.56), else float32."""
    from .dtypes import as_dtype

    stored = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    try:
        value = as_dtype(stored, "config.json dtype") if stored is not None else None
    except ValueError:
        value = None
    return value if isinstance(value, torch.dtype) else torch.float32


def _empty_llm(text_config) -> nn.Module:
    """A transformers LLM with its parameters on the meta device (buffers are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if getattr(text_config, "is_encoder_decoder", False) else AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        return auto.from_config(text_config)


# ---------------------------------------------------------------------------------------
# Hugging Face layout -> blip2lab
# ---------------------------------------------------------------------------------------


def _read_hf_config(folder: Path):
    from transformers import Blip2Config as HFBlip2Config

    file = folder / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a Hugging Face BLIP-2 checkpoint folder")
    raw = json.loads(file.read_text())
    arch = (raw.get("architectures") or [None])[0]
    if raw.get("model_type") != "blip-2" or arch not in _ARCHITECTURES:
        raise WeightsError(f"{file}: model_type {raw.get('model_type')!r}, architectures {raw.get('architectures')}; "
                           f"supported: model_type 'blip-2' with one of {list(_ARCHITECTURES)}")
    return HFBlip2Config.from_pretrained(str(folder)), arch


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
    from .processor import qformer_token_ids

    ids = {name: (value if value is not None and value < vocab_size else None)
           for name, value in qformer_token_ids(qformer_tokenizer).items()}
    return ids if ids["pad_token_id"] is not None else {k: v for k, v in ids.items() if k != "pad_token_id"}


def _empty_model(folder: Path, hf_config, retrieval: bool, source, dtype, qformer_overrides: dict,
                 llm_dtype=None, qformer_tokenizer=None):
    """Our `Blip2` for an HF BLIP-2 config, every parameter on the meta device (no storage)."""
    from accelerate import init_empty_weights
    from transformers import Blip2VisionModel

    from .blip2 import Blip2
    from .dtypes import dtype_name
    from .llm import llm_kind
    from .vision import HFBlip2ImageEncoder

    if retrieval and not hf_config.qformer_config.use_qformer_text_input:
        raise WeightsError(f"{folder}: a retrieval checkpoint needs use_qformer_text_input=True in its config")
    saved_q, saved_vision = _sidecar_overrides(folder)
    shipped = _tokenizer_ids(qformer_tokenizer, hf_config.qformer_config.vocab_size)
    config = config_from_hf(hf_config, **(shipped | saved_q | {"text_input": retrieval} | qformer_overrides))
    config.vision = replace(config.vision, **(_preprocessor_overrides(folder, config.vision.image_size) | saved_vision))
    llm = None if retrieval else _empty_llm(hf_config.text_config)
    kind = "none" if llm is None else llm_kind(llm)
    dtype = _check_dtype(dtype, kind, auto=_stored_dtype(hf_config))
    if llm is not None:
        llm_dtype = dtype if llm_dtype is None else _check_dtype(llm_dtype, kind, _stored_dtype(hf_config.text_config),
                                                                 "llm_dtype")
        config.llm = LLMConfig(kind=kind, name_or_path=f"language_model of {source}", dtype=dtype_name(llm_dtype))
    with init_empty_weights(include_buffers=False):
        encoder = HFBlip2ImageEncoder(Blip2VisionModel(hf_config.vision_config), layer_index=-1,
                                      mean=config.vision.mean, std=config.vision.std)
        return Blip2(config, image_encoder=encoder, language_model=llm, init_from_bert=False), dtype


def load_official(source: str | os.PathLike, *, device_map=None, dtype=None, llm_dtype=None,
                  qformer_tokenizer=None, **qformer_overrides):
    """A blip2lab `Blip2` from a Salesforce BLIP-2 checkpoint in Hugging Face layout: a local
    folder with config.json + model.safetensors (or sharded model-0000x-of-0000y.safetensors
    with model.safetensors.index.json), or a hub id where the hub can be reached.

    `Blip2ForConditionalGeneration` (OPT, FlanT5 or any transformers LLM; no stage-1 heads)
    and `Blip2ForImageTextRetrieval` (stage-1 heads, no LLM) are told apart by config.json's
    `architectures`. Strict: every tensor of the file is used and every model tensor set,
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
    shards = _Shards(folder)  # headers checked here: a damaged file fails before any building
    retrieval = arch == "Blip2ForImageTextRetrieval"
    model, dtype = _empty_model(folder, hf_config, retrieval, source, dtype, qformer_overrides, llm_dtype,
                                qformer_tokenizer)
    llm = None if retrieval else model.llm.model
    llm_dtype = None if llm is None else getattr(torch, model.config.llm.dtype)
    llm_map = None if llm is None else _device_map(llm, device_map, llm_dtype)
    main = _main_device(device_map) if llm is None else "cpu" if llm_map is None else \
        _llm_device(llm_map, _embedding_key(llm))

    table = hf_table(model.config.qformer, model.image_encoder.vision_model.state_dict().keys(),
                     llm.state_dict().keys() if llm is not None else ())
    groups = _tie_groups(model)
    ignorable = [re.compile(p) for p in (getattr(llm, "_keys_to_ignore_on_load_unexpected", None) or [])]

    def ignore(k: str) -> bool:
        return k == "embeddings.position_ids" or (k.startswith("language_model.") and any(
            p.search(k.removeprefix("language_model.")) for p in ignorable))

    todo = _plan(table, shards.shapes, model.state_dict(), str(folder),
                 optional=set().union(*groups), tie_groups=groups, ignore=ignore)
    skipped = sorted(k for k in shards.shapes if ignore(k) and k != "embeddings.position_ids")
    if skipped:
        warnings.warn(f"{folder}: not loaded, as {type(llm).__name__} declares them unused: {skipped}", stacklevel=2)

    def device_of(ours: str):
        if llm_map and ours.startswith("llm.model."):
            return _llm_device(llm_map, ours.removeprefix("llm.model."))
        return main

    try:
        _fill(model, todo, shards.get, dtype, device_of, order=shards.order, llm_dtype=llm_dtype)
    finally:
        shards.close()
    _finish(model, todo, HF_ABSENT if retrieval else (), dtype, main, str(folder))
    if llm_map is not None:
        from accelerate import dispatch_model

        dispatch_model(llm, device_map=llm_map)
    model.official = OfficialInfo(str(source), arch, getattr(hf_config, "image_token_index", None),
                                  untrained=HF_ABSENT if retrieval else ())
    return model.eval()


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


def _hf_vision_config(model):
    from .vision import HFBlip2ImageEncoder

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
    from safetensors.torch import save_file
    from transformers import Blip2Config as HFBlip2Config

    config: Blip2Config = model.config
    q = config.qformer
    has_llm = model.llm is not None
    if has_llm == q.text_input:
        raise WeightsError("the HF layout holds either a generation model (LLM, no Q-Former text side: "
                           "Blip2ForConditionalGeneration) or a retrieval model (Q-Former text side, no LLM: "
                           f"Blip2ForImageTextRetrieval); this model has llm={has_llm}, text_input={q.text_input}")
    vc = _hf_vision_config(model)
    if config.vision.ln_vision_eps != vc.layer_norm_eps:
        warnings.warn(f"ln_vision_eps ({config.vision.ln_vision_eps}) != the vision layer_norm_eps "
                      f"({vc.layer_norm_eps}): HF applies ln_vision (post_layernorm) with the latter", stacklevel=2)
    arch = "Blip2ForConditionalGeneration" if has_llm else "Blip2ForImageTextRetrieval"
    text_config = model.llm.model.config.to_dict() if has_llm else None
    if image_token_index is None and has_llm:
        info = getattr(model, "official", None)
        image_token_index = info.image_token_index if info is not None and info.image_token_index is not None \
            else model.llm.model.get_input_embeddings().num_embeddings - 1
    hf_config = HFBlip2Config(vision_config=vc.to_dict(), qformer_config=_hf_qformer_config(q, vc.hidden_size),
                              text_config=text_config, num_query_tokens=q.num_queries,
                              image_text_hidden_size=config.embed_dim, image_token_index=image_token_index)
    hf_config.architectures = [arch]

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
        parts = value.chunk(len(_keys(theirs))) if not isinstance(theirs, str) else (value,)  # fused q;k;v rows
        for name, part in zip(_keys(theirs), parts):
            tensors[name] = part.contiguous().cpu()

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    index = path / "model.safetensors.index.json"
    if index.is_file():  # a sharded checkpoint was here: it would shadow the new file, so it goes
        for shard in set(json.loads(index.read_text())["weight_map"].values()):
            (path / shard).unlink(missing_ok=True)
        index.unlink()
    tmp = path / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(path / "model.safetensors")  # a crash never leaves half a file under the real name
    hf_config.save_pretrained(str(path))
    (path / _SIDECAR).write_text(json.dumps(to_dict(config), indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------------------
# LAVIS layout (salesforce/LAVIS `.pth`): both ways
# ---------------------------------------------------------------------------------------

_K_BIAS = "attn.k_bias (zeros: EVA has no key bias)"  # stands for the zeros between q_bias and v_bias
_LLM_PREFIXES = ("opt", "t5", "llm")  # blip2_opt, blip2_t5; "llm" as InstructBLIP names other LLMs


def _eva_block_table(i: int, ours: str, theirs: str) -> dict[str, object]:
    """One EVA ViT block (LAVIS `eva_vit.py`) <- our HF-layout block. Our qkv bias is
    cat(q_bias, 0, v_bias): EVA has no key bias (BLIP2_REFERENCE.md Sec. 6)."""
    o, t = f"{ours}.encoder.layers.{i}", f"{theirs}.blocks.{i}"
    table: dict[str, object] = {f"{o}.self_attn.qkv.weight": f"{t}.attn.qkv.weight",
                                f"{o}.self_attn.qkv.bias": (f"{t}.attn.q_bias", f"{t}.{_K_BIAS}", f"{t}.attn.v_bias")}
    for mine, lavis in (("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("self_attn.projection", "attn.proj"),
                        ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
        for p in ("weight", "bias"):
            table[f"{o}.{mine}.{p}"] = f"{t}.{lavis}.{p}"
    return table


def lavis_table(config: Blip2Config, vision_layers: int, llm_keys: Iterable[str] = (),
                llm_prefix: str = "opt") -> dict[str, object]:
    """Our `Blip2` keys <- LAVIS keys (BLIP2_REFERENCE.md Sec. 6). `vision_layers`: blocks of
    our tower; `llm_keys`: the LLM's own keys (empty: no LLM weights). The Q-Former LM head's
    decoder (tied to the word embeddings) is checked and dropped separately."""
    q = config.qformer
    v = "image_encoder.vision_model"
    table: dict[str, object] = {
        f"{v}.embeddings.class_embedding": "visual_encoder.cls_token",
        f"{v}.embeddings.position_embedding": "visual_encoder.pos_embed",
        f"{v}.embeddings.patch_embedding.weight": "visual_encoder.patch_embed.proj.weight",
        f"{v}.embeddings.patch_embedding.bias": "visual_encoder.patch_embed.proj.bias",
        "ln_vision.weight": "ln_vision.weight", "ln_vision.bias": "ln_vision.bias",
        "qformer.query_tokens": "query_tokens",
        "qformer.layernorm.weight": "Qformer.bert.embeddings.LayerNorm.weight",
        "qformer.layernorm.bias": "Qformer.bert.embeddings.LayerNorm.bias",
    }
    for i in range(vision_layers):
        table |= _eva_block_table(i, v, "visual_encoder")
    for i in range(q.num_layers):
        layer = _qformer_layer_table(i, q.has_cross_attention(i), "Qformer.bert.encoder.layer", "bert")
        for ours, theirs in layer.items():
            if q.text_input or ".text_ffn." not in ours:  # stage-2 LAVIS drops intermediate/output
                table[f"qformer.{ours}"] = theirs
    if q.text_input:
        table["qformer.word_embeddings.weight"] = "Qformer.bert.embeddings.word_embeddings.weight"
        table["qformer.position_embeddings.weight"] = "Qformer.bert.embeddings.position_embeddings.weight"
        head = "Qformer.cls.predictions"
        table |= {"qformer.lm_head.dense.weight": f"{head}.transform.dense.weight",
                  "qformer.lm_head.dense.bias": f"{head}.transform.dense.bias",
                  "qformer.lm_head.norm.weight": f"{head}.transform.LayerNorm.weight",
                  "qformer.lm_head.norm.bias": f"{head}.transform.LayerNorm.bias",
                  "qformer.lm_head.bias": f"{head}.bias", "temp": "temp"}
        for name in ("vision_proj", "text_proj", "itm_head"):
            table |= {f"{name}.{p}": f"{name}.{p}" for p in ("weight", "bias")}
    if config.llm.kind != "none":
        table |= {f"llm.projection.{p}": f"{llm_prefix}_proj.{p}" for p in ("weight", "bias")}
        table |= {f"llm.model.{k}": f"{llm_prefix}_model.{k}" for k in llm_keys}
    return table


def _torch_load(path: Path) -> dict:
    """`torch.load` that unpickles tensors and plain containers only (weights_only=True)."""
    if not path.is_file():
        raise FileNotFoundError(f"no LAVIS checkpoint at {path}")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # zip format: no copy
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (pre-1.6) format
    except pickle.UnpicklingError as err:
        raise WeightsError(f"refused to load {path}: it holds objects other than tensors and plain containers, "
                           f"and only those are unpickled (torch.load weights_only=True). {err}") from err
    except (RuntimeError, EOFError, OSError) as err:
        raise WeightsError(f"cannot read {path}: not a complete torch checkpoint ({err})") from err
    return obj


def _as_state(obj, what: str) -> dict[str, Tensor]:
    if isinstance(obj, (str, os.PathLike)):
        obj = _torch_load(Path(obj))
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]  # LAVIS runner checkpoints: {"model": ..., "optimizer": ..., "config": ...}
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"{what} is not a state dict (a mapping of names to tensors)")
    return dict(obj)


_EVA_UNUSED = ("head.", "norm.", "fc_norm.")  # in LAVIS's EVA model (classifier, final norms), never run by BLIP-2
_BLOCK = re.compile(r"^visual_encoder\.blocks\.(\d+)\.")


def _vision_blocks(state: Mapping[str, Tensor]) -> int:
    return 1 + max((int(m.group(1)) for k in state if (m := _BLOCK.match(k))), default=-1)


def _lavis_vision(state: dict, vision_weights, depth: int, source: str) -> tuple[dict, list[str]]:
    """The ViT tensors of a LAVIS load: the checkpoint's own (a fine-tuned ViT) or those of
    `vision_weights` (eva_vit_g.pth), never both. Dropped, as LAVIS's model never runs them:
    the classifier head and final norms, and blocks of `vision_weights` past LAVIS's `depth`
    (eva_vit_g.pth has 40 blocks, LAVIS builds 39). A checkpoint's own ViT was saved from
    LAVIS's model, so every block in it ran: more blocks than `depth` is an error."""
    own = sorted(k for k in state if k.startswith("visual_encoder."))
    notes = []
    if vision_weights is not None:
        if own:
            raise WeightsError(f"{source} holds its own ViT ({len(own)} visual_encoder.* tensors: a fine-tuned one, "
                               f"e.g. at 364 px); vision_weights= would replace it: pass one or the other")
        eva = _as_state(vision_weights, "vision_weights")
        prefixed = any(k.startswith("visual_encoder.") for k in eva)
        eva = {(k if prefixed else f"visual_encoder.{k}"): t for k, t in eva.items()}
        extra = sorted({int(m.group(1)) for k in eva if (m := _BLOCK.match(k)) and int(m.group(1)) >= depth})
        if extra:
            notes.append(f"vision_weights blocks {extra[0]}..{extra[-1]} (LAVIS's model has {depth})")
        eva = {k: t for k, t in eva.items() if not ((m := _BLOCK.match(k)) and int(m.group(1)) >= depth)}
        state = state | eva
    elif own and _vision_blocks(state) > depth:
        raise WeightsError(f"the ViT in {source} has {_vision_blocks(state)} blocks, every one of which LAVIS ran, "
                           f"but vision.layers is {depth}: set vision.layers={_vision_blocks(state)}")
    unused = sorted({k.split(".")[1] for k in state if k.startswith(tuple(f"visual_encoder.{p}" for p in _EVA_UNUSED))})
    if unused:
        notes.append(", ".join(f"visual_encoder.{u}.*" for u in unused))
        state = {k: t for k, t in state.items() if not k.startswith(tuple(f"visual_encoder.{u}." for u in unused))}
    return state, notes


def _tied_copy_names(llm: nn.Module) -> set[str]:
    """The second names of the LLM's tied tensors (OPT `lm_head.weight`, T5 `encoder/decoder.
    embed_tokens.weight`): `named_parameters()` skips them, so LAVIS's runner, which deletes
    the frozen tensors that list names, keeps them in every stage-2 checkpoint."""
    return {n for n, _ in llm.named_parameters(remove_duplicate=False)} - {n for n, _ in llm.named_parameters()}


def _lavis_llm(state: dict, config: Blip2Config, language_model, prefix: str, source: str):
    """(the LLM module, whether the file holds its weights, notes, state without the ignored
    keys). A file holding only the tied copies LAVIS's runner keeps does not hold the LLM: the
    copies must equal the LLM given (or built from llm.name_or_path), or the checkpoint was
    trained with another one (refused, by name)."""
    from transformers import AutoConfig

    from .llm import load_llm

    keys = sorted(k for k in state if k.startswith(f"{prefix}_model."))
    if config.llm.kind == "none":
        return None, bool(keys), [], state
    probe = language_model or _empty_llm(AutoConfig.from_pretrained(config.llm.name_or_path))
    copies = {f"{prefix}_model.{n}" for n in _tied_copy_names(probe)}
    if keys and not set(keys) <= copies:  # the LLM itself is in the file
        return probe, True, [], state
    llm = language_model or load_llm(config.llm)
    for key in keys:
        theirs, mine = state[key], llm.get_parameter(key.removeprefix(f"{prefix}_model."))
        if theirs.shape != mine.shape or not torch.equal(theirs, mine.detach().to(theirs.dtype)):
            raise WeightsError(f"{key} in {source} (a tied copy of a frozen LLM tensor) differs from the LLM given "
                               f"({config.llm.name_or_path or type(llm).__name__}): the checkpoint was trained with "
                               f"another LLM")
    notes = [f"{', '.join(keys)} (tied copies of the frozen LLM's, equal to the LLM given)"] if keys else []
    return llm, False, notes, {k: t for k, t in state.items() if k not in keys}


def load_lavis(path_or_state_dict, config: Blip2Config, language_model: Optional[nn.Module] = None, *,
               vision_weights=None, dtype=None):
    """A blip2lab `Blip2` from a LAVIS BLIP-2 checkpoint (`{"model": state}` or a bare state
    dict; a `.pth` is read with `torch.load(weights_only=True)`: tensors only, never code).

    `config` describes the model (LAVIS files carry no architecture): vision.backend must be
    'hf_blip2' (the EVA tower in HF layout) with vision.layers LAVIS's depth (39 for EVA-g)
    and layer_index -1 (LAVIS reads its last block), `qformer.text_input=False` for stage-2
    checkpoints (no Q-Former text side), `llm.kind` for the LLM. dtype: a torch dtype or its
    name ("auto": the file's; default float32).

    As LAVIS's runner writes them, checkpoints hold the trainable tensors only, so:
    - the ViT (`visual_encoder.*`) is usually absent: pass `vision_weights` (eva_vit_g.pth,
      keys with or without the `visual_encoder.` prefix). A file with its own (fine-tuned) ViT
      and `vision_weights` is refused: one would silently replace the other.
    - the LLM (`opt_model.*` / `t5_model.*`) is absent but for the tied copies (`_lavis_llm`):
      then `language_model` (or, if None, the LLM at `config.llm.name_or_path`) is used, with a
      warning. When the file has the LLM, it is loaded (into `language_model` if given).
    What LAVIS's own load ignores or never runs (the EVA classifier head and final norms, the
    40th block of eva_vit_g.pth, the tied copies) is dropped and named in one warning; any
    other leftover or missing key is an error naming it."""
    from accelerate import init_empty_weights

    from .blip2 import Blip2

    state = _as_state(path_or_state_dict, "the LAVIS checkpoint")
    source = str(path_or_state_dict) if isinstance(path_or_state_dict, (str, os.PathLike)) else "the LAVIS state dict"
    vision = config.vision
    if vision.backend != "hf_blip2":
        raise WeightsError(f"load_lavis needs vision.backend='hf_blip2' (the EVA tower in HF layout), "
                           f"got {vision.backend!r}")
    if vision.layer_index % vision.layers != vision.layers - 1:
        raise WeightsError(f"LAVIS runs every block of its ViT and reads the last one's output, but vision.layers="
                           f"{vision.layers} with vision.layer_index={vision.layer_index} would keep "
                           f"{vision.used_layers}: set vision.layers to LAVIS's depth (39 for EVA ViT-g) and "
                           f"vision.layer_index=-1")
    state, notes = _lavis_vision(state, vision_weights, vision.layers, source)
    prefixes = sorted({p for p in _LLM_PREFIXES for k in state if k.startswith((f"{p}_model.", f"{p}_proj."))})
    if len(prefixes) > 1:
        raise WeightsError(f"{source} holds several LLMs' weights: {[p + '_model' for p in prefixes]}")
    prefix = prefixes[0] if prefixes else "opt"
    llm, has_llm_weights, llm_notes, state = _lavis_llm(state, config, language_model, prefix, source)
    floating = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    dtype = _check_dtype(dtype, config.llm.kind, auto=floating)
    with init_empty_weights(include_buffers=False):
        model = Blip2(config, language_model=llm, init_from_bert=False)
    llm_keys = list(llm.state_dict()) if llm is not None and has_llm_weights else []
    table = lavis_table(config, vision.layers, llm_keys, prefix)

    _check_lm_head_tie(state, config.qformer, source)
    for key in [k for k in state if k.endswith(".attn.qkv.weight") and k.startswith("visual_encoder.blocks.")]:
        block = key.removesuffix("attn.qkv.weight")
        state[block + _K_BIAS] = torch.zeros(state[key].shape[0] // 3, dtype=state[key].dtype)

    def ignore(k: str) -> bool:
        return k in ("Qformer.bert.embeddings.position_ids", "Qformer.cls.predictions.decoder.weight",
                     "Qformer.cls.predictions.decoder.bias") or k.endswith(_K_BIAS)

    groups = _tie_groups(model) if llm_keys else []
    not_here = [] if has_llm_weights else [k for k in model.state_dict() if k.startswith("llm.model.")]
    hint = "" if any(k.startswith("visual_encoder.") for k in state) else \
        " (LAVIS checkpoints omit the frozen ViT: pass vision_weights=, e.g. eva_vit_g.pth)"
    try:
        todo = _plan({k: v for k, v in table.items() if k not in not_here},
                     {k: tuple(t.shape) for k, t in state.items()}, model.state_dict(), source,
                     optional=set().union(*groups), tie_groups=groups, ignore=ignore)
    except WeightsError as err:
        raise WeightsError(str(err) + hint) from None
    # clone: the new model owns its tensors (never shares them with the caller's dict or the file's mmap)
    _fill(model, todo, lambda k: state[k].detach().clone(), dtype, lambda k: "cpu")
    _finish(model, todo, (), dtype, "cpu", source)
    if notes + llm_notes:
        warnings.warn(f"{source}: not loaded, as LAVIS's BLIP-2 never runs them: {'; '.join(notes + llm_notes)}",
                      stacklevel=2)
    if llm is not None and not has_llm_weights:
        warnings.warn(f"{source} has no {prefix}_model.* weights (LAVIS saves only trainable tensors): the LLM "
                      f"keeps the weights it was given ({type(llm).__name__})", stacklevel=2)
    return model.eval()


def _check_lm_head_tie(state: Mapping[str, Tensor], q: QFormerConfig, source: str) -> None:
    """BERT's MLM decoder is tied to the word embeddings (and its bias to `predictions.bias`):
    LAVIS stores the copies, which must agree before they are dropped."""
    pairs = (("Qformer.cls.predictions.decoder.weight", "Qformer.bert.embeddings.word_embeddings.weight"),
             ("Qformer.cls.predictions.decoder.bias", "Qformer.cls.predictions.bias"))
    for copy_key, key in pairs:
        if copy_key in state and key in state and not torch.equal(state[copy_key], state[key]):
            raise WeightsError(f"{source}: {copy_key} differs from {key}; the Q-Former LM head's decoder must be tied")
        if copy_key in state and not q.text_input:
            raise WeightsError(f"{source} has {copy_key} but qformer.text_input is False (a stage-2 model)")


def _lavis_llm_prefix(model) -> str:
    model_type = getattr(model.llm.model.config, "model_type", "")
    return "opt" if model_type == "opt" else "t5" if model_type in ("t5", "mt5") else "llm"


def export_lavis(model, include_frozen: bool = True) -> dict[str, Tensor]:
    """Our `Blip2` as a LAVIS state dict (the inverse of `load_lavis`). The EVA q/v biases are
    split back from our qkv bias, whose key part must be zero (EVA has none). The Q-Former
    LM head's tied decoder is written too, as LAVIS stores it. `include_frozen=False` leaves
    out the frozen ViT and LLM, as LAVIS's own checkpoints do."""
    config: Blip2Config = model.config
    _hf_vision_config(model)  # checks the tower is the EVA / HF-layout one
    own = {k: v.detach() for k, v in model.state_dict().items()}
    vision_layers = len(model.image_encoder.vision_model.encoder.layers)
    prefix = _lavis_llm_prefix(model) if model.llm is not None else "opt"
    llm_keys = [k.removeprefix("llm.model.") for k in own if k.startswith("llm.model.")]
    table = lavis_table(config, vision_layers, llm_keys, prefix)
    unmapped = sorted(set(own) - set(table))
    if unmapped:
        raise WeightsError(f"no LAVIS name for {unmapped}")
    out: dict[str, Tensor] = {}
    for ours, theirs in table.items():
        if not include_frozen and ours.startswith(("image_encoder.", "llm.model.")):
            continue
        value = own[ours]
        if isinstance(theirs, str):
            out[theirs] = value
        elif theirs[1].endswith(_K_BIAS):  # EVA: q_bias, v_bias and no key bias
            q_bias, k_bias, v_bias = value.chunk(3)  # (D_v,) each
            if torch.count_nonzero(k_bias):
                raise WeightsError(f"{ours}: the key part of the qkv bias is not zero, which EVA (LAVIS) cannot store")
            out[theirs[0]], out[theirs[2]] = q_bias.clone(), v_bias.clone()
        else:  # the Q-Former's fused [q; k; v] rows -> query, key, value
            out |= {name: part.clone() for name, part in zip(theirs, value.chunk(len(theirs)))}
    q = config.qformer
    out["Qformer.bert.embeddings.position_ids"] = torch.arange(q.max_position_embeddings)[None]  # LAVIS's buffer
    if q.text_input:
        out["Qformer.cls.predictions.decoder.weight"] = own["qformer.word_embeddings.weight"]
        out["Qformer.cls.predictions.decoder.bias"] = own["qformer.lm_head.bias"]
    return out


def save_lavis(model, path: str | os.PathLike, include_frozen: bool = True) -> Path:
    """`torch.save({"model": export_lavis(model)})`, the layout LAVIS's runner writes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": export_lavis(model, include_frozen)}, tmp)
    tmp.replace(path)
    return path
