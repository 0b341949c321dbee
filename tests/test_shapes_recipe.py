"""The shapes recipe end to end on the tiny preset (stage 1, stage 2 on both LLM families,
evaluation), from the shipped backbones, through the CLI."""

import dataclasses
import json

import pytest

from blip2lab.cli import main as cli
from blip2lab.worlds.shapes import recipe


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    assert cli(["shapes", "build", "--preset", "tiny", "--out", str(out), "--quiet"]) == 0
    return out


def test_build_writes_every_stage_and_a_report(built):
    report = json.loads((built / "report.json").read_text())
    for stage in ("stage1", "opt", "t5"):
        assert (built / stage / "model.safetensors").is_file() and (built / stage / "config.json").is_file()
        assert (built / stage / "train" / "log.csv").is_file()
    for kind in ("opt", "t5"):
        ev = report[kind]["eval"]
        assert 0.0 <= ev["caption/seen"]["f1"] <= 1.0
        assert 0.0 <= ev["vqa/seen"]["accuracy"] <= 1.0 and "accuracy/color" in ev["vqa/seen"]
        assert "retrieval" not in ev  # scored on the stage-1 folder, whose heads the Q-Former still fits
    retrieval = json.loads((built / "stage1" / "eval.json").read_text())["retrieval"]
    assert retrieval == report["stage1_eval"]["retrieval"]
    assert "itm/img_r1" in retrieval and "itc/txt_r1" in retrieval
    assert report["wall_s"] >= report["total_train_s"] > 0


def test_stage_losses_fall(built):
    import csv

    for stage, loss in (("stage1", "itc_loss"), ("opt", "lm_loss"), ("t5", "lm_loss")):
        rows = list(csv.DictReader(open(built / stage / "train" / "log.csv")))
        first = sum(float(r[loss]) for r in rows[:3]) / 3
        last = sum(float(r[loss]) for r in rows[-3:]) / 3
        assert last < first, (stage, first, last)


def test_trained_model_loads_as_a_pipeline_and_answers(built):
    import blip2lab
    from blip2lab.worlds.shapes import world

    pipe = blip2lab.load(built / "opt")
    scene = world.make_split("test", 1, 0)[0]
    image = world.render(scene)
    assert isinstance(pipe.caption([image], num_beams=1)[0], str)
    assert isinstance(pipe.answer(image, "how many shapes are there?", num_beams=1)[0], str)
    assert set(pipe.match(image, world.caption(scene))) == {"itm_prob", "itm_logit", "itc_cosine"}


def test_eval_command(built, capsys):
    assert cli(["shapes", "eval", "retrieval", "--model", str(built / "stage1"), "--preset", "tiny", "--quiet"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert "itc/txt_r1" in out["retrieval"]


def test_train_on_other_backbones(tmp_path):
    # `--backbones DIR` swaps the frozen parts (here: a folder whose t5/ is a link to the
    # shipped one, as one would put a candidate T5 there); the model records where they came from.
    other = tmp_path / "backbones"
    other.mkdir()
    for name in ("vit", "opt", "t5", "bert"):
        (other / name).symlink_to(recipe.BACKBONES.resolve() / name)
    out = tmp_path / "t5"
    assert cli(["shapes", "train", "stage2", "--llm", "t5", "--preset", "tiny", "--backbones", str(other),
                "--out", str(out), "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["llm"]["name_or_path"] == str(other / "t5")
    assert config["qformer"]["init_from"] == str(other / "bert")


def test_preset_overrides_are_checked():
    assert recipe.preset_with("tiny", ["stage1_steps=7"]).stage1_steps == 7
    with pytest.raises(ValueError, match="unknown config key .stage1_stepz."):
        recipe.preset_with("tiny", ["stage1_stepz=7"])


def test_shipped_preset_is_what_the_shipped_models_recorded_and_quick_is_it_shorter():
    # scripts/ship_shapes.sh trains with `--preset shipped` (T5's stage 2 with more steps);
    # every field but the name equals models/shapes-opt's recorded preset. `--preset quick`
    # is that recipe on a smaller budget (fewer steps and scenes, a higher stage-1 lr for the
    # shorter run, bf16): every other field equal.
    recorded = json.loads((recipe.BACKBONES.parent / "shapes-opt" / "recipe.json").read_text())["preset"]
    recorded.setdefault("precision", "no")  # recorded before the field existed: they trained in fp32
    recorded.setdefault("stage2_prefix_lm", 0.0)  # likewise: "a photo of" -> caption
    recorded.setdefault("stage2_paraphrases", False)  # likewise: the canonical caption
    recorded.setdefault("visual_prompt_norm", "none")  # likewise: the paper's prompt
    recorded.setdefault("stage1_partial_captions", 0.0)  # likewise: whole-scene paraphrases only
    shipped = dataclasses.asdict(recipe.PRESETS["shipped"])
    assert {k: v for k, v in shipped.items() if k != "name"} == {
        k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items() if k != "name"}
    quick = dataclasses.asdict(recipe.PRESETS["quick"])
    budgets = {"name", "n_train", "stage1_steps", "stage1_lr", "stage2_steps", "precision"}
    assert {k: v for k, v in quick.items() if k not in budgets} == {k: v for k, v in shipped.items() if k not in budgets}
    assert quick["stage1_steps"] < shipped["stage1_steps"] and quick["stage2_steps"] < shipped["stage2_steps"]
    assert quick["n_train"] < shipped["n_train"]


def test_stage1_siblings_share_a_batch():
    import torch

    scenes = recipe.with_siblings(recipe.world.make_split("train", 8, 0), seed=0)
    data = recipe.Stage1Data(torch.zeros(16, 3, 4), scenes, seed=0, siblings=True)
    assert len(data) == 8
    original, sibling = data[2]
    assert (original["image_id"], sibling["image_id"]) == (2, 10)
    a, b = scenes[2], scenes[10]
    assert sorted(o.as_tuple()[:3] for o in a.objects) == sorted(o.as_tuple()[:3] for o in b.objects)
    assert recipe.world.caption(a) != recipe.world.caption(b)
    preset = recipe.preset_with("tiny", ["stage1_siblings=true", "stage1_batch=8"])
    processor = recipe.processor_for(recipe.shapes_config(None, preset), recipe.BACKBONES)
    batch = recipe.stage1_stream(torch.zeros(16, 3, 4), scenes, preset, processor, seed=0)(0)
    assert batch["image_embeds"].shape[0] == 8  # 4 (original, sibling) pairs
    ids = batch["image_ids"].tolist()
    assert sorted(i % 8 for i in ids[0::2]) == sorted(i % 8 for i in ids[1::2]) and all(i >= 8 for i in ids[1::2])


def test_stage1_partial_captions_mark_every_scene_they_are_true_of(built, tmp_path):
    import torch

    scenes = recipe.with_siblings(recipe.world.make_split("train", 40, 0), seed=0)
    data = recipe.Stage1Data(torch.zeros(80, 3, 4), scenes, seed=0, siblings=True, partial=0.5)
    items = [it for i in range(len(data)) for it in data[i]]
    assert all(recipe.world.describes(it["text"], scenes[it["image_id"]]) for it in items)
    partial = sum(recipe.world.parse_caption(it["text"]) != scenes[it["image_id"]].tuples() for it in items)
    assert 20 <= partial <= 60  # about half of 80, some of them the whole scene by chance
    with pytest.raises(ValueError, match="stage1_partial_captions"):
        recipe.Stage1Data(torch.zeros(80, 3, 4), scenes, partial=1.5)

    preset = recipe.preset_with("tiny", ["stage1_siblings=true", "stage1_batch=16", "stage1_partial_captions=0.5"])
    processor = recipe.processor_for(recipe.shapes_config(None, preset), recipe.BACKBONES)
    batch = recipe.stage1_stream(torch.zeros(80, 3, 4), scenes, preset, processor, seed=0)(0)
    true_of = batch["text_true_of"]  # (16, 16)
    assert true_of.shape == (16, 16) and true_of.diagonal().all() and true_of.sum() > 16
    assert "text_true_of" not in recipe.stage1_stream(torch.zeros(80, 3, 4), scenes,
                                                      recipe.preset_with("tiny", ["stage1_siblings=true"]),
                                                      processor, seed=0)(0)  # the shipped path: unchanged
    assert recipe.text_true_of(["a red circle", "a blue square"], [
        recipe.world.Scene([recipe.world.place_object("circle", "red", "small", "top", "left")])] * 2).tolist() == [
        [True, True], [False, True]]

    # Stage 1 continued from a stage-1 folder, with partial descriptions: one step, and it says where it began.
    out = tmp_path / "partial"
    assert cli(["shapes", "train", "stage1", "--stage1", str(built / "stage1"), "--preset", "tiny", "--set",
                "stage1_steps=1", "warmup=1", "stage1_partial_captions=0.5", "--out", str(out), "--quiet"]) == 0
    record = json.loads((out / "recipe.json").read_text())
    assert record["init"] == str(built / "stage1") and record["preset"]["stage1_partial_captions"] == 0.5


def test_question_aware_stage2_masks_captions_out_and_answers(built, tmp_path):
    """stage2_qformer_question: VQA items give their question to the Q-Former; a caption
    item's question row is masked whole, so its queries are exactly the no-text pass."""
    import torch

    import blip2lab
    from blip2lab.worlds.shapes import world

    preset = recipe.preset_with("tiny", ["stage2_qformer_question=true", "stage2_steps=3"])
    config = recipe.shapes_config("opt", preset)
    assert config.qformer_question and not recipe.shapes_config(None, preset).qformer_question
    model, proc = recipe.build_model(config).eval(), recipe.processor_for(config)
    scene = world.make_split("train", 1, 0)[0]
    image = model.encode_image(proc.images([world.render(scene)] * 2))  # (2, N, D_v)
    batch = recipe.stage2_collate(proc, qformer_question=True)(
        [{"image_embeds": image[0], "question": None, "answer": world.caption(scene)},
         {"image_embeds": image[1], "question": "how many shapes are there?", "answer": "one"}])
    assert batch["question_mask"][0].sum() == 0 and batch["question_mask"][1].sum() > 2
    with torch.no_grad():
        asked = model.query_outputs(image, batch["question_ids"], batch["question_mask"])  # (2, Q, D_q)
        plain = model.query_outputs(image)
    torch.testing.assert_close(asked[0], plain[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(asked[1], plain[1], atol=1e-4)

    pipe, _ = recipe.train_stage2(tmp_path / "opt-q", built / "stage1", "opt", preset, progress=False)
    loaded = blip2lab.load(tmp_path / "opt-q")
    assert loaded.model.config.qformer_question
    answer = loaded.answer(world.render(scene), "how many shapes are there?", num_beams=1)
    assert answer == pipe.answer(world.render(scene), "how many shapes are there?", num_beams=1)


def test_same_seed_same_weights_whatever_the_global_rng(built, tmp_path):
    """Both stages seed the init of their fresh parts: a rerun gives the same bits (before,
    the LLM projection and the stage-1 heads drew from whatever the global RNG held)."""
    import torch

    from blip2lab.formats.native import read_safetensors

    preset = recipe.preset_with("tiny", ["stage1_steps=2", "stage2_steps=2"])
    runs = []
    for state in (1, 2):
        torch.manual_seed(state)
        recipe.train_stage1(tmp_path / f"s1-{state}", preset, progress=False)
        torch.manual_seed(state)
        recipe.train_stage2(tmp_path / f"opt-{state}", built / "stage1", "opt", preset, progress=False)
        runs.append([read_safetensors(tmp_path / f"{run}-{state}" / "model.safetensors") for run in ("s1", "opt")])
    for first, second in zip(*runs):
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
