"""blip2lab: BLIP-2 (Li et al. 2023, arXiv 2301.12597), exact to the paper and small enough
to learn from: a frozen image encoder and a frozen LLM bridged by a Querying Transformer.

    import blip2lab
    pipe = blip2lab.load("shapes-opt")          # or a folder, or an official checkpoint
    pipe.caption(["scene.png"]); pipe.answer("scene.png", "what color is the circle?")
"""

__version__ = "0.1.0"


def load(name_or_path, retrieval=None, device="cpu", **kwargs):
    """A ready pipeline (caption / answer / match / embed_images / embed_texts); see
    `blip2lab.pipeline.load`."""
    from blip2lab.pipeline import load as _load

    return _load(name_or_path, retrieval=retrieval, device=device, **kwargs)


__all__ = ["load", "__version__"]
