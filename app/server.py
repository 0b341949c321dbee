"""The rules of a server shared by strangers: the models it holds (each loaded once, shared
by the sessions that pick it, a bounded number at once), every session's own choice among
them, a bounded queue, a pixel and an upload size limit, files handed out from this
process's own folder, errors that never take the server down nor cover the page, and no
request that can make it read, list or return a file outside what the user uploaded or what
ships with the app (reading a folder, or loading a model, by its path is a local-only
convenience, off when hosted or listening beyond loopback).

The settings, the models and the search index are module state (`SETTINGS`, `MODELS`,
`SEARCH`), set by `setup`; a handler reaches its session's model through `model(name)`.
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
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import gradio as gr
import torch
from PIL import Image

import blip2lab
from blip2lab import routing
from blip2lab.pipeline import PIPELINE_NAME, PRESETS, Blip2Pipeline
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
# Stage 1 trained with partial descriptions too (models/shapes-stage1-partial/recipe.json): it
# finds "a red circle" among scenes that hold one, where shapes-stage1 reads it as a mismatch.
# The shipped shapes models search and match with it in the app.
SHAPES_MATCHER = "shapes-stage1-partial"
SHAPES_NOTE = ("This model was trained only on the synthetic shapes world (64x64 scenes of up to three "
               "circles, squares and triangles in six colours on a 2x3 grid). It does not know real photos: "
               "on anything else its answers are shapes-world guesses.")
MINIREAL_NOTE = ("mini-real: a frozen EfficientNet-lite0 (ImageNet) and a frozen SmolLM2-135M-Instruct, bridged by "
                 "a Q-Former initialised from all-MiniLM-L6-v2 and trained here (stage 1 then stage 2) on 4,567 "
                 "public-domain cliparts of Debian's Open Clip Art, captioned by their human-written titles, "
                 "descriptions and keywords. It names the main object of simple pictures at best: it has seen no "
                 "photos in training, and its answers come from a 135M-parameter LLM.")


# ---------------------------------------------------------------------------------------
# Settings, the models and the search index
# ---------------------------------------------------------------------------------------


def _names(value: Optional[str]) -> tuple[str, ...]:
    return tuple(n.strip() for n in (value or "").split(",") if n.strip())


@dataclass
class Settings:
    model: str = "shapes-opt"  # what a new session gets
    models: tuple[str, ...] = ()  # what a session may pick; () = every shipped model
    retrieval: Optional[str] = None  # the default model's matcher, for a stage-2 checkpoint without heads
    search_model: Optional[str] = None  # what the Search tab searches with (None: see `search`)
    max_models: int = 6  # models held at once; the least recently used other one goes first
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

    @property
    def choices(self) -> list[str]:
        """The models a session may pick: the default first."""
        return list(dict.fromkeys([self.model, *(self.models or sorted(PRESETS))]))

    @property
    def search(self) -> str:
        """The Search tab's model: BLIP2LAB_SEARCH_MODEL, else SHAPES_MATCHER for a shapes app, else the default."""
        if self.search_model:
            return self.search_model
        return SHAPES_MATCHER if SHAPES_MATCHER in PRESETS and self.model.startswith("shapes") else self.model

    def matcher_for(self, name: str) -> Optional[str]:
        """The retrieval model `name` matches with: BLIP2LAB_RETRIEVAL for the default model;
        SHAPES_MATCHER for a shipped shapes model that links a stage-1 model (pipeline.json);
        else None (its own heads or its own link)."""
        if name == self.model and self.retrieval:
            return self.retrieval
        linked = name in PRESETS and (PRESETS[name] / PIPELINE_NAME).is_file()
        return SHAPES_MATCHER if linked and name.startswith("shapes") and SHAPES_MATCHER in PRESETS else None

    @classmethod
    def from_env(cls, env=os.environ) -> "Settings":
        cuda = torch.cuda.is_available()
        return cls(model=env.get("BLIP2LAB_MODEL", "shapes-opt"), models=_names(env.get("BLIP2LAB_MODELS")),
                   retrieval=env.get("BLIP2LAB_RETRIEVAL") or None,
                   search_model=env.get("BLIP2LAB_SEARCH_MODEL") or None,
                   max_models=int(env.get("BLIP2LAB_MAX_MODELS", 6)),
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
    """One model the server holds, and the lock that lets one request at a time use it."""

    pipe: Blip2Pipeline
    name: str
    lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def is_shapes(self) -> bool:
        return routing.is_shapes_model(self.pipe, self.name)

    @property
    def can_match(self) -> bool:
        return self.pipe.model.has_stage1_heads or self.pipe.retrieval is not None


class Models:
    """The models this server holds: each loaded once, on first use, and shared by every
    session that picks it; at most `settings.max_models` at once (the least recently used
    one goes, never the default or the search model; a request using it keeps its copy)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._loaded: OrderedDict[str, Loaded] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def allowed(self, name: str) -> bool:
        return name in self.settings.choices or name in (routing.PHOTO_MODEL, self.settings.search)

    def held(self) -> list[str]:
        with self._lock:
            return list(self._loaded)

    def get(self, name: str) -> Loaded:
        """The model `name`, loaded now if it is not held (one load per name at a time)."""
        with self._lock:
            if name in self._loaded:
                self._loaded.move_to_end(name)
                return self._loaded[name]
            loading = self._loading.setdefault(name, threading.Lock())
        with loading:
            with self._lock:
                if name in self._loaded:
                    return self._loaded[name]
            loaded = Loaded(_load_pipe(name, self.settings.matcher_for(name), self.settings), name)
            with self._lock:
                self._loaded[name] = loaded
                keep = {self.settings.model, self.settings.search, name}
                over = max(0, len(self._loaded) - self.settings.max_models)
                for old in [n for n in self._loaded if n not in keep][:over]:  # least recently used first
                    del self._loaded[old]
        return loaded


@dataclass
class SearchIndex:
    """The Search tab's model and its base gallery (shapes test scenes + shipped examples),
    indexed once in the background and shared by every session."""

    loaded: Loaded
    base: Optional[ShapesGallery] = None
    ready: threading.Event = field(default_factory=threading.Event)
    error: Optional[str] = None


SETTINGS = Settings()
MODELS = Models(SETTINGS)
SEARCH: Optional[SearchIndex] = None
TMP = Path(tempfile.gettempdir()) / f"blip2lab-app-{os.getpid()}"  # files this process hands out


def _load_pipe(name: str, retrieval: Optional[str], settings: Settings) -> Blip2Pipeline:
    """blip2lab.load with the app's LLM precision and its pixel limit on every processor the
    pipeline holds."""
    pipe = blip2lab.load(name, retrieval=retrieval, device=settings.device, llm_dtype=settings.llm_dtype)
    for proc in {id(pipe.processor): pipe.processor, id(pipe.retrieval_processor): pipe.retrieval_processor}.values():
        proc.max_pixels = settings.max_pixels
    return pipe


def _build_search(index: SearchIndex, size: int) -> None:
    try:
        if index.loaded.can_match:  # the model's lock per batch: requests go first
            index.base = build_gallery(index.loaded.pipe, size, ASSETS, EXAMPLES, lock=index.loaded.lock)
        else:
            index.base = ShapesGallery()
    except Exception as e:  # reported by the search tab, never fatal to the app
        log.exception("building the search gallery failed")
        index.error = f"{type(e).__name__}: {e}"
    finally:
        index.ready.set()


def check_choice(name: str) -> str:
    """A model a session may pick: one of the choices; locally also any name, id or folder."""
    name = (name or "").strip()
    if not name:
        raise UserError("Pick a model.")
    if not MODELS.allowed(name):
        if SETTINGS.hosted:
            raise UserError(f"{name!r} is not one of this server's models: pick one of {SETTINGS.choices}.")
        check_model_source(name)
    return name


def model(name: Optional[str] = None) -> Loaded:
    """A session's model (its choice, else the default), loaded on first use."""
    name = check_choice(name or SETTINGS.model)
    try:
        return MODELS.get(name)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise UserError(f"Cannot load {name}: {e}") from e


def search_index() -> SearchIndex:
    if SEARCH is None:
        raise UserError("The search gallery is not set up on this server.")
    return SEARCH


def photo_model_for(loaded: Loaded, image: Image.Image) -> Optional[Loaded]:
    """The model that answers a photo sent to `loaded` (`blip2lab.routing`: mini-real for a
    shapes model), or None when `loaded` answers it itself."""
    name = routing.photo_model_for(loaded.pipe, image, loaded.name)
    return None if name is None else MODELS.get(name)


# ---------------------------------------------------------------------------------------
# Errors and input
# ---------------------------------------------------------------------------------------


class UserError(gr.Error):
    """Input the app refuses, with a plain message for the user and no traceback in the
    server's log (`print_exception=False`: a user's mistake is not the server's failure).
    `image`: the image the user gave is what was wrong (the page drops it from the input)."""

    def __init__(self, message: str, image: bool = False):
        super().__init__(message, print_exception=False)
        self.image = image


def friendly(fn: Callable) -> Callable:
    """Bad input becomes a UserError with a plain message (one line in the log); anything
    unexpected is logged with its traceback and reported in one line. The app keeps serving."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error as e:
            log.info("%s refused: %s", fn.__name__, e.message)
            raise
        except (ValueError, TypeError, FileNotFoundError) as e:
            log.info("%s refused: %s", fn.__name__, e)
            raise UserError(str(e)) from e
        except Exception as e:
            log.error("%s failed:\n%s", fn.__name__, traceback.format_exc())
            raise gr.Error(f"Something went wrong ({type(e).__name__}). The app is still running; "
                           "try another input.", print_exception=False) from e

    return wrapper


def on_page(fn: Callable, outputs: int, on_error: Optional[Callable[[gr.Error], tuple]] = None) -> Callable:
    """The page's version of a handler: a refusal is a toast (gr.Warning) and every output
    stays as it was (gr.skip()), or becomes what `on_error(error)` returns. A raised gr.Error
    would mark each output of the event with an "Error" badge that stays until that output's
    next event, covering the conversation and the inputs; the API endpoints raise it instead,
    so a script gets the error (app.py wires both)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error as e:
            gr.Warning(e.message)
            if on_error is not None:
                return on_error(e)
            return tuple(gr.skip() for _ in range(outputs)) if outputs > 1 else gr.skip()

    return wrapper


def open_image(path: Any, target_size: Optional[int] = None) -> Image.Image:
    """An uploaded file (a path from Gradio's upload folder, or one of ours) -> RGB image,
    decoded by blip2lab's loader: pixel limit before decoding, EXIF, alpha, grey, 16-bit;
    `target_size`: a large image is reduced while decoding (the model's input side)."""
    if path is None or path == "":
        raise UserError("Add an image first.")
    if isinstance(path, Image.Image):
        return load_image(path, max_pixels=SETTINGS.max_pixels)
    name = Path(str(path)).name
    try:
        return load_image(str(path), max_pixels=SETTINGS.max_pixels, target_size=target_size)
    except (ValueError, OSError) as e:
        message = str(e).replace(str(path), name)
        if "max_pixels" in message:
            raise UserError(f"{name} is too large: images may have at most {SETTINGS.max_pixels:,} pixels.",
                            image=True) from e
        raise UserError(f"{name} is not an image this app can read ({message}).", image=True) from e


def warn_if_not_scene(loaded: Loaded, image: Image.Image) -> None:
    if loaded.is_shapes and not routing.looks_like_scene(image):
        gr.Warning("This does not look like a shapes-world scene. " + SHAPES_NOTE)


def require_local(action: str, instead: str) -> None:
    """A path the user typed is read only on their own machine (Settings.folders_allowed)."""
    if not SETTINGS.folders_allowed:
        raise UserError(f"{action} is a local-only convenience and is off on this server; {instead}.")


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
        raise UserError(f"{folder!r} is not a folder on this machine.")
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
    """Read the settings, set torch's threads and PIL's bomb limit, load the default and the
    search model, index the search gallery and then load the other choices, in the background."""
    global SETTINGS, MODELS, SEARCH
    SETTINGS = settings or Settings.from_env()
    if os.environ.get("BLIP2LAB_THREADS"):
        torch.set_num_threads(int(os.environ["BLIP2LAB_THREADS"]))
    Image.MAX_IMAGE_PIXELS = SETTINGS.max_pixels  # Gradio's own PIL calls refuse bombs too
    MODELS = Models(SETTINGS)
    default = MODELS.get(SETTINGS.model)
    SEARCH = SearchIndex(MODELS.get(SETTINGS.search))
    threading.Thread(target=_warm_up, args=(SEARCH, SETTINGS), daemon=True).start()
    return default


def _warm_up(index: SearchIndex, settings: Settings) -> None:
    """The search gallery, then every other choice (so a session's first pick is quick)."""
    _build_search(index, settings.gallery_size)
    for name in settings.choices[:settings.max_models]:
        try:
            MODELS.get(name)
        except Exception as e:  # picked later, the model says why it cannot load
            log.warning("could not preload %s: %s", name, e)


def launch(demo: gr.Blocks, prevent_thread_lock: bool = False, **kwargs):
    """Bounded queue, upload limit, loopback by default, only the shipped examples served
    from the repository, no server-side rendering (no Node)."""
    demo.queue(max_size=SETTINGS.queue_size)
    return demo.launch(server_name=SETTINGS.host, server_port=SETTINGS.port, max_file_size=SETTINGS.max_upload,
                       allowed_paths=[str(ASSETS)], prevent_thread_lock=prevent_thread_lock, ssr_mode=False,
                       footer_links=["api"], **kwargs)
