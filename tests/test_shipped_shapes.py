"""The shipped shapes models (models/shapes-opt, models/shapes-t5): they load offline by name,
re-evaluate on a slice of the test split to the figures recorded beside them
(eval_slice.json, written by scripts/ship_shapes.sh with the same slice), meet the issue's
targets in their full evaluation (eval.json), and are small and documented."""

import json

import pytest

import blip2lab
from blip2lab.pipeline import MODELS_DIR
from blip2lab.worlds.shapes import recipe

SLICE = ["n_eval=24", "gallery=100"]  # the slice scripts/ship_shapes.sh records in eval_slice.json


def _close(got: dict, want: dict, tol: float, path: str = "") -> None:
    """Every number of `want` (nested dicts) matches `got` within tol; timings ignored."""
    for key, value in want.items():
        if key.endswith("_s") or key == "examples":
            continue
        if isinstance(value, dict):
            _close(got[key], value, tol, f"{path}{key}/")
        elif isinstance(value, (int, float)):
            assert abs(got[key] - value) <= tol, f"{path}{key}: got {got[key]}, recorded {value}"


@pytest.mark.parametrize("name", ["shapes-opt", "shapes-t5"])
def test_shipped_model_reevaluates_to_its_json(name):
    pipe = blip2lab.load(name)
    recorded = json.loads((MODELS_DIR / name / "eval_slice.json").read_text())
    tasks = ("caption", "vqa", "retrieval") if name == "shapes-opt" else ("caption", "vqa")
    got = recipe.evaluate(pipe, recipe.preset_with("default", SLICE), tasks=tasks)
    # Same weights, same scenes, greedy decoding: equal up to float ties on another CPU.
    _close(got, {k: v for k, v in recorded.items() if k.split("/")[0] in tasks}, tol=0.03)


def test_shipped_figures_hold_their_floor_and_retrieval_is_stage1():
    """Regression floors under what the shipped models measure. shapes-opt meets the issue's
    three targets (caption object F1 >= 0.95: 0.984; VQA >= 0.90: 0.986; t->i R@1 >= 0.80 over
    1,000 scenes: 0.962); so does shapes-t5 (0.957, 0.980; its "where" 0.948, hence a lower
    floor there). The stage-2 models score retrieval with the linked stage-1 model, so their
    figures are its figures."""
    stage1 = json.loads((MODELS_DIR / "shapes-stage1" / "eval.json").read_text())["retrieval"]
    assert stage1["itc/img_r1"] >= 0.80 and stage1["itc/img_r5"] >= 0.99  # the target, and below it
    for name, f1_floor, vqa_floor, count_floor, where_floor in (("shapes-opt", 0.95, 0.90, 0.95, 0.95),
                                                                ("shapes-t5", 0.95, 0.90, 0.95, 0.90)):
        ev = json.loads((MODELS_DIR / name / "eval.json").read_text())
        assert ev["caption/seen"]["f1"] >= f1_floor, (name, ev["caption/seen"]["f1"])
        assert ev["vqa/seen"]["accuracy"] >= vqa_floor and ev["vqa/seen"]["accuracy/count"] >= count_floor
        assert ev["vqa/seen"]["accuracy/where"] >= where_floor  # positions: 0.19 before the position-carrying ViT
        assert ev["retrieval"] == stage1
        assert json.loads((MODELS_DIR / name / "pipeline.json").read_text()) == {"retrieval": "../shapes-stage1"}


def test_shipped_models_are_small_and_documented():
    # The shapes world's weights (its backbones and BLIP-2 models) within issue 4's 40 MB, plus
    # the 4.7 MB of shapes-stage1-partial, the app's search model (43.1 MB in all);
    # mini-real has its own 60 MB bound (tests/test_shipped_minireal.py).
    total = sum(f.stat().st_size for f in MODELS_DIR.rglob("*.safetensors")
                if f.relative_to(MODELS_DIR).parts[0] != "mini-real")
    assert total <= 45e6
    for name in ("shapes-stage1", "shapes-stage1-partial", "shapes-opt", "shapes-t5"):
        recipe_file = json.loads((MODELS_DIR / name / "recipe.json").read_text())
        assert "ship_shapes.sh" in recipe_file["command"] and recipe_file["seed"] == 0
