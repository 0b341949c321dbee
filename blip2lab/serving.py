"""Which model answers photos in the app: `choose_photo_model`.

The shipped shapes models know only rendered scenes; a photo sent to them goes to a photo
model. Where a hub is reachable and a GPU is present (a GPU Space, a ZeroGPU Space, a
workstation) that is an official checkpoint, Salesforce/blip2-opt-2.7b by default; elsewhere it
is the shipped mini-real (small, offline, CPU-fast, and much weaker). On a CPU-only machine
with a hub the official checkpoint is an opt-in: it answers, but in minutes, from ~8 GB of
weights (bf16).

Configuration (environment):
  BLIP2LAB_PHOTO_MODEL   the photo model, any source `blip2lab.load` opens ("mini-real", a hub
                         id, a folder); set, it wins over everything below.
  BLIP2LAB_PHOTO_ON_CPU  "1": use the official default on a CPU-only machine too (the opt-in).
Hub reachability: offline flags (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE) say no; a Space
(SPACE_ID) says yes; otherwise one HEAD request to the hub, 3 s at most. GPU: CUDA, or a
ZeroGPU Space (SPACES_ZERO_GPU), whose GPU is lent per call.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional

__all__ = ["DEFAULT_PHOTO_MODEL", "MINIREAL", "PhotoModel", "choose_photo_model", "hub_reachable", "gpu_present"]

DEFAULT_PHOTO_MODEL = "Salesforce/blip2-opt-2.7b"
MINIREAL = "mini-real"
_TRUE = ("1", "true", "yes", "on")
CPU_NOTE = (f"Photos are answered by {MINIREAL}, a small model trained here on clip art: its answers about photos "
            f"are rough. This machine has no GPU; the official {DEFAULT_PHOTO_MODEL} would take minutes per answer "
            f"on its CPU (~8 GB of weights in bf16). To use it anyway, set BLIP2LAB_PHOTO_ON_CPU=1 (or "
            f"BLIP2LAB_PHOTO_MODEL={DEFAULT_PHOTO_MODEL}).")


@dataclass(frozen=True)
class PhotoModel:
    """The photo model to load: `blip2lab.load(source, device=device, llm_dtype=llm_dtype)`."""

    source: str  # "mini-real", or an official hub id / folder
    device: str  # "cuda" or "cpu" (ZeroGPU: "cuda", used inside the app's spaces.GPU calls)
    llm_dtype: Optional[str]  # "float16" (OPT) / "bfloat16" (FlanT5) on a GPU, "auto" on a CPU, None for mini-real
    official: bool  # an official checkpoint, not the shipped mini-real
    reason: str  # one line for the log: why this one
    note: Optional[str] = None  # for the user, when the choice needs saying (CPU-only with a hub)
    opt_in: Optional[str] = None  # the official model the user may switch to (CPU-only with a hub)


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in _TRUE


def hub_reachable(env: Mapping[str, str] = os.environ, timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers (module docstring); never raises."""
    if _flag(env, "HF_HUB_OFFLINE") or _flag(env, "TRANSFORMERS_OFFLINE"):
        return False
    if env.get("SPACE_ID"):
        return True
    import urllib.request

    endpoint = env.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
    try:
        urllib.request.urlopen(urllib.request.Request(f"{endpoint}/api/models/{DEFAULT_PHOTO_MODEL}",
                                                      method="HEAD"), timeout=timeout).close()
        return True
    except (OSError, ValueError):  # no route, DNS, timeout, HTTP errors: all mean "not here"
        return False


def gpu_present(env: Mapping[str, str] = os.environ) -> bool:
    """CUDA, or a ZeroGPU Space (its GPU exists only inside spaces.GPU calls, so CUDA says no at start)."""
    if _flag(env, "SPACES_ZERO_GPU"):
        return True
    import torch

    return torch.cuda.is_available()


def _llm_dtype(source: str, device: str) -> str:
    if device == "cpu":
        return "auto"  # bf16 where the CPU runs it natively
    return "bfloat16" if "t5" in source.lower() else "float16"  # FlanT5 overflows in fp16 (BLIP2_REFERENCE Sec. 3)


def choose_photo_model(env: Mapping[str, str] = os.environ, *, hub: Optional[bool] = None,
                       gpu: Optional[bool] = None) -> PhotoModel:
    """The photo model for this machine. `hub`, `gpu`: known answers (None: detect them, the
    hub only when the choice depends on it)."""
    gpu = gpu_present(env) if gpu is None else gpu
    device = "cuda" if gpu else "cpu"
    chosen = env.get("BLIP2LAB_PHOTO_MODEL", "").strip()
    if chosen:
        official = chosen != MINIREAL
        note = None if gpu or not official else f"{chosen} runs on the CPU here: expect minutes per answer."
        return PhotoModel(chosen, device, _llm_dtype(chosen, device) if official else None, official,
                          "BLIP2LAB_PHOTO_MODEL", note)
    hub = hub_reachable(env) if hub is None else hub
    if not hub:
        return PhotoModel(MINIREAL, device, None, False, "no hub reachable: the shipped mini-real")
    if gpu:
        return PhotoModel(DEFAULT_PHOTO_MODEL, device, _llm_dtype(DEFAULT_PHOTO_MODEL, device), True,
                          "a hub and a GPU: the official checkpoint")
    if _flag(env, "BLIP2LAB_PHOTO_ON_CPU"):
        return PhotoModel(DEFAULT_PHOTO_MODEL, "cpu", "auto", True, "BLIP2LAB_PHOTO_ON_CPU: the official checkpoint "
                          "on the CPU", f"{DEFAULT_PHOTO_MODEL} runs on the CPU here: expect minutes per answer.")
    return PhotoModel(MINIREAL, "cpu", None, False, "a hub but no GPU: mini-real unless opted in", CPU_NOTE,
                      DEFAULT_PHOTO_MODEL)
