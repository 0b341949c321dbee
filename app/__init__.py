"""blip2lab's Gradio app, one module per tab, assembled by `app.py` at the repository root
(the entry point: `python app.py`, which Hugging Face Spaces runs; its docstring lists the
environment variables).

    server.py     the rules of a server shared by strangers: settings, the one model and its
                  lock, limits, the files handed out, errors, which paths may be read
    widgets.py    the pieces several tabs use: the image input, the page's CSS
    chat.py       Chat: a conversation about one image
    caption.py    Caption & attention: a caption, cross-attention maps, Grad-CAM
    search.py     Search: retrieval both ways over a gallery, with the user's own additions
    composer.py   Scene composer: a shapes-world scene from cells or words
    model.py      Model: what is loaded, and loading another

Every number comes from the blip2lab package; what lives here is the user interface.
(`app.py` and this package share a name: `import app` finds the package, and app.py runs
as a script.)
"""
