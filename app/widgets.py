"""What several tabs share in the page: the image input that hands its handler the file's
path unopened, and the page's CSS."""

from __future__ import annotations

import gradio as gr

# Shapes scenes are 64 px: show them scaled up, with sharp pixels.
CSS = """
.pixelated img { image-rendering: pixelated; }
#scene-image img, #caption-image img, #search-image img { width: 100%; height: 100%; object-fit: contain; }
"""


def image_input(**kwargs) -> gr.Image:
    """A gr.Image input whose handler gets the uploaded file's path unopened, so blip2lab's
    loader (pixel limit first, friendly errors) is the only decoder: gr.Image's own
    preprocessing opens the file with PIL and fails on a non-image with no message for the
    user. (Set on the instance: a gr.Image subclass would make Gradio write a .pyi stub.)"""
    component = gr.Image(type="filepath", **kwargs)

    def preprocess(payload):
        if payload is None or payload.path is None:
            return gr.Image.preprocess(component, payload)
        return str(payload.path)

    component.preprocess = preprocess
    return component
