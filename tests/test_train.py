"""The training loop: deterministic batches, exact resume, the NaN guard, logs, and
two processes (DDP over gloo) against one on the same global batch."""

import csv
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import random_text, tiny_config

from blip2lab.config import TrainConfig
from blip2lab.model.blip2 import Blip2
from blip2lab.training import loop as T
from blip2lab.training.loop import BatchStream, lr_at, train


class Toy(torch.utils.data.Dataset):
    """16 fixed (image, caption) examples without padding."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.pixels = torch.randn(16, 3, 32, 32, generator=g)
        self.ids, self.mask = random_text(16, 6, g)

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return {"pixels": self.pixels[i], "text_ids": self.ids[i], "text_mask": self.mask[i]}


def collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _model(dropout=0.1):
    torch.manual_seed(0)
    return Blip2(tiny_config(hidden_dropout=dropout))  # dropout on: resume must replay its masks too


def _cfg(**kw):
    base = dict(lr=1e-3, min_lr=1e-4, warmup_steps=2, max_steps=6, batch_size=4, seed=3)
    return TrainConfig(**(base | kw))


def test_batch_stream_is_a_function_of_the_step():
    data = Toy()
    a, b = BatchStream(data, 4, collate, seed=1), BatchStream(data, 4, collate, seed=1)
    assert torch.equal(a(7)["text_ids"], b(7)["text_ids"])
    epoch = torch.cat([a(i)["text_ids"] for i in range(4)])  # 4 batches of 4 = one epoch: a permutation
    assert sorted(map(tuple, epoch.tolist())) == sorted(map(tuple, data.ids.tolist()))
    r0, r1 = BatchStream(data, 2, collate, seed=1, rank=0, world_size=2), BatchStream(data, 2, collate, seed=1, rank=1, world_size=2)
    assert torch.equal(torch.cat([r0(5)["text_ids"], r1(5)["text_ids"]]),
                       BatchStream(data, 4, collate, seed=1)(5)["text_ids"])


def test_resume_equals_uninterrupted(tmp_path):
    data = Toy()
    whole = _model()
    train(whole, BatchStream(data, 4, collate, seed=3), _cfg(), out_dir=tmp_path / "whole")

    class Stop(Exception):
        pass

    def crash(step, logs):
        if step == 3:
            raise Stop

    first = _model()
    with pytest.raises(Stop):
        train(first, BatchStream(data, 4, collate, seed=3), _cfg(save_every=3), out_dir=tmp_path / "cut", on_step=crash)
    resumed = _model()
    history = train(resumed, BatchStream(data, 4, collate, seed=3), _cfg(save_every=3), out_dir=tmp_path / "cut",
                    resume=True)
    assert len(history) == 6
    for (k, v), (k2, v2) in zip(whole.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(v, v2), k  # bitwise, on the CPU


def test_logs_config_and_checkpoint(tmp_path):
    history = train(_model(), BatchStream(Toy(), 4, collate), _cfg(max_steps=3), out_dir=tmp_path)
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert {"itc_loss", "itm_loss", "itg_loss", "loss", "lr", "grad_norm"} <= set(rows[0])
    assert float(rows[0]["lr"]) == pytest.approx(lr_at(0, _cfg(max_steps=3)))
    assert (tmp_path / "train_config.json").is_file() and (tmp_path / "model_config.json").is_file()
    assert (tmp_path / "checkpoint" / "model.safetensors").is_file()
    assert any((tmp_path / "tb").iterdir())
    assert len(history) == 3


def test_nan_guard_skips_and_stops(tmp_path):
    model = _model()

    def batches(i):
        b = collate([Toy()[j] for j in range(4)])
        if i in (1, 2):  # two poisoned batches: their updates are skipped
            b["pixels"] = b["pixels"] * float("nan")
        return b

    before = {k: v.clone() for k, v in model.state_dict().items()}
    history = train(model, batches, _cfg(max_steps=4, max_bad_steps=5))
    assert [h["skipped"] for h in history] == [0.0, 1.0, 1.0, 0.0]
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(FloatingPointError, match="max_bad_steps"):
        train(_model(), batches, _cfg(max_steps=4, max_bad_steps=1))


def _ddp_worker(rank, world, init_file, out):
    # The group meets through a file, not a TCP port picked beforehand (another process could
    # take that port first); accelerate uses a group that is already initialised. Both ranks
    # pass a barrier before tearing gloo down (tests/test_dist.py: an abort otherwise).
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _model(dropout=0.0)
        train(model, BatchStream(Toy(), 4 // world, collate, seed=3, rank=rank, world_size=world),
              _cfg(max_steps=3, losses=("itg",)))
        if rank == 0:
            torch.save(model.state_dict(), out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_on_the_same_global_batch(tmp_path):
    """ITG alone (no cross-rank gathers, equal token counts): DDP's averaged gradients are the
    whole batch's, so 2 processes of batch 2 train exactly as 1 process of batch 4."""
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp.pt")), nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt")
    single = _model(dropout=0.0)  # dropout masks are per process: the runs compare without it
    single_cfg = _cfg(max_steps=3, losses=("itg",))
    train(single, BatchStream(Toy(), 4, collate, seed=3), single_cfg)
    for k, v in single.state_dict().items():
        if k.startswith("qformer.layers") and k.endswith("weight"):
            torch.testing.assert_close(ddp[k], v, atol=1e-5, rtol=1e-4)


def test_loss_schedule_phases_losses_in(tmp_path):
    cfg = _cfg(max_steps=4, loss_schedule=("itm@2",))
    assert cfg.losses_at(0) == ("itc", "itg") and cfg.losses_at(2) == ("itc", "itm", "itg")
    history = train(_model(), BatchStream(Toy(), 4, collate), cfg, out_dir=tmp_path)
    assert ["itm_loss" in h for h in history] == [False, False, True, True]
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [r["itm_loss"] != "" for r in rows] == [False, False, True, True]
    with pytest.raises(ValueError, match="loss_schedule"):
        _cfg(loss_schedule=("mlm@3",))


def test_bf16_on_the_cpu_follows_fp32_and_runs_the_math_attention_kernel():
    from blip2lab.dtypes import native_bf16
    from blip2lab.training.loop import _accelerator, _autocast, resolve_precision

    assert resolve_precision("auto") == ("bf16" if native_bf16() else "no")
    assert resolve_precision("no") == "no" and resolve_precision("bf16") == "bf16"
    cfg = _cfg(mixed_precision="bf16")
    with _autocast(_accelerator(cfg)):  # one process may switch precision between runs
        # the CPU's flash kernel is 5x slower than fp32 in a bf16 backward pass (train._autocast)
        assert torch.is_autocast_enabled("cpu") and not torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()
    data = Toy()
    fp32 = train(_model(dropout=0.0), BatchStream(data, 4, collate, seed=3), _cfg())
    bf16 = train(_model(dropout=0.0), BatchStream(data, 4, collate, seed=3), _cfg(mixed_precision="bf16"))
    assert [h["loss"] for h in bf16] == pytest.approx([h["loss"] for h in fp32], rel=0.02)
    assert [h["loss"] for h in bf16] != [h["loss"] for h in fp32]  # autocast did run in bf16


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_freed_heap_memory_goes_back_to_the_system():
    # Fragment the heap the way a training step does: many mid-size blocks (below glibc's
    # mmap threshold once it has risen), every other one freed: ~100 MB free but held.
    torch.zeros(8 << 20).numpy()  # a freed 32 MB block raises the mmap threshold to 32 MB
    blocks = [bytearray(1 << 20) for _ in range(200)]
    del blocks[::2]
    before = _rss_mb()
    assert T.release_free_memory()
    assert _rss_mb() < before - 50
    del blocks


def test_training_hands_free_memory_back_every_release_every_steps(monkeypatch):
    calls = []
    monkeypatch.setattr(T, "RELEASE_EVERY", 2)
    monkeypatch.setattr(T, "release_free_memory", lambda: calls.append(len(calls)) or True)
    seen = []
    train(_model(), BatchStream(Toy(), 4, collate), _cfg(max_steps=5), on_step=lambda step, logs: seen.append(
        (step, len(calls))))
    assert seen == [(0, 0), (1, 0), (2, 1), (3, 1), (4, 2)]  # after steps 2 and 4 (counting from 1)
