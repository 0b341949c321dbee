"""Precision names: one reading of `dtype=` / `llm_dtype=` for every entry point.

transformers names a precision by a torch dtype or by its name ("bfloat16", "float16",
"float32", "auto"); code written for it passes strings. Every blip2lab function that takes a
dtype runs it through `as_dtype`, so `blip2lab.load(folder, dtype="bfloat16")` means what
`dtype=torch.bfloat16` means, and a wrong name is an error naming the argument.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

import torch

__all__ = ["DTYPE_NAMES", "DtypeLike", "as_dtype", "dtype_name", "pick_dtype", "native_bf16"]

DTYPE_NAMES: dict[str, torch.dtype] = {
    "float64": torch.float64, "double": torch.float64,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}

DtypeLike = Union[torch.dtype, str, None]


def as_dtype(value: DtypeLike, what: str = "dtype") -> Union[torch.dtype, Literal["auto"], None]:
    """None -> None; a floating torch dtype -> itself; "auto" -> "auto" (the caller says what
    it means there); a name ("bfloat16", "bf16", "torch.float16", ...) -> its torch dtype.
    Anything else is a ValueError naming `what`."""
    if value is None or isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    if isinstance(value, str):
        name = value.strip().lower().removeprefix("torch.")
        if name == "auto":
            return "auto"
        if name in DTYPE_NAMES:
            return DTYPE_NAMES[name]
    raise ValueError(f"{what} must be a floating torch dtype or one of its names "
                     f"({', '.join(sorted(set(DTYPE_NAMES) | {'auto'}))}), got {value!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (the names LLMConfig.dtype and config files use)."""
    return str(dtype).removeprefix("torch.")


def pick_dtype(requested: str, kind: str, device: torch.device | str) -> torch.dtype:
    """The precision policy for the frozen LLM (BLIP2_REFERENCE.md Sec. 3, 8): fp32 on the
    CPU; on a GPU bf16 where supported, else fp16, except T5 which overflows in fp16 and so
    runs bf16 or fp32. An explicit request wins, but fp16 is refused for T5."""
    device = torch.device(device)
    if requested != "auto":
        dtype = as_dtype(requested, "llm.dtype")
        if kind == "encoder_decoder" and dtype == torch.float16:
            raise ValueError("llm.dtype float16 is refused for T5 / FlanT5: it overflows (use bfloat16 or float32)")
        return dtype
    if device.type != "cuda":
        return torch.float32
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32 if kind == "encoder_decoder" else torch.float16


def native_bf16(device: Optional[torch.device | str] = None) -> bool:
    """Whether bf16 runs natively on `device` (default: CUDA when present, else the CPU): a
    CUDA device that has it, or a CPU with AVX512-BF16 or AMX (Linux's /proc/cpuinfo flags).
    Elsewhere a CPU emulates bf16, slower than fp32."""
    cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    if cuda:
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
