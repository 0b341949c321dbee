"""blip2lab.worlds.shapes.gallery: the shapes search gallery (test scenes + example files)
indexed both ways, what each key truly is, and the lock taken per batch of images. A tiny
random shapes pipeline (tests/app_fixture.py): nothing here depends on the ranking."""

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from app_fixture import build_tiny_shapes_pipeline

import blip2lab
from blip2lab.worlds.shapes import world
from blip2lab.worlds.shapes.gallery import ShapesGallery, build_gallery

torch.set_num_threads(1)
ASSETS = Path(__file__).resolve().parents[1] / "assets" / "examples"
EXAMPLES = dict(list(json.loads((ASSETS / "captions.json").read_text()).items())[:2])


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return blip2lab.load(build_tiny_shapes_pipeline(tmp_path_factory.mktemp("model") / "shapes-tiny-random"))


class CountingLock:
    def __init__(self):
        self.lock, self.entries = threading.RLock(), 0

    def __enter__(self):
        self.lock.acquire()
        self.entries += 1

    def __exit__(self, *exc):
        self.lock.release()


def test_scenes_and_examples_indexed_both_ways(pipe):
    lock = CountingLock()
    built = build_gallery(pipe, 5, ASSETS, EXAMPLES, batch=2, lock=lock)
    scenes = world.make_gallery("test", 5, seed=0)
    assert built.gallery.image_keys == [f"scene:{i}" for i in range(5)] + [f"example:{n}" for n in EXAMPLES]
    assert built.gallery.texts == [world.caption(s) for s in scenes] + list(EXAMPLES.values())
    assert built.scenes == scenes and lock.entries == 4 + 1  # 7 images in batches of 2, then the texts
    assert built.about("scene:3") == world.caption(scenes[3]) and built.about("upload:0:x.png") == ""
    name, description = next(iter(EXAMPLES.items()))
    assert built.about(f"example:{name}") == description
    assert np.array_equal(np.asarray(built.image("scene:3")), np.asarray(world.render(scenes[3])))
    assert built.image(f"example:{name}").size == (64, 64) and built.image("upload:0:x.png") is None
    hits = built.gallery.text_to_image(pipe, world.caption(scenes[0]), 3, "itc")
    assert len(hits) == 3 and all(h.key in built.gallery.image_keys for h in hits)


def test_an_example_key_reads_only_its_own_folder(pipe, tmp_path):
    built = ShapesGallery(examples_dir=tmp_path)
    (tmp_path / "passwd").write_text("not an image")
    with pytest.raises(ValueError):  # tmp_path/passwd, by its name only; never /etc/passwd
        built.image("example:../../../../etc/passwd")


def test_an_empty_gallery_and_examples_without_their_folder(pipe):
    empty = build_gallery(pipe, 0)
    assert empty.gallery.num_images == empty.gallery.num_texts == 0 and empty.scenes == []
    with pytest.raises(ValueError, match="examples_dir"):
        build_gallery(pipe, 0, examples=EXAMPLES)


def test_holds_says_which_images_a_partial_text_is_true_of():
    scenes = [world.Scene([world.place_object("circle", "red", "large", "top", "left")]),
              world.Scene([world.place_object("triangle", "red", "small", "bottom", "right")])]
    gallery = ShapesGallery(scenes=scenes, examples={"a.png": "a small red triangle on the bottom right",
                                                     "b.png": "a colour gradient"})
    assert gallery.holds("scene:0", "a red circle") and not gallery.holds("scene:1", "a red circle")
    assert gallery.holds("example:a.png", "a red triangle") and gallery.holds("example:b.png", "a red shape") is False
    assert gallery.holds("upload:0:x.png", "a red circle") is None  # unknown content
    assert gallery.count_holding("a red shape") == 3 and gallery.count_holding("a cat") == 0
