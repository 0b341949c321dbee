"""A trained blip2lab folder as a Hugging Face BLIP-2 folder (`formats.export_hf`), which
transformers opens: LoRA merged (the folder's weights as they are), or, with `adapter=True`,
the base weights before the adapters and the adapters beside them as one peft folder, the
LLM's and the Q-Former's (`OUT/adapter`:
`PeftModel.from_pretrained(Blip2ForConditionalGeneration.from_pretrained(OUT), OUT/adapter)`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..formats import export_hf
from .finetune import hf_weight_rows
from .run import load_run_model

__all__ = ["export_trained", "unmerge_adapter"]


def unmerge_adapter(model, adapter_dir: Path) -> int:
    """Take the adapter of `adapter_dir` (HF names, finetune.save_lora_adapter) back out of a
    merged model, in place: W -= alpha / r * B A (peft's `unmerge`, on the weights merge_lora
    folded it into); an HF query, key or value is its rows of our fused `qkv`. Returns the HF
    modules touched."""
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    params, rows_of = dict(model.named_parameters()), hf_weight_rows(model)
    n = 0
    with torch.no_grad():
        for key, a in state.items():
            if ".lora_A." not in key:
                continue
            b = state[key.replace(".lora_A.", ".lora_B.")]
            theirs = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            ours, i, parts = rows_of.get(theirs) or ("llm.model." + theirs.removeprefix("language_model."), 0, 1)
            weight = params[ours].chunk(parts)[i]  # (out, in): a view of those rows
            weight.sub_((scale * (b.double() @ a.double())).to(weight.dtype))
            n += 1
    return n


def export_trained(model_dir: str | Path, out: str | Path, adapter: bool = False) -> Path:
    model_dir, out = Path(model_dir), Path(out)
    pipe = load_run_model(model_dir)
    if adapter:
        source = model_dir / "lora_adapter"
        if not (source / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{model_dir} has no lora_adapter/ (a LoRA run writes one)")
        unmerge_adapter(pipe.model, source)
    export_hf(pipe.model, out)
    if pipe.processor.llm_tokenizer is not None:
        pipe.processor.llm_tokenizer.save_pretrained(str(out))  # where transformers' processors look
    if adapter:
        shutil.copytree(model_dir / "lora_adapter", out / "adapter", dirs_exist_ok=True)
        config = json.loads((out / "adapter" / "adapter_config.json").read_text())
        (out / "adapter" / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": str(out)},
                                                                        indent=2) + "\n")
    return out
