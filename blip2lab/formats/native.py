"""blip2lab's own checkpoint format: a folder with `config.json` (the resolved config) and
`model.safetensors`, written atomically, read back without ever holding the weights twice.

A folder may leave out the frozen parts that building the model from its config restores
exactly (`save_pretrained(rebuild_frozen=True)`: mini-real's packaged towers), each with a
fingerprint that the load checks against the part rebuilt here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..config import Blip2Config, from_dict, to_dict
from ..model import Blip2
from .keys import WeightsError, check_strict
from .streaming import Shards, assign, empty_llm

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "LLM_CONFIG_DIR", "fingerprint", "rebuildable_parts", "save_pretrained",
           "read_safetensors", "load_pretrained", "load_weights_into"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"

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
        metadata[REBUILT_META] = json.dumps({prefix: fingerprint(part) for prefix, part in rebuilt.items()})
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

    path = Path(path)
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no {CONFIG_NAME}: not a blip2lab checkpoint folder")
    config = from_dict(Blip2Config, json.loads(config_file.read_text()))
    file = path / WEIGHTS_NAME
    shards = Shards(path)  # header checked here: a truncated file fails before anything is built
    aliases = _aliases(file)
    rebuilt = _metadata_json(file, REBUILT_META, None)
    if rebuilt is not None:
        return _load_rebuilding(file, config, shards, aliases, rebuilt, map_location)
    language_model = None
    if config.llm.kind != "none":
        from transformers import AutoConfig

        language_model = empty_llm(AutoConfig.from_pretrained(str(path / LLM_CONFIG_DIR)))
    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers real (some are not saved)
        model = Blip2(config, language_model=language_model)
    own = model.state_dict()
    check_strict({k: v.shape for k, v in own.items()}, _stored_shapes(shards, aliases), str(file))
    try:
        for key in shards.shapes:
            value = shards.get(key)
            assign(model, key, value.to(device=map_location, dtype=own[key].dtype))
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


def _stored_shapes(shards: Shards, aliases: dict[str, str]) -> dict[str, tuple]:
    """Key -> shape of what a folder holds: its tensors, and the tied names stored once."""
    return shards.shapes | {alias: shards.shapes[target] for alias, target in aliases.items() if target in shards.shapes}


def fingerprint(module: nn.Module) -> str:
    """A short digest of a module's weights (names, shapes and two sums per tensor): a
    checkpoint or feature cache built with other weights is refused rather than silently
    reused."""
    h = hashlib.sha1()
    with torch.no_grad():
        for name, t in module.state_dict().items():
            t = t.detach().double()
            h.update(f"{name}{tuple(t.shape)}{t.sum().item():.6e}{t.abs().sum().item():.6e}".encode())
    return h.hexdigest()[:16]


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
    from .build import build_model

    try:
        model = build_model(config)
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
    parts = rebuildable_parts(model) if rebuilt else {}
    for prefix, expected_print in rebuilt.items():
        if prefix not in parts:
            raise WeightsError(f"{file} leaves out {prefix.rstrip('.')}, which this model does not rebuild "
                               f"(rebuildable here: {sorted(parts) or 'nothing'})")
        here = fingerprint(parts[prefix])
        if here != expected_print:
            section, name = _REBUILT_SOURCE[prefix]
            raise WeightsError(f"{file} was trained with other {prefix.rstrip('.')} weights than "
                               f"{section}.{name} = {getattr(getattr(model.config, section), name)!r} gives here "
                               f"(fingerprint {expected_print} there, {here} here): another version of that source")
    own = model.state_dict()
    stored = _stored_shapes(shards, aliases)
    expected = {k: v.shape for k, v in own.items()
                if not k.startswith(tuple(rebuilt)) and (k in stored or not k.startswith(tuple(fresh)))}
    check_strict(expected, stored, str(file))
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
    path = Path(path)
    file = path / WEIGHTS_NAME
    shards = Shards(path)
    try:
        _copy_stored(model, file, shards, _aliases(file), _metadata_json(file, REBUILT_META, {}), fresh)
    finally:
        shards.close()
