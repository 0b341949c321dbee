"""Where the shipped files live: the trained models and frozen backbones under models/, one
folder each with the command that rebuilt it (see models/*/recipe.json)."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODELS_DIR = REPO / "models"
BACKBONES_DIR = MODELS_DIR / "backbones"
