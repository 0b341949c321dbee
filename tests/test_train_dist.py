"""`blip2lab train` on 2 processes (gloo, as `accelerate launch` starts them) gives the loss of
one process on the same global batch; webdataset shards split over ranks without overlap or
loss, and a resumed shard stream continues where the interrupted one was."""

import json
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import train_data as D

from blip2lab.paths import MODELS_DIR
from blip2lab.training import run as R
from blip2lab.training.data_sources import DataConfig, open_data
from blip2lab.training.streams import ShardStream
from blip2lab.worlds.shapes import world

BERT = str(MODELS_DIR / "backbones" / "bert")


def _cfg(data, out, batch):
    # ITC + ITG without dropout: ITM draws its negatives per rank, and dropout masks are per
    # process; captions of one object have equal token counts, so ITG's per-rank means average exactly.
    sets = (f"data.path={data}", f"out={out}", f"train.batch_size={batch}", "train.max_steps=2", "progress=false",
            "data.crop.hflip=false", "finetune.losses=itc,itg", "model.build.vision.image_size=32",
            "model.build.vision.patch_size=8", "model.build.vision.width=32", "model.build.vision.layers=2",
            "model.build.vision.heads=4", f"model.build.qformer.init_from={BERT}", "model.build.qformer.num_queries=4",
            "model.build.qformer.hidden_dropout=0", "model.build.qformer.attention_dropout=0")
    return R.resolve("stage1", None, sets)


def _worker(rank, world_size, init_file, data, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        summary = R.run(_cfg(data, out, 4 // world_size), log=lambda _: None)
        (out.parent / f"rank{rank}.json").write_text(json.dumps(summary["history"]))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_loss_of_one_on_the_same_global_batch(tmp_path):
    scenes = [s for s in world.make_split("train", 60, 0) if len(s.objects) == 1][:8]
    rows = D.write_images(tmp_path / "images", scenes)
    D.write_csv(tmp_path / "images" / "captions.csv", rows)
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), tmp_path / "images", tmp_path / "ddp" / "out"), nprocs=2,
             join=True)
    ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in range(2)]
    single = R.run(_cfg(tmp_path / "images", tmp_path / "one", 4), log=lambda _: None)["history"]
    for name in ("itc_loss", "itg_loss"):
        mean = (ranks[0][0][name] + ranks[1][0][name]) / 2
        assert abs(mean - single[0][name]) < 1e-5, (name, mean, single[0][name])
    assert (tmp_path / "ddp" / "out" / "model.safetensors").is_file()  # the main process saved the model


def _keys(stream, steps):
    return [int(k) for i in range(steps) for k in stream(i)["image_ids"]]


def test_shards_split_over_ranks_without_overlap_or_loss_and_resume(tmp_path):
    rows = D.write_images(tmp_path / "images", world.make_split("train", 16, 0))
    D.write_shards(tmp_path / "shards", tmp_path / "images", rows, n_shards=4)
    collate = lambda items: {"image_ids": torch.tensor([it["image_id"] for it in items])}  # noqa: E731
    cfg = DataConfig(path=str(tmp_path / "shards"), shuffle_buffer=0)
    per_rank = [_keys(ShardStream(open_data(cfg, rank=r, world_size=2), 2, collate), 4) for r in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1]) and len(set(per_rank[0]) | set(per_rank[1])) == 16
    shuffled = DataConfig(path=str(tmp_path / "shards"), shuffle_buffer=4)
    whole = _keys(ShardStream(open_data(shuffled, rank=0, world_size=2, seed=1), 2, collate), 7)  # into epoch 2
    resumed = ShardStream(open_data(shuffled, rank=0, world_size=2, seed=1), 2, collate)
    assert [int(k) for i in range(5, 7) for k in resumed(i)["image_ids"]] == whole[10:]
