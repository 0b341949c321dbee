"""The notebooks' measurements (blip2lab.worlds.shapes.analysis), the ablation runners
(blip2lab.worlds.shapes.ablations) on a micro preset, and the tiny official-layout checkpoints
(blip2lab.worlds.shapes.official_demo)."""

import csv
import json
import random

import numpy as np
import pytest
import torch
from conftest import tiny_config

import blip2lab
from blip2lab.model import summary
from blip2lab.model.blip2 import Blip2
from blip2lab.worlds.shapes import ablations as A
from blip2lab.worlds.shapes import analysis, world
from blip2lab.worlds.shapes import recipe as R

MICRO = R.preset_with("tiny", ["n_train=32", "stage1_steps=2", "stage2_steps=2", "stage1_batch=8",
                               "stage2_batch=8", "n_eval=2", "gallery=8", "k_test=2", "warmup=1"])


def test_box_cover_counts_patch_area_inside_the_box():
    cover = analysis.box_cover((8, 8, 16, 16), image_size=64, grid=8)  # exactly patch (1, 1)
    assert cover[1, 1] == 1 and cover.sum() == 1
    half = analysis.box_cover((8, 8, 12, 16), image_size=64, grid=8)  # left half of it
    assert half[1, 1] == pytest.approx(0.5) and half.sum() == pytest.approx(0.5)
    assert analysis.box_cover((0, 0, 64, 64), 64, 8).sum() == pytest.approx(64)


def test_mass_in_box_against_chance():
    box = (0, 0, 32, 32)  # a quarter of the image
    mass, chance = analysis.mass_in_box(np.ones((8, 8)), box, 64)
    assert mass == pytest.approx(0.25) and chance == pytest.approx(0.25)
    heat = np.zeros((8, 8))
    heat[:4, :4] = 1.0
    assert analysis.mass_in_box(heat, box, 64)[0] == pytest.approx(1.0)
    assert analysis.mass_in_box(np.zeros((8, 8)), box, 64)[0] == 0.0
    with pytest.raises(ValueError, match="square"):
        analysis.mass_in_box(np.ones((4, 8)), box, 64)


def test_map_spread_tells_uniform_from_focused_maps():
    from blip2lab.explain import CrossAttentionMaps

    def spread(probs):  # probs (Q, g, g) -> maps of one layer and one head
        return analysis.map_spread(CrossAttentionMaps(probs[None, None], torch.zeros(1, 1, probs.shape[0]), (0,)))

    uniform = spread(torch.full((3, 10, 10), 0.01))
    assert uniform["entropy"] == pytest.approx(1.0) and uniform["top10_mass"] == pytest.approx(0.1)
    assert uniform["query_similarity"] == pytest.approx(1.0)
    spots = torch.zeros(3, 10, 10)
    for q in range(3):  # each query on its own patch
        spots[q, q, q] = 1.0
    focused = spread(spots)
    assert focused["entropy"] == pytest.approx(0.0, abs=1e-9) and focused["top10_mass"] == pytest.approx(1.0)
    assert focused["query_similarity"] == pytest.approx(0.0)


def test_query_collapse_measures_how_alike_the_queries_are():
    torch.manual_seed(0)
    model = Blip2(tiny_config()).eval()
    image = model.encode_image(torch.randn(1, 3, model.config.vision.image_size, model.config.vision.image_size))
    out = analysis.query_collapse(model.qformer, image)
    assert len(out["self_attention"]) == model.config.qformer.num_layers
    assert all(-1 <= v <= 1 for v in [out["inputs"], out["outputs"], *out["self_attention"]])
    with torch.no_grad():  # every query the same vector: identical rows and outputs
        model.qformer.query_tokens.copy_(model.qformer.query_tokens[:, :1].expand_as(model.qformer.query_tokens))
    same = analysis.query_collapse(model.qformer, image)
    assert same["inputs"] == pytest.approx(1.0) and same["outputs"] == pytest.approx(1.0)
    assert same["self_attention"] == pytest.approx([1.0] * model.config.qformer.num_layers)
    with pytest.raises(ValueError, match="one image"):
        analysis.query_collapse(model.qformer, image.expand(2, -1, -1))


def test_parameter_counts_add_up_and_know_what_is_frozen():
    model = Blip2(tiny_config())
    counts = summary.parameter_counts(model)
    assert sum(r["params"] for r in counts.values()) == sum(p.numel() for p in model.parameters())
    assert counts["frozen image encoder"]["trainable"] == 0
    assert counts["Q-Former: cross-attention (queries -> image)"]["params"] > 0
    assert "other" not in counts and "Q-Former: other" not in counts


def test_trace_shapes_follows_a_forward_pass():
    model = Blip2(tiny_config())
    pixels = torch.randn(2, 3, 32, 32)
    records = summary.trace_shapes(model, lambda: model.encode_image(pixels), depth=2)
    shapes = dict((name, shape) for name, _, shape in records)
    assert shapes["ln_vision"] == (2, 17, 24)  # 1 + (32/8)^2 tokens, width 24
    assert not any(name.startswith("image_encoder.") for name in shapes)


def test_altered_scene_changes_one_fact():
    rng = random.Random(0)
    for scene in world.make_split("test", 30, 0):
        other = analysis.altered_scene(scene, rng)
        a, b = scene.tuples(), other.tuples()
        assert len(a) == len(b) and a != b
        diffs = sum(x != y for ox, oy in zip(sorted(a), sorted(b)) for x, y in zip(ox, oy))
        assert diffs >= 1
        assert analysis.shared_attributes(scene, scene) == {"occupancy": 1.0, "shape": 1.0, "color": 1.0,
                                                              "size": 1.0}


def test_image_neighbours_find_the_copy():
    from blip2lab.worlds.shapes.vision_backbone import load_shapes_vision

    scenes = world.make_split("test", 6, 0)
    idx, cos = analysis.image_neighbours(load_shapes_vision(R.BACKBONES / "vit"), scenes + scenes[:1], k=2)
    assert int(idx[0, 0]) == 6 and float(cos[0, 0]) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="pool"):
        analysis.image_neighbours(load_shapes_vision(R.BACKBONES / "vit"), scenes, pool="max")


@pytest.fixture(scope="module")
def stage1_run():
    torch.set_num_threads(1)
    return A.run_stage1(MICRO, seed=0)


def test_localisation_rows(stage1_run):
    scenes = [s for s in world.make_split("test", 6, 0) if len(s.objects) >= 2][:2]
    rows = analysis.localisation(stage1_run.pipe, scenes)
    assert rows
    for r in rows:
        for k in ("xattn_max_query", "xattn_mean_query", "chance", "gradcam_name", "gradcam_phrase"):
            assert 0.0 <= r[k] <= 1.0 + 1e-6, (k, r[k])
        assert r["xattn_max_query"] >= r["xattn_mean_query"] - 1e-9
    summary = analysis.summarise_localisation(rows)
    assert summary["chance"]["n"] == len(rows)


def test_figure5_from_a_stage1_folder_starts_from_its_weights(stage1_run, tmp_path):
    """The live notebook's Figure 5: every seed's stage 2 starts from a saved stage-1 folder
    (models/shapes-stage1 there), the same weights as the run that was saved."""
    stage1_run.pipe.save(tmp_path / "stage1")
    start = A.Trained.from_folder(tmp_path / "stage1").state_dict()
    for k, v in A.Trained.of(stage1_run).state_dict().items():
        assert torch.equal(start[k], v), k
    model, _ = A.stage2_model(MICRO, "opt", A.Trained.from_folder(tmp_path / "stage1"))
    assert torch.equal(model.state_dict()["qformer.query_tokens"], start["qformer.query_tokens"])
    rows = A.figure5(tmp_path, MICRO, seeds=(0, 1), kinds=("opt",), eval_at=(2,), n_eval=2, verbose=False,
                     stage1_from=tmp_path / "stage1")
    assert [(r["seed"], r["stage1"]) for r in rows] == [(0, True), (0, False), (1, True), (1, False)]


def test_ablation_runners_write_their_rows(stage1_run, tmp_path):
    assert len(stage1_run.history) == MICRO.stage1_steps
    rows = A.figure5(tmp_path, MICRO, seeds=(0,), kinds=("opt",), eval_at=(1, 2), n_eval=2, verbose=False)
    assert [(r["stage1"], r["step"]) for r in rows] == [(True, 1), (True, 2), (False, 1), (False, 2)]
    assert all(0.0 <= r["vqa"] <= 1.0 and 0.0 <= r["caption_f1"] <= 1.0 for r in rows)
    saved = json.loads((tmp_path / "figure5.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows)) and saved["preset"]["stage2_steps"] == 2
    assert len(list(csv.DictReader(open(tmp_path / "figure5.csv")))) == len(rows)

    rows = A.table6(tmp_path, MICRO, seeds=(0,), loss_sets={"ITC": ("itc",), "ITC+ITM": ("itc", "itm")},
                    verbose=False)
    assert [r["losses"] for r in rows] == ["ITC", "ITC+ITM"]
    assert "final_itm_loss" not in rows[0] and "final_itm_loss" in rows[1]
    assert all(0.0 <= r["itc/txt_r1"] <= 1.0 for r in rows)


def _untimed(rows):
    return [{k: v for k, v in r.items() if not k.endswith("_s")} for r in rows]


def test_findings_share_the_full_stage1_and_write_three_tables(tmp_path):
    """Table 6 (with the one-fact-changed gallery), Figure 5 (zero-shot VQA by type) and its
    VQA-items variant in one run, the full stage 1 of each seed serving all three."""
    out = A.findings(tmp_path, MICRO, seeds=(0,), kinds=("opt",), eval_at=(2,), n_eval=2, verbose=False)
    assert [r["losses"] for r in out["table6"]] == list(A.LOSS_SETS)
    assert all(0 <= r["hard/itm/img_r1"] <= 1 and 0 <= r["itc/txt_r1"] <= 1 for r in out["table6"])
    for name in ("figure5", "figure5_vqa"):
        assert {(r["stage1"], r["step"]) for r in out[name]} == {(True, 2), (False, 2)}
        assert all("vqa/count" in r and "caption_f1" in r for r in out[name])
        assert json.loads((tmp_path / f"{name}.json").read_text())["rows"] == json.loads(json.dumps(out[name]))
    saved = json.loads((tmp_path / "figure5_vqa.json").read_text())
    assert saved["preset"]["stage2_vqa_fraction"] == 0.5 and saved["command"] == "called from Python"
    assert len(saved["timings"]) == 3 + 4 and all(t.get("stage1_s", t.get("stage2_s", -1)) >= 0 for t in saved["timings"])


def test_two_workers_give_the_rows_of_one_process(stage1_run, tmp_path):
    """The sweeps' jobs in two spawned processes: the same rows (timings aside) as in this one."""
    kw = dict(seeds=(0, 1), verbose=False)
    fig_one = A.figure5(tmp_path / "one", MICRO, kinds=("opt",), eval_at=(2,), n_eval=2, **kw)
    A._RESULTS.clear()  # else the second sweep takes the first one's finished jobs
    fig_two = A.figure5(tmp_path / "two", MICRO, kinds=("opt",), eval_at=(2,), n_eval=2, workers=2, **kw)
    assert _untimed(fig_two) == _untimed(fig_one) and len(fig_one) == 4
    saved = json.loads((tmp_path / "two" / "figure5.json").read_text())
    assert saved["workers"] == 2 and [t["seed"] for t in saved["timings"]] == [0, 0, 0, 1, 1, 1]
    sets = {"ITC": ("itc",), "ITC+ITM": ("itc", "itm")}
    tab_one = A.table6(tmp_path / "one", MICRO, loss_sets=sets, **kw)
    A._RESULTS.clear()
    tab_two = A.table6(tmp_path / "two", MICRO, loss_sets=sets, workers=2, **kw)
    assert _untimed(tab_two) == _untimed(tab_one)
    assert [(r["losses"], r["seed"]) for r in tab_two] == [("ITC", 0), ("ITC", 1), ("ITC+ITM", 0), ("ITC+ITM", 1)]


def test_a_finished_job_is_not_run_again(tmp_path):
    """The encoder sweep's shipped-tower model is the query sweep's 8-query model: taken, not retrained."""
    A._RESULTS.clear()
    q_rows = A.queries(tmp_path, MICRO, counts=(MICRO.num_queries,), verbose=False)
    e_rows = A.encoders(tmp_path, MICRO, tmp_path / "work", pretrain_steps=(), probe_scenes=(40, 20), verbose=False)
    assert len(e_rows) == 1 and e_rows[0]["encoder"] == "600 steps (shipped)"
    assert {k: e_rows[0][k] for k in q_rows[0] if k != "num_queries"} == {k: v for k, v in q_rows[0].items()
                                                                         if k != "num_queries"}
    calls = []
    done = A._submit(A._Here(), lambda *a: calls.append(a), 1)  # a new job runs...
    again = A._submit(A._Here(), lambda *a: calls.append(a), 1)  # ...and the same one (same name, arguments) not
    assert calls == [(1,)] and done.result() is again.result() is None


def test_trained_weights_start_stage2_like_the_run(stage1_run):
    sent = A.Trained.of(stage1_run)
    assert not any(k.startswith("image_encoder.") for k in sent.state_dict())
    a, _ = A.stage2_model(MICRO, "opt", stage1_run, seed=0)
    b, _ = A.stage2_model(MICRO, "opt", sent, seed=0)
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


def test_stage2_from_stage1_keeps_the_stage1_qformer(stage1_run):
    model, _ = A.stage2_model(MICRO, "opt", stage1_run, seed=0)
    ours, theirs = model.state_dict(), stage1_run.pipe.model.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs if k.startswith("qformer."))
    fresh, _ = A.stage2_model(MICRO, "opt", None, seed=0)
    assert not torch.equal(fresh.state_dict()["qformer.query_tokens"], theirs["qformer.query_tokens"])


def test_mean_sd():
    assert A.mean_sd([1.0, 3.0]) == (2.0, pytest.approx(2 ** 0.5))
    assert A.mean_sd([5.0]) == (5.0, 0.0)


def test_tiny_official_checkpoints_load_like_official_ones(tmp_path):
    from blip2lab.worlds.shapes.official_demo import tiny_official_checkpoints

    gen, itm, ids = tiny_official_checkpoints(tmp_path)
    assert json.loads((gen / "config.json").read_text())["architectures"] == ["Blip2ForConditionalGeneration"]
    pipe = blip2lab.load(gen, retrieval=itm, **ids)
    image = world.render(world.make_split("test", 1, 0)[0])
    assert isinstance(pipe.caption([image], num_beams=1, max_new_tokens=4)[0], str)
    assert isinstance(pipe.answer(image, "what color is the circle?", num_beams=1, max_new_tokens=3)[0], str)
    assert set(pipe.match(image, "a red circle")) == {"itm_prob", "itm_logit", "itc_cosine"}
