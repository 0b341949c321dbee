"""The Caption & attention tab: a caption, the queries' cross-attention maps over the image
(`blip2lab.explain`), and Grad-CAM of the ITM score word by word, drawn as overlays; the
raw maps download as .npz. Changing a selector redraws the maps already computed."""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import gradio as gr
from PIL import Image

from app import server
from app.server import UserError, friendly, gpu, on_page
from app.widgets import image_input
from blip2lab import explain
from blip2lab.pipeline import no_loops
from blip2lab.worlds.shapes import world

MAP_NOTE = ("**What a map is, and is not.** A cross-attention map shows how much each learned query reads "
            "each image patch; Grad-CAM weights that attention by its gradient on the image-text matching "
            "score (clamped at 0, averaged over heads; a word's map weights the queries by how much they "
            "attend to that word). Both are *estimates* of where evidence comes from, not explanations of "
            "the answer: a model can attend to a patch and then ignore it.")


def _choice(value: Any) -> Optional[int]:
    """"all" -> None; "3" / 3 -> 3."""
    if value is None or str(value).strip().lower() in ("", "all", "none"):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"expected 'all' or a number, got {value!r}")


def _gradcam_layer(value: Any) -> Optional[int]:
    """"last" (or nothing) -> None, the last cross-attention layer; else a layer number."""
    return None if value in (None, "", "last") else _choice(value)


def render_maps(image: Image.Image, maps: explain.CrossAttentionMaps, layer: Any, head: Any, reduce: str,
                query: Any) -> tuple[list, str]:
    """Small multiples (one overlay per query) and one large overlay (one query, or all
    queries combined by `reduce`)."""
    if reduce not in ("mean", "max"):
        raise UserError(f"aggregation must be 'mean' or 'max', got {reduce!r}")
    per_query = maps.select(_choice(layer), _choice(head), reduce)  # (Q, g, g)
    small = [(server.save_png(explain.overlay(image, m, size=96)), f"query {q}") for q, m in enumerate(per_query)]
    q = _choice(query)
    if q is not None and not 0 <= q < per_query.shape[0]:
        raise UserError(f"query {q} out of range: the model has {per_query.shape[0]} queries")
    big = per_query[q] if q is not None else (per_query.mean(0) if reduce == "mean" else per_query.amax(0))  # (g, g)
    return small, server.save_png(explain.overlay(image, big, size=320))


def log_odds(p: float) -> float:
    """The ITM head's log-odds of "match", log(p / (1 - p)): its match logit minus its
    no-match logit (the raw match logit alone says nothing without the other)."""
    p = min(max(float(p), 1e-7), 1 - 1e-7)
    return math.log(p / (1 - p))


def render_gradcam(image: Image.Image, cam: explain.GradCam, word: Optional[int]) -> tuple[list, str, str]:
    """Highlighted words (intensity = share of the Grad-CAM mass routed through each word),
    the overlay of one word's map (or of the whole text), and a line of numbers."""
    top = float(cam.word_scores.max()) if len(cam.words) else 0.0
    highlighted = [(w, round(float(s) / top, 3) if top > 0 else 0.0) for w, s in zip(cam.words, cam.word_scores)]
    if word is not None and not 0 <= word < len(cam.words):
        raise UserError(f"word {word} out of range: the text has {len(cam.words)} words")
    m = cam.text_map if word is None else cam.word_maps[word]
    what = "the whole text" if word is None else f"the word “{cam.words[word]}”"
    info = (f"Grad-CAM of {what} at Q-Former layer {cam.layer}; ITM match probability {cam.itm_prob:.3f} "
            f"(log-odds {log_odds(cam.itm_prob):+.2f}: the head's match minus no-match logit).")
    return highlighted, server.save_png(explain.overlay(image, m, size=320)), info


def _npz(maps: Optional[explain.CrossAttentionMaps], cam: Optional[explain.GradCam], **extra) -> str:
    path = server.tmp_file(".npz")
    explain.save_npz(str(path), maps, cam, **extra)
    return str(path)


def _held_out_note(loaded: server.Loaded, text: str) -> str:
    held = world.held_out_mentions(text) if loaded.is_shapes else []
    if not held:
        return ""
    pairs = " or ".join(f"a {c} {s}" for c, s in held)
    return f" {loaded.name} never saw {pairs} in training (a held-out pair): its match score for it is a guess."


def _answering(model: Optional[str], image_path: Any) -> tuple[server.Loaded, Image.Image, str]:
    """The model that captions this image (mini-real for a photo sent to a shapes model), the
    image, and a line naming that model and what it is."""
    loaded = server.model(model)
    image = server.open_image(image_path, loaded.pipe.processor.image_size)
    photo = server.photo_model_for(loaded, image)
    if photo is None:
        server.warn_if_not_scene(loaded, image)
        what = "a shapes-world model: scenes of circles, squares and triangles only" if loaded.is_shapes else ""
        return loaded, image, f"Captioned by **{loaded.name}**" + (f" ({what})." if what else ".")
    return photo, image, (f"This looks like a photo: captioned by **{photo.name}**, not {loaded.name}. "
                          f"{server.MINIREAL_NOTE}")


@friendly
@gpu
def caption_maps(image: Any = None, layer: Any = "all", head: Any = "all", reduce: str = "mean", query: Any = "all",
                 gradcam_text: str = "", gradcam_layer: Any = "last", model: Optional[str] = None) -> tuple:
    """Caption the image (by this session's model; a photo sent to a shapes model by mini-real),
    then its queries' cross-attention maps and Grad-CAM of the ITM score word by word.

    Parameters:
        image: the image (a file)
        layer: a cross-attention layer of the Q-Former, or "all" (averaged)
        head: an attention head, or "all" (averaged)
        reduce: how the large map combines the queries: "mean" or "max"
        query: one query for the large map, or "all"
        gradcam_text: the text Grad-CAM explains; empty: the caption
        gradcam_layer: the Q-Former layer of Grad-CAM, or "last"
    Returns:
        the caption, which model captioned it, every query's map, the large map, the words with their Grad-CAM share,
        the Grad-CAM overlay, a line of numbers, the raw maps (.npz)
    """
    loaded, image, by = _answering(model, image)
    with loaded.lock:
        caption = loaded.pipe.caption([image], **no_loops(loaded.pipe.processor, {}))[0]
        maps = loaded.pipe.attention_maps(image)
        text = (gradcam_text or "").strip() or caption
        cam = None
        if loaded.can_match and text:
            cam = loaded.pipe.gradcam(image, text, layer=_gradcam_layer(gradcam_layer))
    small, big = render_maps(image, maps, layer, head, reduce, query)
    if cam is not None:
        highlighted, cam_image, info = render_gradcam(image, cam, None)
        info += _held_out_note(loaded, text)
    else:
        highlighted, cam_image = [], None
        info = "Grad-CAM needs an ITM head: this model has none." if not loaded.can_match else "No text to explain."
    cache = {"image": image, "maps": maps, "cam": cam}
    return caption, by, small, big, highlighted, cam_image, info, _npz(maps, cam, caption=caption), cache


@friendly
@gpu
def gradcam(image: Any = None, text: str = "", layer: Any = "last", model: Optional[str] = None,
            word: Any = "all") -> tuple:
    """Grad-CAM of the ITM score of the image with a text, word by word (by this session's model;
    a photo sent to a shapes model by mini-real).

    Parameters:
        image: the image (a file)
        text: the text to explain, e.g. "a large red circle on the top left"
        layer: the Q-Former layer of Grad-CAM, or "last"
    Returns:
        the words with their Grad-CAM share, the Grad-CAM overlay, a line of numbers, the raw maps (.npz)
    """
    text = (text or "").strip()
    if not text:
        raise UserError("Type a text to explain (or leave it empty in the UI to use the caption).")
    loaded, image, _ = _answering(model, image)
    if not loaded.can_match:
        raise UserError(f"{loaded.name} has no ITM head, so there is no matching score to explain.")
    with loaded.lock:
        cam = loaded.pipe.gradcam(image, text, layer=_gradcam_layer(layer))
    highlighted, cam_image, info = render_gradcam(image, cam, _choice(word))
    return highlighted, cam_image, info + _held_out_note(loaded, text), _npz(None, cam, text=text)


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
# The selectors, which follow the loaded model
# ---------------------------------------------------------------------------------------


def cross_layers(loaded: server.Loaded) -> list[int]:
    q = loaded.pipe.model.config.qformer
    return [i for i in range(q.num_layers) if q.has_cross_attention(i)]


def selector_updates(loaded: server.Loaded) -> tuple:
    """New choices for the layer, head, query and Grad-CAM layer selectors after a model switch."""
    q = loaded.pipe.model.config.qformer
    layers = [str(i) for i in cross_layers(loaded)]
    return (gr.update(choices=["all"] + layers, value="all"),
            gr.update(choices=["all"] + [str(h) for h in range(q.num_heads)], value="all"),
            gr.update(choices=["all"] + [str(i) for i in range(q.num_queries)], value="all"),
            gr.update(choices=["last"] + layers, value="last"))


class CaptionTab(NamedTuple):
    image: gr.Image  # the scene composer sends scenes here
    selectors: list  # layer, head, query, Grad-CAM layer: the Model tab updates their choices


OUTPUTS = ("caption", "by", "small", "big", "words", "cam", "info", "npz")  # caption_maps' outputs, in order


def _outputs(num_queries: int) -> dict:
    """The right-hand column: the caption and who made it, the maps, the words, the raw maps."""
    out = {"caption": gr.Textbox(label="Caption", interactive=False, elem_id="caption-text"),
           "by": gr.Markdown(elem_id="caption-by")}
    with gr.Row():
        out["big"] = gr.Image(label="Cross-attention (large overlay)", interactive=False, height=320,
                              elem_id="attention-overlay")
        out["cam"] = gr.Image(label="Grad-CAM", interactive=False, height=320, elem_id="gradcam-overlay")
    rows = -(-num_queries // 6)  # every map in view: Gradio's tiles are >= ~100 px, so 6 (~122 px) fit a row
    out["small"] = gr.Gallery(label="Every query", columns=6, rows=rows, height=64 + 132 * rows, allow_preview=False,
                              object_fit="contain", elem_id="query-maps")
    out["words"] = gr.HighlightedText(label="Words (click one for its Grad-CAM map)", show_legend=False,
                                      combine_adjacent=False)
    out["info"] = gr.Markdown(elem_id="caption-info")
    out["npz"] = gr.File(label="Raw maps (.npz)", interactive=False)
    gr.Markdown(MAP_NOTE)
    return out


def _controls(loaded: server.Loaded) -> dict:
    """The left-hand column: the image, the map selectors, the Grad-CAM text, the buttons."""
    q = loaded.pipe.model.config.qformer
    layers = [str(i) for i in cross_layers(loaded)]
    c = {"image": image_input(label="Image", height=260, elem_id="caption-image", elem_classes="pixelated")}
    with gr.Row():
        c["layer"] = gr.Dropdown(["all"] + layers, value="all", label="Layer")
        c["head"] = gr.Dropdown(["all"] + [str(h) for h in range(q.num_heads)], value="all", label="Head")
    with gr.Row():
        c["reduce"] = gr.Radio(["mean", "max"], value="mean", label="Aggregation")
        c["query"] = gr.Dropdown(["all"] + [str(i) for i in range(q.num_queries)], value="all",
                                 label="Query (large map)")
    c["text"] = gr.Textbox(value="", label="Text for Grad-CAM (empty: the caption)")
    c["cam_layer"] = gr.Dropdown(["last"] + layers, value="last", label="Grad-CAM layer")
    c["caption_button"] = gr.Button("Caption and maps", variant="primary")
    c["cam_button"] = gr.Button("Grad-CAM of my text")
    gr.Examples([[str(server.ASSETS / n)] for n in server.EXAMPLES], inputs=[c["image"]], label="Examples")
    return c


def _refused(outputs: int):
    """A refusal on the page: the outputs stay; a refused image is dropped from the input."""
    return lambda error: (None if getattr(error, "image", False) else gr.skip(),) + (gr.skip(),) * outputs


def build(model_state: gr.State) -> CaptionTab:
    loaded = server.model()
    with gr.Tab("Caption & attention", id="caption"):
        map_cache = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                c = _controls(loaded)
            with gr.Column(scale=2):
                out = _outputs(loaded.pipe.model.config.qformer.num_queries)
        image = c["image"]
        cap_inputs = [image, c["layer"], c["head"], c["reduce"], c["query"], c["text"], c["cam_layer"], model_state]
        cap_outputs = [out[k] for k in OUTPUTS] + [map_cache]
        cam_inputs = [image, c["text"], c["cam_layer"], model_state]
        cam_outputs = [out["words"], out["cam"], out["info"], out["npz"]]
        gr.on([], caption_maps, cap_inputs, cap_outputs, api_name="caption_maps")  # the API's, then the page's
        gr.on([], gradcam, cam_inputs, cam_outputs, api_name="gradcam")
        c["caption_button"].click(on_page(lambda *a: (gr.skip(),) + caption_maps(*a), 10, _refused(9)), cap_inputs,
                                  [image] + cap_outputs, api_visibility="private")
        c["cam_button"].click(on_page(lambda *a: (gr.skip(),) + gradcam(*a), 5, _refused(4)), cam_inputs,
                              [image] + cam_outputs, api_visibility="private")
        selectors = [c["layer"], c["head"], c["reduce"], c["query"]]
        for selector in selectors:
            selector.change(on_page(redraw_maps, 2), [map_cache] + selectors, [out["small"], out["big"]],
                            api_visibility="private")
        out["words"].select(on_page(pick_word, 2), [map_cache], [out["cam"], out["info"]], api_visibility="private")
    return CaptionTab(image, [c["layer"], c["head"], c["query"], c["cam_layer"]])
