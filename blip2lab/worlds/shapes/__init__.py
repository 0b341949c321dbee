"""The shapes world: scenes, captions and questions with their true content (`world.py`), the
frozen backbones pretrained here (`vision_backbone.py`, `text_backbones.py`), the BLIP-2
recipe and its presets (`recipe.py`), the paper's ablations (`ablations.py`), what the
notebooks measure (`analysis.py`), the search gallery (`gallery.py`) and tiny official-layout
checkpoints (`official_demo.py`)."""
