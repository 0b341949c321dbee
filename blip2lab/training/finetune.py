"""What trains, and how: the fine-tuning modes people ask for, on any stage.

    paper   (default) the Q-Former, ln_vision, the heads and the LLM projection train; the
            image encoder and the LLM stay frozen (paper Sec. 3). `train_vision` unfreezes the
            image encoder too, with layer-wise lr decay (paper Sec. 4 / Table 7: 0.95 per
            layer). LAVIS computes `lr_scale` for the ViT's layers and its scheduler never
            applies it; here the loop multiplies every group's lr by its `lr_scale`.
    lora    only LoRA adapters train (peft), on the LLM and/or the Q-Former (`lora.targets`),
            with target modules right for the family (OPT, Llama, T5; peft's table for the rest).

`quantize` loads the frozen LLM's linear layers in 8-bit or 4-bit (bitsandbytes, CUDA only: a
clear error on a CPU), as QLoRA does; `gradient_checkpointing` recomputes the Q-Former's, the
LLM's and an unfrozen image encoder's activations in the backward pass.

After training, `merge_lora` folds the adapters into the base weights (a plain blip2lab model
that the app opens), and `save_lora_adapter` writes them as one peft adapter of the whole
BLIP-2 in the Hugging Face layout, what `PeftModel.from_pretrained(Blip2ForConditionalGeneration
...)` reads: the LLM's under `language_model.*`, the Q-Former's under transformers' Q-Former
names (`hf_modules`; our fused self-attention `qkv` is their query, key and value, each with
the same A and its third of B's rows, which is exactly the fused update).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import torch
from torch import nn

from ..config import ConfigError
from ..formats.hf import hf_table
from ..formats.keys import keys_of

__all__ = ["LoraSettings", "FinetuneConfig", "LORA_TARGETS", "QFORMER_LORA_TARGETS", "lora_targets",
           "apply_finetune", "apply_lora", "merge_lora", "lora_state", "save_lora_adapter", "hf_modules",
           "hf_weight_rows", "quantize_llm",
           "layer_decay_groups", "vision_layer_id", "trainable_summary"]

# Attention projections per LLM family (transformers' module names). peft's own defaults
# (q and v only) leave out half of each attention block; QLoRA adapts every projection.
LORA_TARGETS = {
    "opt": ("q_proj", "k_proj", "v_proj", "out_proj"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "t5": ("q", "k", "v", "o"),
    "mt5": ("q", "k", "v", "o"),
}
# The Q-Former's attention (model/qformer.py): fused self-attention qkv, cross-attention q, k, v, outputs.
QFORMER_LORA_TARGETS = ("qkv", "q", "k", "v", "out")


@dataclass
class LoraSettings:
    """peft LoRA adapters (Hu et al. 2021): W + (alpha / r) B A, B starting at zero."""

    targets: tuple[str, ...] = ("llm",)  # which parts get adapters: "llm", "qformer"
    r: int = 8  # rank of the update
    alpha: float = 16.0  # scale alpha / r
    dropout: float = 0.05  # on the adapter input (off while the frozen LLM runs in eval mode)
    # transformers module names to adapt in the LLM; () = the family's (LORA_TARGETS)
    target_modules: tuple[str, ...] = ()
    qformer_modules: tuple[str, ...] = QFORMER_LORA_TARGETS

    def __post_init__(self) -> None:
        bad = [t for t in self.targets if t not in ("llm", "qformer")]
        if bad or not self.targets:
            raise ConfigError(f"finetune.lora.targets must name 'llm' and/or 'qformer', got {list(self.targets)}")
        if self.r < 1 or self.alpha <= 0 or not 0 <= self.dropout < 1:
            raise ConfigError("finetune.lora: need r >= 1, alpha > 0 and dropout in [0, 1)")


@dataclass
class FinetuneConfig:
    """Which parameters train and how the frozen ones are held (every stage)."""

    mode: Literal["paper", "lora"] = "paper"
    train_vision: bool = False  # paper mode: the image encoder trains too (layer-wise lr decay)
    layer_decay: float = 0.95  # lr of ViT layer i: lr * decay ** (depth + 1 - i) (paper's 0.95)
    lora: LoraSettings = field(default_factory=LoraSettings)
    quantize: Literal["none", "8bit", "4bit"] = "none"  # the frozen LLM's linears (bitsandbytes, CUDA)
    gradient_checkpointing: bool = False
    # The losses; () = the stage's (stage 1: itc, itm, itg; stage 2 and finetune: lm, or the
    # stage-1 losses for a model without an LLM)
    losses: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(f"finetune.layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.train_vision and self.mode == "lora":
            raise ConfigError("finetune.train_vision is a paper-mode option; LoRA mode trains adapters only")


# -- the trainable set --------------------------------------------------------------------


def apply_finetune(model: nn.Module, cfg: FinetuneConfig, device: Optional[torch.device] = None) -> nn.Module:
    """Freeze / unfreeze / adapt `model` (a Blip2) in place, as `cfg` says; returns it."""
    if cfg.quantize != "none":
        if model.llm is None:
            raise ConfigError(f"finetune.quantize={cfg.quantize!r} needs a model with an LLM")
        quantize_llm(model.llm.model, cfg.quantize, device)
    model.requires_grad_(True)
    model.image_encoder.freeze()
    if model.llm is not None:
        model.llm.freeze()
    if model.config.qformer.freeze_word_embeddings:
        model.qformer.word_embeddings.requires_grad_(False)
    if cfg.mode == "paper" and cfg.train_vision:
        model.image_encoder.unfreeze()
    if cfg.mode == "lora":
        model.requires_grad_(False)
        apply_lora(model, cfg.lora)
    if cfg.gradient_checkpointing:
        _gradient_checkpointing(model, cfg)
    return model


def _gradient_checkpointing(model: nn.Module, cfg: FinetuneConfig) -> None:
    model.config.qformer.gradient_checkpointing = True
    model.qformer.cfg.gradient_checkpointing = True
    if cfg.train_vision:
        model.image_encoder.set_gradient_checkpointing(True)
    if model.llm is not None and hasattr(model.llm.model, "gradient_checkpointing_enable"):
        # non-reentrant: the frozen LLM's inputs (the visual prompt) carry the gradient
        model.llm.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def lora_targets(model: nn.Module, lora: LoraSettings) -> dict[str, tuple[str, ...]]:
    """{part: module names} the adapters go on: "llm" -> the LLM family's, "qformer" -> its own."""
    out = {}
    if "llm" in lora.targets:
        if model.llm is None:
            raise ConfigError("finetune.lora.targets names 'llm' but this model has no LLM")
        family = getattr(model.llm.model.config, "model_type", "")
        names = lora.target_modules or LORA_TARGETS.get(family) or _peft_default(family)
        out["llm"] = tuple(names)
    if "qformer" in lora.targets:
        out["qformer"] = tuple(lora.qformer_modules)
    return out


def _peft_default(family: str) -> tuple[str, ...]:
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table

    if family not in table:
        raise ConfigError(f"no LoRA target modules known for LLM family {family!r}: name them with "
                          f"finetune.lora.target_modules")
    return tuple(table[family])


def _part(model: nn.Module, name: str) -> nn.Module:
    return model.llm.model if name == "llm" else model.qformer


def apply_lora(model: nn.Module, lora: LoraSettings) -> None:
    """peft LoRA adapters injected in place into the LLM and/or the Q-Former; only they train.
    A target module name that matches no linear layer of its part is an error naming it."""
    from peft import LoraConfig, inject_adapter_in_model

    for part, names in lora_targets(model, lora).items():
        module = _part(model, part)
        linear = [n for n, m in module.named_modules() if isinstance(m, nn.Linear)]
        field_name = "target_modules" if part == "llm" else "qformer_modules"
        for target in names:
            if not any(n == target or n.endswith("." + target) for n in linear):
                raise ConfigError(f"finetune.lora.{field_name}: {target!r} matches no linear layer of the {part} "
                                  f"(e.g. {sorted({n.rsplit('.', 1)[-1] for n in linear})[:12]})")
        config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=list(names),
                            bias="none")
        inject_adapter_in_model(config, module)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)


def _lora_layers(model: nn.Module):
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA adapter into its base layer (W += alpha / r * B A) and put the plain
    layer back: the model is a plain Blip2 again, its state dict the usual keys. Returns
    how many layers were merged."""
    layers = _lora_layers(model)
    for name, layer in layers:
        layer.merge()
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, attr, layer.get_base_layer())
    return len(layers)


def hf_modules(name: str, table: dict) -> tuple[str, ...]:
    """The Hugging Face BLIP-2 modules of our linear layer `name`: `llm.model.X` is HF's
    `language_model.X`; a Q-Former layer's come from formats.hf's key table `table` (several
    for a fused projection, in the order of its rows)."""
    if name.startswith("llm.model."):
        return ("language_model." + name.removeprefix("llm.model."),)
    theirs = table.get(name + ".weight")
    if theirs is None:
        raise ValueError(f"{name} has no Hugging Face BLIP-2 counterpart to put its adapter on")
    return tuple(k.removesuffix(".weight") for k in keys_of(theirs))


def hf_weight_rows(model: nn.Module) -> dict[str, tuple[str, int, int]]:
    """HF Q-Former weight key -> (our weight key, i, n): its rows are chunk i of n of ours."""
    out = {}
    for ours, theirs in hf_table(model.config.qformer).items():
        keys = keys_of(theirs)
        out |= {k: (ours, i, len(keys)) for i, k in enumerate(keys)}
    return out


def lora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights under peft's saved names in the Hugging Face BLIP-2 layout,
    `base_model.model.<HF module>.lora_{A,B}.weight` (`hf_modules`). A fused projection's
    update s B A, split by rows of B, is each of its parts' own update with the same A."""
    table = hf_table(model.config.qformer)
    out = {}
    for name, layer in _lora_layers(model):
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, in), (out, r)
        modules = hf_modules(name, table)
        for module, rows in zip(modules, b.chunk(len(modules))):  # (out / n, r) each
            # copies: a safetensors file holds no tensor twice, and the parts share A
            out[f"base_model.model.{module}.lora_A.weight"] = a.detach().cpu().clone()
            out[f"base_model.model.{module}.lora_B.weight"] = rows.detach().cpu().clone()
    return out


def save_lora_adapter(model: nn.Module, lora: LoraSettings, path: str | Path, base: str = "") -> Path:
    """A peft adapter folder (adapter_config.json + adapter_model.safetensors) of every LoRA
    adapter of `model`, the LLM's and the Q-Former's, for the exported Hugging Face folder
    (PeftModel.from_pretrained); `target_modules` lists exactly the HF modules adapted."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    state = lora_state(model)
    if not state:
        raise ValueError("this model has no LoRA adapters to save")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    modules = sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in state})
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=modules,
                        bias="none", base_model_name_or_path=base or None)
    config.save_pretrained(str(path))
    save_file(state, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    return path


# -- 8-bit / 4-bit LLM --------------------------------------------------------------------


def quantize_llm(llm: nn.Module, bits: str, device: Optional[torch.device] = None) -> int:
    """Replace the LLM's linear layers (not its LM head) by bitsandbytes' 8-bit or 4-bit (NF4)
    ones on CUDA, in place: any source (built, official, LAVIS) works the same. Returns how
    many layers were replaced. CUDA and bitsandbytes are required, and said so by name."""
    if not torch.cuda.is_available() or (device is not None and torch.device(device).type != "cuda"):
        raise ConfigError(f"finetune.quantize={bits!r} needs a CUDA GPU (bitsandbytes' {bits} kernels); this run is "
                          f"on the CPU: use finetune.quantize=none")
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise ConfigError(f"finetune.quantize={bits!r} needs bitsandbytes: pip install 'blip2lab[gpu]'") from err
    head = llm.get_output_embeddings()
    dtype = next(llm.parameters()).dtype
    todo = [(n, m) for n, m in llm.named_modules() if isinstance(m, nn.Linear) and m is not head]
    for name, lin in todo:
        owner, _, attr = name.rpartition(".")
        setattr(llm.get_submodule(owner) if owner else llm, attr, _bnb_linear(bnb, lin, bits, dtype))
    llm.to("cuda")  # bitsandbytes quantizes its weights on the move to the GPU
    return len(todo)


def _bnb_linear(bnb, lin: nn.Linear, bits: str, dtype: torch.dtype) -> nn.Module:
    bias = lin.bias is not None
    if bits == "8bit":
        new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=bias, has_fp16_weights=False)
        new.weight = bnb.nn.Int8Params(lin.weight.data.to(torch.float16), requires_grad=False, has_fp16_weights=False)
    else:
        new = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=bias, compute_dtype=dtype, quant_type="nf4")
        new.weight = bnb.nn.Params4bit(lin.weight.data, requires_grad=False, quant_type="nf4")
    if bias:
        new.bias = nn.Parameter(lin.bias.data, requires_grad=False)
    return new


# -- layer-wise lr decay -------------------------------------------------------------------

_BLOCK = re.compile(r"(?:resblocks|layers|blocks)\.(\d+)\.")
_STEM = ("embed", "conv1", "class_embedding", "positional_embedding", "ln_pre", "cls_token", "pos_embed")


def vision_layer_id(name: str, depth: int) -> int:
    """BEiT / LAVIS's layer id of an image-encoder parameter: 0 for the stem (patch and
    position embeddings), i + 1 for block i, depth + 1 for what follows the blocks."""
    m = _BLOCK.search(name)
    if m is not None:
        return int(m.group(1)) + 1
    return 0 if any(s in name for s in _STEM) else depth + 1


def layer_decay_groups(model: nn.Module, weight_decay: float, decay: float) -> list[dict]:
    """Optimizer groups: the trainable image-encoder parameters by layer, each with
    `lr_scale` = decay ** (depth + 1 - layer id), and everything else at scale 1; each split
    into decay / no-decay (biases, norms and other 1-D parameters get no weight decay)."""
    depth = _vision_depth(model.image_encoder)
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        scale = decay ** (depth + 1 - vision_layer_id(name, depth)) if name.startswith("image_encoder.") else 1.0
        groups.setdefault((scale, p.ndim >= 2), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if decays else 0.0, "lr_scale": scale}
            for (scale, decays), ps in sorted(groups.items(), key=lambda kv: (-kv[0][0], not kv[0][1]))]


def _vision_depth(encoder: nn.Module) -> int:
    ids = [int(m.group(1)) for n, _ in encoder.named_parameters() if (m := _BLOCK.search(n))]
    return max(ids) + 1 if ids else 0


def trainable_summary(model: nn.Module) -> dict:
    """Parameter counts: trainable, frozen, and the trainable ones by top-level part."""
    parts: dict[str, int] = {}
    trainable = frozen = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            trainable += p.numel()
            top = name.split(".")[0] if not name.startswith("llm.") else \
                ("llm.projection" if name.startswith("llm.projection") else "llm.model")
            parts[top] = parts.get(top, 0) + p.numel()
        else:
            frozen += p.numel()
    return {"trainable": trainable, "frozen": frozen, "by_part": parts}

