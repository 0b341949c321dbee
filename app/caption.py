"""The Caption & attention tab: a caption, the queries' cross-attention maps over the image
(`blip2lab.explain`), and Grad-CAM of the ITM score word by word, drawn as overlays; the
raw maps download as .npz. Changing a selector redraws the maps already computed."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import gradio as gr
from PIL import Image

from app import server
from app.server import friendly, gpu
from app.widgets import image_input
from blip2lab import explain

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
        raise gr.Error(f"expected 'all' or a number, got {value!r}")


def _gradcam_layer(value: Any) -> Optional[int]:
    """"last" (or nothing) -> None, the last cross-attention layer; else a layer number."""
    return None if value in (None, "", "last") else _choice(value)


def render_maps(image: Image.Image, maps: explain.CrossAttentionMaps, layer: Any, head: Any, reduce: str,
                query: Any) -> tuple[list, str]:
    """Small multiples (one overlay per query) and one large overlay (one query, or all
    queries combined by `reduce`)."""
    if reduce not in ("mean", "max"):
        raise gr.Error(f"aggregation must be 'mean' or 'max', got {reduce!r}")
    per_query = maps.select(_choice(layer), _choice(head), reduce)  # (Q, g, g)
    small = [(server.save_png(explain.overlay(image, m, size=96)), f"query {q}") for q, m in enumerate(per_query)]
    q = _choice(query)
    if q is not None and not 0 <= q < per_query.shape[0]:
        raise gr.Error(f"query {q} out of range: the model has {per_query.shape[0]} queries")
    big = per_query[q] if q is not None else (per_query.mean(0) if reduce == "mean" else per_query.amax(0))  # (g, g)
    return small, server.save_png(explain.overlay(image, big, size=320))


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
    return highlighted, server.save_png(explain.overlay(image, m, size=320)), info


def _npz(maps: Optional[explain.CrossAttentionMaps], cam: Optional[explain.GradCam], **extra) -> str:
    path = server.tmp_file(".npz")
    explain.save_npz(str(path), maps, cam, **extra)
    return str(path)


@friendly
@gpu
def caption_maps(image_path: Any, layer: Any = "all", head: Any = "all", reduce: str = "mean", query: Any = "all",
                 gradcam_text: str = "", gradcam_layer: Any = "last") -> tuple:
    """Caption the image, then its per-query cross-attention maps and Grad-CAM of the ITM
    score for the caption (or `gradcam_text`) word by word."""
    loaded = server.current()
    image = server.open_image(image_path)
    server.warn_if_not_scene(image)
    with loaded.lock:
        caption = loaded.pipe.caption([image])[0]
        maps = loaded.pipe.attention_maps(image)
        text = (gradcam_text or "").strip() or caption
        cam = None
        if loaded.can_match and text:
            cam = loaded.pipe.gradcam(image, text, layer=_gradcam_layer(gradcam_layer))
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
    loaded = server.current()
    if not loaded.can_match:
        raise gr.Error(f"{loaded.name} has no ITM head, so there is no matching score to explain.")
    text = (text or "").strip()
    if not text:
        raise gr.Error("Type a text to explain (or leave it empty in the UI to use the caption).")
    image = server.open_image(image_path)
    with loaded.lock:
        cam = loaded.pipe.gradcam(image, text, layer=_gradcam_layer(layer))
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
# The selectors, which follow the loaded model
# ---------------------------------------------------------------------------------------


def cross_layers() -> list[int]:
    q = server.current().pipe.model.config.qformer
    return [i for i in range(q.num_layers) if q.has_cross_attention(i)]


def selector_updates() -> tuple:
    """New choices for the layer, head, query and Grad-CAM layer selectors after a model switch."""
    q = server.current().pipe.model.config.qformer
    layers = [str(i) for i in cross_layers()]
    return (gr.update(choices=["all"] + layers, value="all"),
            gr.update(choices=["all"] + [str(h) for h in range(q.num_heads)], value="all"),
            gr.update(choices=["all"] + [str(i) for i in range(q.num_queries)], value="all"),
            gr.update(choices=["last"] + layers, value="last"))


class CaptionTab(NamedTuple):
    image: gr.Image  # the scene composer sends scenes here
    selectors: list  # layer, head, query, Grad-CAM layer: the Model tab updates their choices


def _outputs() -> dict:
    """The right-hand column: the caption, the maps, the words, the raw maps."""
    out = {"caption": gr.Textbox(label="Caption", interactive=False, elem_id="caption-text")}
    with gr.Row():
        out["big"] = gr.Image(label="Cross-attention (large overlay)", interactive=False, height=320,
                              elem_id="attention-overlay")
        out["cam"] = gr.Image(label="Grad-CAM", interactive=False, height=320, elem_id="gradcam-overlay")
    out["small"] = gr.Gallery(label="Every query", columns=8, height=150, allow_preview=False, elem_id="query-maps")
    out["words"] = gr.HighlightedText(label="Words (click one for its Grad-CAM map)", show_legend=False,
                                      combine_adjacent=False)
    out["info"] = gr.Markdown()
    out["npz"] = gr.File(label="Raw maps (.npz)", interactive=False)
    gr.Markdown(MAP_NOTE)
    return out


def build() -> CaptionTab:
    q = server.current().pipe.model.config.qformer
    layer_choices = ["all"] + [str(i) for i in cross_layers()]
    with gr.Tab("Caption & attention", id="caption"):
        map_cache = gr.State(None)
        with gr.Row():
            with gr.Column(scale=1):
                image = image_input(label="Image", height=260, elem_id="caption-image", elem_classes="pixelated")
                with gr.Row():
                    layer = gr.Dropdown(layer_choices, value="all", label="Layer")
                    head = gr.Dropdown(["all"] + [str(h) for h in range(q.num_heads)], value="all", label="Head")
                with gr.Row():
                    reduce = gr.Radio(["mean", "max"], value="mean", label="Aggregation")
                    query = gr.Dropdown(["all"] + [str(i) for i in range(q.num_queries)], value="all",
                                        label="Query (large map)")
                cam_text = gr.Textbox(label="Text for Grad-CAM (empty: the caption)")
                cam_layer = gr.Dropdown(["last"] + layer_choices[1:], value="last", label="Grad-CAM layer")
                cap_btn = gr.Button("Caption and maps", variant="primary")
                cam_btn = gr.Button("Grad-CAM of my text")
                gr.Examples([[str(server.ASSETS / n)] for n in server.EXAMPLES], inputs=[image], label="Examples")
            with gr.Column(scale=2):
                out = _outputs()
        cap_btn.click(caption_maps, [image, layer, head, reduce, query, cam_text, cam_layer],
                      [out[k] for k in ("caption", "small", "big", "words", "cam", "info", "npz")] + [map_cache],
                      api_name="caption_maps")
        cam_btn.click(gradcam, [image, cam_text, cam_layer], [out["words"], out["cam"], out["info"], out["npz"]],
                      api_name="gradcam")
        for selector in (layer, head, reduce, query):
            selector.change(redraw_maps, [map_cache, layer, head, reduce, query], [out["small"], out["big"]],
                            api_visibility="private")
        out["words"].select(pick_word, [map_cache], [out["cam"], out["info"]], api_visibility="private")
    return CaptionTab(image, [layer, head, query, cam_layer])
