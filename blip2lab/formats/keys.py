"""Strict loading, and the key tables that map other layouts' names onto ours.

Every load is strict: shapes are asserted key by key, and a key left over or missing is an
error that names it (nanoGPT `from_pretrained`; never LAVIS's `strict=False` with the message
ignored). Every format module (native, HF, LAVIS, BERT) checks through `check_strict` and
renames through tables of this module: ours -> theirs, where several of their keys are
concatenated along dim 0 for our fused projections.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

__all__ = ["WeightsError", "Keys", "raise_load_problems", "check_strict", "load_strict", "keys_of",
           "qformer_layer_table", "remap"]


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


def check_strict(expected: Mapping[str, tuple], stored: Mapping[str, tuple], source: str,
                 allowed_missing: Iterable[str] = ()) -> None:
    """`stored` (key -> shape, from a file's header or a state dict) must hold every key of
    `expected` (the model's key -> shape) but `allowed_missing`, nothing else, at the same
    shapes; otherwise one error names every problem."""
    missing = set(expected) - set(stored) - set(allowed_missing)
    bad_shapes = [f"{k}: {tuple(stored[k])} in {source}, {tuple(expected[k])} in model"
                  for k in sorted(set(stored) & set(expected)) if tuple(stored[k]) != tuple(expected[k])]
    raise_load_problems(source, missing, set(stored) - set(expected), bad_shapes)


def load_strict(module: nn.Module, state: Mapping[str, Tensor], allowed_missing: Iterable[str] = (),
                source: str = "checkpoint") -> None:
    """Copy `state` into `module`: every key must exist with the same shape, and every
    parameter/buffer of the module must be given, except the keys in `allowed_missing`
    (parts the source layout does not carry, e.g. HF checkpoints drop `temp`)."""
    own = module.state_dict()
    check_strict({k: v.shape for k, v in own.items()}, {k: v.shape for k, v in state.items()}, source,
                 allowed_missing)
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value)


# ---------------------------------------------------------------------------------------
# Key tables: ours <- theirs
# ---------------------------------------------------------------------------------------


Keys = str | tuple[str, ...]  # one key of theirs, or several concatenated along dim 0 (fused projections)


def qformer_layer_table(i: int, has_cross: bool, theirs: str, style: str) -> dict[str, Keys]:
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


def keys_of(theirs: Keys) -> tuple[str, ...]:
    """A table entry's keys of theirs, always as a tuple."""
    return (theirs,) if isinstance(theirs, str) else tuple(theirs)


def remap(state: Mapping[str, Tensor], table: Mapping[str, Keys], source: str,
          prefix: str = "", ignore: Iterable[str] = ()) -> dict[str, Tensor]:
    """Rename `state` (their keys) to ours through `table` (ours -> theirs; several keys of
    theirs are concatenated along dim 0). Their keys that the table does not use, other
    than those starting with an `ignore` prefix, are an error naming them; so is a table
    entry their state lacks."""
    used = {k for theirs in table.values() for k in keys_of(theirs)}
    missing = sorted(k for k in used if k not in state)
    if missing:
        raise WeightsError(f"{source} lacks keys the model needs: {missing}")
    leftover = sorted(k for k in state if k not in used and not any(k.startswith(p) for p in ignore))
    if leftover:
        raise WeightsError(f"{source} has keys no table entry uses: {leftover}")
    return {prefix + ours: torch.cat([state[k] for k in keys_of(theirs)]) if not isinstance(theirs, str) else state[theirs]
            for ours, theirs in table.items()}
