"""The app's handlers called directly (no server), tab by tab (the modules of app/): chat
turns and their history format, who answered and what it cannot know, decoding controls,
caption and maps, Grad-CAM, search with both rankings, the gallery, the scene composer, the
per-session model choice, refusals on the page (a toast, the outputs untouched), and bad
input of every kind the issue names.

Runs on the shipped shapes-opt when it is there, else on a tiny random pipeline
(tests/app_fixture.py): nothing here depends on the answers being right."""

import sys
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
import torch
from app_fixture import ROOT, build_tiny_shapes_pipeline, model_for_tests
from PIL import Image

sys.path.insert(0, str(ROOT))  # the app/ package lives at the repository root, beside app.py
from app import caption as caption_tab  # noqa: E402
from app import chat as chat_tab  # noqa: E402
from app import composer, server  # noqa: E402
from app import model as model_tab  # noqa: E402
from app import search as search_tab  # noqa: E402
from app.search import DIRECTIONS  # noqa: E402
from blip2lab import routing  # noqa: E402
from blip2lab.pipeline import PRESETS, VQA_DECODING, decoding_config  # noqa: E402
from blip2lab.search.gallery import Gallery  # noqa: E402
from blip2lab.worlds.shapes import world  # noqa: E402

torch.set_num_threads(1)
ASSETS = ROOT / "assets" / "examples"
DECODING = ["beam search", 5, 10, 0, 1.0, 0.9, -1.0, 1.0, 0]
GALLERY_SIZE = 30


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    model = model_for_tests(tmp_path_factory.mktemp("model"))
    out = server.setup(server.Settings(model=model, models=(model,), gallery_size=GALLERY_SIZE))
    assert server.SEARCH.ready.wait(60) and server.SEARCH.error is None
    return out


def turn(message, state, *decoding, model=None):
    """chat() -> (messages, prompt, state), the page's view of one turn."""
    answer, by, prompt, messages, state = chat_tab.chat(message, state, model, *(decoding or DECODING))
    return messages, prompt, state


@pytest.fixture
def files(tmp_path):
    scene = world.Scene([world.place_object("triangle", "green", "small", "top", "middle")])
    out = {"scene": tmp_path / "scene.png", "grey": tmp_path / "grey.png", "rgba": tmp_path / "rgba.png",
           "text": tmp_path / "notes.png", "corrupt": tmp_path / "corrupt.png", "huge": tmp_path / "huge.png"}
    world.render(scene).save(out["scene"])
    world.render(scene).convert("L").save(out["grey"])
    world.render(scene).convert("RGBA").save(out["rgba"])
    out["text"].write_text("not an image")
    out["corrupt"].write_bytes(out["scene"].read_bytes()[:100])
    Image.new("1", (7000, 7000)).save(out["huge"])  # 49 M pixels > the app's 40 M
    return {k: str(v) for k, v in out.items()}


def answer_of(messages):
    return messages[-1]["content"].split("\n\n<sub>")[0]


def test_chat_turns_use_the_reference_history_format(loaded, files):
    state = chat_tab.new_chat()
    answer, by, prompt, messages, state = chat_tab.chat({"text": "what color is the triangle?",
                                                         "files": [files["scene"]]}, state, None, *DECODING)
    assert prompt == "Question: what color is the triangle? Answer:"
    a1 = state["turns"][0][1]
    assert answer == a1 and by.startswith(f"answered by {loaded.name}") and state["turns"][0][2] == by
    assert messages[0]["content"] == {"path": files["scene"]} and messages[-1]["role"] == "assistant"
    assert messages[-1]["content"] == f"{a1 or '(an empty answer)'}\n\n<sub>{by}</sub>"  # the model beside it
    messages, prompt, state = turn({"text": "where is it?", "files": []}, state)
    assert prompt == f"Question: what color is the triangle? Answer: {a1}. Question: where is it? Answer:"
    assert loaded.pipe.processor.chat_prompt([("what color is the triangle?", a1)], "where is it?") == prompt
    assert len(messages) == 5

    messages, box, state = chat_tab.chat_undo(state)
    assert len(state["turns"]) == 1 and box == {"text": "where is it?", "files": []} and len(messages) == 3
    messages, prompt, state, seed = chat_tab.chat_retry(state, None, *DECODING)
    assert len(state["turns"]) == 1 and seed == 0 and prompt == "Question: what color is the triangle? Answer:"
    messages, prompt, state, seed = chat_tab.chat_retry(state, None, "nucleus sampling", *DECODING[1:])
    assert seed == 1  # sampling draws again

    # A new image starts a new conversation; an image alone asks for a question.
    messages, prompt, state = turn({"text": "", "files": [str(ASSETS / "red-circle.png")]}, state)
    assert state["turns"] == [] and prompt == "" and len(messages) == 1
    assert chat_tab.chat_clear()[-1] == chat_tab.new_chat()


def test_answers_say_who_answered_and_what_it_never_saw(loaded, files):
    note = chat_tab.answer_note("shapes-opt", "is there a purple triangle?", True)
    assert note.startswith("answered by shapes-opt") and "never saw a purple triangle" in note
    assert "never saw" not in chat_tab.answer_note("shapes-opt", "is there a red circle?", True)
    assert "never saw" not in chat_tab.answer_note("mini-real", "is there a purple triangle?", False)
    photo = chat_tab.answer_note(routing.PHOTO_MODEL, "what is it?", False, "shapes-opt")
    assert "instead of shapes-opt" in photo and "cannot count" in photo and "cut at" not in photo
    assert "cut at 10 new tokens" in chat_tab.answer_note(routing.PHOTO_MODEL, "what is it?", False, cut_at=10)
    _, by, _, messages, _ = chat_tab.chat({"text": "is there a purple triangle?",
                                           "files": [str(ASSETS / "novel-purple-triangle.png")]}, None, None, *DECODING)
    assert loaded.name in by and ("never saw a purple triangle" in by) == loaded.is_shapes
    assert by in messages[-1]["content"]


def test_a_refusal_on_the_page_is_a_toast_and_leaves_everything_usable(loaded, files):
    """The page's handler never raises: a toast (gr.Warning) and gr.skip() for every output
    (no "Error" badge covering the conversation); a refused image leaves the box, the question stays."""
    state = turn({"text": "what color is the triangle?", "files": [files["scene"]]}, chat_tab.new_chat())[2]
    for name in ("text", "huge"):
        with pytest.warns(UserWarning, match="not an image|too large"):
            out = chat_tab.chat_on_page({"text": "what is it?", "files": [files[name]]}, state, None, *DECODING)
        chatbot, box, prompt, new_state = out
        assert chatbot == gr.skip() and prompt == gr.skip() and new_state == gr.skip()
        assert box == {"text": "what is it?", "files": []}  # the bad file is gone, the question kept
    with pytest.warns(UserWarning, match="Type a question"):
        out = chat_tab.chat_on_page({"text": " ", "files": []}, state, None, *DECODING)
    assert out == (gr.skip(),) * 4  # nothing to drop: the box stays as typed
    messages, box, prompt, state2 = chat_tab.chat_on_page({"text": "where is it?", "files": []}, state, None,
                                                          *DECODING)
    assert box is None and len(state2["turns"]) == 2  # and the conversation goes on
    with pytest.warns(UserWarning, match="not an image"):
        image, *rest = server.on_page(lambda *a: (gr.skip(),) + caption_tab.caption_maps(*a), 10,
                                      caption_tab._refused(9))(files["text"])
    assert image is None and rest == [gr.skip()] * 9  # the caption tab drops the bad image, keeps the rest


def test_refusals_print_no_traceback(loaded, files, caplog):
    caplog.set_level("INFO", logger="blip2lab.app")
    with pytest.raises(gr.Error):
        chat_tab.chat({"text": "what is it?", "files": [files["text"]]}, None, None, *DECODING)
    assert "refused" in caplog.text and "Traceback" not in caplog.text
    with pytest.raises(server.UserError) as raised:
        server.open_image(files["text"])
    assert raised.value.image and not raised.value.print_exception


def test_decoding_controls_map_to_blip2lab_options_and_grey_out(loaded):
    beam = chat_tab.decoding_options("beam search", 3, 12, 2, 0.7, 0.8, 0.5, 1.2, 9)
    cfg = decoding_config(VQA_DECODING, **beam)
    assert (cfg.strategy, cfg.num_beams, cfg.max_new_tokens, cfg.min_new_tokens, cfg.length_penalty,
            cfg.repetition_penalty) == ("beam", 3, 12, 2, 0.5, 1.2)
    greedy = decoding_config(VQA_DECODING, **chat_tab.decoding_options("beam search", 1, 5, 0, 1, 1, 1, 1, 0))
    assert greedy.strategy == "greedy"
    nucleus = decoding_config(VQA_DECODING,
                              **chat_tab.decoding_options("nucleus sampling", 3, 12, 20, 0.7, 0.8, 0.5, 1.2, 9))
    assert (nucleus.strategy, nucleus.top_p, nucleus.temperature, nucleus.seed, nucleus.min_new_tokens) == (
        "sample", 0.8, 0.7, 9, 12)  # min length never above max
    beams, length_penalty, temperature, top_p, seed = chat_tab.decoding_interactivity("beam search")
    assert beams["interactive"] and length_penalty["interactive"]
    assert not (temperature["interactive"] or top_p["interactive"] or seed["interactive"])
    beams, length_penalty, temperature, top_p, seed = chat_tab.decoding_interactivity("nucleus sampling")
    assert not (beams["interactive"] or length_penalty["interactive"])
    assert temperature["interactive"] and top_p["interactive"] and seed["interactive"]
    with pytest.raises(gr.Error):
        chat_tab.decoding_options("telepathy", 1, 1, 0, 1, 1, 1, 1, 0)


def test_bad_images_get_friendly_errors(loaded, files):
    for name, match in (("text", "not an image"), ("corrupt", "not an image"), ("huge", "too large")):
        with pytest.raises(gr.Error, match=match):
            turn({"text": "what is it?", "files": [files[name]]}, chat_tab.new_chat())
        with pytest.raises(gr.Error, match=match):
            caption_tab.caption_maps(files[name])
    with pytest.raises(gr.Error, match="Add an image"):
        turn({"text": "what is it?", "files": []}, chat_tab.new_chat())
    with pytest.raises(gr.Error, match="Add an image"):
        caption_tab.caption_maps(None)
    for name in ("grey", "rgba"):
        assert server.open_image(files[name]).mode == "RGB"
        _, prompt, state = turn({"text": "what shape is on the top middle?", "files": [files[name]]},
                                chat_tab.new_chat())
        assert len(state["turns"]) == 1
    with pytest.warns(UserWarning, match="shapes-world scene|looks like a photo"):
        turn({"text": "", "files": [str(ASSETS / "not-a-scene.png")]}, chat_tab.new_chat())


def test_questions_empty_long_and_a_long_chat(loaded, files):
    state = turn({"text": "", "files": [files["scene"]]}, chat_tab.new_chat())[-1]
    with pytest.raises(gr.Error, match="Type a question"):
        turn({"text": "   ", "files": []}, state)
    with pytest.warns(UserWarning, match="characters"):
        _, prompt, state = turn({"text": "what " * 2000, "files": []}, state)
    assert len(state["turns"]) == 1 and prompt.endswith("Answer:")
    pipe = loaded.pipe
    limit = pipe.model.llm.model.config.max_position_embeddings
    history = [["how many shapes are there? " * 4, "one"]] * 40  # far more than the LLM reads
    long_chat = {"image": files["scene"], "turns": history}
    with pytest.warns(UserWarning, match="oldest"):
        _, prompt, state = turn({"text": "what color is it?", "files": []}, long_chat)
    assert [t[:2] for t in state["turns"][:-1]] == history and state["turns"][-1][0] == "what color is it?"
    assert prompt.startswith("Question: how many shapes") and prompt.endswith("Question: what color is it? Answer:")
    assert pipe.processor.generation_batch([prompt])["llm_ids"].shape[1] + 10 + \
        pipe.model.config.qformer.num_queries <= limit


def test_caption_maps_selectors_words_and_raw_maps(loaded):
    image = str(ASSETS / "three-shapes.png")
    caption, by, small, big, words, cam_image, info, npz, cache = caption_tab.caption_maps(image, "all", "all",
                                                                                           "mean", "all")
    cfg = loaded.pipe.model.config.qformer
    assert isinstance(caption, str) and len(small) == cfg.num_queries and f"Captioned by **{loaded.name}**" in by
    assert Image.open(small[0][0]).size == (96, 96) and Image.open(big).size == (320, 320)
    assert small[3][1] == "query 3" and "Grad-CAM" in info and "log-odds" in info
    layers = caption_tab.cross_layers(loaded)
    with np.load(npz) as raw:
        assert raw["cross_attention"].shape[:3] == (len(layers), cfg.num_heads, cfg.num_queries)
        assert list(raw["cross_attention_layers"]) == layers and str(raw["caption"]) == caption
    for layer, head, reduce, query in ((str(layers[0]), "0", "max", "2"), ("all", "all", "max", "all")):
        small2, big2 = caption_tab.redraw_maps(cache, layer, head, reduce, query)
        assert len(small2) == cfg.num_queries and Path(big2).is_file()
    with pytest.raises(gr.Error, match="out of range"):
        caption_tab.redraw_maps(cache, "all", str(cfg.num_heads), "mean", "all")
    with pytest.raises(gr.Error, match="no cross-attention"):
        caption_tab.caption_maps(image, "999")

    text = "a small green circle on the top right"
    words, cam_image, info, npz = caption_tab.gradcam(image, text, "last", word="all")
    assert [w for w, _ in words] == text.split() and max(s for _, s in words) == 1.0
    assert "the whole text" in info and "log-odds" in info
    assert caption_tab.log_odds(0.5) == 0 and abs(caption_tab.log_odds(0.962) - 3.23) < 0.01
    _, _, info, _ = caption_tab.gradcam(image, "a purple triangle")
    assert ("never saw a purple triangle" in info) == loaded.is_shapes
    cam_image2, info2 = caption_tab.pick_word({"image": Image.open(image), "maps": None, "cam": loaded.pipe.gradcam(
        image, text)}, gr.SelectData(None, {"index": 3, "value": "circle"}))
    assert "“circle”" in info2 and Path(cam_image2).is_file()
    with np.load(npz) as raw:
        assert raw["gradcam_word_maps"].shape[0] == len(text.split())
        np.testing.assert_allclose(raw["gradcam_word_scores"].sum(), 1.0, atol=1e-5)
    with pytest.raises(gr.Error, match="Type a text"):
        caption_tab.gradcam(image, "  ")


def test_search_both_ways_with_session_additions(loaded, files):
    session = search_tab.new_session_gallery()
    caption = world.caption(world.make_gallery("test", GALLERY_SIZE, seed=0)[4])
    itc_images, itm_images, table, status, hits = search_tab.search(DIRECTIONS[0], caption, None, 5, session)
    assert len(itc_images) == len(itm_images) == 5 and "ITC" in status and "ITM" in status
    assert [h["rank"] for h in hits["itc"]] == [1, 2, 3, 4, 5] == [h["rank"] for h in hits["itm"]]
    cosines = [h["itc_cosine"] for h in hits["itc"]]
    assert cosines == sorted(cosines, reverse=True)  # the left gallery: ITC's order
    scores = [h["score"] for h in hits["itm"]]
    assert scores == sorted(scores, reverse=True)  # the right one: ITM logit + cosine
    assert all(r[2].startswith(("scene:", "example:")) and 0 <= r[4] <= 1 for r in table)
    assert {r[2] for r in table} == {h["key"] for h in hits["itc"] + hits["itm"]}
    assert {r[5] for r in table} <= {"✓", "✗"} and "hold" in status
    assert [r[2] for r in table if r[1] != "-"] == [h["key"] for h in hits["itm"]]  # ITM order first
    itc_images, itm_images, table, _, _ = search_tab.search(DIRECTIONS[1], "", files["scene"], 3, session)
    assert itc_images == itm_images == [] and 3 <= len(table) <= 6

    with pytest.warns(UserWarning, match="Skipped 1 file"):
        status, session = search_tab.gallery_add([files["scene"], files["text"]], session)
    assert "Added 1 image(s)" in status and session["gallery"].num_images == 1
    status, session = search_tab.gallery_add_texts("a green triangle\n\nmy own words", session)
    assert session["gallery"].texts == ["a green triangle", "my own words"]
    _, _, table, _, _ = search_tab.search(DIRECTIONS[0], "a green triangle", None, 50, session)
    assert any(r[2].startswith("upload:") and r[5] == "" for r in table)  # 30 scenes + 6 examples + 1 upload
    _, _, table, _, _ = search_tab.search(DIRECTIONS[1], "", files["scene"], 50, session)
    assert {"a green triangle", "my own words"} <= {r[2] for r in table}
    assert search_tab.gallery_reset()[1]["gallery"].num_images == 0

    with pytest.raises(gr.Error, match="Type a text"):
        search_tab.search(DIRECTIONS[0], "", None)
    with pytest.raises(gr.Error, match="Add an image"):
        search_tab.search(DIRECTIONS[1], "", None)
    with pytest.raises(gr.Error, match="Choose one or more"):
        search_tab.gallery_add([], session)


def test_search_says_how_many_hold_it_and_flags_held_out_pairs(loaded):
    *_, status, _ = search_tab.search(DIRECTIONS[0], "a red circle", None, 5, None)
    truth = server.SEARCH.base.count_holding("a red circle")
    assert f"**{truth}** of the shared gallery's images hold 'a red circle'" in status and "never saw" not in status
    *_, status, _ = search_tab.search(DIRECTIONS[0], "a purple triangle", None, 5, None)
    assert ("never saw a purple triangle" in status) == server.SEARCH.loaded.is_shapes
    assert "**1** of the shared gallery's images" in status  # the shipped example novel-purple-triangle.png


def test_search_with_an_empty_gallery(loaded, monkeypatch):
    monkeypatch.setattr(server.SEARCH.base, "gallery", Gallery())
    with pytest.raises(gr.Error, match="no images"):
        search_tab.search(DIRECTIONS[0], "a red circle", None, 5, search_tab.new_session_gallery())
    with pytest.raises(gr.Error, match="no texts"):
        search_tab.search(DIRECTIONS[1], "", str(ASSETS / "red-circle.png"), 5, search_tab.new_session_gallery())


def test_clicking_a_result_searches_by_it(loaded):
    session = search_tab.new_session_gallery()
    *_, hits = search_tab.search(DIRECTIONS[0], "a large red circle on the top left", None, 3, session)
    for which in ("itc", "itm", "table"):
        out = search_tab._by_result(which)(hits, DIRECTIONS[0], 3, session,
                                           gr.SelectData(None, {"index": 1, "value": None}))
        direction, _, query_image, _, _, table, status, new_hits, _ = out
        assert direction == DIRECTIONS[1] and Path(query_image).is_file() and len(table) >= 3
    out = search_tab._by_result("table")(new_hits, direction, 3, session,
                                         gr.SelectData(None, {"index": [0, 1], "value": None}))
    assert out[0] == DIRECTIONS[0] and out[1] == new_hits["table"][0] and len(out[4]) == 3


def test_folder_indexing_is_local_only(loaded, files, tmp_path, monkeypatch):
    folder = tmp_path / "pictures"
    (folder / "sub").mkdir(parents=True)
    Image.open(files["scene"]).save(folder / "a.png")
    Image.open(files["grey"]).save(folder / "sub" / "b.jpg")
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    (folder / "notes.txt").write_text("skip me")
    status, session = search_tab.gallery_add_folder(str(folder), search_tab.new_session_gallery())
    assert "Indexed 2 of 3" in status and session["gallery"].num_images == 2
    with pytest.raises(gr.Error, match="not a folder"):
        search_tab.gallery_add_folder(str(folder / "missing"), search_tab.new_session_gallery())
    for settings in (server.Settings(hosted=True), server.Settings(host="0.0.0.0")):
        assert not settings.folders_allowed
        monkeypatch.setattr(server, "SETTINGS", settings)
        for path in (str(folder), "..", "../..", "/", "/etc"):
            with pytest.raises(gr.Error, match="local-only"):
                search_tab.gallery_add_folder(path, search_tab.new_session_gallery())
        with pytest.raises(gr.Error, match="local-only|not one of this server's models"):
            model_tab.select_model(str(tmp_path))


def test_scene_composer(loaded):
    cells = [["none", "red", "large"]] * 6
    cells[0] = ["circle", "red", "large"]
    cells[5] = ["square", "blue", "small"]
    path, caption, record = composer.compose_scene(*[v for c in cells for v in c])
    assert caption == "a large red circle on the top left and a small blue square on the bottom right"
    assert world.Scene.from_json(record).tuples() == world.parse_caption(caption)
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(world.render(world.Scene.from_json(record))))
    assert composer.scene_from_text(caption)[1] == caption
    assert composer.random_scene(3, False)[2] == composer.random_scene(3, False)[2]
    assert world.Scene.from_json(composer.random_scene(3, True)[2]).has_held_out
    with pytest.raises(gr.Error, match="at least one"):
        composer.compose_scene(*[v for c in [["none", "red", "large"]] * 6 for v in c])
    with pytest.raises(gr.Error, match="same cell"):
        composer.scene_from_text("a large red circle on the top left and a small blue square on the top left")
    with pytest.raises(gr.Error, match="Describe each shape"):
        composer.scene_from_text("a cat")


def test_model_tab(loaded):
    info = model_tab.model_info()
    assert loaded.name in info and "Q-Former" in info and "parameters" in info and "decoder-only LLM" in info
    header = model_tab.header_markdown()
    assert loaded.name in header and "Try this first" in header
    with pytest.raises(gr.Error, match="unknown model|not a"):
        model_tab.select_model("no-such-model")
    info, header, name, *updates = model_tab.select_model(loaded.name)
    assert name == loaded.name and loaded.name in info and len(updates) == 4 and updates[0]["choices"][0] == "all"
    assert server.model(loaded.name) is loaded  # held once, shared: a pick loads nothing again


def test_a_model_pick_is_per_session_and_hosted_servers_offer_their_list_only(loaded, monkeypatch, tmp_path):
    """Sessions pass their own model name; nothing global changes. Hosted, only the list."""
    other = model_for_tests(tmp_path)  # a second copy of the test model, under another name
    if other == loaded.name:
        other = str(build_tiny_shapes_pipeline(tmp_path / "shapes-second"))
    _, by, *_ = chat_tab.chat({"text": "how many shapes are there?", "files": [str(ASSETS / "red-circle.png")]},
                              None, other, *DECODING)
    assert by.startswith(f"answered by {server.model(other).name}")
    _, by, *_ = chat_tab.chat({"text": "how many shapes are there?", "files": [str(ASSETS / "red-circle.png")]},
                              None, None, *DECODING)
    assert by.startswith(f"answered by {loaded.name}")  # the other session's pick changed nothing here
    monkeypatch.setattr(server.SETTINGS, "hosted", True)
    with pytest.raises(gr.Error, match="not one of this server's models"):
        model_tab.select_model("Salesforce/blip2-opt-2.7b")
    assert model_tab.select_model(loaded.name)[2] == loaded.name
    # Memory stays bounded: at most max_models held, the least recently used other than the default goes.
    monkeypatch.setattr(server, "_load_pipe", lambda name, retrieval, settings: SimpleNamespace(name=name))
    models = server.Models(server.Settings(model="a", search_model="a", models=("a", "b", "c"), max_models=2))
    assert models.get("b") is models.get("b") and models.get("a").name == "a"
    models.get("c")
    assert models.held() == ["a", "c"]


def test_a_photo_sent_to_a_shapes_model_is_answered_by_mini_real(loaded):
    if not loaded.is_shapes or routing.PHOTO_MODEL not in PRESETS:  # the tiny random fallback model
        assert server.photo_model_for(loaded, Image.open(ASSETS / "not-a-scene.png").convert("RGB")) is None
        return
    scene = Image.open(ASSETS / "red-circle.png").convert("RGB")
    assert server.photo_model_for(loaded, scene) is None  # scenes stay with the shapes model
    with pytest.warns(UserWarning, match=routing.PHOTO_MODEL):
        answer, by, prompt, messages, state = chat_tab.chat(
            {"text": "what is in the picture?", "files": [str(ASSETS / "not-a-scene.png")]}, None, None,
            "beam search", 5, 40, 0, 1.0, 0.9, -1.0, 1.0, 0)
    photo = server.model(routing.PHOTO_MODEL)
    assert photo.pipe.model.config.llm.kind == "decoder" and isinstance(answer, str)
    assert by.startswith(f"answered by {routing.PHOTO_MODEL}") and f"instead of {loaded.name}" in by
    words = answer.split()
    assert len(words) < 4 or max(words.count(w) for w in set(words)) <= len(words) // 2  # no loop
    assert routing.PHOTO_MODEL in model_tab.header_markdown()
    assert "llama layout" in model_tab.llm_kind(photo) and "SmolLM2" in model_tab.llm_kind(photo)
    caption, by, *_ = caption_tab.caption_maps(str(ASSETS / "not-a-scene.png"))  # the caption tab routes too
    assert f"captioned by **{routing.PHOTO_MODEL}**" in by
    assert not any(caption.count(w) > 3 for w in caption.split())
