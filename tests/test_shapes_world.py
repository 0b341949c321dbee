"""The shapes world's contract: colours, sizes, cells and triangle orientation measured on
rendered pixels; caption grammar and parsing; questions; the held-out split rule;
determinism; datasets. All on CPU, in a few seconds."""

import io
import random
import time

import numpy as np
import pytest
from PIL import Image

from blip2lab.worlds.shapes import world as S
from blip2lab.worlds.shapes.world import place_object as obj


def lone(shape, color="red", size="small", row="top", column="left", image_size=64, **kw):
    return S.Scene([obj(shape, color, size, row, column, image_size=image_size, **kw)], image_size=image_size)


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# -- pixels -------------------------------------------------------------------------------


def test_vocabulary_constants():
    assert S.SHAPES == ("circle", "square", "triangle") and S.SIZES == ("small", "large")
    assert S.ROWS == ("top", "bottom") and S.COLUMNS == ("left", "middle", "right")
    assert S.COLORS == {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
                        "yellow": (235, 200, 30), "purple": (140, 60, 180), "orange": (245, 130, 30)}
    assert S.BACKGROUND == (245, 245, 245)
    assert S.HELD_OUT == {("purple", "triangle"), ("orange", "square")}
    assert S.NUMBER_WORDS[:4] == ("zero", "one", "two", "three")


def test_exact_colour_at_every_centre_and_background_at_corners():
    rng = random.Random(0)
    for color in S.COLORS:
        for shape in S.SHAPES:
            for size in S.SIZES:
                d = (rng.uniform(-3, 3), rng.uniform(-3, 3))
                scene = lone(shape, color, size, rng.choice(S.ROWS), rng.choice(S.COLUMNS), dx=d[0], dy=d[1])
                img = np.asarray(S.render(scene))
                assert img.shape == (64, 64, 3) and img.dtype == np.uint8
                o = scene.objects[0]
                for px, py in ((int(o.cx), int(o.cy)), (round(o.cx), round(o.cy))):
                    assert tuple(img[py, px]) == S.COLORS[color], (color, shape, size)
                bg = [(0, 0), (0, 63), (63, 0), (63, 63)]
                assert sum(tuple(img[y, x]) == S.BACKGROUND for x, y in bg) >= 3  # one may hold the shape
    random_scene = S.sample_scene(random.Random(1), min_objects=3, max_objects=3)
    img = np.asarray(S.render(random_scene))
    for o in random_scene.objects:
        assert tuple(img[int(o.cy), int(o.cx)]) == S.COLORS[o.color]


@pytest.mark.parametrize("image_size", [64, 96])
def test_square_extent_and_box(image_size):
    scale = image_size / 64
    for size, across in (("small", 12), ("large", 22)):
        scene = lone("square", "blue", size, "bottom", "middle", image_size=image_size, dx=0.3, dy=-0.7)
        img = np.asarray(S.render(scene))
        ink = np.any(img != S.BACKGROUND, axis=-1)
        cols, rows = np.flatnonzero(ink.any(axis=0)), np.flatnonzero(ink.any(axis=1))
        width, height = cols[-1] - cols[0] + 1, rows[-1] - rows[0] + 1
        assert abs(width - across * scale) <= 1 and abs(height - across * scale) <= 1, (size, width, height)
        x0, y0, x1, y1 = scene.objects[0].box
        assert x1 - x0 == pytest.approx(across * scale) and y1 - y0 == pytest.approx(across * scale)
        # the box is the drawn extent: ink lies within it, to the pixel
        assert cols[0] >= np.floor(x0) and cols[-1] < np.ceil(x1)
        assert rows[0] >= np.floor(y0) and rows[-1] < np.ceil(y1)


def test_centres_stay_in_their_cells_and_shapes_inside_the_image():
    for scene in S.make_split("val", 300, 3, max_objects=6):
        for o in scene.objects:
            r, c = o.cell
            assert abs(o.cx - (c + 0.5) * 64 / 3) <= 3.5 and abs(o.cy - (r + 0.5) * 32) <= 3.5
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 and 0 <= y0 and x1 <= 64 and y1 <= 64
            assert (o.cx, o.cy) == pytest.approx(((x0 + x1) / 2, (y0 + y1) / 2))


def test_triangle_points_up():
    img = np.asarray(S.render(lone("triangle", "green", "large", "top", "middle")))
    ink = np.any(img != S.BACKGROUND, axis=-1)
    widths = ink.sum(axis=1)
    rows = np.flatnonzero(widths)
    top, bottom = widths[rows[:4]], widths[rows[-4:]]
    assert top.max() < bottom.min() and np.all(np.diff(widths[rows[1:-1]]) >= 0)
    assert widths[rows[-1]] >= 20  # the base spans (nearly) the full 22 px


def test_render_batch_matches_render_and_speed():
    scenes = S.make_split("train", 500, 0)
    start = time.perf_counter()
    batch = S.render_batch(scenes)
    seconds = time.perf_counter() - start
    print(f"render_batch: {len(scenes) / seconds:.0f} images/s (64 px, supersample 2)")
    assert batch.shape == (500, 64, 64, 3) and batch.dtype == np.uint8
    for i in (0, 17, 499):
        assert np.array_equal(batch[i], np.asarray(S.render(scenes[i])))


# -- captions -----------------------------------------------------------------------------


def test_canonical_caption_and_reading_order():
    scene = S.Scene([obj("square", "blue", "large", "bottom", "right"), obj("circle", "red", "small", "top", "left")])
    assert S.caption(scene) == "a small red circle on the top left and a large blue square on the bottom right"
    scene = S.Scene([obj("triangle", "yellow", "small", "bottom", "left"), obj("circle", "green", "large", "top", "right"),
                     obj("square", "orange", "small", "top", "middle")])
    assert S.caption(scene) == ("a small orange square on the top middle and a large green circle on the top right"
                                " and a small yellow triangle on the bottom left")


def test_parse_recovers_canonical_and_paraphrases():
    rng = random.Random(0)
    for scene in S.make_split("test", 200, 0, max_objects=4):
        assert S.parse_caption(S.caption(scene)) == scene.tuples()
        for template in S.PARAPHRASE_TEMPLATES:
            text = S.paraphrases(scene, rng, template)
            assert sorted(S.parse_caption(text)) == sorted(scene.tuples()), (template, text)
            words = text.replace(",", " ").replace(";", " ").replace(":", " ").replace("(", " ").replace(")", " ")
            assert set(words.split()) <= set(S.VOCABULARY), text
        assert S.caption_f1(S.caption(scene), scene)["f1"] == 1.0


def test_parse_is_tolerant():
    text = "A small red circle on the top left, and then a blue square on the bottom right and a large green thing"
    assert S.parse_caption(text) == [("small", "red", "circle", "top", "left")]
    partial = S.parse_objects_partial(text)
    assert partial[1] == {"size": None, "color": "blue", "shape": "square", "row": "bottom", "column": "right"}
    assert partial[2]["size"] == "large" and partial[2]["shape"] is None
    assert S.parse_caption("") == [] and S.parse_caption("nothing to see here") == []
    # two objects run together without a separator still split
    assert len(S.parse_caption("a small red circle on the top left a large blue square on the bottom right")) == 2
    scene = S.Scene([obj("circle", "red", "small", "top", "left"), obj("square", "blue", "large", "bottom", "right")])
    f1 = S.caption_f1("a small red circle on the top left and a small green circle on the top right", scene)
    assert f1 == {"precision": 0.5, "recall": 0.5, "f1": 0.5}


# -- questions ----------------------------------------------------------------------------


def test_questions_for_a_hand_built_scene():
    scene = S.Scene([obj("circle", "red", "small", "top", "left"), obj("circle", "blue", "large", "top", "right"),
                     obj("square", "blue", "small", "bottom", "middle")])
    qa = S.questions(scene, random.Random(0))
    no = [(q, a) for q, a, t in qa if t == "exists" and a == "no"]
    rest = {(q, a, t) for q, a, t in qa if not (t == "exists" and a == "no")}
    assert rest == {
        ("what color is the square?", "blue", "color"),  # not for the circle: there are two
        ("what shape is on the top left?", "circle", "shape"),
        ("what shape is on the top right?", "circle", "shape"),
        ("what shape is on the bottom middle?", "square", "shape"),
        ("what size is the red circle?", "small", "size"),
        ("what size is the blue circle?", "large", "size"),
        ("what size is the blue square?", "small", "size"),
        ("how many shapes are there?", "three", "count"),
        ("is there a red circle?", "yes", "exists"),
        ("is there a blue circle?", "yes", "exists"),
        ("is there a blue square?", "yes", "exists"),
        ("where is the red circle?", "top left", "where"),
        ("where is the blue circle?", "top right", "where"),
        ("where is the blue square?", "bottom middle", "where"),
    }
    present = {"red circle", "blue circle", "blue square"}
    assert len(no) == 3 and len(set(no)) == 3
    assert all(q.startswith("is there a ") and q[len("is there a "):-1] not in present for q, _ in no)
    assert S.questions(scene) == S.questions(scene)  # rng None: deterministic


def test_questions_repeats_counts_and_held_out_rule():
    twin = S.Scene([obj("triangle", "red", "small", "top", "left"), obj("triangle", "red", "large", "bottom", "left")])
    qa = S.questions(twin, random.Random(0))
    types = [t for _, _, t in qa]
    assert "color" not in types and "size" not in types and "where" not in types
    assert ("how many shapes are there?", "two", "count") in qa
    assert [a for q, a, t in qa if t == "exists"].count("yes") == 1
    for n in (1, 2, 3, 4, 5, 6):
        scene = S.sample_scene(random.Random(n), min_objects=n, max_objects=n)
        assert ("how many shapes are there?", S.NUMBER_WORDS[n], "count") in S.questions(scene)
    held = {f"is there a {c} {s}?" for c, s in S.HELD_OUT}
    for i, scene in enumerate(S.make_split("train", 200, 0)):
        assert not held & {q for q, _, _ in S.questions(scene, random.Random(i), allow_held_out=False)}


# -- splits -------------------------------------------------------------------------------


def test_held_out_split_rule():
    def held(scene):
        return sum(o.combo in S.HELD_OUT for o in scene.objects)

    assert all(held(s) == 0 for s in S.make_split("train", 2000, 0))
    for name in ("val", "test"):
        assert all(held(s) == 0 for s in S.make_split(name, 300, 0))
        novel = S.make_split(name, 300, 0, novel=True)
        assert all(held(s) >= 1 for s in novel)
        assert {o.combo for s in novel for o in s.objects} >= S.HELD_OUT
    with pytest.raises(ValueError):
        S.make_split("train", 1, 0, novel=True)


def test_determinism_and_json_round_trip():
    a, b = S.make_split("val", 20, 7), S.make_split("val", 20, 7)
    assert a == b and S.make_split("val", 5, 7) == a[:5]
    assert [png_bytes(S.render(s)) for s in a] == [png_bytes(S.render(s)) for s in b]
    assert S.make_split("val", 20, 8) != a and S.make_split("test", 20, 7) != a
    assert S.make_split("val", 20, 7, novel=True) != a
    for scene in a + S.make_split("test", 10, 0, novel=True, image_size=96, max_objects=6):
        back = S.Scene.from_json(scene.to_json())
        assert back == scene and S.Scene.from_dict(scene.to_dict()) == scene
        assert png_bytes(S.render(back)) == png_bytes(S.render(scene))
    # a numpy Generator works as the rng too, deterministically
    assert S.sample_scene(np.random.default_rng(3)) == S.sample_scene(np.random.default_rng(3))


def test_validation_errors_name_the_field():
    with pytest.raises(ValueError, match="color"):
        S.ShapeObject("circle", "pink", "small", "top", "left", 10, 10, (4, 4, 16, 16))
    with pytest.raises(ValueError, match="cell"):
        S.Scene([obj("circle", "red", "small", "top", "left"), obj("square", "red", "small", "top", "left")])


# -- datasets -----------------------------------------------------------------------------


def test_datasets_and_retrieval_gallery():
    scenes = S.make_split("train", 40, 0)
    images = S.render_batch(scenes)
    lazy = S.CaptionDataset(scenes)
    item = lazy[3]
    assert len(lazy) == 40 and isinstance(item["image"], Image.Image) and item["scene_index"] == 3
    assert item["text"] == S.caption(scenes[3])
    eager = S.CaptionDataset(scenes, images, paraphrase=True, seed=1)
    item = eager[3]
    assert item["image"].shape == (64, 64, 3) and np.array_equal(item["image"], np.asarray(lazy[3]["image"]))
    assert sorted(S.parse_caption(item["text"])) == sorted(scenes[3].tuples())
    assert eager[3]["text"] == item["text"]
    assert len({eager[i]["text"] for i in range(40)} - {S.caption(s) for s in scenes}) > 0  # some paraphrased

    vqa = S.VQADataset(scenes, images)
    assert len(vqa) == sum(len(S.questions(s)) for s in scenes)
    item = vqa[0]
    assert set(item) == {"image", "question", "answer", "type", "scene_index"}
    assert {vqa[k]["type"] for k in range(len(vqa))} == set(S.QUESTION_TYPES)
    held = {f"is there a {c} {s}?" for c, s in S.HELD_OUT}
    assert not held & {vqa[k]["question"] for k in range(len(vqa))}  # train: inferred allow_held_out=False
    only_count = S.VQADataset(scenes, types=["count"])
    assert len(only_count) == 40 and isinstance(only_count[0]["image"], Image.Image)

    gallery = S.make_gallery("test", 300, 0)
    g_images, captions, text_to_image = S.retrieval_gallery(gallery)
    assert g_images.shape == (300, 64, 64, 3) and len(set(captions)) == 300 and text_to_image == list(range(300))
    dup = S.make_split("test", 300, 0)
    kept = S.distinct_caption_scenes(dup)
    assert len({S.caption(s) for s in kept}) == len(kept) == len({S.caption(s) for s in dup})


def test_rearranged_moves_objects_only():
    rng = random.Random(3)
    for _ in range(300):
        scene = S.sample_scene(rng, max_objects=rng.randint(1, 6))
        moved = S.rearranged(scene, rng)
        assert S.caption(moved) != S.caption(scene)  # positions differ, even with twin objects
        assert sorted(o.as_tuple()[:3] for o in moved.objects) == sorted(o.as_tuple()[:3] for o in scene.objects)
        assert len({o.cell for o in moved.objects}) == len(moved.objects)
    assert S.rearranged(scene, 7).to_json() == S.rearranged(scene, 7).to_json()


def test_partial_descriptions_are_true_of_their_scene_and_say_less():
    rng = random.Random(0)
    scenes = S.make_split("train", 200, seed=3)
    lengths = []
    for scene in scenes:
        text = S.partial_description(scene, rng)
        said = S.parse_objects_partial(text)
        assert S.describes(text, scene), (text, S.caption(scene))
        assert 1 <= len(said) <= len(scene.objects) and all(any(v for v in o.values()) for o in said)
        assert set(text.replace(",", "").split()) <= set(S.VOCABULARY)
        lengths.append(sum(v is not None for o in said for v in o.values()) / (5 * len(scene.objects)))
    assert 0.2 < sum(lengths) / len(lengths) < 0.7  # attributes and objects do get left out
    assert S.partial_description(scenes[0], 5) == S.partial_description(scenes[0], 5)


def test_describes_by_hand():
    scene = S.Scene([obj("circle", "red", "large", "top", "left"), obj("square", "blue", "small", "bottom", "right")])
    for text in ("a red circle", "a large shape on the top", "a blue square and a red circle", "a shape on the right",
                 S.caption(scene), S.paraphrases(scene, 0, "image_shows")):
        assert S.describes(text, scene), text
    for text in ("a blue circle", "a red circle on the bottom", "a red circle and a red circle",
                 "a small red circle", "hello", "", "a triangle"):
        assert not S.describes(text, scene), text
    assert S.describes(S.parse_objects_partial("a red circle"), scene)  # parsed once, for many scenes


def test_held_out_mentions_and_object_queries():
    assert S.held_out_mentions("is there a purple triangle?") == [("purple", "triangle")]
    assert S.held_out_mentions("a large orange square on the top left and a purple triangle") == [
        ("orange", "square"), ("purple", "triangle")]
    assert S.held_out_mentions("a purple circle and an orange triangle") == []
    queries = S.object_queries()
    assert len(queries) == 16 * 15 and "a red circle" in queries and "a purple triangle" not in queries
    assert "a purple triangle" in S.object_queries(allow_held_out=True)
    assert all(len(S.parse_objects_partial(q)) == 1 for q in queries)
