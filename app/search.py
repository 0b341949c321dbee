"""The Search tab: text -> image and image -> text over the shared gallery (shapes test
scenes and the shipped examples, `blip2lab.worlds.shapes.gallery`, indexed once per model)
plus what this session added: its uploads, its texts, and (local only) a folder. A click on
a result searches by it.

A session's additions are {"gallery": Gallery, "thumbs": {key: image}}; nobody else sees them.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple, Optional

import gradio as gr
from PIL import Image

from app import server
from app.server import friendly, gpu
from app.widgets import image_input
from blip2lab.processor import load_image
from blip2lab.search.gallery import Gallery, Hit
from blip2lab.worlds.shapes import world
from blip2lab.worlds.shapes.gallery import ShapesGallery

DIRECTIONS = ("text → image", "image → text")
MODES = {"ITC": "itc", "ITC + ITM re-rank": "itc+itm"}


def new_session_gallery() -> dict:
    return {"gallery": Gallery(), "thumbs": {}}


def _thumb(image: Image.Image, side: int = 160) -> Image.Image:
    image = image.copy()
    image.thumbnail((side, side))
    return image


def _base(loaded: server.Loaded) -> ShapesGallery:
    if not loaded.base_ready.wait(timeout=120):
        raise gr.Error("The search gallery is still being indexed; try again in a moment.")
    if loaded.base_error:
        raise gr.Error(f"The search gallery could not be built: {loaded.base_error}")
    return loaded.base


def _item_image(loaded: server.Loaded, session: dict, key: str) -> Image.Image:
    """A shared item (scene or example) from the base gallery, else this session's thumbnail."""
    image = _base(loaded).image(key)
    return session["thumbs"][key] if image is None else image


def _search_images(loaded: server.Loaded, gallery: Gallery, session: dict, text: str, k: int, mode: str) -> tuple:
    text = (text or "").strip()
    if not text:
        raise gr.Error("Type a text to search the images with.")
    if not gallery.num_images:
        raise gr.Error("The gallery has no images: add some first.")
    with loaded.lock:
        hits = gallery.text_to_image(loaded.pipe, text[:1000], k, MODES[mode])
    images = [(server.save_png(_item_image(loaded, session, h.key)),
               f"#{h.rank} cos {h.itc_cosine:.2f} · ITM {h.itm_prob:.2f}") for h in hits]
    return hits, images


def _search_texts(loaded: server.Loaded, gallery: Gallery, image_path: Any, k: int, mode: str) -> tuple:
    query = server.open_image(image_path)
    if not gallery.num_texts:
        raise gr.Error("The gallery has no texts: add some first.")
    with loaded.lock:
        hits = gallery.image_to_text(loaded.pipe, query, k, MODES[mode])
    return hits, []


@friendly
@gpu
def search(direction: str, text: str, image_path: Any, mode: str = "ITC + ITM re-rank", k: float = 8,
           session: Optional[dict] = None) -> tuple:
    """text -> image or image -> text over the shared gallery plus this session's additions."""
    loaded = server.current()
    if not loaded.can_match:
        raise gr.Error(f"{loaded.name} has no ITC/ITM heads, so it cannot search.")
    if mode not in MODES:
        raise gr.Error(f"mode must be one of {list(MODES)}, got {mode!r}")
    session = session or new_session_gallery()
    k = max(1, min(int(k), 50))
    base = _base(loaded)
    gallery = base.gallery + session["gallery"]
    start = time.perf_counter()
    if direction == DIRECTIONS[0]:
        hits, images = _search_images(loaded, gallery, session, text, k, mode)
    elif direction == DIRECTIONS[1]:
        hits, images = _search_texts(loaded, gallery, image_path, k, mode)
    else:
        raise gr.Error(f"direction must be one of {list(DIRECTIONS)}, got {direction!r}")
    ms = (time.perf_counter() - start) * 1000
    table = [[h.rank, h.key, round(h.itc_cosine, 4), round(h.itm_prob, 4), base.about(h.key)] for h in hits]
    what = f"{gallery.num_images} images" if direction == DIRECTIONS[0] else f"{gallery.num_texts} texts"
    status = f"Top {len(hits)} of {what}, ranked by {mode}, in {ms:.0f} ms."
    return images, table, status, [asdict(h) for h in hits]


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
        path = server.save_png(_item_image(server.current(), session, hit.key))
        out = search(DIRECTIONS[1], "", path, mode, k, session)
        return (DIRECTIONS[1], gr.update(), path) + out + (session,)
    out = search(DIRECTIONS[0], hit.key, None, mode, k, session)
    return (DIRECTIONS[0], hit.key, gr.update()) + out + (session,)


# ---------------------------------------------------------------------------------------
# This session's additions
# ---------------------------------------------------------------------------------------


def _add_images(session: dict, images: list[Image.Image], keys: list[str]) -> None:
    loaded = server.current()
    with loaded.lock:
        session["gallery"].add_images(loaded.pipe, images, keys)
    side = max(160, loaded.pipe.processor.image_size)  # a result clicked is searched by at full model resolution
    for key, image in zip(keys, images):
        session["thumbs"][key] = _thumb(image, side)


def _gallery_status(session: dict, note: str = "") -> str:
    loaded = server.current()
    base = loaded.base.gallery if loaded.base_ready.is_set() and loaded.base is not None else None
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
    loaded = server.current()
    if not loaded.can_match:
        raise gr.Error(f"{loaded.name} has no ITC/ITM heads, so it cannot index images.")
    files = [f for f in (files or []) if f]
    if not files:
        raise gr.Error("Choose one or more images to add.")
    room = server.MAX_SESSION_IMAGES - session["gallery"].num_images
    if len(files) > room:
        gr.Warning(f"Only {room} more images fit in your part of the gallery; the rest are skipped.")
        files = files[:room]
    images, keys, bad = [], [], []
    for f in files:
        path = f if isinstance(f, str) else getattr(f, "name", str(f))
        try:
            images.append(server.open_image(path))
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
    loaded = server.current()
    with loaded.lock:
        session["gallery"].add_texts(loaded.pipe, lines)
    return _gallery_status(session, f"Added {len(lines)} text(s)."), session


@friendly
@gpu
def gallery_add_folder(folder: str, session: Optional[dict]) -> tuple:
    """Local only: index the images of a folder on this machine (not when hosted, nor when
    the app listens beyond loopback)."""
    session = session or new_session_gallery()
    path, files = server.image_folder(folder, server.MAX_SESSION_IMAGES - session["gallery"].num_images)
    if not files:
        raise gr.Error(f"No images found in {path}.")
    images, keys = [], []
    target = server.current().pipe.processor.image_size
    for p in files:
        try:
            images.append(load_image(p, max_pixels=server.SETTINGS.max_pixels, target_size=target))
            keys.append(f"folder:{session['gallery'].num_images + len(keys)}:{p.name}")
        except (ValueError, OSError):
            continue
    if images:
        _add_images(session, images, keys)
    return _gallery_status(session, f"Indexed {len(images)} of {len(files)} file(s) from {path}."), session


def gallery_reset() -> tuple:
    session = new_session_gallery()
    return _gallery_status(session, "Your additions were removed."), session


# ---------------------------------------------------------------------------------------
# The tab
# ---------------------------------------------------------------------------------------


class SearchTab(NamedTuple):
    image: gr.Image  # the scene composer sends scenes here ...
    direction: gr.Radio  # ... and turns the direction to image -> text


def _query_column() -> dict:
    q = {"direction": gr.Radio(list(DIRECTIONS), value=DIRECTIONS[0], label="Direction")}
    q["text"] = gr.Textbox(label="Text query", value=world.caption(
        world.Scene([world.place_object("circle", "red", "large", "top", "left")])))
    q["image"] = image_input(label="Image query", height=200, elem_id="search-image", elem_classes="pixelated")
    q["mode"] = gr.Radio(list(MODES), value="ITC + ITM re-rank", label="Ranking")
    q["k"] = gr.Slider(1, 50, value=8, step=1, label="Top k")
    q["button"] = gr.Button("Search", variant="primary")
    gr.Examples([["a small green circle on the top right"], ["a large blue square on the top middle"],
                 ["a purple triangle"]], inputs=[q["text"]], label="Text examples")
    gr.Examples([[str(server.ASSETS / n)] for n in server.EXAMPLES], inputs=[q["image"]], label="Image examples")
    return q


def _additions(session: gr.State) -> None:
    """The accordion where a user adds images, texts or (local only) a folder, or removes them."""
    local = server.SETTINGS.folders_allowed
    with gr.Accordion("Gallery: add your own images or texts", open=False):
        status = gr.Markdown()
        uploads = gr.File(file_count="multiple", file_types=["image"], label="Images (seen only by you)")
        add_btn = gr.Button("Add images")
        texts = gr.Textbox(lines=3, label="Texts, one per line")
        add_texts_btn = gr.Button("Add texts")
        folder = gr.Textbox(label="Folder on this machine (local only)", visible=local)
        folder_btn = gr.Button("Index folder", visible=local)
        reset_btn = gr.Button("Remove my additions")
    add_btn.click(gallery_add, [uploads, session], [status, session], api_name="gallery_add")
    add_texts_btn.click(gallery_add_texts, [texts, session], [status, session], api_name="gallery_add_texts")
    folder_btn.click(gallery_add_folder, [folder, session], [status, session], api_name="gallery_add_folder")
    reset_btn.click(gallery_reset, None, [status, session], api_name="gallery_reset")


def build() -> SearchTab:
    with gr.Tab("Search", id="search"):
        session = gr.State(new_session_gallery())
        hits_state = gr.State([])
        with gr.Row():
            with gr.Column(scale=1):
                q = _query_column()
            with gr.Column(scale=2):
                results = gr.Gallery(label="Images (click one to search by it)", columns=4, height=300,
                                     allow_preview=False, elem_id="search-results", elem_classes="pixelated")
                table = gr.Dataframe(headers=["rank", "result", "ITC cosine", "ITM probability", "true content"],
                                     label="Results (click a row to search by it)", interactive=False)
                status = gr.Markdown(elem_id="search-status")
        inputs = [q["direction"], q["text"], q["image"], q["mode"], q["k"], session]
        outputs = [results, table, status, hits_state]
        q["button"].click(search, inputs, outputs, api_name="search")
        q["text"].submit(search, inputs, outputs, api_visibility="private")
        clicked = [hits_state, q["direction"], q["mode"], q["k"], session]
        click_outputs = [q["direction"], q["text"], q["image"]] + outputs + [session]
        results.select(search_by_result, clicked, click_outputs, api_visibility="private")
        table.select(search_by_result, clicked, click_outputs, api_visibility="private")
        _additions(session)
    return SearchTab(q["image"], q["direction"])
