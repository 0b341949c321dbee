"""mini-real: frozen EfficientNet-lite0, all-MiniLM-L6-v2 and SmolLM2-135M-Instruct shipped in
PyPI packages (`backbones.py`), Debian's Open Clip Art as captioned data (`clipart.py`), nine
offline photos (`photos.py`) and the recipe (`recipe.py`)."""
