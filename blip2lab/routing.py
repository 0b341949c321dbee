"""Which shipped model answers an image. A shapes-world model knows only its 64 px scenes
of circles, squares and triangles on a light grey ground; a photo sent to it gets
shapes-world guesses. When mini-real (trained on clip art, `blip2lab.worlds.minireal`) is
shipped, photos go to it instead and scenes stay with the shapes model. Any other model (an
official or user checkpoint) answers every image itself.

A scene is recognised by the world's background along the image border
(`looks_like_scene`): cheap, and right for every shipped example.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image

from blip2lab.pipeline import PRESETS, Blip2Pipeline
from blip2lab.worlds.shapes import world

PHOTO_MODEL = "mini-real"  # answers the photos sent to a shapes model


def looks_like_scene(image: Image.Image) -> bool:
    """A shapes-world scene has the world's light grey background along its border."""
    a = np.asarray(image.convert("RGB").resize((64, 64), Image.Resampling.BILINEAR), dtype=np.int16)  # (64, 64, 3)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])  # (256, 3)
    near = np.abs(border - np.array(world.BACKGROUND)).max(axis=1) <= 12  # (256,)
    return float(near.mean()) >= 0.6


def is_shapes_model(pipe: Blip2Pipeline, name: str = "") -> bool:
    """A model of the shapes world, by the name it was loaded by or its folder's name
    (the shipped ones are all "shapes-*")."""
    return name.startswith("shapes") or pipe.name.startswith("shapes")


def routes_photos(pipe: Blip2Pipeline, name: str = "") -> bool:
    """Photos sent to this model go to PHOTO_MODEL: it is a shapes model and mini-real ships."""
    return is_shapes_model(pipe, name) and PHOTO_MODEL in PRESETS


def photo_model_for(pipe: Blip2Pipeline, image: Image.Image, name: str = "") -> Optional[str]:
    """The shipped model that answers `image` instead of `pipe` (loaded as `name`), or None
    when `pipe` answers it itself."""
    if routes_photos(pipe, name) and not looks_like_scene(image):
        return PHOTO_MODEL
    return None
