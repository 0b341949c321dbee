"""The Model tab and the page's header: what this session's model is (its parameters per box
of the paper's Figure 2, `blip2lab.model.summary`; its LLM; what it was trained on; what it
can do; its shipped evaluation), and picking another, for this session only: the server
holds each model once and every session chooses among them (`server.Models`). When hosted,
only the server's own list can be picked (no folders, no checkpoint ids)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import gradio as gr

from app import caption, server
from app.server import friendly, on_page
from blip2lab import routing
from blip2lab.formats.hf import KNOWN_CHECKPOINTS
from blip2lab.model.summary import parameter_counts
from blip2lab.pipeline import PRESETS

INTRO = ("**blip2lab** is a from-scratch BLIP-2: a frozen image encoder, a Q-Former that learns to read it, and a "
         "frozen language model that answers. The shipped models were trained here on a toy world of coloured "
         "shapes. **Try this first:** click an example under the chat box and press Enter; then open *Search* "
         "or *Caption & attention*.")


def llm_kind(loaded: server.Loaded) -> str:
    """What the LLM is, read from the LLM itself: "a decoder-only LLM (SmolLM2-135M-Instruct, llama layout)"."""
    pipe = loaded.pipe
    if pipe.model.llm is None:
        return "no LLM (Q-Former captions)"
    kind = {"decoder": "a decoder-only", "encoder_decoder": "an encoder-decoder"}[pipe.model.config.llm.kind]
    layout = getattr(pipe.model.llm.model.config, "model_type", "") or "unknown"
    source = Path(str(pipe.model.config.llm.name_or_path or "")).name.removesuffix(".gguf")
    source = source.split(".Q")[0] if source else ""  # a GGUF file's quantisation suffix
    return f"{kind} LLM ({source + ', ' if source else ''}{layout} layout)"


def _trained_on(loaded: server.Loaded) -> str:
    if loaded.is_shapes:
        photos = f" Photos are answered and captioned by {routing.PHOTO_MODEL}, named beside each answer."
        return server.SHAPES_NOTE + (photos if routing.routes_photos(loaded.pipe, loaded.name) else "")
    if routing.PHOTO_MODEL in (loaded.name, loaded.pipe.name):
        return server.MINIREAL_NOTE
    return "An official or user checkpoint: see its own model card."


def header_markdown(model: Optional[str] = None) -> str:
    """The page's header for a session: what this is, what to try first, and its model."""
    loaded = server.model(model)
    pipe = loaded.pipe
    n = sum(row["params"] for row in parameter_counts(pipe.model).values()) / 1e6
    dtype = "" if pipe.model.llm is None else f", LLM in {str(pipe.model.llm.model.dtype).removeprefix('torch.')}"
    return (f"{INTRO}\n\n### Your model: **{loaded.name}** ({n:.2f}M parameters, {llm_kind(loaded)}, on "
            f"{pipe.device}{dtype})\n{_trained_on(loaded)}")


def model_info(model: Optional[str] = None) -> str:
    """What this session's model is: name, parameters per part, device, what it can do, its evaluation."""
    loaded = server.model(model)
    m = loaded.pipe.model
    counts = parameter_counts(m)
    rows = "\n".join(f"| {part} | {c['params'] / 1e6:.3f}M | {c['trainable'] / 1e6:.3f}M |" for part, c in counts.items())
    total = sum(c["params"] for c in counts.values()) / 1e6
    q = m.config.qformer
    can = ["caption"] + (["answer / chat"] if m.llm is not None else []) + (
        ["match / Grad-CAM"] if loaded.can_match else [])
    scorer = loaded.pipe.retrieval is not None and server.SETTINGS.matcher_for(loaded.name)
    text = (f"**{loaded.name}** on `{loaded.pipe.device}`: {total:.3f}M parameters, {llm_kind(loaded)}.\n\n"
            f"| part | parameters | trainable |\n|---|---|---|\n{rows}\n\n"
            f"Image side {m.config.vision.image_size} px, {m.config.vision.num_tokens} image tokens; Q-Former "
            f"{q.num_layers} layers x {q.num_heads} heads, {q.num_queries} queries, cross-attention on layers "
            f"{caption.cross_layers(loaded)}. Can: {', '.join(can)}"
            + (f" (matching with {scorer})" if scorer else "") + ".\n\n"
            f"Search uses **{server.SETTINGS.search}** for every session.")
    folder = PRESETS.get(loaded.name)  # a shipped model says how it scores, next to its weights
    if folder is not None and (folder / "eval.json").is_file():
        text += f"\n\nIts evaluation (`{folder.name}/eval.json`):\n```json\n{(folder / 'eval.json').read_text()[:4000]}\n```"
    return text


def model_choices() -> list[str]:
    """What a session may pick: the server's list; locally also the official checkpoint ids."""
    return server.SETTINGS.choices + ([] if server.SETTINGS.hosted else sorted(KNOWN_CHECKPOINTS))


@friendly
def select_model(name: str = "shapes-opt") -> tuple:
    """Use another model in this session only (nobody else's changes). The server's models are
    each loaded once and shared; when hosted only those can be picked.

    Parameters:
        name: one of the server's models (shipped: shapes-opt, shapes-t5, mini-real, ...); locally also an
              official checkpoint id or a blip2lab folder
    Returns:
        the model's description, the page header
    """
    loaded = server.model(server.check_choice(name))
    return (model_info(loaded.name), header_markdown(loaded.name), loaded.name) + caption.selector_updates(loaded)


def build(header: gr.Markdown, model_state: gr.State, selectors: list) -> None:
    """The tab; a pick redraws the page's `header` and the Caption tab's `selectors`."""
    local = not server.SETTINGS.hosted
    with gr.Tab("Model", id="model"):  # the pick first, then what the model is
        # Any value reaches select_model, which refuses what this server does not offer with a
        # plain message (Gradio's own check of the choices would log a traceback for it).
        name = gr.Dropdown(model_choices(), value=server.SETTINGS.model, allow_custom_value=True,
                           label="Model for this session: one of this server's models"
                                 + (", an official checkpoint id, or a local folder" if local else ""),
                           elem_id="model-choice")
        use_btn = gr.Button("Use this model (only in this session)", variant="primary")
        gr.Markdown(f"The server holds each model once (at most {server.SETTINGS.max_models} at a time) and every "
                    "visitor picks among them: your choice changes nothing for anyone else."
                    + ("" if local else " On this hosted server only the models listed can be picked."))
        info = gr.Markdown(model_info(), elem_id="model-info")
        outputs = [info, header, model_state] + selectors
        refresh = gr.Button("Refresh", size="sm")
        gr.on([], select_model, [name], outputs, api_name="select_model")  # the API's, then the page's
        gr.on([], model_info, [model_state], [info], api_name="model_info")
        use_btn.click(on_page(select_model, len(outputs)), [name], outputs, api_visibility="private")
        refresh.click(on_page(model_info, 1), [model_state], [info], api_visibility="private")
