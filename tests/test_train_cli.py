"""`blip2lab train`: every data format read from disk, each stage trains a few steps, resumes
exactly after a crash, and its output opens with `blip2lab.load`; bad input is a clear error
naming the item or field, or a counted skip reported at the end."""

import functools
import json
from pathlib import Path

import pytest
import torch
import train_data as D

import blip2lab
from blip2lab.cli import main
from blip2lab.config import ConfigError
from blip2lab.paths import MODELS_DIR
from blip2lab.training import loop
from blip2lab.training import run as R
from blip2lab.training.data_sources import DataConfig, detect_format, open_data

OPT = str(MODELS_DIR / "backbones" / "opt")
BERT = str(MODELS_DIR / "backbones" / "bert")
FAST = ("data.crop.hflip=false", "progress=false", "train.batch_size=4")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    images = root / "images"
    rows = D.write_images(images, D.scenes(12))
    files = {"csv": D.write_csv(root / "captions.csv", rows), "jsonl": D.write_jsonl(root / "c.jsonl", rows),
             "coco": D.write_coco(root / "coco.json", rows), "karpathy": D.write_karpathy(root / "k.json", rows),
             "lavis": D.write_lavis(root / "lavis.json", rows), "lavis_vqa": D.write_lavis_vqa(root / "vqa.json", rows),
             "hf": D.write_hf(root / "hfds", images, rows)}
    D.write_csv(images / "captions.csv", rows)
    files["folder"] = images
    files["webdataset"] = root / "shards"
    D.write_shards(root / "shards", images, rows)
    files["vqav2"], annotations = D.write_vqav2(images, rows)
    return {"root": root, "images": images, "rows": rows, "files": files, "annotations": annotations}


def _cfg(stage, out, *sets, **flags):
    base = [f"out={out}", "train.max_steps=2", *FAST]
    return R.resolve(stage, None, tuple(base + [f"{k}={v}" for k, v in flags.items()] + list(sets)))


EXPECTED = {"csv": "csv", "jsonl": "jsonl", "coco": "coco", "karpathy": "coco", "lavis": "lavis",
            "lavis_vqa": "lavis_vqa", "hf": "hf", "folder": "folder", "webdataset": "webdataset", "vqav2": "vqav2"}


@pytest.mark.parametrize("fmt", sorted(EXPECTED))
def test_every_format_is_read_and_batched(data, fmt):
    path = data["files"][fmt]
    cfg = DataConfig(path=str(path), images=str(data["images"]) if fmt not in ("folder", "hf", "webdataset") else None,
                     annotations=str(data["annotations"]) if fmt == "vqav2" else None,
                     **({"image_column": "img", "text_column": "text"} if fmt == "hf" else {}),
                     **({"image_pattern": "COCO_{subset}_{image_id:012d}.png"} if fmt == "vqav2" else {}))
    assert detect_format(cfg) == EXPECTED[fmt]
    dataset = open_data(cfg, rank=0, world_size=1)
    items = list(dataset)[:3] if fmt == "webdataset" else [dataset[i] for i in range(3)]
    assert all(it["image"].size == (64, 64) and it["text"] for it in items)
    if fmt in ("lavis_vqa", "vqav2"):
        assert all(it["question"].endswith("?") for it in items)
    elif fmt != "webdataset":
        assert items[0]["text"] == data["rows"][0]["caption"]


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_stage1_crash_resume_equals_uninterrupted_and_loads(data, tmp_path, monkeypatch):
    args = (f"data.path={data['files']['csv']}", f"data.images={data['images']}", "model.source=shapes-stage1",
            "train.max_steps=3", "train.save_every=2")
    whole = R.run(_cfg("stage1", tmp_path / "whole", *args))

    def crash(step, logs):
        if step == 2:  # after the checkpoint of step 2, before the final one
            raise KeyboardInterrupt

    monkeypatch.setattr(R, "train", functools.partial(loop.train, on_step=crash))
    with pytest.raises(KeyboardInterrupt):
        R.run(_cfg("stage1", tmp_path / "cut", *args))
    monkeypatch.setattr(R, "train", loop.train)
    with pytest.raises(ConfigError, match="--resume"):
        R.run(_cfg("stage1", tmp_path / "cut", *args))
    resumed = R.run(_cfg("stage1", tmp_path / "cut", *args), resume=True)
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in whole["history"]]
    a, b = blip2lab.load(str(tmp_path / "whole")), blip2lab.load(str(tmp_path / "cut"))
    for (k, v), (_, w) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(v, w), k
    assert a.match(str(data["images"] / "img_000.png"), data["rows"][0]["caption"])["itm_prob"].shape == (1,)
    saved = json.loads((tmp_path / "cut" / "run_config.json").read_text())
    assert saved["stage"] == "stage1" and saved["train"]["max_steps"] == 3
    assert (tmp_path / "cut" / "train" / "log.csv").is_file() and (tmp_path / "cut" / "train" / "tb").is_dir()


def test_stage2_adds_an_llm_to_a_stage1_model_and_trains_on_vqa(data, tmp_path):
    cfg = _cfg("stage2", tmp_path / "s2", f"data.path={data['files']['lavis_vqa']}", f"data.images={data['images']}",
               "model.source=shapes-stage1", "model.llm.kind=decoder", f"model.llm.name_or_path={OPT}",
               "model.qformer_question=true")
    summary = R.run(cfg)
    assert summary["losses"] == ["lm"] and "llm.projection" in summary["parameters"]["by_part"]
    pipe = blip2lab.load(str(tmp_path / "s2"))
    assert pipe.model.config.qformer_question and isinstance(pipe.answer(str(data["images"] / "img_000.png"),
                                                                        "what color is the circle?")[0], str)


def test_finetune_continues_the_model_and_keeps_its_stage1_heads(data, tmp_path):
    before = blip2lab.load("shapes-opt").model.state_dict()
    main(["train", "finetune", "--data", str(data["files"]["folder"]), "--out", str(tmp_path / "ft"),
          "--from", "shapes-opt", "--steps", "2", "--batch-size", "4", "--quiet", "--set", "data.crop.hflip=false"])
    after = blip2lab.load(str(tmp_path / "ft")).model.state_dict()
    assert torch.equal(before["itm_head.weight"], after["itm_head.weight"])  # LM loss only: heads untouched
    assert not torch.equal(before["llm.projection.weight"], after["llm.projection.weight"])
    assert torch.equal(before["llm.model.lm_head.weight"], after["llm.model.lm_head.weight"])  # the LLM is frozen


def test_a_model_built_from_parts_trains(data, tmp_path):
    """An open_clip tower described by its config, the Q-Former from a BERT folder, an OPT LLM."""
    cfg = _cfg("stage2", tmp_path / "built", f"data.path={data['files']['jsonl']}", f"data.images={data['images']}",
               "model.build.vision.image_size=32", "model.build.vision.patch_size=8", "model.build.vision.width=32",
               "model.build.vision.layers=2", "model.build.vision.heads=4", f"model.build.qformer.init_from={BERT}",
               "model.build.qformer.num_queries=4", "model.build.llm.kind=decoder",
               f"model.build.llm.name_or_path={OPT}")
    R.run(cfg)
    assert blip2lab.load(str(tmp_path / "built")).model.config.qformer.hidden_size == 128  # read from the BERT


def test_layer_wise_lr_decay_is_applied(data, tmp_path, monkeypatch):
    made = []
    real = loop.make_optimizer
    monkeypatch.setattr(loop, "make_optimizer", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    R.run(_cfg("finetune", tmp_path / "vit", f"data.path={data['files']['csv']}", f"data.images={data['images']}",
               "model.source=shapes-stage1", "finetune.train_vision=true", "train.max_steps=1",
               "train.warmup_steps=0", "train.lr=1e-3", "train.min_lr=1e-3"))
    lrs = sorted({round(g["lr"], 12) for g in made[0].param_groups})
    depth = 4  # the shapes ViT keeps 4 blocks (layer_index -2 of 5): stem 0.95^5 ... last block 0.95^1, the rest 1
    assert lrs == sorted({round(1e-3 * 0.95 ** k, 12) for k in range(depth + 2)})
    vit = [g for g in made[0].param_groups if g["lr_scale"] < 1]
    assert vit and sum(p.numel() for g in vit for p in g["params"]) > 0


def test_bad_input_is_named_or_counted(data, tmp_path):
    images = data["images"]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    rows = [{"image": r["image"], "caption": r["caption"]} for r in data["rows"][:4]]
    rows += [{"image": "nowhere.png", "caption": "a caption"}, {"image": rows[0]["image"], "caption": "  "},
             {"image": str(tmp_path / "broken.png"), "caption": "a small red circle on the top left"}]
    D.write_csv(tmp_path / "bad.csv", rows)
    ds = open_data(DataConfig(path=str(tmp_path / "bad.csv"), images=str(images)))
    _ = [ds[i] for i in range(len(ds))]
    assert dict(ds.skipped) == {"missing": 1, "empty_caption": 1, "unreadable": 1}
    assert "nowhere.png" in ds.report() and "empty_caption 1" in ds.report()
    (tmp_path / "nocol.csv").write_text("image,text\na.png,hello\n")
    with pytest.raises(ValueError, match="no 'caption' column"):
        open_data(DataConfig(path=str(tmp_path / "nocol.csv")))
    with pytest.raises(ConfigError, match="train.lrr"):
        R.resolve("stage1", None, ("train.lrr=1",))
    with pytest.raises(ConfigError, match="'nothing_here' matches no linear layer"):
        R.load_model(_cfg("finetune", tmp_path / "x", "model.source=shapes-opt", "finetune.mode=lora",
                          "finetune.lora.target_modules=nothing_here"))
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        R.load_model(_cfg("finetune", tmp_path / "x", "model.source=shapes-opt", "finetune.quantize=4bit"),
                     torch.device("cpu"))
    code = main(["train", "stage1", "--data", str(tmp_path / "nocol.csv"), "--out", str(tmp_path / "o"),
                 "--set", "finetune.lossess=itc"])
    assert code == 2


def test_the_collate_pickles_for_spawned_workers(data):
    """DataLoader workers started by spawn (macOS, a spawned process) get the collate pickled."""
    import pickle

    from PIL import Image

    proc = blip2lab.load("shapes-opt").processor
    collate = R.make_collate(proc, ("itc", "lm"), DataConfig().crop)
    items = [{"image": Image.open(data["images"] / "img_000.png"), "text": "a red circle", "image_id": 0,
              "index": 0, "epoch": 1}]
    a, b = collate(items), pickle.loads(pickle.dumps(collate))(items)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_shard_cut_short_is_a_counted_skip(data, tmp_path):
    shards = sorted((data["root"] / "shards").glob("*.tar"))
    cut = tmp_path / "shard-cut.tar"
    whole = shards[0].read_bytes()
    cut.write_bytes(whole[: len(whole) * 2 // 3 + 100])  # cut in the middle of a sample
    ds = open_data(DataConfig(path=f"{cut}::{shards[1]}"), rank=0, world_size=1)
    items = list(ds)
    assert len(items) == 6 and ds.skipped["cut_short"] == 1 and "shard-cut.tar" in ds.report()
