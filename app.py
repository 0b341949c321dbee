"""blip2lab's Gradio app: chat about an image, captions with attention maps, retrieval
search, a scene composer for the shapes world, and a model picker.

    python app.py                      # http://127.0.0.1:7860, the shipped shapes-opt model
    BLIP2LAB_MODEL=path/to/folder python app.py

This file is the entry point (Hugging Face Spaces runs `python app.py`); it assembles the
page from the `app/` package beside it, one module per tab (app/chat.py, caption.py,
search.py, composer.py, model.py) and the rules of a server shared by strangers
(app/server.py: each model held once and shared, every session its own choice among them,
errors that are a toast and never cover the page, a bounded queue, a pixel and an upload
size limit, per-session uploads, and no request that can make the server read, list or
return a file outside what the user uploaded or what ships with the app). Every endpoint a
script would call has named, documented parameters with defaults (`Client.view_api()`). The app holds
no model logic: every number comes from the blip2lab package (`blip2lab.pipeline`,
`blip2lab.chat`, `blip2lab.routing`, `blip2lab.explain`, `blip2lab.search.gallery`,
`blip2lab.worlds.shapes.gallery`).

Environment variables (all optional):
    BLIP2LAB_MODEL         a new session's model: name or folder (default "shapes-opt"; shipped names: models/)
    BLIP2LAB_MODELS        the models a session may pick, comma-separated (default: every shipped model)
    BLIP2LAB_MAX_MODELS    models held in memory at once (default 6)
    BLIP2LAB_RETRIEVAL     a second model with ITC/ITM heads for BLIP2LAB_MODEL, for a stage-2 checkpoint
                           without them (the shipped shapes models match with shapes-stage1-partial)
    BLIP2LAB_SEARCH_MODEL  the Search tab's model (default: shapes-stage1-partial for a shapes app)
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

import logging

import gradio as gr

# `import app` would find the app/ package beside this file, never this script.
from app import caption, chat, composer, model, search, server
from app.widgets import CSS


def build_demo() -> gr.Blocks:
    """The page: the header, then one tab per module of app/, wired to each other where a
    tab sends its result to another (the composer's scenes) or follows this session's model."""
    with gr.Blocks(title="blip2lab", delete_cache=(3600, 3600)) as demo:
        model_state = gr.State(server.SETTINGS.model)  # this session's model: its own, nobody else's
        header = gr.Markdown(model.header_markdown(), elem_id="header")
        with gr.Tabs() as tabs:
            chat_in = chat.build(model_state)
            caption_tab = caption.build(model_state)
            search_tab = search.build()
            composer.build(tabs, chat_in, caption_tab.image, search_tab.image, search_tab.direction)
            model.build(header, model_state, caption_tab.selectors)
    return demo


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    try:
        server.setup()
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"blip2lab app: cannot load the model: {e}\n"
                         "Set BLIP2LAB_MODEL to a shipped model name or a checkpoint folder.") from None
    server.launch(build_demo(), css=CSS)


if __name__ == "__main__":
    main()
