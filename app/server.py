"""The rules of a server shared by strangers: one model for everyone behind one lock, a
bounded queue, a pixel and an upload size limit, files handed out from this process's own
folder, errors that never take the server down, and no request that can make it read, list
or return a file outside what the user uploaded or what ships with the app (reading a
folder by its path is a local-only convenience, off when hosted or listening beyond
loopback).

The settings and the loaded model are module state (`SETTINGS`, `APP`), set by `setup`
and `load_model`; handlers reach the model through `current()`.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import gradio as gr
import torch
from PIL import Image

import blip2lab
from blip2lab import routing
from blip2lab.pipeline import PRESETS, Blip2Pipeline
from blip2lab.processor import load_image
from blip2lab.worlds.shapes.gallery import ShapesGallery, build_gallery

try:  # Hugging Face ZeroGPU: run the model calls on a GPU lent for the call; absent elsewhere
    import spaces

    gpu = spaces.GPU
except ImportError:  # the usual case: a plain function

    def gpu(fn: Callable) -> Callable:
        return fn


log = logging.getLogger("blip2lab.app")
ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "assets" / "examples"  # the only folder of the repository the server hands out
EXAMPLES: dict[str, str] = json.loads((ASSETS / "captions.json").read_text())  # shipped image -> description
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
MAX_SESSION_IMAGES = 200  # per-user additions to the search gallery
MAX_FOLDER_FILES = 2000
SHAPES_NOTE = ("This model was trained only on the synthetic shapes world (64x64 scenes of up to three "
               "circles, squares and triangles in six colours on a 2x3 grid). It does not know real photos: "
               "on anything else its answers are shapes-world guesses.")
MINIREAL_NOTE = ("mini-real: a frozen EfficientNet-lite0 (ImageNet) and a frozen SmolLM2-135M-Instruct, bridged by "
                 "a Q-Former initialised from all-MiniLM-L6-v2 and trained here (stage 1 then stage 2) on 4,567 "
                 "public-domain cliparts of Debian's Open Clip Art, captioned by their human-written titles, "
                 "descriptions and keywords. It names the main object of simple pictures at best: it has seen no "
                 "photos in training, and its answers come from a 135M-parameter LLM.")


# ---------------------------------------------------------------------------------------
# Settings and the one shared model
# ---------------------------------------------------------------------------------------


@dataclass
class Settings:
    model: str = "shapes-opt"
    retrieval: Optional[str] = None
    device: str = "cpu"
    gallery_size: int = 1000
    host: str = "127.0.0.1"
    port: int = 7860
    max_upload: str = "10mb"
    max_pixels: int = 40_000_000
    queue_size: int = 64
    hosted: bool = False  # on Hugging Face Spaces (SPACE_ID set)
    llm_dtype: str = "auto"  # Blip2Pipeline.set_llm_dtype

    @property
    def folders_allowed(self) -> bool:
        """Reading a folder by its path: only on the user's own machine, listening on loopback."""
        return not self.hosted and self.host in LOOPBACK

    @classmethod
    def from_env(cls, env=os.environ) -> "Settings":
        cuda = torch.cuda.is_available()
        return cls(model=env.get("BLIP2LAB_MODEL", "shapes-opt"), retrieval=env.get("BLIP2LAB_RETRIEVAL") or None,
                   device=env.get("BLIP2LAB_DEVICE", "cuda" if cuda else "cpu"),
                   gallery_size=int(env.get("BLIP2LAB_GALLERY_SIZE", 1000)),
                   host=env.get("BLIP2LAB_HOST") or env.get("GRADIO_SERVER_NAME") or "127.0.0.1",
                   port=int(env.get("BLIP2LAB_PORT") or env.get("GRADIO_SERVER_PORT") or 7860),
                   max_upload=env.get("BLIP2LAB_MAX_UPLOAD", "10mb"),
                   max_pixels=int(env.get("BLIP2LAB_MAX_PIXELS", 40_000_000)),
                   queue_size=int(env.get("BLIP2LAB_QUEUE_SIZE", 64)), hosted=bool(env.get("SPACE_ID")),
                   llm_dtype=env.get("BLIP2LAB_LLM_DTYPE") or "auto")


@dataclass
class Loaded:
    """The model every session shares, its base search gallery, and the lock that lets
    one request at a time use them."""

    pipe: Blip2Pipeline
    name: str
    lock: threading.RLock = field(default_factory=threading.RLock)
    base: Optional[ShapesGallery] = None  # shapes test scenes + shipped examples, built in the background
    base_ready: threading.Event = field(default_factory=threading.Event)
    base_error: Optional[str] = None
    photo_pipe: Optional[Blip2Pipeline] = None  # mini-real, loaded on the first photo a shapes model is sent

    @property
    def is_shapes(self) -> bool:
        return routing.is_shapes_model(self.pipe, self.name)

    @property
    def can_match(self) -> bool:
        return self.pipe.model.has_stage1_heads or self.pipe.retrieval is not None


SETTINGS = Settings()
APP: Optional[Loaded] = None
TMP = Path(tempfile.gettempdir()) / f"blip2lab-app-{os.getpid()}"  # files this process hands out


def load_model(name: str, retrieval: Optional[str] = None, settings: Optional[Settings] = None) -> Loaded:
    """Load a model for everyone and start indexing its base gallery in the background."""
    global APP
    settings = settings or SETTINGS
    pipe = _load_pipe(name, retrieval, settings.device, settings)
    loaded = Loaded(pipe, str(name))
    APP = loaded
    threading.Thread(target=_build_base_gallery, args=(loaded, settings.gallery_size), daemon=True).start()
    return loaded


def _load_pipe(name: str, retrieval: Optional[str], device: str, settings: Settings) -> Blip2Pipeline:
    """blip2lab.load with the app's LLM precision and its pixel limit on every processor the
    pipeline holds."""
    pipe = blip2lab.load(name, retrieval=retrieval, device=device, llm_dtype=settings.llm_dtype)
    for proc in {id(pipe.processor): pipe.processor, id(pipe.retrieval_processor): pipe.retrieval_processor}.values():
        proc.max_pixels = settings.max_pixels
    return pipe


def _build_base_gallery(loaded: Loaded, size: int) -> None:
    try:
        if loaded.can_match:  # the model's lock per batch: requests go first
            loaded.base = build_gallery(loaded.pipe, size, ASSETS, EXAMPLES, lock=loaded.lock)
        else:
            loaded.base = ShapesGallery()
    except Exception as e:  # reported by the search tab, never fatal to the app
        log.exception("building the search gallery failed")
        loaded.base_error = f"{type(e).__name__}: {e}"
    finally:
        loaded.base_ready.set()


def current() -> Loaded:
    """The loaded model, or an error for the user when there is none yet."""
    if APP is None:
        raise gr.Error("No model is loaded yet: pick one in the Model tab.")
    return APP


def photo_model_for(image: Image.Image) -> Optional[Blip2Pipeline]:
    """The pipeline that answers a photo sent to a shapes model (`blip2lab.routing`; loaded
    once, on the device of the main model); None when the loaded model answers it itself."""
    loaded = current()
    name = routing.photo_model_for(loaded.pipe, image, loaded.name)
    if name is None:
        return None
    with loaded.lock:
        if loaded.photo_pipe is None:
            loaded.photo_pipe = _load_pipe(name, None, loaded.pipe.device, SETTINGS)
    return loaded.photo_pipe


# ---------------------------------------------------------------------------------------
# Errors and input
# ---------------------------------------------------------------------------------------


def friendly(fn: Callable) -> Callable:
    """Bad input becomes a gr.Error with a plain message; anything unexpected is logged
    with its traceback on the server and reported in one line. The app keeps serving."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except (ValueError, TypeError, FileNotFoundError) as e:
            raise gr.Error(str(e)) from e
        except Exception as e:
            log.error("%s failed:\n%s", fn.__name__, traceback.format_exc())
            raise gr.Error(f"Something went wrong ({type(e).__name__}). The app is still running; "
                           "try another input.") from e

    return wrapper


def open_image(path: Any) -> Image.Image:
    """An uploaded file (a path from Gradio's upload folder, or one of ours) -> RGB image,
    decoded by blip2lab's loader: pixel limit before decoding, EXIF, alpha, grey, 16-bit."""
    if path is None or path == "":
        raise gr.Error("Add an image first.")
    if isinstance(path, Image.Image):
        return load_image(path, max_pixels=SETTINGS.max_pixels)
    name = Path(str(path)).name
    try:
        return load_image(str(path), max_pixels=SETTINGS.max_pixels, target_size=current().pipe.processor.image_size)
    except (ValueError, OSError) as e:
        message = str(e).replace(str(path), name)
        if "max_pixels" in message:
            raise gr.Error(f"{name} is too large: images may have at most {SETTINGS.max_pixels:,} pixels.") from e
        raise gr.Error(f"{name} is not an image this app can read ({message}).") from e


def warn_if_not_scene(image: Image.Image) -> None:
    if current().is_shapes and not routing.looks_like_scene(image):
        gr.Warning("This does not look like a shapes-world scene. " + SHAPES_NOTE)


def require_local(action: str, instead: str) -> None:
    """A path the user typed is read only on their own machine (Settings.folders_allowed)."""
    if not SETTINGS.folders_allowed:
        raise gr.Error(f"{action} is a local-only convenience and is off on this server; {instead}.")


def check_model_source(source: str) -> None:
    """A shipped name or a checkpoint id may be loaded anywhere; a folder only locally."""
    is_path = source.startswith((".", "/", "~")) or Path(source).expanduser().exists()
    if source not in PRESETS and is_path:
        require_local("Loading a model from a folder", "pick a shipped model or an official checkpoint id")


def image_folder(folder: str, limit: int) -> tuple[Path, list[Path]]:
    """Local only: a folder on this machine and its first `limit` image files, sorted."""
    require_local("Indexing a folder by path", "upload images instead")
    path = Path((folder or "").strip()).expanduser()
    if not str(folder or "").strip() or not path.is_dir():
        raise gr.Error(f"{folder!r} is not a folder on this machine.")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return path, files[:min(MAX_FOLDER_FILES, limit)]


# ---------------------------------------------------------------------------------------
# Files handed out
# ---------------------------------------------------------------------------------------


def tmp_file(suffix: str) -> Path:
    """A new file in this process's folder; files older than an hour are removed."""
    TMP.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for old in TMP.iterdir():
        try:
            if now - old.stat().st_mtime > 3600:
                old.unlink()
        except OSError:
            pass
    return Path(tempfile.mkstemp(suffix=suffix, dir=TMP)[1])


def save_png(image: Image.Image) -> str:
    """The image as a PNG file named by its content, written once (to a temporary name, then
    renamed). Handlers return such paths rather than PIL images: Gradio stores a returned
    PIL image under a content hash too, but by writing over that path in place, so two
    requests returning the same picture at once could serve a half-written file."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = buffer.getvalue()
    TMP.mkdir(parents=True, exist_ok=True)
    path = TMP / f"{hashlib.sha256(data).hexdigest()[:24]}.png"
    if path.exists():
        os.utime(path)  # used again: not pruned for another hour
    else:
        staging = tmp_file(".part")
        staging.write_bytes(data)
        os.replace(staging, path)
    return str(path)


# ---------------------------------------------------------------------------------------
# Starting and serving
# ---------------------------------------------------------------------------------------


def setup(settings: Optional[Settings] = None) -> Loaded:
    """Read the settings, set torch's threads and PIL's bomb limit, load the model."""
    global SETTINGS
    SETTINGS = settings or Settings.from_env()
    if os.environ.get("BLIP2LAB_THREADS"):
        torch.set_num_threads(int(os.environ["BLIP2LAB_THREADS"]))
    Image.MAX_IMAGE_PIXELS = SETTINGS.max_pixels  # Gradio's own PIL calls refuse bombs too
    return load_model(SETTINGS.model, SETTINGS.retrieval, SETTINGS)


def launch(demo: gr.Blocks, prevent_thread_lock: bool = False, **kwargs):
    """Bounded queue, upload limit, loopback by default, only the shipped examples served
    from the repository, no server-side rendering (no Node)."""
    demo.queue(max_size=SETTINGS.queue_size)
    return demo.launch(server_name=SETTINGS.host, server_port=SETTINGS.port, max_file_size=SETTINGS.max_upload,
                       allowed_paths=[str(ASSETS)], prevent_thread_lock=prevent_thread_lock, ssr_mode=False,
                       footer_links=["api"], **kwargs)
