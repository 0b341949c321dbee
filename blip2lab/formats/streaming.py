"""Checkpoints too large to hold twice: build the model empty, plan from shapes, fill it
tensor by tensor (the official HF and LAVIS layouts, blip2lab's own folders).

Memory: the model is first built with its parameters on the meta device (accelerate
`init_empty_weights`: shapes, no storage); `plan` checks a key table against the file
headers' shapes before a byte of data is read; `fill` reads each tensor once (`Shards`) and
puts it in place (`assign`, the `assign=True` of `load_state_dict`); fused q/k/v rows are
concatenated per layer. Peak memory is the model itself plus one tensor.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional

import torch
from torch import Tensor, nn

from ..config import Blip2Config
from ..dtypes import as_dtype, dtype_name, pick_dtype
from .keys import WeightsError, keys_of, raise_load_problems

__all__ = ["Shards", "safetensors_header", "tie_groups", "plan", "assign", "fill", "finish", "check_dtype",
           "empty_llm"]

# ---------------------------------------------------------------------------------------
# Safetensors files read lazily: headers first (shapes, completeness), data tensor by tensor
# ---------------------------------------------------------------------------------------


# safetensors dtype names -> torch (the ones checkpoints hold; others go through safe_open)
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def safetensors_header(file: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape from a safetensors header, checking the file holds all the data the
    header promises (a truncated download fails here, before anything is loaded)."""
    return {k: tuple(v["shape"]) for k, v in safetensors_entries(file)[1].items()}


def safetensors_entries(file: Path) -> tuple[int, dict[str, dict]]:
    """(offset of the data, key -> {"dtype", "shape", "data_offsets"}) of a safetensors file,
    checked as `safetensors_header` says."""
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


class Shards:
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
            start, entries = safetensors_entries(file)
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


def tie_groups(model: nn.Module) -> list[set[str]]:
    """Groups of our keys the LLM ties together (one tensor under several names); each
    group needs one of its keys in the file, the others are tied after loading."""
    if model.llm is None:
        return []
    groups: dict[str, set[str]] = {}
    for target, source in model.llm.model.get_expanded_tied_weights_keys(all_submodels=True).items():
        groups.setdefault(source, {f"llm.model.{source}"}).add(f"llm.model.{target}")
    return list(groups.values())


def plan(table: Mapping[str, object], shapes: Mapping[str, tuple], own: Mapping[str, Tensor], source: str,
          optional: Iterable[str] = (), tie_groups: Iterable[set[str]] = (),
          ignore: Callable[[str], bool] = lambda k: False) -> dict[str, tuple[str, ...]]:
    """Check `table` (ours <- theirs; several keys of theirs concatenate along dim 0) against
    the shapes of their tensors, before reading any data. Returns the entries to load.
    Missing keys (except our `optional` ones), leftovers (except `ignore`d ones) and shape
    mismatches are one error naming them all."""
    todo, missing, bad = {}, [], []
    optional = set(optional)
    for ours, theirs in table.items():
        theirs = keys_of(theirs)
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
            missing += [f"one of {sorted('+'.join(keys_of(table[k])) for k in group)}"]
    used = {k for theirs in table.values() for k in keys_of(theirs)}
    leftover = sorted(k for k in shapes if k not in used and not ignore(k))
    raise_load_problems(source, missing, leftover, bad)
    return todo


def assign(model: nn.Module, key: str, value: Tensor) -> None:
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


def fill(model: nn.Module, todo: Mapping[str, tuple[str, ...]], get: Callable[[str], Tensor],
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
        assign(model, ours, value.to(device_of(ours)))
        del parts, value


def fresh_value(key: str, shape: torch.Size, config: Blip2Config) -> Tensor:
    """A sensible initial value for a part the source layout never carries (HF_ABSENT):
    the temperature at `temp_init`, the Q-Former LM head as QFormer.reset_parameters does."""
    if key == "temp":
        return torch.tensor(config.temp_init)
    if key.endswith("norm.weight"):
        return torch.ones(shape)
    if key.endswith("dense.weight"):
        return torch.randn(shape) * config.qformer.init_std
    return torch.zeros(shape)  # biases


def finish(model: nn.Module, loaded: Iterable[str], absent_ok: Iterable[str], dtype: torch.dtype,
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
            assign(model, key, fresh_value(key, own[key].shape, model.config).to(dtype=dtype, device=device))
    meta = sorted({n for n, t in [*model.named_parameters(remove_duplicate=False),
                                  *model.named_buffers(remove_duplicate=False)] if t.is_meta})
    if meta:
        raise WeightsError(f"after loading {source}, these tensors have no value (still on the meta device): {meta}")


def check_dtype(dtype, kind: str, auto: torch.dtype = torch.float32, what: str = "dtype") -> torch.dtype:
    """`dtype` (a torch dtype, its name, "auto" or None) -> the torch dtype to load in: None is
    float32, "auto" the checkpoint's own (`auto`); float16 is refused for T5."""
    dtype = as_dtype(dtype, what)
    dtype = torch.float32 if dtype is None else auto if dtype == "auto" else dtype
    if kind != "none":
        pick_dtype(dtype_name(dtype), kind, "cpu")  # refuses float16 for T5
    return dtype


def empty_llm(text_config) -> nn.Module:
    """A transformers LLM with its parameters on the meta device (buffers are real)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if getattr(text_config, "is_encoder_decoder", False) else AutoModelForCausalLM
    with init_empty_weights(include_buffers=False):
        return auto.from_config(text_config)
