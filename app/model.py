"""The Model tab and the page's header: what is loaded (its parameters per box of the
paper's Figure 2, `blip2lab.model.summary`; what it was trained on; what it can do; its
shipped evaluation), and loading another model, which changes it for every user."""

from __future__ import annotations

import gradio as gr

from app import caption, server
from app.server import friendly
from blip2lab import routing
from blip2lab.formats.hf import KNOWN_CHECKPOINTS
from blip2lab.model.summary import parameter_counts
from blip2lab.pipeline import PRESETS

LLM_KINDS = {"decoder": "a decoder-only LLM (OPT-style)", "encoder_decoder": "an encoder-decoder LLM (T5-style)",
             "none": "no LLM (Q-Former captions)"}


def _trained_on(loaded: server.Loaded) -> str:
    if loaded.is_shapes:
        photos = f" Photos in the chat tab are answered by {routing.PHOTO_MODEL}."
        return server.SHAPES_NOTE + (photos if routing.routes_photos(loaded.pipe, loaded.name) else "")
    if routing.PHOTO_MODEL in (loaded.name, loaded.pipe.name):
        return server.MINIREAL_NOTE
    return "An official or user checkpoint: see its own model card."


def header_markdown() -> str:
    loaded = server.current()
    pipe = loaded.pipe
    n = sum(row["params"] for row in parameter_counts(pipe.model).values()) / 1e6
    llm = LLM_KINDS[pipe.model.config.llm.kind]
    dtype = "" if pipe.model.llm is None else f", LLM in {str(pipe.model.llm.model.dtype).removeprefix('torch.')}"
    return (f"### blip2lab · model **{loaded.name}** ({n:.2f}M parameters, {llm}, on {pipe.device}{dtype})\n"
            f"{_trained_on(loaded)}")


def model_info() -> str:
    """What is loaded: name, parameters per part, device, what it can do."""
    loaded = server.current()
    m = loaded.pipe.model
    counts = parameter_counts(m)
    rows = "\n".join(f"| {part} | {c['params'] / 1e6:.3f}M | {c['trainable'] / 1e6:.3f}M |" for part, c in counts.items())
    total = sum(c["params"] for c in counts.values()) / 1e6
    q = m.config.qformer
    can = ["caption"] + (["answer / chat"] if m.llm is not None else []) + (
        ["match / search / Grad-CAM"] if loaded.can_match else [])
    text = (f"**{loaded.name}** on `{loaded.pipe.device}`: {total:.3f}M parameters.\n\n"
            f"| part | parameters | trainable |\n|---|---|---|\n{rows}\n\n"
            f"Image side {m.config.vision.image_size} px, {m.config.vision.num_tokens} image tokens; Q-Former "
            f"{q.num_layers} layers x {q.num_heads} heads, {q.num_queries} queries, cross-attention on layers "
            f"{caption.cross_layers()}. Can: {', '.join(can)}.")
    folder = PRESETS.get(loaded.name)  # a shipped model says how it scores, next to its weights
    if folder is not None and (folder / "eval.json").is_file():
        text += f"\n\nIts evaluation (`{folder.name}/eval.json`):\n```json\n{(folder / 'eval.json').read_text()[:4000]}\n```"
    return text


def model_choices() -> list[str]:
    return sorted(PRESETS) + sorted(KNOWN_CHECKPOINTS)


@friendly
def switch_model(name: str, retrieval: str = "") -> tuple:
    """Load a shipped model, an official checkpoint id, or (local only) a folder. The app
    has one model for everyone: switching changes it for every user."""
    name, retrieval = (name or "").strip(), (retrieval or "").strip() or None
    if not name:
        raise gr.Error("Pick or type a model.")
    for source in filter(None, (name, retrieval)):
        server.check_model_source(source)
    with server.current().lock:
        server.load_model(name, retrieval)
    return (model_info(), header_markdown()) + caption.selector_updates()


def build(header: gr.Markdown, selectors: list) -> None:
    """The tab; a switch redraws the page's `header` and the Caption tab's `selectors`."""
    with gr.Tab("Model", id="model"):
        info = gr.Markdown(model_info())
        with gr.Row():
            model_name = gr.Dropdown(model_choices(), value=server.current().name, allow_custom_value=True,
                                     label="Model: a shipped name, an official checkpoint id"
                                           + (", or a local folder" if server.SETTINGS.folders_allowed else ""))
            retrieval = gr.Textbox(label="Retrieval model (optional: ITC/ITM heads for a stage-2 "
                                         "checkpoint, e.g. Salesforce/blip2-itm-vit-g)")
        load_btn = gr.Button("Load (for everyone using this app)")
        if PRESETS:
            gr.Examples([[n] for n in sorted(PRESETS)], inputs=[model_name], label="Shipped")
        load_btn.click(switch_model, [model_name, retrieval], [info, header] + selectors, api_name="load_model")
        refresh = gr.Button("Refresh", size="sm")
        refresh.click(model_info, None, [info], api_name="model_info")
