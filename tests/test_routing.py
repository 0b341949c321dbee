"""blip2lab.routing: shapes-world scenes are told from photos by their border, and a photo
sent to a shapes model goes to mini-real when it ships; nothing else is re-routed."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from blip2lab import routing
from blip2lab.worlds.shapes import world

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "examples"
SHAPES, OTHER = SimpleNamespace(name="shapes-opt"), SimpleNamespace(name="blip2-opt-2.7b")  # only .name is read
SCENE = world.render(world.Scene([world.place_object("circle", "red", "large", "top", "left")]))
PHOTO = Image.open(ASSETS / "not-a-scene.png").convert("RGB")


def test_scenes_look_like_scenes_and_photos_do_not():
    shipped = [p for p in ASSETS.glob("*.png") if p.name != "not-a-scene.png"]
    assert shipped and all(routing.looks_like_scene(Image.open(p).convert("RGB")) for p in shipped)
    assert all(routing.looks_like_scene(world.render(s)) for s in world.make_split("test", 20, seed=0))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    assert not routing.looks_like_scene(PHOTO) and not routing.looks_like_scene(noise)
    assert routing.looks_like_scene(SCENE.resize((512, 512)))  # at any size


def test_shapes_models_by_name():
    assert routing.is_shapes_model(SHAPES) and routing.is_shapes_model(SimpleNamespace(name="x"), "shapes-t5")
    assert not routing.is_shapes_model(OTHER, "Salesforce/blip2-opt-2.7b")


@pytest.mark.parametrize("shipped", [True, False])
def test_photos_sent_to_a_shapes_model_go_to_mini_real_when_it_ships(monkeypatch, shipped):
    monkeypatch.setattr(routing, "PRESETS", {routing.PHOTO_MODEL: Path("models/mini-real")} if shipped else {})
    assert routing.routes_photos(SHAPES) == shipped
    assert routing.photo_model_for(SHAPES, PHOTO) == (routing.PHOTO_MODEL if shipped else None)
    assert routing.photo_model_for(SHAPES, SCENE) is None  # scenes stay with the shapes model
    assert routing.photo_model_for(OTHER, PHOTO) is None  # any other model answers photos itself
