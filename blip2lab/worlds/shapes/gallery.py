"""The search gallery of the shapes world: test-split scenes and a folder of example images,
indexed both ways (`blip2lab.search.gallery.Gallery`), with what each item truly is.

Keys name where an image came from: "scene:i" is the i-th scene of
`world.make_gallery("test", size, seed)`, "example:<file>" a file of the examples folder.
Texts are the scenes' true captions and the examples' descriptions, in the same order.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Optional

from PIL import Image

from blip2lab.pipeline import Blip2Pipeline
from blip2lab.processor import load_image
from blip2lab.search.gallery import Gallery
from blip2lab.worlds.shapes import world


@dataclass
class ShapesGallery:
    """An indexed gallery and the items behind its keys."""

    gallery: Gallery = field(default_factory=Gallery)
    scenes: list[world.Scene] = field(default_factory=list)  # key "scene:i" -> scenes[i]
    examples: dict[str, str] = field(default_factory=dict)  # key "example:<file>" -> its description
    examples_dir: Optional[Path] = None

    def about(self, key: str) -> str:
        """What an image is, when known: a scene's true caption, an example's description; else ""."""
        kind, _, name = key.partition(":")
        if kind == "scene":
            return world.caption(self.scenes[int(name)])
        if kind == "example":
            return self.examples.get(name, "")
        return ""

    def holds(self, key: str, text: str | list) -> Optional[bool]:
        """Whether the image behind `key` is one `text` describes (`world.describes`: "a red
        circle" is true of every scene holding one; `text` may come parsed, as describes takes
        it); None when its content is unknown (an upload)."""
        kind, _, name = key.partition(":")
        if kind == "scene":
            return world.describes(text, self.scenes[int(name)])
        if kind == "example" and name in self.examples:
            objects = world.parse_caption(self.examples[name])  # a shipped example's description is its caption
            return bool(objects) and world.describes(text, world.Scene([world.place_object(
                shape, color, size, row, column) for size, color, shape, row, column in objects]))
        return None

    def count_holding(self, text: str) -> int:
        """How many of the scenes and examples `text` describes (the right answers of a search)."""
        keys = [f"scene:{i}" for i in range(len(self.scenes))] + [f"example:{n}" for n in self.examples]
        said = world.parse_objects_partial(text)  # parsed once for every image
        if not said:
            return 0
        return sum(bool(self.holds(k, said)) for k in keys)

    def image(self, key: str) -> Optional[Image.Image]:
        """The image behind a scene or example key; None for a key this gallery did not make."""
        kind, _, name = key.partition(":")
        if kind == "scene":
            return world.render(self.scenes[int(name)])
        if kind == "example" and self.examples_dir is not None:
            return load_image(self.examples_dir / Path(name).name)  # a file of the folder, by its name only
        return None


def build_gallery(pipe: Blip2Pipeline, size: int, examples_dir: Optional[Path] = None,
                  examples: Optional[Mapping[str, str]] = None, seed: int = 0, batch: int = 64,
                  lock: AbstractContextManager = nullcontext()) -> ShapesGallery:
    """Index `size` test scenes and the `examples` ({file name in `examples_dir`: its
    description}) with `pipe`'s ITC/ITM model. `lock` is held per batch of images and
    released between batches, so a server's requests wait for one batch, not the whole build."""
    examples = dict(examples or {})
    if examples and examples_dir is None:
        raise ValueError("examples need examples_dir, the folder that holds their files")
    scenes = world.make_gallery("test", size, seed=seed) if size > 0 else []
    images = [world.render(s) for s in scenes] + [Path(examples_dir) / n for n in examples]
    keys = [f"scene:{i}" for i in range(len(scenes))] + [f"example:{n}" for n in examples]
    texts = [world.caption(s) for s in scenes] + list(examples.values())
    gallery = Gallery()
    for start in range(0, len(images), batch):
        with lock:
            gallery.add_images(pipe, images[start:start + batch], keys[start:start + batch])
        time.sleep(0.001)  # a thread waiting on the lock gets it before the next batch
    with lock:
        gallery.add_texts(pipe, texts)
    return ShapesGallery(gallery, scenes, examples, examples_dir)
