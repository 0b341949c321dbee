"""The Search tab: text -> image and image -> text over the shared gallery (shapes test
scenes and the shipped examples, `blip2lab.worlds.shapes.gallery`, indexed once by the
search model) plus what this session added: its uploads, its texts, and (local only) a
folder. ITC's ranking and ITM's re-ranking of ITC's top candidates side by side, each
result marked by whether it truly holds what the query says. A click on a result searches by it.

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
from app.server import UserError, friendly, gpu, on_page
from app.widgets import image_input
from blip2lab.processor import load_image
from blip2lab.search.gallery import Gallery, Hit
from blip2lab.worlds.shapes import world
from blip2lab.worlds.shapes.gallery import ShapesGallery

DIRECTIONS = ("text → image", "image → text")
MIN_DEPTH = 16  # ITM re-ranks ITC's top max(2k, 16) (the shapes retrieval protocol's k_test)
COLUMNS = ["ITC rank", "ITM rank", "result", "ITC cosine", "ITM match", "holds it?", "true content"]
MARK = {True: "✓", False: "✗", None: ""}


def new_session_gallery() -> dict:
    return {"gallery": Gallery(), "thumbs": {}}


def _thumb(image: Image.Image, side: int = 160) -> Image.Image:
    image = image.copy()
    image.thumbnail((side, side))
    return image


def _base(index: server.SearchIndex) -> ShapesGallery:
    if not index.ready.wait(timeout=120):
        raise UserError("The search gallery is still being indexed; try again in a moment.")
    if index.error:
        raise UserError(f"The search gallery could not be built: {index.error}")
    return index.base


def _item_image(base: ShapesGallery, session: dict, key: str) -> Image.Image:
    """A shared item (scene or example) from the base gallery, else this session's thumbnail."""
    image = base.image(key)
    return session["thumbs"][key] if image is None else image


class Rankings(NamedTuple):
    itc: list[Hit]  # ITC's top k
    itm: list[Hit]  # ITM's re-ranking of ITC's top `depth`, its top k
    depth: int


def _rankings(hits: list[Hit], k: int, depth: int) -> Rankings:
    """Hits of an ITC + ITM search `depth` deep (in ITM order) -> both rankings' top k."""
    itc = sorted(hits, key=lambda h: -h.itc_cosine)[:k]
    return Rankings([Hit(**(asdict(h) | {"rank": r + 1})) for r, h in enumerate(itc)], hits[:k], depth)


def _query(index: server.SearchIndex, gallery: Gallery, direction: str, text: str, image_path: Any, k: int):
    """Both rankings, and the query text that the `holds it?` marks check (None for an image)."""
    loaded = index.loaded
    if direction == DIRECTIONS[0]:
        text = (text or "").strip()[:1000]
        if not text:
            raise UserError("Type a text to search the images with.")
        if not gallery.num_images:
            raise UserError("The gallery has no images: add some first.")
        depth = min(max(2 * k, MIN_DEPTH), gallery.num_images)
        with loaded.lock:
            hits = gallery.text_to_image(loaded.pipe, text, depth, "itc+itm")
        return _rankings(hits, k, depth), text
    if direction != DIRECTIONS[1]:
        raise UserError(f"direction must be one of {list(DIRECTIONS)}, got {direction!r}")
    query = server.open_image(image_path, loaded.pipe.processor.image_size)
    if not gallery.num_texts:
        raise UserError("The gallery has no texts: add some first.")
    depth = min(max(2 * k, MIN_DEPTH), gallery.num_texts)
    with loaded.lock:
        hits = gallery.image_to_text(loaded.pipe, query, depth, "itc+itm")
    return _rankings(hits, k, depth), None


def _table(base: ShapesGallery, ranked: Rankings, text: Optional[str]) -> list[list]:
    """One row per result of either ranking, in ITM order then ITC's: both ranks, both scores."""
    itc_rank = {h.key: h.rank for h in ranked.itc}
    itm_rank = {h.key: h.rank for h in ranked.itm}
    rows, seen = [], set()
    for h in ranked.itm + ranked.itc:
        if h.key in seen:
            continue
        seen.add(h.key)
        holds = base.holds(h.key, text) if text is not None else None
        rows.append([itc_rank.get(h.key, "-"), itm_rank.get(h.key, "-"), h.key, round(h.itc_cosine, 3),
                     round(h.itm_prob, 3), MARK[holds], base.about(h.key)])
    return rows


def _status(index: server.SearchIndex, base: ShapesGallery, gallery: Gallery, ranked: Rankings, text: Optional[str],
            ms: float) -> str:
    n = gallery.num_images if text is not None else gallery.num_texts
    out = (f"Top {len(ranked.itm)} of {n} {'images' if text is not None else 'texts'}: left by ITC cosine, right "
           f"re-ranked by ITM (ITM logit + cosine, LAVIS's order) among ITC's top {ranked.depth}; in {ms:.0f} ms, "
           f"by {index.loaded.name} (the search model of this server).")
    if text is None:
        return out
    right = base.count_holding(text)
    if world.parse_objects_partial(text):
        out += f" **{right}** of the shared gallery's images hold {text!r} (✓ in the results)."
    held = world.held_out_mentions(text) if index.loaded.is_shapes else []
    if held:
        pairs = " or ".join(f"a {c} {s}" for c, s in held)
        out += (f"\n\n⚠ {index.loaded.name} never saw {pairs}: it is a held-out pair, absent from every training "
                "scene and caption, so its scores for it are guesses (the 1,000 test scenes hold none either; the "
                "shipped example novel-purple-triangle.png does).")
    return out


def _caption(h: Hit, base: ShapesGallery, text: str, itm: bool) -> str:
    """"#1 ✓ 0.98": the rank, whether it holds what the text says, the score that ranked it."""
    return f"#{h.rank} {MARK[base.holds(h.key, text)]} {h.itm_prob if itm else h.itc_cosine:.2f}".replace("  ", " ")


@friendly
@gpu
def search(direction: str = "text → image", text: str = "a red circle", image: Any = None, k: float = 8,
           session: Optional[dict] = None) -> tuple:
    """Search the shared gallery (1,000 shapes test scenes and the shipped examples) plus this
    session's additions: ITC's ranking and ITM's re-ranking of ITC's top max(2k, 16), side by side.

    Parameters:
        direction: "text → image" or "image → text"
        text: the text query (text → image), e.g. "a red circle"
        image: the image query (image → text), a file
        k: results per ranking, 1 to 50
    Returns:
        ITC's top k images, ITM's top k images (text → image; empty the other way), a table of both rankings
        (ITC rank, ITM rank, result, ITC cosine, ITM match probability, whether it holds what the text says,
        its true content), a status line
    """
    index = server.search_index()
    if not index.loaded.can_match:
        raise UserError(f"{index.loaded.name} has no ITC/ITM heads, so it cannot search.")
    session = session or new_session_gallery()
    k = max(1, min(int(k), 50))
    base = _base(index)
    gallery = base.gallery + session["gallery"]
    start = time.perf_counter()
    ranked, query_text = _query(index, gallery, direction, text, image, k)
    ms = (time.perf_counter() - start) * 1000
    images = [[], []]
    if query_text is not None:
        images = [[(server.save_png(_item_image(base, session, h.key)), _caption(h, base, query_text, itm))
                   for h in hits] for hits, itm in ((ranked.itc, False), (ranked.itm, True))]
    state = {"itc": [asdict(h) for h in ranked.itc], "itm": [asdict(h) for h in ranked.itm],
             "table": [row[2] for row in _table(base, ranked, query_text)]}
    return (images[0], images[1], _table(base, ranked, query_text),
            _status(index, base, gallery, ranked, query_text, ms), state)


def _by_result(which: str):
    """A click on a result of `which` ("itc", "itm" or "table") searches by it: an image
    result searches texts, a text result images."""

    @friendly
    def by_result(hits: Optional[dict], direction: str, k: float, session: Optional[dict],
                  evt: gr.SelectData) -> tuple:
        if not hits or not hits.get(which):
            return (gr.skip(),) * 9
        index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        entry = hits[which][int(index)]
        key = entry if isinstance(entry, str) else entry["key"]
        session = session or new_session_gallery()
        if direction == DIRECTIONS[0]:  # the result is an image
            path = server.save_png(_item_image(_base(server.search_index()), session, key))
            return (DIRECTIONS[1], gr.skip(), path) + search(DIRECTIONS[1], "", path, k, session) + (session,)
        return (DIRECTIONS[0], key, gr.skip()) + search(DIRECTIONS[0], key, None, k, session) + (session,)

    return by_result


# ---------------------------------------------------------------------------------------
# This session's additions
# ---------------------------------------------------------------------------------------


def _add_images(session: dict, images: list[Image.Image], keys: list[str]) -> None:
    loaded = server.search_index().loaded
    with loaded.lock:
        session["gallery"].add_images(loaded.pipe, images, keys)
    side = max(160, loaded.pipe.processor.image_size)  # a result clicked is searched by at full model resolution
    for key, image in zip(keys, images):
        session["thumbs"][key] = _thumb(image, side)


def _gallery_status(session: dict, note: str = "") -> str:
    index = server.search_index()
    base = index.base.gallery if index.ready.is_set() and index.base is not None else None
    n_img = (base.num_images if base else 0) + session["gallery"].num_images
    n_txt = (base.num_texts if base else 0) + session["gallery"].num_texts
    ready = "" if index.ready.is_set() else " (the shared part is still being indexed)"
    return (f"{note} Gallery: {n_img} images, {n_txt} texts ({session['gallery'].num_images} images and "
            f"{session['gallery'].num_texts} texts added by you){ready}.").strip()


@friendly
@gpu
def gallery_add(files: Optional[list] = None, session: Optional[dict] = None) -> tuple:
    """Add uploaded images to this session's part of the search gallery (nobody else sees them).

    Parameters:
        files: image files
    """
    session = session or new_session_gallery()
    loaded = server.search_index().loaded
    if not loaded.can_match:
        raise UserError(f"{loaded.name} has no ITC/ITM heads, so it cannot index images.")
    files = [f for f in (files or []) if f]
    if not files:
        raise UserError("Choose one or more images to add.")
    room = server.MAX_SESSION_IMAGES - session["gallery"].num_images
    if len(files) > room:
        gr.Warning(f"Only {room} more images fit in your part of the gallery; the rest are skipped.")
        files = files[:room]
    images, keys, bad = [], [], []
    for f in files:
        path = f if isinstance(f, str) else getattr(f, "name", str(f))
        try:
            images.append(server.open_image(path, loaded.pipe.processor.image_size))
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
def gallery_add_texts(texts: str = "", session: Optional[dict] = None) -> tuple:
    """Add texts to this session's part of the search gallery, for image -> text.

    Parameters:
        texts: one text per line
    """
    session = session or new_session_gallery()
    lines = [t.strip()[:500] for t in (texts or "").splitlines() if t.strip()][:200]
    if not lines:
        raise UserError("Type one or more texts, one per line.")
    loaded = server.search_index().loaded
    with loaded.lock:
        session["gallery"].add_texts(loaded.pipe, lines)
    return _gallery_status(session, f"Added {len(lines)} text(s)."), session


@friendly
@gpu
def gallery_add_folder(folder: str = "", session: Optional[dict] = None) -> tuple:
    """Local only: index the images of a folder on this machine (not when hosted, nor when
    the app listens beyond loopback).

    Parameters:
        folder: a folder on the machine running the app
    """
    session = session or new_session_gallery()
    path, files = server.image_folder(folder, server.MAX_SESSION_IMAGES - session["gallery"].num_images)
    if not files:
        raise UserError(f"No images found in {path}.")
    images, keys = [], []
    target = server.search_index().loaded.pipe.processor.image_size
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
    """Remove this session's additions to the search gallery."""
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
    q["text"] = gr.Textbox(label="Text query", value="a red circle", elem_id="search-text")
    q["image"] = image_input(label="Image query", height=200, elem_id="search-image", elem_classes="pixelated")
    q["k"] = gr.Slider(1, 50, value=8, step=1, label="Top k")
    q["button"] = gr.Button("Search", variant="primary")
    gr.Examples([["a red circle"], ["a small green circle on the top right"], ["a large blue square and a triangle"],
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
        texts = gr.Textbox(value="", lines=3, label="Texts, one per line")
        add_texts_btn = gr.Button("Add texts")
        folder = gr.Textbox(value="", label="Folder on this machine (local only)", visible=local)
        folder_btn = gr.Button("Index folder", visible=local)
        reset_btn = gr.Button("Remove my additions")
    for button, fn, inputs, name in ((add_btn, gallery_add, uploads, "gallery_add"),
                                     (add_texts_btn, gallery_add_texts, texts, "gallery_add_texts"),
                                     (folder_btn, gallery_add_folder, folder, "gallery_add_folder")):
        gr.on([], fn, [inputs, session], [status, session], api_name=name)  # the API's, then the page's
        button.click(on_page(fn, 2), [inputs, session], [status, session], api_visibility="private")
    reset_btn.click(gallery_reset, None, [status, session], api_name="gallery_reset")


def _results() -> dict:
    """The right-hand column: both rankings side by side, the table, the status line."""
    r = {}
    with gr.Row():
        r["itc"] = gr.Gallery(label="Ranked by ITC cosine (click one to search by it)", columns=4, height=300,
                              allow_preview=False, elem_id="search-itc", elem_classes="pixelated")
        r["itm"] = gr.Gallery(label="Re-ranked by ITM (match probability shown)", columns=4, height=300,
                              allow_preview=False,
                              elem_id="search-itm", elem_classes="pixelated")
    r["status"] = gr.Markdown(elem_id="search-status")
    r["table"] = gr.Dataframe(headers=COLUMNS, label="Both rankings (click a row to search by it)",
                              interactive=False, wrap=True, elem_id="search-table",
                              column_widths=["8%", "8%", "18%", "9%", "9%", "8%", "40%"])
    gr.Markdown("**ITC cosine**: the query and result embeddings' cosine (max over queries), in [-1, 1]; it ranks "
                "the whole gallery. **ITM match**: the matching head's probability that the pair matches, for "
                "ITC's top candidates; ITM re-ranks them by its logit + the cosine. **holds it?**: ✓ where the "
                "image truly holds what the text says (every shapes scene's content is known).")
    return r


def build() -> SearchTab:
    with gr.Tab("Search", id="search"):
        session = gr.State(new_session_gallery())
        hits_state = gr.State({})
        with gr.Row():
            with gr.Column(scale=1, min_width=280):
                q = _query_column()
            with gr.Column(scale=3):
                r = _results()
        inputs = [q["direction"], q["text"], q["image"], q["k"], session]
        outputs = [r["itc"], r["itm"], r["table"], r["status"], hits_state]
        gr.on([], search, inputs, outputs, api_name="search")  # the API's, then the page's
        for trigger in (q["button"].click, q["text"].submit):
            trigger(on_page(search, 5), inputs, outputs, api_visibility="private")
        clicked = [hits_state, q["direction"], q["k"], session]
        click_outputs = [q["direction"], q["text"], q["image"]] + outputs + [session]
        for which, component in (("itc", r["itc"]), ("itm", r["itm"]), ("table", r["table"])):
            component.select(on_page(_by_result(which), 9), clicked, click_outputs, api_visibility="private")
        _additions(session)
    return SearchTab(q["image"], q["direction"])
