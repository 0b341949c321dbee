"""What a model is made of, for readers and the app: parameters per box of the paper's
Figure 2 (`parameter_counts`, the Q-Former split into its parts, trainable or frozen) and
the output shape of every named submodule in one forward pass (`trace_shapes`)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor, nn

__all__ = ["parameter_counts", "trace_shapes"]


# Q-Former parameter names -> the part of the figure they belong to (first match wins).
_QFORMER_PARTS = (
    ("query_tokens", "learned queries"),
    ("word_embeddings", "text embeddings (word + position + LayerNorm)"),
    ("position_embeddings", "text embeddings (word + position + LayerNorm)"),
    ("layernorm", "text embeddings (word + position + LayerNorm)"),
    (".self_attn.", "self-attention (shared by queries and text)"),
    (".cross_attn.", "cross-attention (queries -> image)"),
    (".query_ffn.", "query feed-forward"),
    (".text_ffn.", "text feed-forward"),
    ("lm_head.", "ITG / LM head (decoder tied to the word embeddings)"),
)


def parameter_counts(model: nn.Module) -> "OrderedDict[str, dict[str, int]]":
    """{part: {"params", "trainable"}} for a `Blip2`: the frozen image encoder, ln_vision, the
    Q-Former's parts, the stage-1 heads, the LLM projection and the frozen LLM. A tied weight
    is counted once, in the part that owns it (the word embeddings)."""
    out: "OrderedDict[str, dict[str, int]]" = OrderedDict()

    def add(part: str, p: Tensor) -> None:
        row = out.setdefault(part, {"params": 0, "trainable": 0})
        row["params"] += p.numel()
        row["trainable"] += p.numel() if p.requires_grad else 0

    for name, p in model.named_parameters():  # named_parameters skips tied duplicates
        if name.startswith("image_encoder."):
            part = "frozen image encoder"
        elif name.startswith("ln_vision."):
            part = "ln_vision"
        elif name.startswith("qformer."):
            part = next((f"Q-Former: {label}" for key, label in _QFORMER_PARTS if key in name), "Q-Former: other")
        elif name.split(".")[0] in ("vision_proj", "text_proj", "itm_head", "temp"):
            part = "stage-1 heads (ITC projections, ITM head, temperature)"
        elif name.startswith("llm.projection."):
            part = "LLM projection (Q-Former -> LLM width)"
        elif name.startswith("llm."):
            part = "frozen LLM"
        else:
            part = "other"
        add(part, p)
    return out


def trace_shapes(model: nn.Module, run: Callable[[], Any], depth: int = 3,
                 skip: Sequence[str] = ("image_encoder.", "llm.model.")) -> list[tuple[str, str, tuple]]:
    """Run `run()` (a forward pass through `model`) with hooks on every submodule at most
    `depth` names deep (not under `skip`, e.g. the frozen towers' insides) and return
    (module name, class, output shape) in call order. Tuple/dataclass outputs report their
    first tensor."""
    records: list[tuple[str, str, tuple]] = []
    handles = []

    def first_tensor(x: Any) -> Optional[Tensor]:
        if isinstance(x, Tensor):
            return x
        if isinstance(x, (tuple, list)):
            return next((t for t in map(first_tensor, x) if t is not None), None)
        if hasattr(x, "__dataclass_fields__"):
            return next((t for t in map(first_tensor, vars(x).values()) if t is not None), None)
        return None

    for name, module in model.named_modules():
        if not name or name.count(".") >= depth or any(name.startswith(s) for s in skip):
            continue

        def hook(mod, args, output, name=name):
            t = first_tensor(output)
            records.append((name, type(mod).__name__, tuple(t.shape) if t is not None else ()))

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return records


