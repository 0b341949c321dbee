"""blip2lab's Gradio app: chat about an image, captions with attention maps, retrieval
search, a scene composer for the shapes world, and a model picker.

    python app.py                      # http://127.0.0.1:7860, the shipped shapes-opt model
    BLIP2LAB_MODEL=path/to/folder python app.py

The app holds no model logic: every number comes from the blip2lab pipeline
(`blip2lab.pipeline`), its explanation maps (`blip2lab.explain`) and its gallery index
(`blip2lab.search.gallery`). What lives here is the user interface, input checking, and the
rules of a server shared by strangers: one model for everyone behind one lock, a bounded
queue, a pixel and an upload size limit, per-session uploads, and no request that can
make the server read, list or return a file outside what the user uploaded or what ships
with the app (indexing a folder by path is a local-only convenience, off when hosted or
listening beyond loopback).

Environment variables (all optional):
    BLIP2LAB_MODEL         model name or folder (default "shapes-opt"; shipped names: models/)
    BLIP2LAB_RETRIEVAL     a second model with ITC/ITM heads, for a stage-2 checkpoint without them
    BLIP2LAB_DEVICE        "cpu" / "cuda" (default: cuda when available)
    BLIP2LAB_GALLERY_SIZE  shapes test scenes in the search gallery (default 1000)
    BLIP2LAB_HOST, BLIP2LAB_PORT   where to listen (default 127.0.0.1:7860; GRADIO_SERVER_NAME /
                           GRADIO_SERVER_PORT, which Spaces sets, are honoured too)
    BLIP2LAB_MAX_UPLOAD    upload size limit (default "10mb")
    BLIP2LAB_MAX_PIXELS    images with more pixels are refused (default 40,000,000)
    BLIP2LAB_QUEUE_SIZE    requests waiting at most (default 64)
    BLIP2LAB_THREADS       torch CPU threads (default: torch's choice)
    BLIP2LAB_LLM_DTYPE     the frozen LLM's precision: "auto" (default: bf16 where the CPU or GPU
                           runs it natively, about 2x faster decoding; else the checkpoint's),
                           "float32" (as every evaluation in the README ran), or "bfloat16"
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import gradio as gr
import numpy as np
import torch
from PIL import Image

import blip2lab
from blip2lab import explain
from blip2lab.worlds.shapes import world
from blip2lab.search.gallery import Gallery, Hit
from blip2lab.pipeline import PRESETS, Blip2Pipeline
from blip2lab.processor import load_image

try:  # Hugging Face ZeroGPU: run the model calls on a GPU lent for the call; absent elsewhere
    import spaces

    gpu = spaces.GPU
except ImportError:  # the usual case: a plain function

    def gpu(fn: Callable) -> Callable:
        return fn


log = logging.getLogger("blip2lab.app")
ROOT = Path(__file__).resolve().parent
ASSETS = ROOT / "assets" / "examples"
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
EXAMPLES: dict[str, str] = json.loads((ASSETS / "captions.json").read_text())  # shipped image -> description
MAX_SESSION_IMAGES = 200  # per-user additions to the search gallery
MAX_FOLDER_FILES = 2000
SHAPES_NOTE = ("This model was trained only on the synthetic shapes world (64x64 scenes of up to three "
               "circles, squares and triangles in six colours on a 2x3 grid). It does not know real photos: "
               "on anything else its answers are shapes-world guesses.")
PHOTO_MODEL = "mini-real"  # answers uploaded photos in the chat when a shapes model is loaded
MINIREAL_NOTE = ("mini-real: a frozen EfficientNet-lite0 (ImageNet) and a frozen SmolLM2-135M-Instruct, bridged by "
                 "a Q-Former initialised from all-MiniLM-L6-v2 and trained here (stage 1 then stage 2) on 4,567 "
                 "public-domain cliparts of Debian's Open Clip Art, captioned by their human-written titles, "
                 "descriptions and keywords. It names the main object of simple pictures at best: it has seen no "
                 "photos in training, and its answers come from a 135M-parameter LLM.")
MAP_NOTE = ("**What a map is, and is not.** A cross-attention map shows how much each learned query reads "
            "each image patch; Grad-CAM weights that attention by its gradient on the image-text matching "
            "score (clamped at 0, averaged over heads; a word's map weights the queries by how much they "
            "attend to that word). Both are *estimates* of where evidence comes from, not explanations of "
            "the answer: a model can attend to a patch and then ignore it.")


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
    base: Optional[Gallery] = None  # shapes test scenes + shipped examples, built in the background
    base_ready: threading.Event = field(default_factory=threading.Event)
    base_error: Optional[str] = None
    scenes: list = field(default_factory=list)  # the gallery's shapes scenes, key "scene:i" -> scenes[i]
    photo_pipe: Optional[Blip2Pipeline] = None  # mini-real, loaded on the first photo a shapes model is sent

    @property
    def is_shapes(self) -> bool:
        return self.name.startswith("shapes") or self.pipe.name.startswith("shapes")

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
        gallery = Gallery()
        if loaded.can_match:
            scenes = world.make_gallery("test", size, seed=0) if size > 0 else []
            images = [world.render(s) for s in scenes] + [ASSETS / n for n in EXAMPLES]
            keys = [f"scene:{i}" for i in range(len(scenes))] + [f"example:{n}" for n in EXAMPLES]
            texts = [world.caption(s) for s in scenes] + list(EXAMPLES.values())
            for start in range(0, len(images), 64):  # the lock in slices: requests go first
                with loaded.lock:
                    gallery.add_images(loaded.pipe, images[start:start + 64], keys[start:start + 64])
                time.sleep(0.001)
            with loaded.lock:
                gallery.add_texts(loaded.pipe, texts)
            loaded.scenes = scenes
        loaded.base = gallery
    except Exception as e:  # reported by the search tab, never fatal to the app
        log.exception("building the search gallery failed")
        loaded.base_error = f"{type(e).__name__}: {e}"
    finally:
        loaded.base_ready.set()


def app() -> Loaded:
    if APP is None:
        raise gr.Error("No model is loaded yet: pick one in the Model tab.")
    return APP


# ---------------------------------------------------------------------------------------
# Input checking and errors
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
        return load_image(str(path), max_pixels=SETTINGS.max_pixels, target_size=app().pipe.processor.image_size)
    except (ValueError, OSError) as e:
        message = str(e).replace(str(path), name)
        if "max_pixels" in message:
            raise gr.Error(f"{name} is too large: images may have at most {SETTINGS.max_pixels:,} pixels.") from e
        raise gr.Error(f"{name} is not an image this app can read ({message}).") from e


def looks_like_scene(image: Image.Image) -> bool:
    """A shapes-world scene has the world's light grey background along its border."""
    a = np.asarray(image.resize((64, 64), Image.Resampling.BILINEAR), dtype=np.int16)  # (64, 64, 3)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])  # (256, 3)
    near = np.abs(border - np.array(world.BACKGROUND)).max(axis=1) <= 12
    return float(near.mean()) >= 0.6


def warn_if_not_scene(image: Image.Image) -> None:
    if app().is_shapes and not looks_like_scene(image):
        gr.Warning("This does not look like a shapes-world scene. " + SHAPES_NOTE)


def photo_model_for(image: Image.Image) -> Optional[Blip2Pipeline]:
    """mini-real for a photo sent to a shapes model, when it is shipped (loaded once, on the
    device of the main model); None otherwise: the loaded model answers. An official or user
    checkpoint, when configured, is never a shapes model and answers photos itself."""
    loaded = app()
    if not loaded.is_shapes or PHOTO_MODEL not in PRESETS or looks_like_scene(image):
        return None
    with loaded.lock:
        if loaded.photo_pipe is None:
            loaded.photo_pipe = _load_pipe(PHOTO_MODEL, None, loaded.pipe.device, SETTINGS)
    return loaded.photo_pipe


def check_question(text: str) -> str:
    text = (text or "").strip()
    if not text:
        raise gr.Error("Type a question about the image.")
    limit = app().pipe.processor.max_question_chars
    if len(text) > limit:
        gr.Warning(f"Your question is {len(text):,} characters long; only the first {limit:,} are used.")
        text = text[:limit]
    return text


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
# Chat
# ---------------------------------------------------------------------------------------

STRATEGIES = ("beam search", "nucleus sampling")


def new_chat() -> dict:
    return {"image": None, "turns": []}


def decoding_options(strategy: str, beams: float, max_new_tokens: float, min_length: float, temperature: float,
                     top_p: float, length_penalty: float, repetition_penalty: float, seed: float) -> dict:
    """The UI's controls -> blip2lab decoding options (DecodingConfig's names)."""
    common = dict(max_new_tokens=int(max_new_tokens), min_new_tokens=min(int(min_length), int(max_new_tokens)),
                  repetition_penalty=float(repetition_penalty))
    if strategy == "nucleus sampling":
        return common | dict(use_nucleus_sampling=True, top_p=float(top_p), temperature=float(temperature),
                             seed=int(seed))
    if strategy != "beam search":
        raise gr.Error(f"decoding must be one of {STRATEGIES}, got {strategy!r}")
    return common | dict(num_beams=int(beams), length_penalty=float(length_penalty))


def decoding_interactivity(strategy: str) -> list:
    """Grey out what does not apply: beams and length penalty are beam search's; temperature,
    top-p and seed are sampling's."""
    beam = strategy == "beam search"
    return [gr.update(interactive=beam), gr.update(interactive=beam), gr.update(interactive=not beam),
            gr.update(interactive=not beam), gr.update(interactive=not beam)]


def chat_messages(state: dict) -> list[dict]:
    messages: list[dict] = []
    if state.get("image"):
        messages.append({"role": "user", "content": {"path": state["image"]}})
    for q, a in state["turns"]:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a or "(an empty answer)"}]
    return messages


def fit_to_context(pipe: Blip2Pipeline, history: list[tuple[str, str]], question: str,
                   max_new_tokens: int) -> tuple[list[tuple[str, str]], str, str]:
    """Keep the prompt inside the LLM's positions (visual tokens + prompt + new tokens):
    drop the oldest turns first, then cut the question. Returns (history, question, prompt)."""
    proc = pipe.processor

    def prompt_of(h, q):
        return proc.chat_prompt(h, q) if h else proc.vqa_prompt(q)

    limit = getattr(pipe.model.llm.model.config, "max_position_embeddings", None)
    if limit is None:
        return history, question, prompt_of(history, question)
    budget = limit - pipe.model.config.qformer.num_queries - (max_new_tokens if proc.llm_kind == "decoder" else 0)

    def fits(h, q):
        return proc.generation_batch([prompt_of(h, q)])["llm_ids"].shape[1] <= budget

    kept = list(history)
    while kept and not fits(kept, question):
        kept = kept[1:]
    if len(kept) < len(history):
        gr.Warning(f"The conversation is longer than the model can read: the oldest {len(history) - len(kept)} "
                   "turn(s) are left out of the prompt.")
    if not fits(kept, question):
        lo, hi = 1, len(question)  # the longest prefix that fits, by bisection
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(kept, question[:mid]) else (lo, mid - 1)
        if not fits(kept, question[:lo]):
            raise gr.Error("Even a one-character question does not fit this model's context; "
                           "lower 'Max new tokens'.")
        gr.Warning(f"The question is too long for the model's context: only its first {lo} characters are used.")
        question = question[:lo].rstrip() or question[:lo]
    return kept, question, prompt_of(kept, question)


def _answer(state: dict, question: str, decoding: dict) -> tuple[str, str]:
    """The model's answer to `question` after the state's earlier turns, and the prompt it saw."""
    loaded = app()
    image = open_image(state["image"])
    pipe = photo_model_for(image) or loaded.pipe
    with loaded.lock:
        history, question, prompt = fit_to_context(pipe, [tuple(t) for t in state["turns"]], question,
                                                   decoding["max_new_tokens"])
        answer = pipe.answer(image, question, history=[history], **decoding)[0]
    return answer, prompt


@friendly
@gpu
def chat(message: Optional[dict], state: Optional[dict], *controls) -> tuple:
    """One chat turn. `message`: {"text": str, "files": [paths]}; an image among the files
    starts a new conversation about it (the reference's history format: earlier turns as
    "Question: q Answer: a." before the new question)."""
    state = state or new_chat()
    message = message or {"text": "", "files": []}
    files = [f for f in (message.get("files") or []) if f]
    if files:
        image = open_image(files[-1])
        if photo_model_for(image) is not None:
            gr.Warning(f"This looks like a photo, not a shapes-world scene: {PHOTO_MODEL} answers it. " + MINIREAL_NOTE)
        else:
            warn_if_not_scene(image)
        state = {"image": str(files[-1]), "turns": []}
    text = (message.get("text") or "").strip()
    if not state["image"]:
        raise gr.Error("Add an image first (drop one into the box, or pick an example).")
    if not text:
        if files:
            return chat_messages(state), None, "", state
        raise gr.Error("Type a question about the image.")
    if app().pipe.model.llm is None:
        raise gr.Error(f"{app().name} has no language model: it can caption (Q-Former decoder) and match, not chat.")
    question = check_question(text)
    answer, prompt = _answer(state, question, decoding_options(*controls))
    state = {"image": state["image"], "turns": state["turns"] + [[question, answer]]}
    return chat_messages(state), None, prompt, state


@friendly
@gpu
def chat_retry(state: Optional[dict], *controls) -> tuple:
    """Answer the last question again with the current decoding settings (with sampling,
    the seed moves on by one so the draw differs)."""
    state = state or new_chat()
    if not state["turns"]:
        raise gr.Error("Nothing to retry yet.")
    options = decoding_options(*controls)
    seed = int(controls[-1])
    if options.get("use_nucleus_sampling"):
        seed += 1
        options["seed"] = seed
    question = state["turns"][-1][0]
    state = {"image": state["image"], "turns": state["turns"][:-1]}
    answer, prompt = _answer(state, question, options)
    state["turns"] = state["turns"] + [[question, answer]]
    return chat_messages(state), prompt, state, seed


@friendly
def chat_undo(state: Optional[dict]) -> tuple:
    """Drop the last turn; its question goes back into the box."""
    state = state or new_chat()
    if not state["turns"]:
        return chat_messages(state), None, state
    question = state["turns"][-1][0]
    state = {"image": state["image"], "turns": state["turns"][:-1]}
    return chat_messages(state), {"text": question, "files": []}, state


def chat_clear() -> tuple:
    return [], None, "", new_chat()


# ---------------------------------------------------------------------------------------
# Caption & attention
# ---------------------------------------------------------------------------------------


def _choice(value: Any) -> Optional[int]:
    """"all" -> None; "3" / 3 -> 3."""
    if value is None or str(value).strip().lower() in ("", "all", "none"):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise gr.Error(f"expected 'all' or a number, got {value!r}")


def render_maps(image: Image.Image, maps: explain.CrossAttentionMaps, layer: Any, head: Any, reduce: str,
                query: Any) -> tuple[list, str]:
    """Small multiples (one overlay per query) and one large overlay (one query, or all
    queries combined by `reduce`)."""
    if reduce not in ("mean", "max"):
        raise gr.Error(f"aggregation must be 'mean' or 'max', got {reduce!r}")
    per_query = maps.select(_choice(layer), _choice(head), reduce)  # (Q, g, g)
    small = [(save_png(explain.overlay(image, m, size=96)), f"query {q}") for q, m in enumerate(per_query)]
    q = _choice(query)
    if q is not None and not 0 <= q < per_query.shape[0]:
        raise gr.Error(f"query {q} out of range: the model has {per_query.shape[0]} queries")
    big = per_query[q] if q is not None else (per_query.mean(0) if reduce == "mean" else per_query.amax(0))
    return small, save_png(explain.overlay(image, big, size=320))


def render_gradcam(image: Image.Image, cam: explain.GradCam, word: Optional[int]) -> tuple[list, str, str]:
    """Highlighted words (intensity = share of the Grad-CAM mass routed through each word),
    the overlay of one word's map (or of the whole text), and a line of numbers."""
    top = float(cam.word_scores.max()) if len(cam.words) else 0.0
    highlighted = [(w, round(float(s) / top, 3) if top > 0 else 0.0) for w, s in zip(cam.words, cam.word_scores)]
    if word is not None and not 0 <= word < len(cam.words):
        raise gr.Error(f"word {word} out of range: the text has {len(cam.words)} words")
    m = cam.text_map if word is None else cam.word_maps[word]
    what = "the whole text" if word is None else f"the word “{cam.words[word]}”"
    info = (f"Grad-CAM of {what} at Q-Former layer {cam.layer}; ITM match probability "
            f"{cam.itm_prob:.3f} (logit {cam.itm_logit:.2f}).")
    return highlighted, save_png(explain.overlay(image, m, size=320)), info


def _npz(maps: Optional[explain.CrossAttentionMaps], cam: Optional[explain.GradCam], **extra) -> str:
    path = tmp_file(".npz")
    explain.save_npz(str(path), maps, cam, **extra)
    return str(path)


@friendly
@gpu
def caption_maps(image_path: Any, layer: Any = "all", head: Any = "all", reduce: str = "mean", query: Any = "all",
                 gradcam_text: str = "", gradcam_layer: Any = "last") -> tuple:
    """Caption the image, then its per-query cross-attention maps and Grad-CAM of the ITM
    score for the caption (or `gradcam_text`) word by word."""
    loaded = app()
    image = open_image(image_path)
    warn_if_not_scene(image)
    with loaded.lock:
        caption = loaded.pipe.caption([image])[0]
        maps = loaded.pipe.attention_maps(image)
        text = (gradcam_text or "").strip() or caption
        cam = None
        if loaded.can_match and text:
            cam = loaded.pipe.gradcam(image, text, layer=None if gradcam_layer in (None, "", "last")
                                      else _choice(gradcam_layer))
    small, big = render_maps(image, maps, layer, head, reduce, query)
    if cam is not None:
        highlighted, cam_image, info = render_gradcam(image, cam, None)
    else:
        highlighted, cam_image = [], None
        info = "Grad-CAM needs an ITM head: this model has none." if not loaded.can_match else "No text to explain."
    cache = {"image": image, "maps": maps, "cam": cam}
    return caption, small, big, highlighted, cam_image, info, _npz(maps, cam, caption=caption), cache


@friendly
@gpu
def gradcam(image_path: Any, text: str, layer: Any = "last", word: Any = "all") -> tuple:
    """Grad-CAM of the ITM score for a text the user typed; `word`: a word index or "all"."""
    loaded = app()
    if not loaded.can_match:
        raise gr.Error(f"{loaded.name} has no ITM head, so there is no matching score to explain.")
    text = (text or "").strip()
    if not text:
        raise gr.Error("Type a text to explain (or leave it empty in the UI to use the caption).")
    image = open_image(image_path)
    with loaded.lock:
        cam = loaded.pipe.gradcam(image, text, layer=None if layer in (None, "", "last") else _choice(layer))
    highlighted, cam_image, info = render_gradcam(image, cam, _choice(word))
    return highlighted, cam_image, info, _npz(None, cam, text=text)


@friendly
def redraw_maps(cache: Optional[dict], layer: Any, head: Any, reduce: str, query: Any) -> tuple:
    """New selector values over the maps already computed (no model call)."""
    if not cache or cache.get("maps") is None:
        return gr.update(), gr.update()
    return render_maps(cache["image"], cache["maps"], layer, head, reduce, query)


@friendly
def pick_word(cache: Optional[dict], evt: gr.SelectData) -> tuple:
    """A click on a word of the highlighted text shows that word's Grad-CAM map."""
    if not cache or cache.get("cam") is None:
        return gr.update(), gr.update()
    _, image, info = render_gradcam(cache["image"], cache["cam"], int(evt.index))
    return image, info


# ---------------------------------------------------------------------------------------
# Search
# ---------------------------------------------------------------------------------------

DIRECTIONS = ("text → image", "image → text")
MODES = {"ITC": "itc", "ITC + ITM re-rank": "itc+itm"}


def new_session_gallery() -> dict:
    return {"gallery": Gallery(), "thumbs": {}}


def _thumb(image: Image.Image, side: int = 160) -> Image.Image:
    image = image.copy()
    image.thumbnail((side, side))
    return image


def _base(loaded: Loaded) -> Gallery:
    if not loaded.base_ready.wait(timeout=120):
        raise gr.Error("The search gallery is still being indexed; try again in a moment.")
    if loaded.base_error:
        raise gr.Error(f"The search gallery could not be built: {loaded.base_error}")
    return loaded.base


def _about(loaded: Loaded, key: str) -> str:
    """What an image result is, when the app knows: a scene's true caption, an example's description."""
    kind, _, name = key.partition(":")
    if kind == "scene":
        return world.caption(loaded.scenes[int(name)])
    if kind == "example":
        return EXAMPLES.get(name, "")
    return ""


def _item_image(loaded: Loaded, session: dict, key: str) -> Image.Image:
    kind, _, name = key.partition(":")
    if kind == "scene":
        return world.render(loaded.scenes[int(name)])
    if kind == "example":
        return load_image(ASSETS / Path(name).name)  # a shipped file, by its name only
    return session["thumbs"][key]


@friendly
@gpu
def search(direction: str, text: str, image_path: Any, mode: str = "ITC + ITM re-rank", k: float = 8,
           session: Optional[dict] = None) -> tuple:
    """text -> image or image -> text over the shared gallery plus this session's additions."""
    loaded = app()
    if not loaded.can_match:
        raise gr.Error(f"{loaded.name} has no ITC/ITM heads, so it cannot search.")
    if mode not in MODES:
        raise gr.Error(f"mode must be one of {list(MODES)}, got {mode!r}")
    session = session or new_session_gallery()
    k = max(1, min(int(k), 50))
    gallery = _base(loaded) + session["gallery"]
    start = time.perf_counter()
    if direction == DIRECTIONS[0]:
        text = (text or "").strip()
        if not text:
            raise gr.Error("Type a text to search the images with.")
        if not gallery.num_images:
            raise gr.Error("The gallery has no images: add some first.")
        with loaded.lock:
            hits = gallery.text_to_image(loaded.pipe, text[:1000], k, MODES[mode])
        images = [(save_png(_item_image(loaded, session, h.key)),
                   f"#{h.rank} cos {h.itc_cosine:.2f} · ITM {h.itm_prob:.2f}") for h in hits]
    elif direction == DIRECTIONS[1]:
        query = open_image(image_path)
        if not gallery.num_texts:
            raise gr.Error("The gallery has no texts: add some first.")
        with loaded.lock:
            hits = gallery.image_to_text(loaded.pipe, query, k, MODES[mode])
        images = []
    else:
        raise gr.Error(f"direction must be one of {list(DIRECTIONS)}, got {direction!r}")
    ms = (time.perf_counter() - start) * 1000
    table = [[h.rank, h.key, round(h.itc_cosine, 4), round(h.itm_prob, 4), _about(loaded, h.key)] for h in hits]
    what = f"{gallery.num_images} images" if direction == DIRECTIONS[0] else f"{gallery.num_texts} texts"
    status = f"Top {len(hits)} of {what}, ranked by {mode}, in {ms:.0f} ms."
    return images, table, status, [asdict(h) for h in hits]


def _add_images(session: dict, images: list[Image.Image], keys: list[str]) -> None:
    loaded = app()
    with loaded.lock:
        session["gallery"].add_images(loaded.pipe, images, keys)
    side = max(160, loaded.pipe.processor.image_size)  # a result clicked is searched by at full model resolution
    for key, image in zip(keys, images):
        session["thumbs"][key] = _thumb(image, side)


def _gallery_status(session: dict, note: str = "") -> str:
    loaded = app()
    base = loaded.base if loaded.base_ready.is_set() and loaded.base is not None else None
    n_img = (base.num_images if base else 0) + session["gallery"].num_images
    n_txt = (base.num_texts if base else 0) + session["gallery"].num_texts
    ready = "" if loaded.base_ready.is_set() else " (the shared part is still being indexed)"
    return (f"{note} Gallery: {n_img} images, {n_txt} texts ({session['gallery'].num_images} images and "
            f"{session['gallery'].num_texts} texts added by you){ready}.").strip()


@friendly
@gpu
def gallery_add(files: Optional[list], session: Optional[dict]) -> tuple:
    """Add uploaded images to this session's part of the gallery (others never see them)."""
    session = session or new_session_gallery()
    if not app().can_match:
        raise gr.Error(f"{app().name} has no ITC/ITM heads, so it cannot index images.")
    files = [f for f in (files or []) if f]
    if not files:
        raise gr.Error("Choose one or more images to add.")
    room = MAX_SESSION_IMAGES - session["gallery"].num_images
    if len(files) > room:
        gr.Warning(f"Only {room} more images fit in your part of the gallery; the rest are skipped.")
        files = files[:room]
    images, keys, bad = [], [], []
    for f in files:
        path = f if isinstance(f, str) else getattr(f, "name", str(f))
        try:
            images.append(open_image(path))
            keys.append(f"upload:{session['gallery'].num_images + len(keys)}:{Path(path).name}")
        except gr.Error:
            bad.append(Path(path).name)
    if bad:
        gr.Warning(f"Skipped {len(bad)} file(s) that are not readable images: {', '.join(bad[:5])}")
    if images:
        _add_images(session, images, keys)
    return _gallery_status(session, f"Added {len(images)} image(s)."), session


@friendly
@gpu
def gallery_add_texts(texts: str, session: Optional[dict]) -> tuple:
    """Add texts (one per line) to this session's part of the gallery, for image -> text."""
    session = session or new_session_gallery()
    lines = [t.strip()[:500] for t in (texts or "").splitlines() if t.strip()][:200]
    if not lines:
        raise gr.Error("Type one or more texts, one per line.")
    loaded = app()
    with loaded.lock:
        session["gallery"].add_texts(loaded.pipe, lines)
    return _gallery_status(session, f"Added {len(lines)} text(s)."), session


@friendly
@gpu
def gallery_add_folder(folder: str, session: Optional[dict]) -> tuple:
    """Local only: index the images of a folder on this machine (not when hosted, nor when
    the app listens beyond loopback)."""
    session = session or new_session_gallery()
    if not SETTINGS.folders_allowed:
        raise gr.Error("Indexing a folder by path is a local-only convenience and is off on this server; "
                       "upload images instead.")
    path = Path((folder or "").strip()).expanduser()
    if not str(folder or "").strip() or not path.is_dir():
        raise gr.Error(f"{folder!r} is not a folder on this machine.")
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    files = files[:min(MAX_FOLDER_FILES, MAX_SESSION_IMAGES - session["gallery"].num_images)]
    if not files:
        raise gr.Error(f"No images found in {path}.")
    images, keys = [], []
    for p in files:
        try:
            images.append(load_image(p, max_pixels=SETTINGS.max_pixels, target_size=app().pipe.processor.image_size))
            keys.append(f"folder:{session['gallery'].num_images + len(keys)}:{p.name}")
        except (ValueError, OSError):
            continue
    if images:
        _add_images(session, images, keys)
    return _gallery_status(session, f"Indexed {len(images)} of {len(files)} file(s) from {path}."), session


def gallery_reset() -> tuple:
    session = new_session_gallery()
    return _gallery_status(session, "Your additions were removed."), session


@friendly
def search_by_result(hits: Optional[list], direction: str, mode: str, k: float, session: Optional[dict],
                     evt: gr.SelectData) -> tuple:
    """A click on a result searches by it: an image result searches texts, a text result images."""
    if not hits:
        return (gr.update(),) * 8
    index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
    hit = Hit(**hits[int(index)])
    session = session or new_session_gallery()
    if direction == DIRECTIONS[0]:  # the hit is an image
        path = save_png(_item_image(app(), session, hit.key))
        out = search(DIRECTIONS[1], "", path, mode, k, session)
        return (DIRECTIONS[1], gr.update(), path) + out + (session,)
    out = search(DIRECTIONS[0], hit.key, None, mode, k, session)
    return (DIRECTIONS[0], hit.key, gr.update()) + out + (session,)


# ---------------------------------------------------------------------------------------
# Scene composer
# ---------------------------------------------------------------------------------------

CELLS = [(r, c) for r in world.ROWS for c in world.COLUMNS]


def _scene_outputs(scene: world.Scene) -> tuple[str, str, str]:
    return save_png(world.render(scene)), world.caption(scene), scene.to_json()


@friendly
def random_scene(seed: float = 0, novel: bool = False) -> tuple:
    """A random scene of 1-3 shapes; `novel` forces one held-out pair (purple triangle or
    orange square), which the model never saw in training."""
    scene = world.sample_scene(int(seed), allow_held_out=bool(novel), require_held_out=bool(novel))
    return _scene_outputs(scene)


@friendly
def compose_scene(*cells: Any) -> tuple:
    """18 values, three per cell in reading order (top left ... bottom right): shape (or
    "" / "none" for an empty cell), color, size."""
    if len(cells) != 3 * len(CELLS):
        raise gr.Error(f"compose_scene takes {3 * len(CELLS)} values (shape, color, size per cell)")
    objects = []
    for (row, column), (shape, color, size) in zip(CELLS, zip(cells[0::3], cells[1::3], cells[2::3])):
        if not shape or shape == "none":
            continue
        objects.append(world.place_object(shape, color or "red", size or "large", row, column))
    if not objects:
        raise gr.Error("Put at least one shape in a cell.")
    return _scene_outputs(world.Scene(objects=objects))


@friendly
def scene_from_text(text: str) -> tuple:
    """A scene from a description in the world's words, e.g. "a large red circle on the top
    left and a small blue square on the bottom right"."""
    found = world.parse_caption(text or "")
    if not found:
        raise gr.Error("Describe each shape fully: size, color, shape and place, e.g. "
                       "'a large red circle on the top left'.")
    cells = [(row, column) for *_, row, column in found]
    if len(set(cells)) != len(cells):
        raise gr.Error("Two shapes in the same cell: each cell holds one shape.")
    return _scene_outputs(world.Scene(objects=[world.place_object(shape, color, size, row, column)
                                               for size, color, shape, row, column in found]))


# ---------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------


def header_markdown() -> str:
    loaded = app()
    pipe = loaded.pipe
    n = sum(p.numel() for p in pipe.model.parameters()) / 1e6
    llm = {"decoder": "a decoder-only LLM (OPT-style)", "encoder_decoder": "an encoder-decoder LLM (T5-style)",
           "none": "no LLM (Q-Former captions)"}[pipe.model.config.llm.kind]
    if loaded.is_shapes:
        trained = SHAPES_NOTE + (f" Photos in the chat tab are answered by {PHOTO_MODEL}." if PHOTO_MODEL in PRESETS
                                 else "")
    elif PHOTO_MODEL in (loaded.name, loaded.pipe.name):
        trained = MINIREAL_NOTE
    else:
        trained = "An official or user checkpoint: see its own model card."
    dtype = "" if pipe.model.llm is None else f", LLM in {str(pipe.model.llm.model.dtype).removeprefix('torch.')}"
    return f"### blip2lab · model **{loaded.name}** ({n:.2f}M parameters, {llm}, on {pipe.device}{dtype})\n{trained}"


def model_info() -> str:
    """What is loaded: name, parameters per part, device, what it can do."""
    loaded = app()
    m = loaded.pipe.model
    parts = {"image encoder (frozen)": m.image_encoder, "Q-Former": m.qformer}
    if m.llm is not None:
        parts["LLM (frozen) + projection"] = m.llm
    rows = "\n".join(f"| {k} | {sum(p.numel() for p in v.parameters()) / 1e6:.3f}M |" for k, v in parts.items())
    q = m.config.qformer
    can = ["caption"] + (["answer / chat"] if m.llm is not None else []) + (
        ["match / search / Grad-CAM"] if loaded.can_match else [])
    text = (f"**{loaded.name}** on `{loaded.pipe.device}`: {sum(p.numel() for p in m.parameters()) / 1e6:.3f}M "
            f"parameters.\n\n| part | parameters |\n|---|---|\n{rows}\n\n"
            f"Image side {m.config.vision.image_size} px, {m.config.vision.num_tokens} image tokens; Q-Former "
            f"{q.num_layers} layers x {q.num_heads} heads, {q.num_queries} queries, cross-attention on layers "
            f"{cross_layers()}. Can: {', '.join(can)}.")
    folder = PRESETS.get(loaded.name)  # a shipped model says how it scores, next to its weights
    if folder is not None and (folder / "eval.json").is_file():
        text += f"\n\nIts evaluation (`{folder.name}/eval.json`):\n```json\n{(folder / 'eval.json').read_text()[:4000]}\n```"
    return text


def cross_layers() -> list[int]:
    q = app().pipe.model.config.qformer
    return [i for i in range(q.num_layers) if q.has_cross_attention(i)]


def selector_updates() -> tuple:
    q = app().pipe.model.config.qformer
    layers = [str(i) for i in cross_layers()]
    return (gr.update(choices=["all"] + layers, value="all"),
            gr.update(choices=["all"] + [str(h) for h in range(q.num_heads)], value="all"),
            gr.update(choices=["all"] + [str(i) for i in range(q.num_queries)], value="all"),
            gr.update(choices=["last"] + layers, value="last"))


def model_choices() -> list[str]:
    from blip2lab.formats.hf import KNOWN_CHECKPOINTS

    return sorted(PRESETS) + sorted(KNOWN_CHECKPOINTS)


@friendly
def switch_model(name: str, retrieval: str = "") -> tuple:
    """Load a shipped model, an official checkpoint id, or (local only) a folder. The app
    has one model for everyone: switching changes it for every user."""
    name, retrieval = (name or "").strip(), (retrieval or "").strip() or None
    if not name:
        raise gr.Error("Pick or type a model.")
    for source in filter(None, (name, retrieval)):
        is_path = source.startswith((".", "/", "~")) or Path(source).expanduser().exists()
        if source not in PRESETS and is_path and not SETTINGS.folders_allowed:
            raise gr.Error("Loading a model from a folder is a local-only convenience and is off on this server; "
                           "pick a shipped model or an official checkpoint id.")
    with app().lock:
        load_model(name, retrieval)
    return (model_info(), header_markdown()) + selector_updates()


# ---------------------------------------------------------------------------------------
# The interface
# ---------------------------------------------------------------------------------------


def image_input(**kwargs) -> gr.Image:
    """A gr.Image input whose handler gets the uploaded file's path unopened, so blip2lab's
    loader (pixel limit first, friendly errors) is the only decoder: gr.Image's own
    preprocessing opens the file with PIL and fails on a non-image with no message for the
    user. (Set on the instance: a gr.Image subclass would make Gradio write an app.pyi stub.)"""
    component = gr.Image(type="filepath", **kwargs)

    def preprocess(payload):
        if payload is None or payload.path is None:
            return gr.Image.preprocess(component, payload)
        return str(payload.path)

    component.preprocess = preprocess
    return component


# Shapes scenes are 64 px: show them scaled up, with sharp pixels.
CSS = """
.pixelated img { image-rendering: pixelated; }
#scene-image img, #caption-image img, #search-image img { width: 100%; height: 100%; object-fit: contain; }
"""


def build_demo() -> gr.Blocks:
    loaded = app()
    q = loaded.pipe.model.config.qformer
    layer_choices = ["all"] + [str(i) for i in cross_layers()]
    ex = {n: str(ASSETS / n) for n in EXAMPLES}

    with gr.Blocks(title="blip2lab", delete_cache=(3600, 3600)) as demo:
        header = gr.Markdown(header_markdown())
        with gr.Tabs() as tabs:
            # -- Chat --------------------------------------------------------------------
            with gr.Tab("Chat", id="chat"):
                chat_state = gr.State(new_chat())
                chatbot = gr.Chatbot(label="Chat about one image", height=380, elem_id="chatbot", elem_classes="pixelated")
                chat_in = gr.MultimodalTextbox(file_types=["image"], file_count="single", show_label=False, elem_id="chat-input",
                                               placeholder="Drop an image, then ask about it "
                                                           "(a new image starts a new conversation)")
                with gr.Row():
                    retry_btn = gr.Button("Retry", size="sm")
                    undo_btn = gr.Button("Undo", size="sm")
                    clear_btn = gr.Button("Clear", size="sm")
                prompt_box = gr.Textbox(label="Prompt the LLM saw", interactive=False, lines=2)
                with gr.Accordion("Decoding", open=False):
                    strategy = gr.Radio(list(STRATEGIES), value="beam search", label="Decoding")
                    with gr.Row():
                        beams = gr.Slider(1, 10, value=5, step=1, label="Beams")
                        max_new = gr.Slider(1, 60, value=10, step=1, label="Max new tokens")
                        min_len = gr.Slider(0, 20, value=0, step=1, label="Min length (new tokens)")
                    with gr.Row():
                        temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Temperature",
                                                interactive=False)
                        top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p", interactive=False)
                        seed = gr.Number(value=0, precision=0, label="Seed", interactive=False)
                    with gr.Row():
                        length_penalty = gr.Slider(-2.0, 2.0, value=-1.0, step=0.1, label="Length penalty")
                        repetition_penalty = gr.Slider(1.0, 2.0, value=1.0, step=0.05, label="Repetition penalty")
                controls = [strategy, beams, max_new, min_len, temperature, top_p, length_penalty,
                            repetition_penalty, seed]
                strategy.change(decoding_interactivity, strategy, [beams, length_penalty, temperature, top_p, seed],
                                api_visibility="private")
                gr.Examples([[{"text": "what color is the circle?", "files": [ex["red-circle.png"]]}],
                             [{"text": "how many shapes are there?", "files": [ex["three-shapes.png"]]}],
                             [{"text": "where is the yellow triangle?", "files": [ex["blue-square-yellow-triangle.png"]]}],
                             [{"text": "is there a purple triangle?", "files": [ex["novel-purple-triangle.png"]]}]],
                            inputs=[chat_in], label="Examples")
                chat_in.submit(chat, [chat_in, chat_state] + controls, [chatbot, chat_in, prompt_box, chat_state],
                               api_name="chat")
                retry_btn.click(chat_retry, [chat_state] + controls, [chatbot, prompt_box, chat_state, seed],
                                api_name="chat_retry")
                chatbot.retry(chat_retry, [chat_state] + controls, [chatbot, prompt_box, chat_state, seed],
                              api_visibility="private")
                undo_btn.click(chat_undo, [chat_state], [chatbot, chat_in, chat_state], api_name="chat_undo")
                chatbot.undo(chat_undo, [chat_state], [chatbot, chat_in, chat_state], api_visibility="private")
                clear_btn.click(chat_clear, None, [chatbot, chat_in, prompt_box, chat_state], api_name="chat_clear")

            # -- Caption & attention -------------------------------------------------------
            with gr.Tab("Caption & attention", id="caption"):
                map_cache = gr.State(None)
                with gr.Row():
                    with gr.Column(scale=1):
                        cap_image = image_input(label="Image", height=260, elem_id="caption-image",
                                              elem_classes="pixelated")
                        with gr.Row():
                            layer = gr.Dropdown(layer_choices, value="all", label="Layer")
                            head = gr.Dropdown(["all"] + [str(h) for h in range(q.num_heads)], value="all",
                                               label="Head")
                        with gr.Row():
                            reduce = gr.Radio(["mean", "max"], value="mean", label="Aggregation")
                            query = gr.Dropdown(["all"] + [str(i) for i in range(q.num_queries)], value="all",
                                                label="Query (large map)")
                        cam_text = gr.Textbox(label="Text for Grad-CAM (empty: the caption)")
                        cam_layer = gr.Dropdown(["last"] + layer_choices[1:], value="last", label="Grad-CAM layer")
                        cap_btn = gr.Button("Caption and maps", variant="primary")
                        cam_btn = gr.Button("Grad-CAM of my text")
                        gr.Examples([[ex[n]] for n in EXAMPLES], inputs=[cap_image], label="Examples")
                    with gr.Column(scale=2):
                        caption_box = gr.Textbox(label="Caption", interactive=False, elem_id="caption-text")
                        with gr.Row():
                            big_map = gr.Image(label="Cross-attention (large overlay)", interactive=False,
                                               height=320, elem_id="attention-overlay")
                            cam_image = gr.Image(label="Grad-CAM", interactive=False, height=320, elem_id="gradcam-overlay")
                        small_maps = gr.Gallery(label="Every query", columns=8, height=150, allow_preview=False,
                                                elem_id="query-maps")
                        words = gr.HighlightedText(label="Words (click one for its Grad-CAM map)",
                                                   show_legend=False, combine_adjacent=False)
                        cam_info = gr.Markdown()
                        npz = gr.File(label="Raw maps (.npz)", interactive=False)
                        gr.Markdown(MAP_NOTE)
                cap_btn.click(caption_maps, [cap_image, layer, head, reduce, query, cam_text, cam_layer],
                              [caption_box, small_maps, big_map, words, cam_image, cam_info, npz, map_cache],
                              api_name="caption_maps")
                cam_btn.click(gradcam, [cap_image, cam_text, cam_layer], [words, cam_image, cam_info, npz],
                              api_name="gradcam")
                for selector in (layer, head, reduce, query):
                    selector.change(redraw_maps, [map_cache, layer, head, reduce, query], [small_maps, big_map],
                                    api_visibility="private")
                words.select(pick_word, [map_cache], [cam_image, cam_info], api_visibility="private")

            # -- Search ------------------------------------------------------------------
            with gr.Tab("Search", id="search"):
                session = gr.State(new_session_gallery())
                hits_state = gr.State([])
                with gr.Row():
                    with gr.Column(scale=1):
                        direction = gr.Radio(list(DIRECTIONS), value=DIRECTIONS[0], label="Direction")
                        search_text = gr.Textbox(label="Text query", value=world.caption(
                            world.Scene([world.place_object("circle", "red", "large", "top", "left")])))
                        search_image = image_input(label="Image query", height=200,
                                                 elem_id="search-image", elem_classes="pixelated")
                        mode = gr.Radio(list(MODES), value="ITC + ITM re-rank", label="Ranking")
                        k = gr.Slider(1, 50, value=8, step=1, label="Top k")
                        search_btn = gr.Button("Search", variant="primary")
                        gr.Examples([["a small green circle on the top right"], ["a large blue square on the top middle"],
                                     ["a purple triangle"]], inputs=[search_text], label="Text examples")
                        gr.Examples([[ex[n]] for n in EXAMPLES], inputs=[search_image], label="Image examples")
                    with gr.Column(scale=2):
                        results = gr.Gallery(label="Images (click one to search by it)", columns=4, height=300,
                                             allow_preview=False, elem_id="search-results", elem_classes="pixelated")
                        table = gr.Dataframe(headers=["rank", "result", "ITC cosine", "ITM probability", "true content"],
                                             label="Results (click a row to search by it)", interactive=False)
                        search_status = gr.Markdown(elem_id="search-status")
                with gr.Accordion("Gallery: add your own images or texts", open=False):
                    gallery_status = gr.Markdown()
                    uploads = gr.File(file_count="multiple", file_types=["image"], label="Images (seen only by you)")
                    add_btn = gr.Button("Add images")
                    texts = gr.Textbox(lines=3, label="Texts, one per line")
                    add_texts_btn = gr.Button("Add texts")
                    folder = gr.Textbox(label="Folder on this machine (local only)", visible=SETTINGS.folders_allowed)
                    folder_btn = gr.Button("Index folder", visible=SETTINGS.folders_allowed)
                    reset_btn = gr.Button("Remove my additions")
                search_outputs = [results, table, search_status, hits_state]
                search_btn.click(search, [direction, search_text, search_image, mode, k, session], search_outputs,
                                 api_name="search")
                search_text.submit(search, [direction, search_text, search_image, mode, k, session], search_outputs,
                                   api_visibility="private")
                click_outputs = [direction, search_text, search_image] + search_outputs + [session]
                results.select(search_by_result, [hits_state, direction, mode, k, session], click_outputs,
                               api_visibility="private")
                table.select(search_by_result, [hits_state, direction, mode, k, session], click_outputs,
                             api_visibility="private")
                add_btn.click(gallery_add, [uploads, session], [gallery_status, session], api_name="gallery_add")
                add_texts_btn.click(gallery_add_texts, [texts, session], [gallery_status, session],
                                    api_name="gallery_add_texts")
                folder_btn.click(gallery_add_folder, [folder, session], [gallery_status, session],
                                 api_name="gallery_add_folder")
                reset_btn.click(gallery_reset, None, [gallery_status, session], api_name="gallery_reset")

            # -- Scene composer ------------------------------------------------------------
            with gr.Tab("Scene composer", id="composer"):
                with gr.Row():
                    with gr.Column(scale=2):
                        with gr.Row():
                            scene_seed = gr.Number(value=0, precision=0, label="Seed")
                            novel = gr.Checkbox(label="Include a held-out pair (purple triangle / orange square)")
                            random_btn = gr.Button("Random scene")
                        cell_inputs = []
                        for row in world.ROWS:
                            with gr.Row():
                                for column in world.COLUMNS:
                                    with gr.Group():
                                        with gr.Row():
                                            shape = gr.Dropdown(["none", *world.SHAPES], value="none", min_width=90,
                                                                label=f"{row} {column}")
                                            color = gr.Dropdown(list(world.COLORS), value="red", label="color",
                                                                min_width=90)
                                        size = gr.Radio(list(world.SIZES), value="large", show_label=False)
                                        cell_inputs += [shape, color, size]
                        compose_btn = gr.Button("Compose", variant="primary")
                        describe = gr.Textbox(label="…or describe it",
                                              placeholder="a large red circle on the top left and a small blue "
                                                          "square on the bottom right")
                        describe_btn = gr.Button("Compose from description")
                        gr.Examples([["a large red circle on the top left"],
                                     ["a small purple triangle on the bottom middle and a large green square on "
                                      "the top right"]], inputs=[describe], label="Examples")
                    with gr.Column(scale=1):
                        scene_image = gr.Image(type="filepath", label="Scene", interactive=False, height=256,
                                               elem_id="scene-image", elem_classes="pixelated")
                        scene_caption = gr.Textbox(label="Its true caption", interactive=False)
                        scene_json = gr.Code(label="Scene record", language="json", interactive=False)
                        with gr.Row():
                            to_chat = gr.Button("Send to Chat")
                            to_caption = gr.Button("Send to Caption & attention")
                            to_search = gr.Button("Send to Search")
                scene_outputs = [scene_image, scene_caption, scene_json]
                random_btn.click(random_scene, [scene_seed, novel], scene_outputs, api_name="random_scene")
                compose_btn.click(compose_scene, cell_inputs, scene_outputs, api_name="compose_scene")
                describe_btn.click(scene_from_text, [describe], scene_outputs, api_name="scene_from_text")
                to_chat.click(lambda p: ({"text": "", "files": [p]} if p else None, gr.Tabs(selected="chat")),
                              [scene_image], [chat_in, tabs], api_visibility="private")
                to_caption.click(lambda p: (p, gr.Tabs(selected="caption")), [scene_image], [cap_image, tabs],
                                 api_visibility="private")
                to_search.click(lambda p: (p, DIRECTIONS[1], gr.Tabs(selected="search")), [scene_image],
                                [search_image, direction, tabs], api_visibility="private")

            # -- Model ---------------------------------------------------------------------
            with gr.Tab("Model", id="model"):
                info = gr.Markdown(model_info())
                with gr.Row():
                    model_name = gr.Dropdown(model_choices(), value=loaded.name, allow_custom_value=True,
                                             label="Model: a shipped name, an official checkpoint id"
                                                   + (", or a local folder" if SETTINGS.folders_allowed else ""))
                    retrieval = gr.Textbox(label="Retrieval model (optional: ITC/ITM heads for a stage-2 "
                                                 "checkpoint, e.g. Salesforce/blip2-itm-vit-g)")
                load_btn = gr.Button("Load (for everyone using this app)")
                if PRESETS:
                    gr.Examples([[n] for n in sorted(PRESETS)], inputs=[model_name], label="Shipped")
                load_btn.click(switch_model, [model_name, retrieval], [info, header, layer, head, query, cam_layer],
                               api_name="load_model")
                refresh = gr.Button("Refresh", size="sm")
                refresh.click(model_info, None, [info], api_name="model_info")
    return demo


def setup(settings: Optional[Settings] = None) -> Loaded:
    """Read the settings, set torch's threads and PIL's bomb limit, load the model."""
    global SETTINGS
    SETTINGS = settings or Settings.from_env()
    if os.environ.get("BLIP2LAB_THREADS"):
        torch.set_num_threads(int(os.environ["BLIP2LAB_THREADS"]))
    Image.MAX_IMAGE_PIXELS = SETTINGS.max_pixels  # Gradio's own PIL calls refuse bombs too
    return load_model(SETTINGS.model, SETTINGS.retrieval, SETTINGS)


def launch(demo: gr.Blocks, prevent_thread_lock: bool = False, **kwargs):
    """Bounded queue, upload limit, loopback by default, no server-side rendering (no Node)."""
    demo.queue(max_size=SETTINGS.queue_size)
    return demo.launch(server_name=SETTINGS.host, server_port=SETTINGS.port, max_file_size=SETTINGS.max_upload,
                       allowed_paths=[str(ASSETS)], prevent_thread_lock=prevent_thread_lock, ssr_mode=False,
                       css=CSS, footer_links=["api"], **kwargs)


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    try:
        setup()
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"blip2lab app: cannot load the model: {e}\n"
                         "Set BLIP2LAB_MODEL to a shipped model name or a checkpoint folder.") from None
    launch(build_demo())


if __name__ == "__main__":
    main()
