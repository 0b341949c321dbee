"""The mini-real recipe end to end at the tiny preset: clipart features cached once, stage 1
(ITC + ITM + ITG), stage 2 on SmolLM2, the shipped folder holding only the trained parts,
reloaded by name and strictly, and the evaluation functions on a slice of the test split.

Needs what `make` installs: the three backbone packages and Debian's Open Clip Art. One
tiny run (about 30 s on one thread) serves the whole module.
"""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open

import blip2lab
from blip2lab import pipeline
from blip2lab.formats import build_model
from blip2lab.formats.keys import WeightsError
from blip2lab.formats.native import REBUILT_META, WEIGHTS_NAME, load_pretrained
from blip2lab.training.feature_cache import META_NAME, FeatureCache
from blip2lab.worlds.minireal import recipe as R
from blip2lab.worlds.minireal.photos import load_photo

FROZEN = ("image_encoder.", "llm.model.", "qformer.word_embeddings.")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The tiny preset's data, stage 1 and stage 2, on one thread (the box is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("minireal")
    preset = R.PRESETS["tiny"]
    data = R.load_data(preset, out)
    _, stage1 = R.train_stage1(out, preset, seed=0, data=data, progress=False)
    cache = out / "features" / f"train-{preset.n_train}x{preset.crops}"
    written = (cache / "features.f16").stat().st_mtime_ns
    folder, stage2 = R.train_stage2(out, out / "stage1", preset, seed=0, data=data, progress=False)
    yield SimpleNamespace(out=out, preset=preset, data=data, stage1=stage1, stage2=stage2, folder=folder,
                          cache=cache, cache_written=written)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shipped(built):
    """The shipped folder loaded as users will: `blip2lab.load("mini-real")`, the name
    resolved under models/ (here pointed at the tiny run's folder)."""
    saved = dict(pipeline.PRESETS)
    pipeline.PRESETS["mini-real"] = built.folder
    try:
        yield blip2lab.load("mini-real")
    finally:
        pipeline.PRESETS.clear()
        pipeline.PRESETS.update(saved)


def _stored(folder: Path) -> tuple[dict, dict]:
    with safe_open(str(folder / WEIGHTS_NAME), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


# -- training ----------------------------------------------------------------------------


def test_features_are_cached_once_for_both_stages(built):
    cache = FeatureCache(built.cache)
    assert cache.shape == (built.preset.n_train, built.preset.crops, 50, 1280)  # (n, K, N, D_v)
    meta = json.loads((built.cache / META_NAME).read_text())
    assert meta["crop"]["hflip"] and meta["done"] == built.preset.n_train
    assert (built.cache / "features.f16").stat().st_mtime_ns == built.cache_written  # stage 2 read, never rewrote
    assert not torch.isnan(cache.features(0, 0).float()).any()


def test_stage1_losses_fall_and_stage2_trains(built):
    ends = built.stage1["history_ends"]
    assert set(ends) == {"itc_loss", "itm_loss", "itg_loss"}
    assert ends["itg_loss"]["last"] < 0.8 * ends["itg_loss"]["first"], ends
    assert sum(e["last"] for e in ends.values()) < sum(e["first"] for e in ends.values()), ends
    lm = built.stage2["history_ends"]["lm_loss"]
    assert 0 < lm["last"] < 20 and lm["first"] == lm["first"]
    log = (built.out / "logs" / "stage2" / "log.csv").read_text().splitlines()
    assert len(log) == 1 + built.preset.stage2_steps and "lm_loss" in log[0]


def test_recipe_json_records_command_seed_timings_and_memory(built):
    record = json.loads((built.folder / "recipe.json").read_text())
    assert record["seed"] == 0 and record["preset"]["name"] == "tiny" and record["stage"] == 2
    assert {"build_model", "feature_cache", "stage2_train"} <= set(record["timings_s"])
    assert record["peak_rss_mb"] > 500 and record["weights_bytes"] == (built.folder / WEIGHTS_NAME).stat().st_size
    assert record["data"]["train_images"] == built.preset.n_train


# -- what is shipped -----------------------------------------------------------------------


def test_shipped_file_holds_only_the_trained_parts(built, shipped):
    stored, meta = _stored(built.folder)
    model = shipped.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(stored) == trainable  # the model has no buffer outside the frozen parts
    assert not any(k.startswith(FROZEN) for k in stored)
    assert {"qformer.query_tokens", "ln_vision.weight", "vision_proj.weight", "itm_head.weight", "temp",
            "qformer.lm_head.dense.weight", "llm.projection.weight"} <= set(stored)
    assert set(json.loads(meta[REBUILT_META])) == set(FROZEN)
    assert all(t.dtype == torch.float16 for t in stored.values())
    size = (built.folder / WEIGHTS_NAME).stat().st_size
    assert size <= R.MAX_SHIPPED_BYTES
    n_trained = sum(t.numel() for t in stored.values())
    assert size < 2 * n_trained + 100_000  # fp16, and nothing else of size in the file
    frozen = sum(p.numel() for n, p in model.named_parameters() if n.startswith(FROZEN))
    assert frozen > 6 * n_trained  # SmolLM2, EfficientNet and the word table: all left out
    assert not (built.folder / "llm").exists()  # no LLM config to rebuild it from: the package does


def test_loop_checkpoints_hold_the_trained_parts_and_load_back(built):
    from blip2lab.formats.native import load_weights_into

    checkpoint = built.out / "logs" / "stage1" / "checkpoint"  # what `--resume` starts from
    stored, _ = _stored(checkpoint)
    assert not any(k.startswith(FROZEN) for k in stored)
    model = build_model(R.config_for(built.preset, llm=False))
    load_weights_into(model, checkpoint)
    final = load_pretrained(built.out / "stage1").state_dict()
    assert all(torch.equal(value, final[key]) for key, value in model.state_dict().items())


def test_frozen_word_embeddings_need_a_table_to_rebuild_from():
    from blip2lab.config import ConfigError, QFormerConfig

    with pytest.raises(ConfigError, match="freeze_word_embeddings"):
        QFormerConfig(freeze_word_embeddings=True)  # no init_from
    assert R.config_for(R.PRESETS["tiny"], llm=False).qformer.freeze_word_embeddings


def test_a_trainable_part_is_saved_not_left_out(built, tmp_path):
    from blip2lab.formats.native import save_pretrained

    model = load_pretrained(built.out / "stage1")
    model.qformer.word_embeddings.requires_grad_(True)  # as if they had trained
    save_pretrained(model, tmp_path / "s1", rebuild_frozen=True)
    stored, meta = _stored(tmp_path / "s1")
    assert "qformer.word_embeddings.weight" in stored
    assert set(json.loads(meta[REBUILT_META])) == {"image_encoder."}


def test_reloads_strictly_and_refuses_other_frozen_parts(built, shipped, tmp_path):
    stored, _ = _stored(built.folder)
    own = shipped.model.state_dict()
    for key, value in stored.items():
        assert torch.equal(own[key], value.float()), key
    # the rebuilt frozen parts are MiniLM's word table and the packages' towers
    assert torch.equal(shipped.model.qformer.word_embeddings.weight[:30522],
                       load_pretrained(built.out / "stage1").qformer.word_embeddings.weight[:30522])
    # a missing trained tensor is an error naming it
    broken = tmp_path / "missing"
    shutil.copytree(built.out / "stage1", broken)
    tensors, meta = _stored(broken)
    del tensors["itm_head.bias"]
    from safetensors.torch import save_file

    save_file(tensors, str(broken / WEIGHTS_NAME), metadata=meta)
    with pytest.raises(WeightsError, match="itm_head.bias"):
        load_pretrained(broken)
    # a checkpoint trained against another version of a frozen part is refused
    other = tmp_path / "other"
    shutil.copytree(built.out / "stage1", other)
    tensors, meta = _stored(other)
    meta[REBUILT_META] = json.dumps(json.loads(meta[REBUILT_META]) | {"image_encoder.": "0123456789abcdef"})
    save_file(tensors, str(other / WEIGHTS_NAME), metadata=meta)
    with pytest.raises(WeightsError, match="image_encoder.*vision.weights"):
        load_pretrained(other)


def test_captions_and_answers_a_bundled_photo(shipped):
    # Function only: how long a caption and a chat turn take is measured against transformers'
    # own decoding by benchmarks/minireal_latency.py (no timed tests: a shared CI box stretches
    # any clock; the <= 2 s goal and its figures are in benchmarks/README.md).
    photo = load_photo("chelsea")
    caption = shipped.caption(photo, max_new_tokens=16)
    assert isinstance(caption, list) and len(caption) == 1 and isinstance(caption[0], str)
    answer = shipped.answer(photo, "What is in the picture?", max_new_tokens=4)
    assert isinstance(answer, list) and len(answer) == 1 and isinstance(answer[0], str)


# -- evaluation ----------------------------------------------------------------------------


def test_names_object():
    assert R.names_object("a tabby cat on a rug", ("cat", "kitten"))
    assert R.names_object("two cats", ("cat",)) and R.names_object("a glass of coffee", ("glass",))
    assert not R.names_object("a category icon", ("cat",)) and not R.names_object("", ("cat",))
    assert R.names_object("a portrait of grace hopper", ("grace hopper",))


def test_evaluation_on_a_slice_and_its_reevaluation(built, shipped):
    results = R.evaluate(shipped, built.data, built.preset, meteor=False, photos=False)
    retrieval = results["clipart_test"]["retrieval"]
    n = built.preset.n_test
    assert retrieval["images"] == n and retrieval["texts"] >= n
    for way in ("itc", "itm"):
        for k in ("txt_r1", "txt_r5", "txt_r10", "img_r1", "img_r5", "img_r10"):
            assert 0 <= retrieval[f"{way}/{k}"] <= 1
        assert retrieval[f"{way}/txt_r10"] == 1 and retrieval[f"{way}/img_r10"] == 1  # 10 >= 4 images
    caption = results["clipart_test"]["caption"]
    assert {"Bleu_4", "CIDEr", "ROUGE_L"} <= set(caption["vs_names"]) and "METEOR" not in caption["vs_names"]
    assert len(caption["captions"]) == n
    (built.folder / "eval.json").write_text(json.dumps(results))
    saved, fresh = R.reevaluate_slice(built.folder, built.preset)
    assert len(saved["ids"]) == built.preset.n_slice
    assert fresh == saved  # the folder reproduces its JSON


def test_photo_evaluation_counts_captions_naming_the_object(shipped, monkeypatch):
    from blip2lab.worlds.minireal import photos

    monkeypatch.setattr(photos, "PHOTOS", {"coffee": photos.PHOTOS["coffee"]})
    monkeypatch.setattr(shipped, "caption", lambda images, **kw: ["a cup of coffee"] * len(images))
    monkeypatch.setattr(shipped, "answer", lambda images, q, **kw: ["a dog"] * len(images))
    result = R.eval_photos(shipped, "What is in the picture?")
    assert result["photos"] == 1 and result["captions_naming_object"] == 1 and result["answers_naming_object"] == 0
    assert result["per_photo"]["coffee"]["caption"] == "a cup of coffee"


def test_presets_and_overrides():
    tiny = R.preset_with("tiny", ["stage1_steps=3", "crop_scale=0.5,1", "n_test=none"])
    assert (tiny.stage1_steps, tiny.crop_scale, tiny.n_test) == (3, (0.5, 1.0), None)
    with pytest.raises(ValueError, match="unknown config key .no_such_field."):
        R.preset_with("tiny", ["no_such_field=1"])
    default = R.PRESETS["default"]
    assert default.limit is None and default.n_train is None and default.shipped_dtype == "float16"
    # the visual tokens' tap: the 7x7 head map by default, the 14x14 x 112 stage on request
    assert R.config_for(default, llm=False).vision.width == 1280
    stage = R.config_for(R.preset_with("default", ["image_layer=-4"]), llm=True)
    assert (stage.vision.layer_index, stage.vision.width) == (-4, 112) and stage.llm.chat_template


def test_cli_trains_stage2_from_a_stage1_folder(built, tmp_path, capsys):
    from blip2lab.cli import main

    for part in ("clipart", "features", "stage1"):  # the tiny run's data, cache and stage 1
        shutil.copytree(built.out / part, tmp_path / part)
    argv = ["minireal", "train", "stage2", "--preset", "tiny", "--set", "stage2_steps=1", "--out", str(tmp_path),
            "--quiet"]
    assert main(argv) == 0
    record = json.loads((tmp_path / "mini-real" / "recipe.json").read_text())
    assert record["command"] == "blip2lab " + " ".join(argv)
    assert record["stage1"] == str(tmp_path / "stage1") and record["preset"]["stage2_steps"] == 1
    assert json.loads(capsys.readouterr().out)["weights_bytes"] == record["weights_bytes"]


def test_init_std_sets_the_fresh_weights_only():
    """The preset's init_std reaches the Q-Former's fresh parts (queries, cross-attention);
    the weights copied from MiniLM are the same whatever it is."""
    wide = R.config_for(R.preset_with("tiny", ["init_std=0.2"]), llm=False)
    assert wide.qformer.init_std == 0.2 and R.config_for(R.PRESETS["tiny"], llm=False).qformer.init_std == 0.02

    torch.manual_seed(0)
    model = build_model(wide)
    assert 0.15 < float(model.qformer.query_tokens.detach().std()) < 0.25
    torch.manual_seed(0)
    base = build_model(R.config_for(R.PRESETS["tiny"], llm=False))
    state, base_state = model.state_dict(), base.state_dict()
    assert torch.equal(state["qformer.layers.0.self_attn.qkv.weight"], base_state["qformer.layers.0.self_attn.qkv.weight"])
    assert not torch.equal(state["qformer.layers.0.cross_attn.q.weight"], base_state["qformer.layers.0.cross_attn.q.weight"])


def test_query_init_reaches_the_qformer():
    """The preset's query_init=text starts the queries from MiniLM's embeddings (word +
    position), so before training they are not folded into one vector as random ones are."""
    from blip2lab.worlds.shapes import analysis

    torch.manual_seed(0)
    models = {qi: build_model(R.config_for(R.preset_with("tiny", [f"query_init={qi}"]), llm=False)).eval()
              for qi in ("normal", "text")}
    assert models["text"].qformer.cfg.query_init == "text"
    image = torch.randn(1, 50, models["text"].config.vision.width)  # (1, N, D_v), as ln_vision hands over
    with torch.no_grad():
        outputs = {qi: analysis.query_collapse(m.qformer, m.ln_vision(image))["outputs"] for qi, m in models.items()}
    assert outputs["text"] < outputs["normal"] - 0.2, outputs
