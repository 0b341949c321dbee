"""Stage-1 training throughput: blip2lab's step against a LAVIS-style step (lavis_style.py)
on the same model, the same data and the same training loop (blip2lab.training.train).

    python benchmarks/stage1_step.py                      # the shapes model, CPU
    python benchmarks/stage1_step.py --size small --steps 20
    python benchmarks/stage1_step.py --size g --device cuda --precision bf16 --batch 64
    python benchmarks/stage1_step.py --processes 1,2      # our loop's cost per step, 1 and 2 gloo processes

Contenders, each in a fresh subprocess (so its peak memory is its own), each running
`--steps` optimiser steps from the same initial weights over the same examples:
- `ours`: blip2lab's step on frozen features read from a disk cache (blip2lab.feature_cache:
  K augmented views per image, encoded once, before timing; one view per image per epoch);
- `lavis`: the LAVIS-style step, the frozen encoder run at every step on the pixels of the
  very same views (prepared in memory before timing: the crop itself is not charged to it,
  as LAVIS's loader workers would hide it);
- `ours+ckpt`: ours with the Q-Former's gradient checkpointing.

Reported per contender: median seconds per step (after `--warmup` steps) and samples/s;
peak memory (CPU: the subprocess's peak RSS during training, and its growth over the RSS
before; CUDA: torch.cuda.max_memory_allocated); the bytes of activations kept for the backward pass of
one step (counted with saved-tensor hooks: exact and independent of the allocator; the CPU
RSS also holds what glibc keeps of freed blocks, which differs between the contenders:
MALLOC_MMAP_THRESHOLD_=1048576 in the environment makes it follow live memory, slower). Then
the ratio ours / lavis of samples/s (the goal: >= 3x) and both loss curves; and the frozen
encoder's forward alone on one of the peer's batches (`encoder_s`): the part of its step that
the cache removes, so `peer / (peer - encoder)` is the ratio skipping the encoder alone gives.

Sizes: `shapes` (the recipe's model: its ViT and BERT-initialised Q-Former, its scenes
and captions), and random-weight models with random images and captions of 8-24 tokens
(COCO-like): `tiny` (tests), `small`, `base` (BERT-base Q-Former on a ViT-L/14 tower, 23
of 24 blocks run) and `g` (BERT-base Q-Former on an EVA ViT-g/14-shaped tower, 39 of 40
blocks, the paper's); `base` and `g` need a GPU. Their towers are transformers'
Blip2VisionModel (the official checkpoints' layout), so a plain CUDA image with torch,
transformers, accelerate and torchvision runs them (PYTHONPATH=. without an install).

Where the ratio comes from: the frozen encoder's forward, which the cache removes, and the
Q-Former work LAVIS repeats (see lavis_style.py). At the shapes size the encoder is a
small share of the step (4 blocks of width 128 against a Q-Former trained on 3B ITM
pairs), so the ratio there is bounded well below 3x; at the paper's size EVA ViT-g's
forward outweighs the Q-Former step.

`--processes 1,2`: our loop alone (the `ours` data path) under DDP with gloo, at the same
global batch, `--threads` split across the processes; the cost per step of each.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Optional

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # lavis_style beside it; blip2lab from the checkout if not installed
from common import median_seconds, peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402
from lavis_style import LavisStyleStage1  # noqa: E402

from blip2lab.config import Blip2Config, QFormerConfig, TrainConfig, VisionConfig  # noqa: E402
from blip2lab.formats.native import fingerprint as encoder_fingerprint
from blip2lab.model.blip2 import Blip2  # noqa: E402
from blip2lab.training.feature_cache import (
    CachedFeatureDataset,
    CropConfig,
    FeatureCache,
    build_feature_cache,
    view_pixels,
)
from blip2lab.training.loop import BatchStream, _accelerator, _autocast, train  # noqa: E402

ROOT = HERE.parent

# Random-weight sizes: Q-Former (width, layers, heads, ffn, queries, vocab) and image tower
# (width, blocks built, heads, mlp, image size, patch); the tower runs all but its last block.
SIZES = {
    "tiny": dict(q=(32, 2, 4, 64, 4, 100), v=(24, 3, 4, 96, 32, 8), text=(4, 10), crops=2),
    "small": dict(q=(256, 4, 4, 1024, 16, 30523), v=(384, 7, 6, 1536, 64, 8), text=(8, 24), crops=2),
    "base": dict(q=(768, 12, 12, 3072, 32, 30523), v=(1024, 24, 16, 4096, 224, 14), text=(8, 24), crops=1),
    "g": dict(q=(768, 12, 12, 3072, 32, 30523), v=(1408, 40, 16, 6144, 224, 14), text=(8, 24), crops=1),
}
CONTENDERS = ("ours", "lavis", "ours+ckpt")


@dataclass
class Spec:
    """Everything a contender's subprocess needs to rebuild the same model and data."""

    size: str = "shapes"
    images: int = 256
    batch: int = 64
    steps: int = 40
    warmup: int = 5  # steps left out of the timing (first-call allocations, caches)
    lr: float = 5e-4
    seed: int = 0
    device: str = "cpu"
    precision: str = "no"  # accelerate mixed precision: "no" (fp32) or "bf16"
    threads: int = 1
    crops: int = 0  # K views per image; 0: the size's default
    cache_dir: str = ""
    contender: str = "ours"
    peer_padding: str = "max_length"  # "max_length" (LAVIS) or "longest"
    dropout: Optional[float] = None  # override the Q-Former's dropout (the tests use 0 for exact curves)


# ---------------------------------------------------------------------------------------
# Model and data, rebuilt identically in every process
# ---------------------------------------------------------------------------------------


def _random_config(size: str, dropout: Optional[float]) -> Blip2Config:
    D, layers, heads, ffn, queries, vocab = SIZES[size]["q"]
    Dv, vlayers, vheads, mlp, image, patch = SIZES[size]["v"]
    q = QFormerConfig(hidden_size=D, num_layers=layers, num_heads=heads, intermediate_size=ffn, num_queries=queries,
                      vocab_size=vocab, dec_token_id=vocab - 1, cls_token_id=1 if vocab < 1000 else 101,
                      sep_token_id=2 if vocab < 1000 else 102,
                      **({} if dropout is None else dict(hidden_dropout=dropout, attention_dropout=dropout)))
    # transformers' Blip2VisionModel (the official checkpoints' EVA layout): needs no open_clip,
    # which a plain CUDA image lacks; the last block is dropped, as BLIP-2 does.
    v = VisionConfig(backend="hf_blip2", image_size=image, patch_size=patch, width=Dv, layers=vlayers, heads=vheads,
                     mlp_dim=mlp, layer_index=-2)
    return Blip2Config(vision=v, qformer=q, embed_dim=min(256, D))


def build_model(spec: Spec, checkpointing: bool = False) -> Blip2:
    torch.manual_seed(spec.seed)
    if spec.size == "shapes":
        from blip2lab.worlds.shapes.recipe import PRESETS, shapes_config
        from blip2lab.worlds.shapes.recipe import build_model as shapes_model

        config = shapes_config(None, PRESETS["default"])
        if spec.dropout is not None:
            config.qformer = replace(config.qformer, hidden_dropout=spec.dropout, attention_dropout=spec.dropout)
        config.qformer = replace(config.qformer, gradient_checkpointing=checkpointing)
        return shapes_model(config)
    config = _random_config(spec.size, spec.dropout)
    config.qformer = replace(config.qformer, gradient_checkpointing=checkpointing)
    with torch.device(spec.device):  # initialise where it will run: a 1B-parameter tower inits fast on a GPU
        return Blip2(config)


def build_data(spec: Spec, model: Blip2) -> tuple[torch.Tensor, list[list[int]]]:
    """images (n, S, S, 3) uint8 and each image's caption as token ids ([CLS] ... [SEP])."""
    n, q = spec.images, model.config.qformer
    if spec.size == "shapes":
        from blip2lab.worlds.shapes import world
        from blip2lab.worlds.shapes.recipe import processor_for

        scenes = world.make_split("train", n, spec.seed)
        images = torch.from_numpy(world.render_batch(scenes))  # (n, 64, 64, 3)
        captions = [world.paraphrases(s, random.Random(world.stable_seed("stage1", spec.seed, i)))
                    for i, s in enumerate(scenes)]
        text = processor_for(model.config).qformer_text(captions)
        ids = [row[: int(m.sum())].tolist() for row, m in zip(text["text_ids"], text["text_mask"])]
        return images, ids
    g = torch.Generator().manual_seed(spec.seed)
    S = model.config.vision.image_size
    images = torch.randint(0, 256, (n, S, S, 3), generator=g, dtype=torch.uint8)
    lo, hi = SIZES[spec.size]["text"]
    low_id = 3 if q.vocab_size < 1000 else 1000
    ids = []
    for _ in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        words = torch.randint(low_id, q.vocab_size - 1, (length - 2,), generator=g).tolist()
        ids.append([q.cls_token_id, *words, q.sep_token_id])
    return images, ids


def crop_config(spec: Spec) -> CropConfig:
    K = spec.crops or SIZES.get(spec.size, {"crops": 2})["crops"]
    if spec.size == "shapes":  # captions name left and right: no flip; a mild crop keeps every object in view
        return CropConfig(crops=K, scale=(0.85, 1.0), ratio=(0.9, 1.1), hflip=False, seed=spec.seed)
    return CropConfig(crops=K, seed=spec.seed)  # the paper's: scale 0.5-1.0, flip


def cache_folder(spec: Spec) -> Path:
    root = Path(spec.cache_dir) if spec.cache_dir else ROOT / "runs" / "benchmarks" / "feature_cache"
    return root / f"{spec.size}-n{spec.images}-k{crop_config(spec).crops}-s{spec.seed}"


def ensure_cache(spec: Spec, model: Optional[Blip2] = None) -> FeatureCache:
    """The contenders' feature cache, built (or finished) once before any timing."""
    model = model or build_model(spec)
    images, _ = build_data(spec, model)
    return build_feature_cache(cache_folder(spec), model.image_encoder, images, crop_config(spec),
                               batch_size=64, device=spec.device, progress=True)


class PixelViewDataset(CachedFeatureDataset):
    """The peer's data: the pixels of the very view `ours` reads from the cache (same
    view rule), prepared in memory; LAVIS would crop afresh, from the same distribution."""

    def __init__(self, cache: FeatureCache, items: list[dict], seed: int, pixels: torch.Tensor):
        super().__init__(cache, items, seed)
        self.pixels = pixels  # (n, K, 3, S, S)

    def __getitem__(self, index: int) -> dict:
        return {"pixels": self.pixels[index, self.view_of(index)], "image_id": index} | self.items[index]


def collate(items: list[dict]) -> dict:
    """Texts padded to the batch's longest (the peer pads to max_txt_len itself, as LAVIS)."""
    T = max(len(it["ids"]) for it in items)
    ids = torch.zeros(len(items), T, dtype=torch.long)
    mask = torch.zeros(len(items), T, dtype=torch.long)
    for i, it in enumerate(items):
        ids[i, : len(it["ids"])] = torch.tensor(it["ids"])
        mask[i, : len(it["ids"])] = 1
    batch = {"text_ids": ids, "text_mask": mask, "image_ids": torch.tensor([it["image_id"] for it in items])}
    key = "image_embeds" if "image_embeds" in items[0] else "pixels"
    return batch | {key: torch.stack([it[key] for it in items])}  # (B, N, D_v) fp16 or (B, 3, S, S)


def _dataset(spec: Spec, model: Blip2, cache: FeatureCache):
    images, ids = build_data(spec, model)
    items = [{"ids": row} for row in ids]
    if spec.contender == "lavis":
        enc, crop = model.image_encoder, crop_config(spec)
        pixels = torch.stack([torch.stack([view_pixels(images[i], i, k, crop, enc.image_size, enc.mean, enc.std)
                                           for k in range(cache.crops)]) for i in range(len(images))])
        return PixelViewDataset(cache, items, spec.seed, pixels)
    return CachedFeatureDataset(cache, items, spec.seed)


def _train_config(spec: Spec) -> TrainConfig:
    return TrainConfig(lr=spec.lr, min_lr=spec.lr / 10, warmup_steps=min(10, spec.steps // 4), max_steps=spec.steps,
                       batch_size=spec.batch, mixed_precision=spec.precision, seed=spec.seed, out_dir="")


def saved_activation_bytes(step_model, batch: dict, **kwargs) -> int:
    """Bytes of the tensors one forward keeps for its backward (distinct storages), counted
    by saved-tensor hooks: the activation memory, whatever the allocator does."""
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses = step_model(**batch, **kwargs)
    sum(v for k, v in losses.items() if k.endswith("_loss")).backward()
    step_model.zero_grad(set_to_none=True)
    return sum(seen.values())


def run_contender(spec: Spec) -> dict:
    """Train `spec.steps` steps of one contender; its timings, memory and loss curve."""
    torch.set_num_threads(spec.threads)
    model = build_model(spec, checkpointing=spec.contender == "ours+ckpt")
    cache = FeatureCache(cache_folder(spec))
    if cache.meta["encoder"] != encoder_fingerprint(model.image_encoder):
        raise RuntimeError(f"{cache.folder} was built with other encoder weights")
    data = _dataset(spec, model, cache)
    step_model = LavisStyleStage1(model, pad_to_max=spec.peer_padding == "max_length") \
        if spec.contender == "lavis" else model
    cfg = _train_config(spec)
    stream = BatchStream(data, spec.batch, collate, seed=spec.seed)
    cuda = spec.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    rss_before = rss_bytes()
    stamps = [time.perf_counter()]
    history = train(step_model, stream, cfg, on_step=lambda step, logs: stamps.append(time.perf_counter()))
    step_s = [b - a for a, b in zip(stamps, stamps[1:])]
    result = {
        "contender": spec.contender,
        "step_s": statistics.median(step_s[spec.warmup:] or step_s),
        "step_s_all": step_s,
        "peak_rss_bytes": peak_rss_bytes(),  # since just before training
        "rss_before_train_bytes": rss_before,
        "curve": [{k: v for k, v in h.items() if k.endswith("_loss") or k == "loss"} for h in history],
    }
    if cuda:
        result["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
    # Activations kept for backward, one step on the first batch (train mode, no optimiser).
    batch = {k: v.to(spec.device) for k, v in stream(0).items()}
    step_model.train()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda and spec.precision == "bf16" else nullcontext()
    with autocast:
        result["saved_activation_bytes"] = saved_activation_bytes(
            step_model, batch, generator=torch.Generator(spec.device).manual_seed(0))
    result["weight_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    if spec.contender == "lavis":
        result["encoder_s"] = encoder_seconds(model, batch["pixels"], cfg)
    return result


def encoder_seconds(model: Blip2, pixels: torch.Tensor, cfg: TrainConfig) -> float:
    """Median seconds of the frozen encoder's forward (+ ln_vision) on one batch of pixels,
    under the training loop's autocast: what the feature cache takes out of each LAVIS-style
    step, and so what bounds the ratio where the rest of the step is the same work."""
    accelerator = _accelerator(cfg)
    cuda = pixels.device.type == "cuda"

    def forward():
        with torch.no_grad(), _autocast(accelerator):
            out = model.ln_vision(model.image_encoder(pixels))
        if cuda:
            torch.cuda.synchronize()
        return out

    return median_seconds(forward, repeats=5, warmup=2)


def _subprocess_entry(spec_dict: dict, out: str) -> None:
    result = run_contender(Spec(**spec_dict))
    Path(out).write_text(json.dumps(result))


def run_isolated(spec: Spec, scratch: Path) -> dict:
    """run_contender in a fresh process (spawned: nothing inherited), for its own peak memory."""
    import multiprocessing as mp

    out = scratch / f"{spec.contender}.json"
    out.unlink(missing_ok=True)
    proc = mp.get_context("spawn").Process(target=_subprocess_entry, args=(asdict(spec), str(out)))
    proc.start()
    proc.join()
    if proc.exitcode != 0 or not out.is_file():
        raise RuntimeError(f"contender {spec.contender} failed (exit code {proc.exitcode})")
    return json.loads(out.read_text())


# ---------------------------------------------------------------------------------------
# 1 vs 2 processes (gloo): the cost per step of our loop at the same global batch
# ---------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, spec_dict: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    spec = Spec(**spec_dict)
    torch.set_num_threads(max(1, spec.threads // world))
    model = build_model(spec)
    cache = FeatureCache(cache_folder(spec))
    data = _dataset(replace(spec, contender="ours"), model, cache)
    stream = BatchStream(data, spec.batch // world, collate, seed=spec.seed, rank=rank, world_size=world)
    stamps = [time.perf_counter()]
    train(model, stream, _train_config(spec), on_step=lambda step, logs: stamps.append(time.perf_counter()))
    if rank == 0:
        step_s = [b - a for a, b in zip(stamps, stamps[1:])]
        Path(out).write_text(json.dumps({"step_s": statistics.median(step_s[spec.warmup:] or step_s),
                                         "step_s_all": step_s}))


def run_processes(spec: Spec, world: int, scratch: Path) -> dict:
    import torch.multiprocessing as mp

    if spec.batch % world:
        raise ValueError(f"--batch {spec.batch} is not divisible by {world} processes")
    out = scratch / f"ddp{world}.json"
    out.unlink(missing_ok=True)
    mp.spawn(_ddp_worker, args=(world, _free_port(), asdict(spec), str(out)), nprocs=world, join=True)
    return json.loads(out.read_text()) | {"processes": world, "threads_per_process": max(1, spec.threads // world)}


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def _mb(n: float) -> str:
    return f"{n / 2**20:8.1f} MB"


def compare_curves(a: list[dict], b: list[dict]) -> dict:
    """Per loss: mean |a - b| over the steps, and the last quarter's mean and spread of each."""
    out = {}
    for key in a[0]:
        if key not in b[0]:
            continue
        x, y = [h[key] for h in a], [h[key] for h in b]
        tail = max(2, len(x) // 4)
        out[key] = {"mean_abs_diff": statistics.fmean(abs(p - q) for p, q in zip(x, y)),
                    "tail_mean": (statistics.fmean(x[-tail:]), statistics.fmean(y[-tail:])),
                    "tail_std": (statistics.pstdev(x[-tail:]), statistics.pstdev(y[-tail:]))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="shapes", choices=["shapes", *SIZES])
    parser.add_argument("--images", type=int, default=256, help="training images (each with --crops cached views)")
    parser.add_argument("--crops", type=int, default=0, help="K cached views per image (0: the size's default)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default=None, choices=["no", "bf16"],
                        help="mixed precision of both (default: bf16 on CUDA, fp32 on the CPU)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--peer-padding", default="max_length", choices=["max_length", "longest"])
    parser.add_argument("--processes", default="", help="e.g. 1,2: cost per step of our loop with that many "
                                                        "gloo processes (same global batch) instead of the comparison")
    parser.add_argument("--cache-dir", default="")
    parser.add_argument("--json", default="", help="results file (default runs/benchmarks/stage1_step-<size>"
                                                   "[-processes].json)")
    args = parser.parse_args()

    precision = args.precision or ("bf16" if args.device.startswith("cuda") else "no")
    spec = Spec(size=args.size, images=args.images, batch=args.batch, steps=args.steps, warmup=args.warmup,
                lr=args.lr, device=args.device, precision=precision, threads=args.threads, crops=args.crops,
                cache_dir=args.cache_dir, peer_padding=args.peer_padding)
    # The contenders' result files: a folder of this run's own (two runs at once, e.g. the
    # tests' gpu.sh dry run beside a benchmark, must not read each other's), removed at exit.
    scratch_dir = tempfile.TemporaryDirectory(prefix="blip2lab-stage1_step-")
    scratch = Path(scratch_dir.name)
    t0 = time.perf_counter()
    model = build_model(spec)
    cache = ensure_cache(spec, model)
    del model
    print(f"feature cache: {cache.folder} ({len(cache)} images x {cache.crops} views, "
          f"{_mb(os.path.getsize(cache.folder / 'features.f16')).strip()}), ready in {time.perf_counter() - t0:.1f} s")
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {args.threads} threads"
    result = {"benchmark": "stage1_step", "spec": asdict(spec), "device": device_name,
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}

    if args.processes:
        rows = [run_processes(spec, int(p), scratch) for p in args.processes.split(",")]
        print(f"\nour training loop, global batch {spec.batch}, {spec.size}, {device_name} "
              f"(gloo; threads split across processes)")
        for r in rows:
            print(f"  {r['processes']} process(es) x {r['threads_per_process']} thread(s): "
                  f"{r['step_s'] * 1e3:8.1f} ms/step  {spec.batch / r['step_s']:8.1f} samples/s")
        result["processes"] = rows
    else:
        runs = {name: run_isolated(replace(spec, contender=name), scratch) for name in args.contenders.split(",")}
        print(f"\nstage-1 step, {spec.size}, batch {spec.batch}, {device_name}, precision {precision}, "
              f"median of steps {spec.warmup}..{spec.steps}")
        for name, r in runs.items():
            grown = _mb(r["peak_rss_bytes"] - r["rss_before_train_bytes"]).strip()
            if "cuda_max_allocated_bytes" in r:
                mem = f"peak CUDA {_mb(r['cuda_max_allocated_bytes'])} (weights {_mb(r['weight_bytes']).strip()})"
            else:
                mem = f"peak RSS {_mb(r['peak_rss_bytes'])} (+{grown} in training)"
            print(f"  {name:10s} {r['step_s'] * 1e3:9.1f} ms/step {spec.batch / r['step_s']:9.1f} samples/s   {mem}"
                  f"   activations kept {_mb(r['saved_activation_bytes'])}")
        result["runs"] = runs
        if "ours" in runs and "lavis" in runs:
            ratio = runs["lavis"]["step_s"] / runs["ours"]["step_s"]
            result["ratio"] = ratio
            print(f"  ratio (ours samples/s / LAVIS-style samples/s): {ratio:.2f}x  (goal >= 3x: "
                  f"{'met' if ratio >= 3 else 'NOT met'})")
            enc, peer = runs["lavis"]["encoder_s"], runs["lavis"]["step_s"]
            result["encoder_share"] = enc / peer
            result["ratio_from_the_encoder_alone"] = peer / max(peer - enc, 1e-9)
            print(f"  the LAVIS-style step's frozen encoder forward: {enc * 1e3:.1f} ms, {enc / peer:.0%} of its step; "
                  f"taking only that out (the cache) gives {result['ratio_from_the_encoder_alone']:.2f}x, "
                  f"the rest of the ratio is the Q-Former work saved")
            curves = compare_curves(runs["ours"]["curve"], runs["lavis"]["curve"])
            result["curves"] = curves
            print("\ntraining curves (same init, same examples and views; dropout masks differ):")
            names = [k for k in runs["ours"]["curve"][0] if k in runs["lavis"]["curve"][0]]
            print("  step " + "".join(f"{n + ' ours':>15s}{n + ' lavis':>15s}" for n in names))
            every = max(1, spec.steps // 10)
            for s in list(range(0, spec.steps, every)) + ([spec.steps - 1] if (spec.steps - 1) % every else []):
                print(f"  {s:4d} " + "".join(f"{runs['ours']['curve'][s][n]:15.4f}{runs['lavis']['curve'][s][n]:15.4f}"
                                             for n in names))
            for n, c in curves.items():
                print(f"  {n:9s} mean |diff| {c['mean_abs_diff']:.4f}; last quarter {c['tail_mean'][0]:.4f} "
                      f"+- {c['tail_std'][0]:.4f} (ours) vs {c['tail_mean'][1]:.4f} +- {c['tail_std'][1]:.4f} (lavis)")
    name = f"stage1_step-{args.size}" + ("-processes" if args.processes else "")
    out = Path(args.json) if args.json else ROOT / "runs" / "benchmarks" / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
