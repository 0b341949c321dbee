"""Weights in and out: blip2lab's own checkpoints and the explicit key tables that map
other layouts (a BERT checkpoint, Hugging Face BLIP-2) onto our modules.

Every load is strict: shapes are asserted key by key, and a key left over or missing is
an error that names it (nanoGPT `from_pretrained`; never LAVIS's `strict=False` with the
message ignored). A blip2lab checkpoint is a folder with `config.json` (the resolved
config) and `model.safetensors`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .config import Blip2Config, LLMConfig, QFormerConfig, from_dict, to_dict

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


class WeightsError(RuntimeError):
    """A checkpoint does not fit the model; the message names the keys."""


# ---------------------------------------------------------------------------------------
# Strict loading with named leftovers
# ---------------------------------------------------------------------------------------


def raise_load_problems(source: str, missing: Iterable[str], leftover: Iterable[str], bad_shapes: Iterable[str]) -> None:
    """One error naming every missing key, leftover key and shape mismatch, if any."""
    missing, leftover, bad_shapes = sorted(missing), sorted(leftover), list(bad_shapes)
    problems = []
    if leftover:
        problems.append(f"keys in {source} the model does not have: {leftover}")
    if missing:
        problems.append(f"model keys missing from {source}: {missing}")
    if bad_shapes:
        problems.append("shape mismatches: " + "; ".join(bad_shapes))
    if problems:
        raise WeightsError("strict load failed; " + " | ".join(problems))


def load_strict(module: nn.Module, state: Mapping[str, Tensor], allowed_missing: Iterable[str] = (),
                source: str = "checkpoint") -> None:
    """Copy `state` into `module`: every key must exist with the same shape, and every
    parameter/buffer of the module must be given, except the keys in `allowed_missing`
    (parts the source layout does not carry, e.g. HF checkpoints drop `temp`)."""
    own = module.state_dict()
    allowed = set(allowed_missing)
    unexpected = sorted(set(state) - set(own))
    missing = sorted(set(own) - set(state) - allowed)
    bad_shapes = [f"{k}: {tuple(state[k].shape)} in {source}, {tuple(own[k].shape)} in model"
                  for k in sorted(set(state) & set(own)) if state[k].shape != own[k].shape]
    raise_load_problems(source, missing, unexpected, bad_shapes)
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)


# ---------------------------------------------------------------------------------------
# blip2lab's own format
# ---------------------------------------------------------------------------------------


LLM_CONFIG_DIR = "llm"  # the frozen LLM's transformers config, to rebuild it without its source folder
REBUILT_META = "rebuilt"  # weights-file metadata: {state-dict prefix: fingerprint} of the parts left out


def rebuildable_parts(model: nn.Module) -> dict[str, nn.Module]:
    """The frozen parts of a `Blip2` that building it from its config restores exactly, so a
    checkpoint may leave them out (`save_pretrained(rebuild_frozen=True)`), by state-dict
    prefix: the image encoder when `vision.weights` names its pretrained weights, the LLM
    (from `llm.name_or_path`) and, with `qformer.freeze_word_embeddings`, the Q-Former's word
    embeddings (from `qformer.init_from`). A part with any trainable parameter is not one:
    what it learned exists nowhere else."""
    cfg = model.config
    parts: dict[str, nn.Module] = {}
    if cfg.vision.weights is not None:
        parts["image_encoder."] = model.image_encoder
    if getattr(model, "llm", None) is not None:
        parts["llm.model."] = model.llm.model
    if cfg.qformer.freeze_word_embeddings:
        parts["qformer.word_embeddings."] = model.qformer.word_embeddings
    return {prefix: part for prefix, part in parts.items() if not any(p.requires_grad for p in part.parameters())}


def save_pretrained(model: nn.Module, path: str | Path, dtype: Optional[torch.dtype] = None,
                    rebuild_frozen: bool = False) -> Path:
    """Write `config.json` + `model.safetensors` (+ `llm/config.json` when there is an LLM).
    Tied weights (an LLM's embeddings and LM head, ...) are stored once; the other names
    are kept as aliases in the file's metadata. The weights file is written atomically.
    `dtype` (e.g. torch.float16) stores floating tensors at that precision, half the size;
    loading copies them into the model's own dtype.
    `rebuild_frozen=True` leaves out the `rebuildable_parts` (frozen, rebuilt from their
    sources at load time): the file then holds only what trained, plus a fingerprint of
    each part left out, which `load_pretrained` checks against the rebuilt one."""
    from .feature_cache import encoder_fingerprint

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rebuilt = rebuildable_parts(model) if rebuild_frozen else {}
    left_out = tuple(rebuilt)
    state, aliases, seen = {}, {}, {}
    for key, tensor in model.state_dict().items():
        if key.startswith(left_out):
            continue
        ident = (tensor.data_ptr(), tensor.shape, tensor.stride()) if tensor.numel() else None
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        tensor = tensor.detach().contiguous().cpu()
        state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
    metadata = {"format": "pt", "library": "blip2lab", "aliases": json.dumps(aliases)}
    if rebuilt:
        metadata[REBUILT_META] = json.dumps({prefix: encoder_fingerprint(part) for prefix, part in rebuilt.items()})
    tmp = path / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path / WEIGHTS_NAME)  # a crash never leaves half a file under the real name
    (path / CONFIG_NAME).write_text(json.dumps(to_dict(model.config), indent=2) + "\n")
    if getattr(model, "llm", None) is not None and "llm.model." not in rebuilt:
        model.llm.model.config.save_pretrained(path / LLM_CONFIG_DIR)
    return path


def read_safetensors(file: str | Path) -> dict[str, Tensor]:
    """Read a safetensors file (memory-mapped by safetensors), with blip2lab's aliases for
    tied weights restored; a damaged file is a clear error."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"no weights file at {file}")
    try:
        with safe_open(str(file), framework="pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
        state = load_file(str(file))
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"cannot read {file}: it is not a complete safetensors file ({err})") from err
    for key, target in aliases.items():
        state[key] = state[target]
    return state


def load_pretrained(path: str | Path, map_location: str | torch.device = "cpu"):
    """Rebuild a model saved by `save_pretrained` without ever holding its weights twice.

    The config first; the model is built from it with its parameters on the meta device
    (shapes, no storage; the LLM from `llm/config.json`, not from its original source);
    keys and shapes are checked against the file's header before any data is read (a
    strict load: leftovers, missing keys and shape mismatches are one error naming them);
    then each tensor is read on its own, converted to the dtype the model declares for it,
    moved to `map_location` and put in place (`assign`, no copy into a random twin). Peak
    memory is the model plus one tensor. Tied weights stored once come back tied.
    A folder saved with `rebuild_frozen=True` is built from its config for real instead:
    the parts it leaves out come from their sources (`_load_rebuilding`)."""
    from accelerate import init_empty_weights

    from .blip2 import Blip2  # the model imports this module; import late to avoid a cycle
    from .official import _Shards, _assign, _empty_llm  # the streaming loader of the official checkpoints

    path = Path(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: not a blip2lab checkpoint folder")
    config = from_dict(Blip2Config, json.loads(config_file.read_text()))
    file = path / WEIGHTS_NAME
    shards = _Shards(path)  # header checked here: a truncated file fails before anything is built
    aliases = _aliases(file)
    rebuilt = _metadata_json(file, REBUILT_META, None)
    if rebuilt is not None:
        return _load_rebuilding(file, config, shards, aliases, rebuilt, map_location)
    language_model = None
    if config.llm.kind != "none":
        from transformers import AutoConfig

        language_model = _empty_llm(AutoConfig.from_pretrained(str(path / LLM_CONFIG_DIR)))
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers real (some are not saved)
        model = Blip2(config, language_model=language_model, init_from_bert=False)
    own = model.state_dict()
    stored = set(shards.shapes) | set(aliases)
    bad_shapes = [f"{k}: {shards.shapes[k]} in {file}, {tuple(own[k].shape)} in model"
                  for k in sorted(set(shards.shapes) & set(own)) if tuple(shards.shapes[k]) != tuple(own[k].shape)]
    raise_load_problems(str(file), set(own) - stored, stored - set(own), bad_shapes)
    try:
        for key in shards.shapes:
            value = shards.get(key)
            _assign(model, key, value.to(device=map_location, dtype=own[key].dtype))
            del value
    finally:
        shards.close()
    for key, target in aliases.items():  # one tensor under several names: the same object again
        owner, _, name = key.rpartition(".")
        slot = model.get_submodule(owner)
        if name in slot._parameters:
            slot._parameters[name] = model.get_parameter(target)
        else:
            slot._buffers[name] = model.get_buffer(target)
    left = sorted(n for n, t in [*model.named_parameters(remove_duplicate=False),
                                 *model.named_buffers(remove_duplicate=False)] if t.is_meta)
    if left:
        raise WeightsError(f"after loading {file}, these tensors have no value (still on the meta device): {left}")
    return model.to(map_location).eval()


def _metadata_json(file: Path, key: str, default):
    """A JSON entry of a safetensors file's metadata (header only)."""
    try:
        with safe_open(str(file), framework="pt") as f:
            text = (f.metadata() or {}).get(key)
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"cannot read {file}: it is not a complete safetensors file ({err})") from err
    return default if text is None else json.loads(text)


def _aliases(file: Path) -> dict[str, str]:
    """The tied names `save_pretrained` stored once: alias key -> stored key (header only)."""
    return _metadata_json(file, "aliases", {})


# Where each rebuilt part comes from, for the error that says it is not the part trained with.
_REBUILT_SOURCE = {"image_encoder.": ("vision", "weights"), "llm.model.": ("llm", "name_or_path"),
                   "qformer.word_embeddings.": ("qformer", "init_from")}


def _load_rebuilding(file: Path, config: Blip2Config, shards, aliases: dict[str, str], rebuilt: dict[str, str],
                     map_location: str | torch.device):
    """A checkpoint saved with `rebuild_frozen=True`: build the model from its config for
    real (the parts left out come from their sources: packages, a cache, a hub), then
    `_copy_stored` checks those parts and copies the stored tensors in."""
    from .blip2 import Blip2

    try:
        model = Blip2(config)
        _copy_stored(model, file, shards, aliases, rebuilt)
    finally:
        shards.close()
    return model.to(map_location).eval()


def _copy_stored(model: nn.Module, file: Path, shards, aliases: dict[str, str], rebuilt: dict[str, str],
                 fresh: Sequence[str] = ()) -> None:
    """Copy a weights file into `model`, strictly: every key of the model is stored, and
    nothing else, but the parts the file left out (`rebuilt`: prefix -> fingerprint), each
    of which must be the very part the checkpoint was trained with, and the keys under the
    `fresh` prefixes (parts the checkpoint never had), which keep their values."""
    from .feature_cache import encoder_fingerprint

    parts = rebuildable_parts(model) if rebuilt else {}
    for prefix, fingerprint in rebuilt.items():
        if prefix not in parts:
            raise WeightsError(f"{file} leaves out {prefix.rstrip('.')}, which this model does not rebuild "
                               f"(rebuildable here: {sorted(parts) or 'nothing'})")
        here = encoder_fingerprint(parts[prefix])
        if here != fingerprint:
            section, name = _REBUILT_SOURCE[prefix]
            raise WeightsError(f"{file} was trained with other {prefix.rstrip('.')} weights than "
                               f"{section}.{name} = {getattr(getattr(model.config, section), name)!r} gives here "
                               f"(fingerprint {fingerprint} there, {here} here): another version of that source")
    own = model.state_dict()
    stored = set(shards.shapes) | set(aliases)
    expected = {k for k in own if not k.startswith(tuple(rebuilt)) and (k in stored or not k.startswith(tuple(fresh)))}
    bad_shapes = [f"{k}: {shards.shapes[k]} in {file}, {tuple(own[k].shape)} in model"
                  for k in sorted(set(shards.shapes) & set(own)) if tuple(shards.shapes[k]) != tuple(own[k].shape)]
    raise_load_problems(str(file), expected - stored, stored - expected, bad_shapes)
    with torch.no_grad():
        for key in shards.shapes:
            own[key].copy_(shards.get(key))
        for key, target in aliases.items():
            own[key].copy_(own[target])  # tied in the model too: a copy onto itself


def load_weights_into(model: nn.Module, path: str | Path, fresh: Sequence[str] = ()) -> None:
    """Overwrite an existing model's weights with a `save_pretrained` folder's, strictly,
    one tensor at a time (a resumed training run: the model exists already, so the whole
    file is never read into memory beside it). A folder saved with `rebuild_frozen=True`
    leaves the model's frozen parts as they are, once their fingerprints match. `fresh`:
    prefixes of parts the checkpoint may lack and that keep their values (stage 2 started
    from a stage-1 folder: "llm.")."""
    from .official import _Shards

    path = Path(path)
    file = path / WEIGHTS_NAME
    shards = _Shards(path)
    try:
        _copy_stored(model, file, shards, _aliases(file), _metadata_json(file, REBUILT_META, {}), fresh)
    finally:
        shards.close()


# ---------------------------------------------------------------------------------------
# Key tables: ours <- theirs
# ---------------------------------------------------------------------------------------


Keys = str | tuple[str, ...]  # one key of theirs, or several concatenated along dim 0 (fused projections)


def _qformer_layer_table(i: int, has_cross: bool, theirs: str, style: str) -> dict[str, Keys]:
    """One Q-Former layer. `style` "hf" (HF BLIP-2: `attention.attention.query`) or "bert"
    (BERT / LAVIS: `attention.self.query`). Our fused `qkv` / `kv` projections are their
    separate query, key, value matrices stacked in that order (self-attention only)."""
    att = "attention.attention" if style == "hf" else "attention.self"
    cross = "crossattention.attention" if style == "hf" else "crossattention.self"
    ours = f"layers.{i}"
    t = f"{theirs}.{i}"
    table: dict[str, Keys] = {}
    for p in ("weight", "bias"):
        table[f"{ours}.self_attn.qkv.{p}"] = tuple(f"{t}.{att}.{n}.{p}" for n in ("query", "key", "value"))
        if has_cross:
            for a, b in (("q", "query"), ("k", "key"), ("v", "value")):
                table[f"{ours}.cross_attn.{a}.{p}"] = f"{t}.{cross}.{b}.{p}"
    blocks = [("self_attn", "attention.output")] + ([("cross_attn", "crossattention.output")] if has_cross else [])
    for mine, output in blocks:
        for p in ("weight", "bias"):
            table[f"{ours}.{mine}.out.{p}"] = f"{t}.{output}.dense.{p}"
            table[f"{ours}.{mine}.norm.{p}"] = f"{t}.{output}.LayerNorm.{p}"
    for mine, suffix in (("text_ffn", ""), ("query_ffn", "_query")):
        for p in ("weight", "bias"):
            table[f"{ours}.{mine}.fc1.{p}"] = f"{t}.intermediate{suffix}.dense.{p}"
            table[f"{ours}.{mine}.fc2.{p}"] = f"{t}.output{suffix}.dense.{p}"
            table[f"{ours}.{mine}.norm.{p}"] = f"{t}.output{suffix}.LayerNorm.{p}"
    return table


def hf_table(cfg: QFormerConfig, vision_keys: Iterable[str] = (), llm_keys: Iterable[str] = ()) -> dict[str, Keys]:
    """Our `Blip2` keys <- HF BLIP-2 keys (`Blip2ForImageTextRetrieval` when the Q-Former has
    its text side, `Blip2ForConditionalGeneration` otherwise). `vision_keys`: the keys of
    the HF vision tower's state dict (our `image_encoder.vision_model.*`); `llm_keys`: those
    of the language model (our `llm.model.*`)."""
    table: dict[str, Keys] = {
        "ln_vision.weight": "vision_model.post_layernorm.weight",  # HF's post_layernorm IS ln_vision
        "ln_vision.bias": "vision_model.post_layernorm.bias",
        "qformer.query_tokens": "query_tokens",
        "qformer.layernorm.weight": "qformer.layernorm.weight",
        "qformer.layernorm.bias": "qformer.layernorm.bias",
    }
    table |= {f"image_encoder.vision_model.{k}": f"vision_model.{k}" for k in vision_keys}
    for i in range(cfg.num_layers):
        for ours, theirs in _qformer_layer_table(i, cfg.has_cross_attention(i), "qformer.encoder.layer", "hf").items():
            if cfg.text_input or ".text_ffn." not in ours:
                table[f"qformer.{ours}"] = theirs
    if cfg.text_input:
        table["qformer.word_embeddings.weight"] = "embeddings.word_embeddings.weight"
        table["qformer.position_embeddings.weight"] = "embeddings.position_embeddings.weight"
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


def _keys(theirs: Keys) -> tuple[str, ...]:
    return (theirs,) if isinstance(theirs, str) else theirs


def remap(state: Mapping[str, Tensor], table: Mapping[str, Keys], source: str,
          prefix: str = "", ignore: Iterable[str] = ()) -> dict[str, Tensor]:
    """Rename `state` (their keys) to ours through `table` (ours -> theirs; several keys of
    theirs are concatenated along dim 0). Their keys that the table does not use, other
    than those starting with an `ignore` prefix, are an error naming them; so is a table
    entry their state lacks."""
    used = {k for theirs in table.values() for k in _keys(theirs)}
    missing = sorted(k for k in used if k not in state)
    if missing:
        raise WeightsError(f"{source} lacks keys the model needs: {missing}")
    leftover = sorted(k for k in state if k not in used and not any(k.startswith(p) for p in ignore))
    if leftover:
        raise WeightsError(f"{source} has keys no table entry uses: {leftover}")
    return {prefix + ours: torch.cat([state[k] for k in _keys(theirs)]) if not isinstance(theirs, str) else state[theirs]
            for ours, theirs in table.items()}


def bert_table(cfg: QFormerConfig, theirs_prefix: str = "") -> dict[str, Keys]:
    """Q-Former keys <- a BERT checkpoint (transformers BertModel / BertForMaskedLM names),
    as LAVIS `init_Qformer` does with bert-base-uncased: self-attention, text FFN and the
    embeddings are copied, the query FFN is copied from the text FFN, cross-attention
    stays fresh (normal(0, 0.02))."""
    p = theirs_prefix
    table: dict[str, Keys] = {
        "position_embeddings.weight": f"{p}embeddings.position_embeddings.weight",
        "layernorm.weight": f"{p}embeddings.LayerNorm.weight",
        "layernorm.bias": f"{p}embeddings.LayerNorm.bias",
    }
    for i in range(cfg.num_layers):
        layer = _qformer_layer_table(i, False, f"{p}encoder.layer", "bert")
        for ours, theirs in layer.items():
            # The query FFN starts as a copy of BERT's FFN (LAVIS `intermediate_query`).
            table[ours] = tuple(k.replace("intermediate_query", "intermediate").replace("output_query", "output")
                                for k in _keys(theirs))
    return table


def text_queries(words: Tensor, positions: Tensor, num_queries: int, seed: int = 0) -> Tensor:
    """(Q, D) query embeddings that look like a Q-token sentence to the BERT they came from:
    the word embedding of a fixed random draw of words (after the first 1,000 rows, which
    in BERT vocabularies are special and unused tokens) plus positions 0..Q-1."""
    first = 1000 if words.shape[0] > 2000 else 0
    ids = torch.randint(first, words.shape[0], (num_queries,), generator=torch.Generator().manual_seed(seed))
    return words[ids] + positions[:num_queries]  # (Q, D)


def init_qformer_from_bert(qformer: nn.Module, path: str | Path) -> list[str]:
    """Copy a BERT-like checkpoint in transformers format (a folder, or a `package:` path:
    sources.local_model) into `qformer`. Returns the checkpoint keys deliberately not
    used, for the caller to report.

    Deviations (as LAVIS): BERT's token-type embeddings and pooler are dropped (the
    Q-Former has neither); BERT's vocabulary may be one shorter than ours ([DEC] was
    added): those rows keep their random init. A checkpoint saved without the MLM head
    (a sentence-embedding BERT such as all-MiniLM-L6-v2: `architectures` names no
    `*ForMaskedLM`) is read as a bare encoder, and the Q-Former's LM head keeps its own
    init (its decoder is tied to the copied word embeddings)."""
    from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

    from .sources import local_model

    path = local_model(path)
    cfg: QFormerConfig = qformer.cfg
    bert_cfg = AutoConfig.from_pretrained(str(path))
    for ours, theirs in (("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
                         ("num_heads", "num_attention_heads"), ("ffn_size", "intermediate_size"),
                         ("max_position_embeddings", "max_position_embeddings")):
        if getattr(cfg, ours) != getattr(bert_cfg, theirs):
            raise WeightsError(f"qformer.{ours} ({getattr(cfg, ours)}) != the BERT checkpoint's {theirs} "
                               f"({getattr(bert_cfg, theirs)}) at {path}")
    if bert_cfg.vocab_size > cfg.vocab_size:
        raise WeightsError(f"the BERT vocabulary ({bert_cfg.vocab_size}) exceeds qformer.vocab_size ({cfg.vocab_size})")
    has_head = any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in bert_cfg.architectures or ())
    auto = AutoModelForMaskedLM if has_head else AutoModel
    bert, info = auto.from_pretrained(str(path), output_loading_info=True)
    if info["missing_keys"] or info["mismatched_keys"]:  # transformers would have left them random
        raise WeightsError(f"{path} does not fill a {type(bert).__name__}: missing {sorted(info['missing_keys'])}, "
                           f"mismatched {sorted(info['mismatched_keys'])}")
    state = {k.removeprefix("bert."): v for k, v in bert.state_dict().items()}
    table = bert_table(cfg)
    if has_head:
        table |= {"lm_head.dense.weight": "cls.predictions.transform.dense.weight",
                  "lm_head.dense.bias": "cls.predictions.transform.dense.bias",
                  "lm_head.norm.weight": "cls.predictions.transform.LayerNorm.weight",
                  "lm_head.norm.bias": "cls.predictions.transform.LayerNorm.bias"}
    new = remap(state, table, source=str(path),
                ignore=("embeddings.token_type_embeddings", "embeddings.word_embeddings", "embeddings.position_ids",
                        "pooler.", "cls.predictions.bias", "cls.predictions.decoder"))
    with torch.no_grad():
        own = qformer.state_dict()
        for key, value in new.items():
            if own[key].shape != value.shape:
                raise WeightsError(f"{key}: {tuple(value.shape)} in {path}, {tuple(own[key].shape)} in the Q-Former")
            own[key].copy_(value)
        words = state["embeddings.word_embeddings.weight"]  # (V_bert, D_q)
        own["word_embeddings.weight"][: words.shape[0]].copy_(words)
        if cfg.freeze_word_embeddings:  # the added rows ([DEC]) never train: a fixed draw, not the global RNG's
            extra = own["word_embeddings.weight"][words.shape[0]:]  # (V - V_bert, D_q)
            extra.copy_(torch.randn(extra.shape, generator=torch.Generator().manual_seed(0)) * cfg.init_std)
        bias = state.get("cls.predictions.bias")
        if bias is not None:
            own["lm_head.bias"][: bias.shape[0]].copy_(bias)
        if cfg.query_init == "text":  # QFormerConfig.query_init: word + position embeddings of a fixed draw
            own["query_tokens"].copy_(text_queries(words, state["embeddings.position_embeddings.weight"],
                                                   cfg.num_queries)[None])
    used = {k for theirs in table.values() for k in _keys(theirs)}
    return sorted(k for k in state if k not in used and not k.startswith("embeddings.word_embeddings"))


# ---------------------------------------------------------------------------------------
# Hugging Face BLIP-2 retrieval models (Blip2ForImageTextRetrieval)
# ---------------------------------------------------------------------------------------


# bert-base-uncased's special ids plus LAVIS's added [DEC] (BLIP2_REFERENCE.md Sec. 1): what the
# official checkpoints were trained with, though their config.json does not say so.
BERT_TOKEN_IDS = dict(cls_token_id=101, sep_token_id=102, dec_token_id=30522)


def config_from_hf(hf_config, **qformer_overrides) -> Blip2Config:
    """Our Blip2Config for a transformers `Blip2Config`. The special token ids are not in
    HF's config: bert-base-uncased's are assumed where they fit the Q-Former's vocabulary,
    and an id outside it (the [DEC] of a generation checkpoint, whose config keeps BERT's
    30522 words) is None: the model loads and only what needs that token refuses.
    `qformer_overrides` (e.g. the ids of a tokenizer shipped beside the weights) win."""
    from .vision import vision_config_from_hf

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

    from .blip2 import Blip2
    from .vision import HFBlip2ImageEncoder

    has_llm = hasattr(hf_model, "language_model")
    text_input = bool(hf_model.config.qformer_config.use_qformer_text_input) and not has_llm
    if not has_llm and not text_input:
        raise WeightsError("this HF model has no Q-Former text FFN (use_qformer_text_input=False) and no "
                           "language model: it is neither a retrieval nor a generation checkpoint")
    config = config_from_hf(hf_model.config, text_input=text_input, **qformer_overrides)
    language_model = None
    if has_llm:
        from .llm import llm_kind

        # The frozen LLM module is shared with `hf_model`, not copied: no second copy of the
        # largest part (the load below then copies each of its tensors onto itself).
        language_model = hf_model.language_model
        config.llm = LLMConfig(kind=llm_kind(language_model), name_or_path="(converted from transformers)")
    encoder = HFBlip2ImageEncoder(Blip2VisionModel(hf_model.config.vision_config), layer_index=-1,
                                  mean=config.vision.mean, std=config.vision.std)
    model = Blip2(config, image_encoder=encoder, language_model=language_model, init_from_bert=False)
    table = hf_table(config.qformer, encoder.vision_model.state_dict().keys(),
                     model.llm.model.state_dict().keys() if has_llm else ())
    converted = remap(hf_model.state_dict(), table, source=type(hf_model).__name__,
                      ignore=("embeddings.position_ids",))
    absent = HF_ABSENT if text_input else ()
    load_strict(model, converted, allowed_missing=absent, source=type(hf_model).__name__)
    return model.eval()


from_hf_retrieval = from_hf  # the name the retrieval parity tests and benchmark use
