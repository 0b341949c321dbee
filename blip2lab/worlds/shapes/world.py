"""The shapes world: a tiny synthetic image-text domain where BLIP-2 can be trained and
evaluated on two CPU cores, and where every caption can be checked against the truth.

A scene holds 1-3 (up to 6) filled shapes, each in its own cell of a 2x3 grid, drawn on a
light grey background. Everything about it is a fixed contract that other modules and
independent checks rely on (shared/design/SHAPES_WORLD_NOTES.md, the project issue):

- image: S x S RGB (S = 64 by default), background (245, 245, 245);
- cells: rows `top`, `bottom`; columns `left`, `middle`, `right`; an object's centre is its
  cell's centre ((col + 0.5) S/3, (row + 0.5) S/2) jittered uniformly by up to 3 px
  (scaled by S/64), then pulled inside the image if the shape would cross its border;
- shapes `circle`, `square`, `triangle` (pointing up, apex at the top centre of its box),
  sizes `small` = 12 px and `large` = 22 px across at S = 64 (scaled by S/64); a shape is as
  tall as it is wide, so its box is a square centred on the object's centre;
- six colours (COLORS); purple triangles and orange squares (HELD_OUT) never appear in the
  training split, only in the "novel" part of val/test;
- canonical caption: objects in reading order, "a {size} {color} {shape} on the {row}
  {column}" joined by " and "; paraphrases and questions use the same small vocabulary
  (VOCABULARY), and `parse_caption` reads any of them back into objects.

A Scene is a plain record (JSON round-trips exactly) and rendering is a pure function of it:
shapes are rasterised analytically at `supersample` x the size (pixel centres tested
against the exact shape) and box-filtered down, so anti-aliased edges cost no library
calls, interior pixels carry the exact colour, and the same scene gives the same bytes on
any machine. Splits are a deterministic stream of scenes from a stable hash of
(split, seed, novel), so `make_split(name, n, seed)[:k] == make_split(name, k, seed)`.

Deliberate choices the contract leaves open: a large shape's box (22 px) is wider than a
column (21.3 px), so two large neighbours may overlap by a few pixels (never at either
centre); "is there" questions get as many "no" as "yes" answers, drawn from absent
colour-shape pairs.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Literal, Optional, Sequence, Union

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

__all__ = [
    "SHAPES", "SIZES", "ROWS", "COLUMNS", "COLORS", "BACKGROUND", "HELD_OUT", "NUMBER_WORDS",
    "SIZE_PX", "JITTER_PX", "VOCABULARY", "PUNCTUATION", "QUESTION_TYPES",
    "ShapeObject", "Scene", "stable_seed", "place_object", "sample_scene", "render", "render_batch",
    "caption", "paraphrases", "PARAPHRASE_TEMPLATES", "parse_caption", "parse_objects_partial",
    "caption_f1", "partial_description", "describes", "held_out_mentions", "object_queries", "questions",
    "iter_split", "make_split", "distinct_caption_scenes",
    "make_gallery", "retrieval_gallery", "CaptionDataset", "VQADataset",
]

# -- the world's vocabulary and geometry --------------------------------------------------

SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
ROWS = ("top", "bottom")
COLUMNS = ("left", "middle", "right")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 180),
    "orange": (245, 130, 30),
}
BACKGROUND = (245, 245, 245)
HELD_OUT = frozenset({("purple", "triangle"), ("orange", "square")})  # (color, shape) pairs
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
SIZE_PX = {"small": 12.0, "large": 22.0}  # across (and tall), at a 64 px image
JITTER_PX = 3.0  # max |offset| of an object's centre from its cell's centre, at 64 px
REFERENCE_SIZE = 64  # the image side the pixel figures above refer to
MAX_OBJECTS = len(ROWS) * len(COLUMNS)
QUESTION_TYPES = ("color", "shape", "size", "count", "exists", "where")

ObjectTuple = tuple[str, str, str, str, str]  # (size, color, shape, row, column)


@dataclass
class ShapeObject:
    """One filled shape. `box` is (x0, y0, x1, y1) in continuous pixel coordinates of the
    rendered image (pixel (i, j) spans [i, i+1] x [j, j+1]); (cx, cy) is its centre."""

    shape: str
    color: str
    size: str
    row: str
    column: str
    cx: float
    cy: float
    box: tuple[float, float, float, float]

    def __post_init__(self):
        for name, allowed in (("shape", SHAPES), ("color", tuple(COLORS)), ("size", SIZES),
                              ("row", ROWS), ("column", COLUMNS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"ShapeObject.{name}={getattr(self, name)!r}; expected one of {allowed}")
        self.cx, self.cy = float(self.cx), float(self.cy)
        self.box = tuple(float(v) for v in self.box)
        if len(self.box) != 4 or not (self.box[0] < self.box[2] and self.box[1] < self.box[3]):
            raise ValueError(f"ShapeObject.box={self.box!r}; expected (x0, y0, x1, y1) with x0 < x1, y0 < y1")

    @property
    def combo(self) -> tuple[str, str]:
        """(color, shape): the pair the held-out rule and the questions talk about."""
        return (self.color, self.shape)

    @property
    def cell(self) -> tuple[int, int]:
        """(row index, column index); sorting by it gives reading order."""
        return (ROWS.index(self.row), COLUMNS.index(self.column))

    def as_tuple(self) -> ObjectTuple:
        return (self.size, self.color, self.shape, self.row, self.column)

    def phrase(self) -> str:
        return f"a {self.size} {self.color} {self.shape} on the {self.row} {self.column}"


@dataclass
class Scene:
    """A plain record: objects (each in its own cell) and the image side they were laid out for."""

    objects: list[ShapeObject] = field(default_factory=list)
    image_size: int = REFERENCE_SIZE

    def __post_init__(self):
        cells = [o.cell for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"Scene.objects: two objects share a cell ({cells})")
        if not 1 <= len(self.objects) <= MAX_OBJECTS:
            raise ValueError(f"Scene.objects: {len(self.objects)} objects; expected 1..{MAX_OBJECTS}")
        if self.image_size < 8:
            raise ValueError(f"Scene.image_size={self.image_size}; expected >= 8")

    @property
    def ordered(self) -> list[ShapeObject]:
        """The objects in reading order: top row left to right, then bottom row."""
        return sorted(self.objects, key=lambda o: o.cell)

    @property
    def has_held_out(self) -> bool:
        return any(o.combo in HELD_OUT for o in self.objects)

    def tuples(self) -> list[ObjectTuple]:
        """(size, color, shape, row, column) per object, in reading order (what parse_caption returns)."""
        return [o.as_tuple() for o in self.ordered]

    def to_dict(self) -> dict[str, Any]:
        return {"image_size": self.image_size,
                "objects": [{**asdict(o), "box": list(o.box)} for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Scene":
        return cls(objects=[ShapeObject(**o) for o in d["objects"]], image_size=int(d["image_size"]))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Scene":
        return cls.from_dict(json.loads(text))


# -- sampling -----------------------------------------------------------------------------


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from the parts' text; unlike hash(), the same in every process."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _as_random(rng: Union[random.Random, np.random.Generator, int, None]) -> random.Random:
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, np.random.Generator):  # one draw from the generator seeds the scene
        return random.Random(int(rng.integers(0, 2**63 - 1)))
    return random.Random(rng)


def place_object(shape: str, color: str, size: str, row: str, column: str, *, image_size: int = 64,
                 dx: float = 0.0, dy: float = 0.0) -> ShapeObject:
    """An object at its cell's centre moved by (dx, dy) px, pulled back inside the image if its
    box would cross the border (hand-built scenes use it with dx = dy = 0)."""
    half = SIZE_PX[size] * image_size / REFERENCE_SIZE / 2
    cx = (COLUMNS.index(column) + 0.5) * image_size / 3 + dx
    cy = (ROWS.index(row) + 0.5) * image_size / 2 + dy
    # Two decimals keep the JSON short; the clamp moves a centre by at most 0.34 px at 64 px
    # (a large shape in the left column), so it stays within the jitter of its cell centre.
    cx = min(max(round(cx, 2), half), image_size - half)
    cy = min(max(round(cy, 2), half), image_size - half)
    return ShapeObject(shape, color, size, row, column, cx, cy, (cx - half, cy - half, cx + half, cy + half))


def _combos(allow_held_out: bool) -> list[tuple[str, str]]:
    return [(c, s) for c in COLORS for s in SHAPES if allow_held_out or (c, s) not in HELD_OUT]


def sample_scene(rng: Union[random.Random, np.random.Generator, int, None] = None, *, image_size: int = 64,
                 min_objects: int = 1, max_objects: int = 3, allow_held_out: bool = True,
                 require_held_out: bool = False) -> Scene:
    """A random scene: 1..3 objects in distinct cells, attributes uniform. With
    `allow_held_out=False` no object is a purple triangle or an orange square; with
    `require_held_out=True` one object (at a random position) is, the rest are free."""
    if not 1 <= min_objects <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"min_objects={min_objects}, max_objects={max_objects}; need 1 <= min <= max <= {MAX_OBJECTS}")
    if require_held_out and not allow_held_out:
        raise ValueError("require_held_out=True contradicts allow_held_out=False")
    rng = _as_random(rng)
    n = rng.randint(min_objects, max_objects)
    cells = rng.sample([(r, c) for r in ROWS for c in COLUMNS], n)
    forced = rng.randrange(n) if require_held_out else -1
    pool, held = _combos(allow_held_out), sorted(HELD_OUT)
    objects = []
    for i, (row, column) in enumerate(cells):
        color, shape = rng.choice(held if i == forced else pool)
        size = rng.choice(SIZES)
        jitter = JITTER_PX * image_size / REFERENCE_SIZE
        dx, dy = rng.uniform(-jitter, jitter), rng.uniform(-jitter, jitter)
        objects.append(place_object(shape, color, size, row, column, image_size=image_size, dx=dx, dy=dy))
    return Scene(objects=objects, image_size=image_size)


def rearranged(scene: Scene, rng: Union[random.Random, np.random.Generator, int, None] = None) -> Scene:
    """The same objects (shape, colour, size, jitter) moved to other cells, so that the scene
    differs from `scene` in positions alone (its canonical caption always differs)."""
    rng = _as_random(rng)
    cells = [(r, c) for r in ROWS for c in COLUMNS]
    old = [(o.row, o.column) for o in scene.objects]
    while True:
        new = rng.sample(cells, len(old))
        if sorted(zip(new, (o.as_tuple()[:3] for o in scene.objects))) != sorted(
                zip(old, (o.as_tuple()[:3] for o in scene.objects))):
            break
    jitter = JITTER_PX * scene.image_size / REFERENCE_SIZE
    objects = [place_object(o.shape, o.color, o.size, row, column, image_size=scene.image_size,
                            dx=rng.uniform(-jitter, jitter), dy=rng.uniform(-jitter, jitter))
               for o, (row, column) in zip(scene.objects, new)]
    return Scene(objects=objects, image_size=scene.image_size)


# -- rendering ----------------------------------------------------------------------------


def _draw(canvas: np.ndarray, obj: ShapeObject, ss: int) -> None:
    """Fill `obj` into the supersampled canvas (H*ss, W*ss, 3): a subpixel is inside when its
    centre is inside the exact shape (edges included)."""
    x0, y0, x1, y1 = (v * ss for v in obj.box)
    hs, ws = canvas.shape[:2]
    ix0, iy0 = max(0, math.floor(x0)), max(0, math.floor(y0))
    ix1, iy1 = min(ws, math.ceil(x1)), min(hs, math.ceil(y1))
    if ix0 >= ix1 or iy0 >= iy1:
        return
    xs = np.arange(ix0, ix1, dtype=np.float64)[None, :] + 0.5  # (1, w) subpixel centres
    ys = np.arange(iy0, iy1, dtype=np.float64)[:, None] + 0.5  # (h, 1)
    cx, cy, half_w, height = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, y1 - y0
    inside_y = (ys >= y0) & (ys <= y1)
    if obj.shape == "square":
        mask = inside_y & (xs >= x0) & (xs <= x1)
    elif obj.shape == "circle":
        mask = (xs - cx) ** 2 + (ys - cy) ** 2 <= half_w * half_w
    else:  # triangle pointing up: apex at (cx, y0), base from (x0, y1) to (x1, y1)
        mask = inside_y & (np.abs(xs - cx) <= (ys - y0) / height * half_w)
    canvas[iy0:iy1, ix0:ix1][mask] = COLORS[obj.color]


def _render_array(scene: Scene, supersample: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    if supersample < 1:
        raise ValueError(f"supersample={supersample}; expected >= 1")
    s, ss = scene.image_size, supersample
    canvas = np.empty((s * ss, s * ss, 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    for obj in scene.objects:
        _draw(canvas, obj, ss)
    if out is None:
        out = np.empty((s, s, 3), dtype=np.uint8)
    out[:] = BACKGROUND
    # Box filter, rounding half up (an all-one-colour block keeps its exact colour), and only
    # over the objects' pixel boxes: everything else is background already.
    for obj in scene.objects:
        x0, y0, x1, y1 = obj.box
        px0, py0 = max(0, math.floor(x0)), max(0, math.floor(y0))
        px1, py1 = min(s, math.ceil(x1)), min(s, math.ceil(y1))
        block = canvas[py0 * ss:py1 * ss, px0 * ss:px1 * ss]  # (h*ss, w*ss, 3)
        total = np.zeros((py1 - py0, px1 - px0, 3), dtype=np.uint32)  # (h, w, 3)
        for dy in range(ss):
            for dx in range(ss):
                total += block[dy::ss, dx::ss]
        out[py0:py1, px0:px1] = (total + (ss * ss) // 2) // (ss * ss)
    return out


def render(scene: Scene, supersample: int = 2) -> Image.Image:
    """The scene as an S x S RGB image, anti-aliased by `supersample` x supersampling."""
    return Image.fromarray(_render_array(scene, supersample))


def render_batch(scenes: Sequence[Scene], supersample: int = 2) -> np.ndarray:
    """All scenes (same image_size) as one uint8 array (n, H, W, 3); same pixels as `render`."""
    if not scenes:
        return np.empty((0, REFERENCE_SIZE, REFERENCE_SIZE, 3), dtype=np.uint8)
    s = scenes[0].image_size
    if any(sc.image_size != s for sc in scenes):
        raise ValueError("render_batch: scenes have different image_size")
    out = np.empty((len(scenes), s, s, 3), dtype=np.uint8)
    for i, scene in enumerate(scenes):
        _render_array(scene, supersample, out[i])
    return out


# -- captions -----------------------------------------------------------------------------


def caption(scene: Scene) -> str:
    """The canonical caption: reading order, "a {size} {color} {shape} on the {row} {column}"
    joined by " and "."""
    return " and ".join(o.phrase() for o in scene.ordered)


def _list(parts: list[str]) -> str:
    """'x', 'x and y', 'x, y and z'."""
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _count_phrase(n: int) -> str:
    return f"{NUMBER_WORDS[n]} shape" + ("" if n == 1 else "s")


# Each template takes the objects (reading order) and an rng; all use only VOCABULARY words
# and punctuation, and all parse back with parse_caption.
PARAPHRASE_TEMPLATES = {
    "canonical": lambda objs, rng: " and ".join(o.phrase() for o in objs),
    "there_is": lambda objs, rng: "there is " + _list([o.phrase() for o in objs]),
    "counted": lambda objs, rng: f"{_count_phrase(len(objs))}: " + ", ".join(o.phrase() for o in objs),
    "place_first": lambda objs, rng: " and ".join(
        f"on the {o.row} {o.column} there is a {o.size} {o.color} {o.shape}" for o in objs),
    "compact": lambda objs, rng: "; ".join(
        f"{o.color} {o.shape} ({o.size}) at the {o.row} {o.column}" for o in objs),
    "shuffled": lambda objs, rng: " and ".join(o.phrase() for o in rng.sample(objs, len(objs))),
    "image_shows": lambda objs, rng: "the image shows " + _list(
        [f"a {o.color} {o.shape}, {o.size}, in the {o.row} {o.column}" for o in objs]),
}


def paraphrases(scene: Scene, rng: Union[random.Random, np.random.Generator, int, None] = None,
                template: Optional[str] = None) -> str:
    """One caption of the scene from a random (or the named) template of PARAPHRASE_TEMPLATES."""
    rng = _as_random(rng)
    name = template if template is not None else rng.choice(sorted(PARAPHRASE_TEMPLATES))
    if name not in PARAPHRASE_TEMPLATES:
        raise ValueError(f"template={name!r}; expected one of {sorted(PARAPHRASE_TEMPLATES)}")
    return PARAPHRASE_TEMPLATES[name](scene.ordered, rng)


_KIND_OF: dict[str, tuple[str, str]] = {}  # word -> (attribute, canonical value)
for _kind, _values in (("size", SIZES), ("color", tuple(COLORS)), ("shape", SHAPES),
                       ("row", ROWS), ("column", COLUMNS)):
    for _v in _values:
        _KIND_OF[_v] = (_kind, _v)
for _s in SHAPES:
    _KIND_OF[_s + "s"] = ("shape", _s)  # plurals, as a generated caption may have them
_KIND_OF.update({"big": ("size", "large"), "center": ("column", "middle"), "centre": ("column", "middle"),
                 "upper": ("row", "top"), "lower": ("row", "bottom")})
_ATTRS = ("size", "color", "shape", "row", "column")
_CHUNK_SPLIT = re.compile(r"\band\b|[;.?!\n]")  # hard breaks; commas and colons are not
_WORD = re.compile(r"[a-z]+")


def parse_objects_partial(text: str) -> list[dict[str, Optional[str]]]:
    """Objects mentioned in `text`, each a dict over size/color/shape/row/column (None where
    not said), in order of mention. The text is cut at "and", ";", "." and "?" (not at commas,
    which the "image_shows" template uses inside an object); inside a piece the attribute
    words are read in order, an object closing when all five are known or when an attribute
    comes a second time. Other words are ignored."""
    found: list[dict[str, Optional[str]]] = []
    for piece in _CHUNK_SPLIT.split(text.lower()):
        current: dict[str, Optional[str]] = {}
        for word in _WORD.findall(piece):
            if word not in _KIND_OF:
                continue
            kind, value = _KIND_OF[word]
            if kind in current:
                found.append(current)
                current = {}
            current[kind] = value
            if len(current) == len(_ATTRS):
                found.append(current)
                current = {}
        if current:
            found.append(current)
    return [{k: obj.get(k) for k in _ATTRS} for obj in found]


def parse_caption(text: str) -> list[ObjectTuple]:
    """The fully described objects of `text` as (size, color, shape, row, column), in order
    of mention; reads the canonical caption and every paraphrase template."""
    return [tuple(o[k] for k in _ATTRS) for o in parse_objects_partial(text)
            if all(o[k] is not None for k in _ATTRS)]


def caption_f1(text: str, scene: Scene) -> dict[str, float]:
    """Object-level precision / recall / F1 of a caption against the scene (multiset match of
    full (size, color, shape, row, column) tuples)."""
    predicted, truth = parse_caption(text), scene.tuples()
    remaining = list(truth)
    hits = 0
    for t in predicted:
        if t in remaining:
            remaining.remove(t)
            hits += 1
    precision = hits / len(predicted) if predicted else 0.0
    recall = hits / len(truth) if truth else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


# -- partial descriptions -----------------------------------------------------------------
# A description that leaves things out ("a red circle", "a small shape on the top left") is
# true of every scene holding such objects. Stage 1 may train on them (ShapesPreset.
# stage1_partial_captions) so that retrieval finds a scene by any one of its objects.

PARTIAL_KEEP = {"size": 0.5, "color": 0.7, "shape": 0.8, "place": 0.4}  # chance each attribute is said


def _partial_phrase(o: ShapeObject, rng: random.Random) -> str:
    """One object with some attributes left out (at least one said); an unsaid shape reads "shape"."""
    while True:
        keep = {k: rng.random() < p for k, p in PARTIAL_KEEP.items()}
        place = rng.choice(("row column", "row", "column")) if keep["place"] else ""
        if any(keep.values()):
            break
    words = ["a", o.size if keep["size"] else "", o.color if keep["color"] else "",
             o.shape if keep["shape"] else "shape"]
    where = {"row column": f"{o.row} {o.column}", "row": o.row, "column": o.column, "": ""}[place]
    return " ".join(w for w in words if w) + (f" on the {where}" if where else "")


def partial_description(scene: Scene, rng: Union[random.Random, np.random.Generator, int, None] = None) -> str:
    """A description of a random non-empty subset of the scene's objects (reading order), each
    with some of its attributes left out (PARTIAL_KEEP), e.g. "a red circle and a small shape
    on the bottom". True of `scene` (`describes`) and of any scene holding such objects."""
    rng = _as_random(rng)
    objs = scene.ordered
    chosen = sorted(rng.sample(range(len(objs)), rng.randint(1, len(objs))))
    return " and ".join(_partial_phrase(objs[i], rng) for i in chosen)


def _agrees(said: dict[str, Optional[str]], o: ShapeObject) -> bool:
    return all(v is None or getattr(o, k) == v for k, v in said.items())


def describes(text: Union[str, list[dict[str, Optional[str]]]], scene: Scene) -> bool:
    """Whether every object `text` mentions (parse_objects_partial; or its result, to parse a
    text once for many scenes) is a distinct object of `scene` agreeing with every attribute
    said about it. A full caption is true of its scene only; "a red circle" of every scene
    holding a red circle; a text naming nothing, of none."""
    said = parse_objects_partial(text) if isinstance(text, str) else text
    if not said or len(said) > len(scene.objects):
        return False
    return any(all(_agrees(s, o) for s, o in zip(said, perm))
               for perm in itertools.permutations(scene.objects, len(said)))


def held_out_mentions(text: str) -> list[tuple[str, str]]:
    """The held-out (color, shape) pairs `text` names ("is there a purple triangle?" ->
    [("purple", "triangle")]), which no training scene, caption or question ever held."""
    pairs = [(o["color"], o["shape"]) for o in parse_objects_partial(text)]
    return list(dict.fromkeys(p for p in pairs if p in HELD_OUT))


def object_queries(allow_held_out: bool = False) -> list[str]:
    """One-object queries at three levels of detail: "a red circle", "a small red circle",
    "a small red circle on the top left", for every (seen) colour-shape pair."""
    out = []
    for color, shape in _combos(allow_held_out):
        out.append(f"a {color} {shape}")
        out += [f"a {size} {color} {shape}" for size in SIZES]
        out += [f"a {size} {color} {shape} on the {row} {column}"
                for size in SIZES for row in ROWS for column in COLUMNS]
    return out


# -- questions ----------------------------------------------------------------------------


def questions(scene: Scene, rng: Union[random.Random, np.random.Generator, int, None] = None, *,
              allow_held_out: bool = True) -> list[tuple[str, str, str]]:
    """Every valid (question, answer, type) for the scene:

    color  "what color is the {shape}?"            for each shape present exactly once
    shape  "what shape is on the {row} {column}?"  for each object
    size   "what size is the {color} {shape}?"     for each (color, shape) present once
    count  "how many shapes are there?"            answered with a number word
    exists "is there a {color} {shape}?"           "yes" for each (color, shape) present, and
                                                   as many "no" for absent pairs (random; held-out
                                                   pairs excluded when allow_held_out=False)
    where  "where is the {color} {shape}?"         "{row} {column}", for each (color, shape) present once

    With rng None the "no" pairs are drawn from a seed of the scene itself (deterministic).
    """
    rng = random.Random(stable_seed("questions", scene.to_json())) if rng is None else _as_random(rng)
    objs = scene.ordered
    shape_count = {s: sum(o.shape == s for o in objs) for s in SHAPES}
    combo_count = {c: sum(o.combo == c for o in objs) for c in _combos(True)}
    qa: list[tuple[str, str, str]] = []
    qa += [(f"what color is the {o.shape}?", o.color, "color") for o in objs if shape_count[o.shape] == 1]
    qa += [(f"what shape is on the {o.row} {o.column}?", o.shape, "shape") for o in objs]
    unique = [o for o in objs if combo_count[o.combo] == 1]
    qa += [(f"what size is the {o.color} {o.shape}?", o.size, "size") for o in unique]
    qa.append(("how many shapes are there?", NUMBER_WORDS[len(objs)], "count"))
    present = list(dict.fromkeys(o.combo for o in objs))  # reading order, no repeats
    absent = [c for c in _combos(allow_held_out) if combo_count[c] == 0]
    qa += [(f"is there a {c} {s}?", "yes", "exists") for c, s in present]
    qa += [(f"is there a {c} {s}?", "no", "exists") for c, s in rng.sample(absent, min(len(present), len(absent)))]
    qa += [(f"where is the {o.color} {o.shape}?", f"{o.row} {o.column}", "where") for o in unique]
    return qa


# Every word that captions, paraphrases, questions and answers use (for word-level vocabularies).
VOCABULARY = tuple(dict.fromkeys(
    list(SIZES) + list(COLORS) + list(SHAPES) + list(ROWS) + list(COLUMNS) + list(NUMBER_WORDS)
    + "a on the and there is at in image shows shape shapes what color size how many are where yes no".split()))
PUNCTUATION = (",", ";", ":", "(", ")", "?")


# -- splits -------------------------------------------------------------------------------


def iter_split(name: Literal["train", "val", "test"], seed: int, *, novel: bool = False,
               image_size: int = 64, max_objects: int = 3) -> Iterator[Scene]:
    """The endless, deterministic stream of scenes of a split (see make_split)."""
    if name not in ("train", "val", "test"):
        raise ValueError(f"name={name!r}; expected 'train', 'val' or 'test'")
    if novel and name == "train":
        raise ValueError("novel=True: the train split has no novel part (held-out pairs never appear in it)")
    rng = random.Random(stable_seed("shapes", name, seed, bool(novel), image_size, max_objects))
    while True:
        yield sample_scene(rng, image_size=image_size, max_objects=max_objects,
                           allow_held_out=novel, require_held_out=novel)


def make_split(name: Literal["train", "val", "test"], n: int, seed: int, *, novel: bool = False,
               image_size: int = 64, max_objects: int = 3) -> list[Scene]:
    """The first n scenes of a split. train, and val/test with novel=False (their "seen"
    part), hold no purple triangle or orange square; val/test with novel=True: every scene
    holds at least one. Deterministic from (name, seed, novel, image_size, max_objects) via
    a stable hash, and prefix-stable in n."""
    stream = iter_split(name, seed, novel=novel, image_size=image_size, max_objects=max_objects)
    return [next(stream) for _ in range(n)]


def distinct_caption_scenes(scenes: Sequence[Scene], limit: Optional[int] = None) -> list[Scene]:
    """The scenes whose canonical caption has not appeared before in `scenes` (first
    occurrence kept, order kept), at most `limit` of them."""
    seen, kept = set(), []
    for scene in scenes:
        if limit is not None and len(kept) >= limit:
            break
        text = caption(scene)
        if text not in seen:
            seen.add(text)
            kept.append(scene)
    return kept


def make_gallery(name: Literal["val", "test"], n: int, seed: int, *, novel: bool = False,
                 image_size: int = 64, max_objects: int = 3) -> list[Scene]:
    """The first n scenes of the split's stream with distinct canonical captions (the
    retrieval gallery, e.g. 1,000 test scenes)."""
    stream = iter_split(name, seed, novel=novel, image_size=image_size, max_objects=max_objects)
    return distinct_caption_scenes(stream, limit=n)


def retrieval_gallery(scenes: Sequence[Scene], supersample: int = 2,
                      distinct: bool = True) -> tuple[np.ndarray, list[str], list[int]]:
    """(images uint8 (n, H, W, 3), canonical captions, text_to_image): caption j describes
    image text_to_image[j]. With distinct=True (default) scenes repeating an earlier caption
    are dropped first, so each caption has exactly one matching image."""
    if distinct:
        scenes = distinct_caption_scenes(scenes)
    return render_batch(scenes, supersample), [caption(s) for s in scenes], list(range(len(scenes)))


# -- torch datasets -----------------------------------------------------------------------


def _image(scenes: Sequence[Scene], images: Optional[np.ndarray], i: int, supersample: int):
    return images[i] if images is not None else render(scenes[i], supersample)


class CaptionDataset(Dataset):
    """One item per scene: dict(image, text, scene_index). `image` is images[i] (uint8
    H x W x 3) when a pre-rendered array is given, else the scene rendered on demand (PIL).
    With paraphrase=True the text is a paraphrase drawn from (seed, epoch, index), so it is
    fixed for a given epoch (set_epoch) and varies across epochs; else the canonical caption."""

    def __init__(self, scenes: Sequence[Scene], images: Optional[np.ndarray] = None,
                 paraphrase: bool = False, seed: int = 0, supersample: int = 2):
        if images is not None and len(images) != len(scenes):
            raise ValueError(f"images: {len(images)} for {len(scenes)} scenes")
        self.scenes, self.images, self.paraphrase, self.seed = list(scenes), images, paraphrase, seed
        self.supersample, self.epoch = supersample, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.scenes)

    def __getitem__(self, i: int) -> dict[str, Any]:
        scene = self.scenes[i]
        if self.paraphrase:
            text = paraphrases(scene, random.Random(stable_seed("caption", self.seed, self.epoch, i)))
        else:
            text = caption(scene)
        return {"image": _image(self.scenes, self.images, i, self.supersample), "text": text, "scene_index": i}


class VQADataset(Dataset):
    """Every scene expanded into its QA pairs (see `questions`): one item per pair,
    dict(image, question, answer, type, scene_index). The "no" pairs of each scene are
    drawn from (seed, index). allow_held_out=None means: allowed iff some scene holds a
    held-out pair, so training questions never name a purple triangle or orange square.
    `types` keeps only those question types."""

    def __init__(self, scenes: Sequence[Scene], images: Optional[np.ndarray] = None, seed: int = 0,
                 allow_held_out: Optional[bool] = None, types: Optional[Sequence[str]] = None,
                 supersample: int = 2):
        if images is not None and len(images) != len(scenes):
            raise ValueError(f"images: {len(images)} for {len(scenes)} scenes")
        if types is not None and set(types) - set(QUESTION_TYPES):
            raise ValueError(f"types={types!r}; expected a subset of {QUESTION_TYPES}")
        self.scenes, self.images, self.supersample = list(scenes), images, supersample
        if allow_held_out is None:
            allow_held_out = any(s.has_held_out for s in self.scenes)
        self.items: list[tuple[int, str, str, str]] = []  # (scene_index, question, answer, type)
        for i, scene in enumerate(self.scenes):
            for q, a, t in questions(scene, random.Random(stable_seed("vqa", seed, i)),
                                     allow_held_out=allow_held_out):
                if types is None or t in types:
                    self.items.append((i, q, a, t))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> dict[str, Any]:
        i, q, a, t = self.items[k]
        return {"image": _image(self.scenes, self.images, i, self.supersample), "question": q,
                "answer": a, "type": t, "scene_index": i}
