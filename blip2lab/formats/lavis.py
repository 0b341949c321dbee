"""LAVIS's BLIP-2 checkpoints (salesforce/LAVIS `.pth` files), both ways, as LAVIS's runner
writes them: trainable tensors only, but for the tied copies of frozen LLM tensors it cannot
tell apart (`_lavis_llm`); the frozen EVA ViT in a file of its own (eva_vit_g.pth, 40 blocks
and a classifier head of which LAVIS's 39-block model runs the blocks); a fine-tuned ViT in
the checkpoint itself. Keys go through `lavis_table` (BLIP2_REFERENCE.md Sec. 6); what LAVIS
itself ignores is dropped and named in one warning, anything else left over or missing is
an error naming it. Files are read with `torch.load(weights_only=True)`: tensors, never code.
"""

from __future__ import annotations

import os
import pickle
import re
import warnings
from pathlib import Path
from typing import Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from ..config import Blip2Config, QFormerConfig
from ..model import Blip2
from .build import load_llm
from .hf import hf_vision_config
from .keys import WeightsError, qformer_layer_table
from .streaming import check_dtype, empty_llm, fill, finish, plan, tie_groups

__all__ = ["lavis_table", "load_lavis", "export_lavis", "save_lavis"]

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
        layer = qformer_layer_table(i, q.has_cross_attention(i), "Qformer.bert.encoder.layer", "bert")
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

    keys = sorted(k for k in state if k.startswith(f"{prefix}_model."))
    if config.llm.kind == "none":
        return None, bool(keys), [], state
    probe = language_model or empty_llm(AutoConfig.from_pretrained(config.llm.name_or_path))
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

    state = _as_state(path_or_state_dict, "the LAVIS checkpoint")
    source = str(path_or_state_dict) if isinstance(path_or_state_dict, (str, os.PathLike)) else "the LAVIS state dict"
    vision = config.vision
    _check_lavis_vision(vision)
    state, notes = _lavis_vision(state, vision_weights, vision.layers, source)
    prefixes = sorted({p for p in _LLM_PREFIXES for k in state if k.startswith((f"{p}_model.", f"{p}_proj."))})
    if len(prefixes) > 1:
        raise WeightsError(f"{source} holds several LLMs' weights: {[p + '_model' for p in prefixes]}")
    prefix = prefixes[0] if prefixes else "opt"
    llm, has_llm_weights, llm_notes, state = _lavis_llm(state, config, language_model, prefix, source)
    floating = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    dtype = check_dtype(dtype, config.llm.kind, auto=floating)
    with init_empty_weights(include_buffers=False):
        model = Blip2(config, language_model=llm)
    llm_keys = list(llm.state_dict()) if llm is not None and has_llm_weights else []
    _check_lm_head_tie(state, config.qformer, source)
    todo = _plan_lavis(model, state, lavis_table(config, vision.layers, llm_keys, prefix), has_llm_weights, source)
    # clone: the new model owns its tensors (never shares them with the caller's dict or the file's mmap)
    fill(model, todo, lambda k: state[k].detach().clone(), dtype, lambda k: "cpu")
    finish(model, todo, (), dtype, "cpu", source)
    if notes + llm_notes:
        warnings.warn(f"{source}: not loaded, as LAVIS's BLIP-2 never runs them: {'; '.join(notes + llm_notes)}",
                      stacklevel=2)
    if llm is not None and not has_llm_weights:
        warnings.warn(f"{source} has no {prefix}_model.* weights (LAVIS saves only trainable tensors): the LLM "
                      f"keeps the weights it was given ({type(llm).__name__})", stacklevel=2)
    return model.eval()


def _check_lavis_vision(vision) -> None:
    if vision.backend != "hf_blip2":
        raise WeightsError(f"load_lavis needs vision.backend='hf_blip2' (the EVA tower in HF layout), "
                           f"got {vision.backend!r}")
    if vision.layer_index % vision.layers != vision.layers - 1:
        raise WeightsError(f"LAVIS runs every block of its ViT and reads the last one's output, but vision.layers="
                           f"{vision.layers} with vision.layer_index={vision.layer_index} would keep "
                           f"{vision.used_layers}: set vision.layers to LAVIS's depth (39 for EVA ViT-g) and "
                           f"vision.layer_index=-1")


def _plan_lavis(model: nn.Module, state: dict, table: dict, has_llm_weights: bool, source: str) -> dict:
    """The key plan of a LAVIS state (`streaming.plan`): EVA's absent key bias stands in as
    zeros, the tied MLM decoder and BERT's position ids are not ours to load."""
    for key in [k for k in state if k.endswith(".attn.qkv.weight") and k.startswith("visual_encoder.blocks.")]:
        block = key.removesuffix("attn.qkv.weight")
        state[block + _K_BIAS] = torch.zeros(state[key].shape[0] // 3, dtype=state[key].dtype)

    def ignore(k: str) -> bool:
        return k in ("Qformer.bert.embeddings.position_ids", "Qformer.cls.predictions.decoder.weight",
                     "Qformer.cls.predictions.decoder.bias") or k.endswith(_K_BIAS)

    groups = tie_groups(model) if has_llm_weights else []
    not_here = [] if has_llm_weights else [k for k in model.state_dict() if k.startswith("llm.model.")]
    hint = "" if any(k.startswith("visual_encoder.") for k in state) else \
        " (LAVIS checkpoints omit the frozen ViT: pass vision_weights=, e.g. eva_vit_g.pth)"
    try:
        return plan({k: v for k, v in table.items() if k not in not_here},
                    {k: tuple(t.shape) for k, t in state.items()}, model.state_dict(), source,
                    optional=set().union(*groups), tie_groups=groups, ignore=ignore)
    except WeightsError as err:
        raise WeightsError(str(err) + hint) from None


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
    hf_vision_config(model)  # checks the tower is the EVA / HF-layout one
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
