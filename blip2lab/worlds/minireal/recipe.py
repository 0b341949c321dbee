"""The mini-real recipe: BLIP-2 on real pretrained frozen parts from packages (EfficientNet-
lite0, a MiniLM-initialised Q-Former, SmolLM2-135M-Instruct), trained on the clipart
captions of Debian's Open Clip Art, as a preset of the one training loop (`train.train`).

    blip2lab minireal build --preset default         # features, stage 1, stage 2, evaluation
    blip2lab minireal train stage1 --preset tiny
    blip2lab minireal train stage2 --stage1 runs/minireal/stage1
    blip2lab minireal eval --model runs/minireal/mini-real

What a run writes under --out (runs/minireal):
    clipart/            the 224 px images of a `limit`ed dataset (the full one: runs/clipart)
    features/train-NxK/ the frozen EfficientNet's tokens of K augmented views per training
                        image (feature_cache; built once, read by both stages)
    stage1/             the stage-1 pipeline (trained parts only, fp32) + recipe.json, eval.json
    mini-real/          the shipped pipeline: trained parts only, fp16, <= 60 MB; config.json,
                        tokenizers, recipe.json (command, seed, timings, peak memory), eval.json
    logs/stage1, logs/stage2   the loop's log.csv, TensorBoard and resumable checkpoints

Shipping size. Only what trains is saved (Q-Former, ln_vision, query tokens, ITC/ITM/ITG
heads, the LLM projection); EfficientNet, SmolLM2 and MiniLM's word embeddings are rebuilt
from their packages when the folder is loaded (`save_pretrained(rebuild_frozen=True)`,
each checked against a fingerprint stored in the file). The word embeddings are the one
choice here: 30522 x 384 = 11.7M parameters copied from MiniLM, 35% of the 33.7M-parameter
Q-Former. Training them would add 23 MB in fp16 (the file would be ~68 MB), so they stay
frozen at MiniLM's values (`qformer.freeze_word_embeddings`, [DEC]'s row a fixed draw): the
text encoder reads words as MiniLM learned them on a billion sentence pairs, and the ITG
head, tied to them, learns its transform and bias only. What remains trainable is 22.4M
parameters (Q = 16, with the LLM projection), stored in fp16: 44.8 MB (fp32: 89.5 MB). The
stage-1 heads are kept in the shipped model so it still matches and retrieves (with its
stage-2 Q-Former: stage1/eval.json has the stage-1 model's retrieval beside it).

Deviations from the paper, each a preset field: 16 queries, not 32 (the 7x7 map gives 50
image tokens, not 257, and 16 queries make a stage-2 step 1.6x cheaper, see PRESETS);
K = 2 cached views of RandomResizedCrop(scale 0.64-1) + flip instead of a fresh crop each
step (a clipart is mostly one object centred on white, which a crop of half the area can
cut in two); a few hundred steps at a peak lr of 2e-4 instead of 250k + 80k at 1e-4
(untuned: the first full run is still to come).

Stage-2 prompt: the paper's plain "a photo of", not SmolLM2's chat template. Measured on
120 test names with SmolLM2 alone (no image), mean NLL per caption token: plain prompt
after BOS 8.04; the chat template ("<|im_start|>user\\nWhat is in this picture? ...
<|im_end|>\\n<|im_start|>assistant\\n" then "name<|im_end|>") 8.84; the same template as the
processor's decoder rows must write it (prompt stripped, text after a space, "\\n" as the
end) 10.49. The plain prompt is the one the frozen LLM already finds most natural and the
one `Blip2Processor` lays out exactly ([BOS][prompt][text]["\\n"], "\\n" its stop token), so
stage 2 spends its steps on the image, not on the format. The chat template belongs to
the app's chat tab, where SmolLM2 answers as the assistant it was tuned to be.

Shapes: n images, K views, N = 50 image tokens, D_v = 1280, S = 224, B batch, T text length.
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import resource
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from blip2lab.config import Blip2Config, TrainConfig, from_preset
from blip2lab.formats import build_model
from blip2lab.formats.native import WEIGHTS_NAME, load_weights_into, save_pretrained
from blip2lab.model.blip2 import Blip2
from blip2lab.paths import MODELS_DIR
from blip2lab.pipeline import Blip2Pipeline, load
from blip2lab.processor import Blip2Processor, clean_caption
from blip2lab.training.feature_cache import CachedFeatureDataset, CropConfig, FeatureCache, build_feature_cache
from blip2lab.training.loop import BatchStream, Timer, train
from blip2lab.worlds.minireal import backbones as mr
from blip2lab.worlds.minireal import clipart as C

REPO = MODELS_DIR.parent
CLIPART_CACHE = REPO / "runs" / "clipart"  # where `python -m blip2lab.worlds.minireal.clipart --images` caches the images
SHIPPED_NAME = "mini-real"  # the folder name `blip2lab.load("mini-real")` finds under models/
MAX_SHIPPED_BYTES = 60_000_000


@dataclass
class MiniRealPreset:
    """Sizes and budgets of one run of the recipe."""

    name: str
    limit: Optional[int] = None  # read only the first `limit` clipart files (sorted paths); None: all 8,121
    n_train: Optional[int] = None  # training images (None: the whole train split, 4,567)
    n_test: Optional[int] = None  # held-out test images evaluated (None: the whole test split, 255)
    n_slice: int = 32  # first test images re-evaluated on their own (eval.json "slice": per-image captions)
    crops: int = 2  # K cached augmented views per training image
    crop_scale: tuple[float, float] = (0.64, 1.0)  # RandomResizedCrop area (the paper: 0.5-1.0)
    num_queries: int = 16  # Q (the paper: 32)
    # EfficientNet feature tap for the visual tokens (backbones/minireal.EFFICIENTNET_TAPS):
    # -1 the 7x7 x 1280 head map (50 tokens), -4 the 14x14 x 112 stage (197 tokens).
    image_layer: int = -1
    # Normal std of the Q-Former's fresh weights (queries, cross-attention, heads). BERT's 0.02
    # leaves a fresh 384-wide cross-attention uniform over the 50 image tokens (every query's
    # map entropy 1.00, maps alike 1.00 at init), so every query reads the same pooled feature.
    init_std: float = 0.02
    # QFormerConfig.query_init: "text" starts each query as a MiniLM word + position embedding,
    # so MiniLM's self-attention does not fold the 16 queries into one vector.
    query_init: str = "normal"
    stage1_steps: int = 750
    stage1_batch: int = 32
    stage1_lr: float = 2e-4
    stage1_itm_easy_negatives: float = 0.0  # the paper's all-hard ITM negatives
    stage2_steps: int = 750
    stage2_batch: int = 16
    stage2_lr: float = 2e-4
    warmup: int = 50
    save_every: int = 250  # resumable checkpoints (`--resume`) every N steps
    k_test: int = 16  # ITM re-ranking depth of the retrieval protocol (COCO: 128)
    photo_question: str = "What is in the picture?"  # asked of every bundled photo
    shipped_dtype: str = "float16"  # the shipped weights' precision (fp32 would be 89 MB)


PRESETS = {
    # Seconds, for the tests: 200 clipart files (188 images, 11 of them test), one view each.
    "tiny": MiniRealPreset("tiny", limit=200, n_train=48, n_test=4, n_slice=2, crops=1, stage1_steps=16,
                           stage1_batch=8, stage1_lr=1e-3, stage2_steps=3, stage2_batch=4, stage2_lr=1e-3,
                           warmup=2, save_every=0, k_test=4),
    # Both stages in <= 2 hours on 2 CPU cores, sized from step times measured on this
    # project's shared 2-core box with OMP_NUM_THREADS=1, as this process's CPU seconds (what
    # one free core takes; the wall clock under the other jobs' load was up to 1.5x that):
    #   feature cache  50 ms a view (1,000 views: 47 s wall through this recipe)
    #                  -> 4,567 images x 2 views                       ~   460 s
    #   stage 1, Q 16, B 32: 4.25 s a step (Q 32: 5.29 s)  -> 750 steps ~ 3,190 s
    #   stage 2, Q 16, B 16: 3.20 s a step (Q 32: 5.25 s)  -> 750 steps ~ 2,400 s
    #   data, model builds, saving                                       ~    40 s
    #   evaluation of both folders (287 clipart captions at ~1.2 s when they run to 30
    #   tokens, as an untrained model's do; 9 photos; retrieval)        ~   550 s
    # total ~ 6,640 s = 1.85 h on one core; the second core (torch's default of 2 threads)
    # shortens it by what intra-op parallelism gives (not measurable on the loaded box).
    # 750 steps are 5.3 epochs of stage 1 (24k pairs) and 2.6 of stage 2 (12k captions).
    # Peak RSS: 3.1 GB (stage 1), 2.9 GB (stage 2), each stage run in its own process.
    # Queries start as MiniLM word embeddings (query_init="text", a deviation): from N(0, 0.02)
    # MiniLM's self-attention folds the 16 queries into one vector (outputs' cosine 1.00) and the
    # shipped model's clipart captions scored CIDEr 0.002; with text-initialised queries, 0.109
    # (the same 750 + 750 steps, seed 0; README).
    "default": MiniRealPreset("default", query_init="text"),
}


def preset_with(name: str, overrides: Sequence[str]) -> MiniRealPreset:
    """PRESETS[name] with `field=value` overrides: config.from_preset, the one override path."""
    return from_preset(PRESETS, name, overrides)


# ---------------------------------------------------------------------------------------
# Configuration and models
# ---------------------------------------------------------------------------------------


def config_for(preset: MiniRealPreset, llm: bool) -> Blip2Config:
    """mini-real's config: stage 1 without the LLM, stage 2 with SmolLM2; word embeddings frozen."""
    return mr.minireal_config(llm=llm, num_queries=preset.num_queries, layer_index=preset.image_layer,
                              init_std=preset.init_std, query_init=preset.query_init)


def processor_for(config: Blip2Config) -> Blip2Processor:
    llm_tok = mr.llm_tokenizer(config.llm.name_or_path) if config.llm.kind != "none" else None
    return Blip2Processor.from_config(config, mr.qformer_tokenizer(config.qformer.init_from), llm_tok)


def _save_trained(model: Blip2, path: Path) -> None:
    """The loop's checkpoints hold what trains, not the 540 MB of frozen SmolLM2."""
    save_pretrained(model, path, rebuild_frozen=True)


# ---------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------


@dataclass
class ClipartData:
    items: list  # every Clipart of the dataset read (all splits)
    images: np.ndarray  # (n, S, S, 3) uint8, aligned with items (memory-mapped)
    train: list[int]  # indices into items
    test: list[int]

    def subset(self, which: str) -> "ImageSubset":
        return ImageSubset(self.images, self.train if which == "train" else self.test)


class ImageSubset:
    """images[indices] without copying the array: len + indexing, as build_feature_cache reads."""

    def __init__(self, images: np.ndarray, indices: Sequence[int]):
        self.images, self.indices = images, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.array(self.images[self.indices[i]])  # (S, S, 3) uint8, a writable copy


def load_data(preset: MiniRealPreset, out: Path) -> ClipartData:
    """The clipart items and their 224 px images (cached as .npy: the full dataset's under
    runs/clipart, a `limit`ed one's under out/clipart), the first n_train train items and
    n_test test items."""
    items = C.build_cliparts(limit=preset.limit)
    images = C.cache_images(items, CLIPART_CACHE if preset.limit is None else out / "clipart")
    train_idx = [i for i, it in enumerate(items) if it.split == "train"][: preset.n_train]
    test_idx = [i for i, it in enumerate(items) if it.split == "test"][: preset.n_test]
    if not train_idx or not test_idx:
        raise ValueError(f"preset {preset.name!r} leaves {len(train_idx)} train and {len(test_idx)} test images")
    return ClipartData(items, images, train_idx, test_idx)


def stage2_texts(item) -> tuple[str, ...]:
    """What the LLM learns to say: the clipart's name and, when it has one, its description.
    Not the keyword-list caption ("dead frogs, kwaakwaa, squeleton, ..."): ITC and ITM match
    it well, but it is no sentence to generate."""
    texts = [item.name]
    description = clean_caption(item.description) if item.description else ""
    if description and description != item.name:
        texts.append(description)
    return tuple(texts)


def feature_cache(model: Blip2, data: ClipartData, preset: MiniRealPreset, out: Path, seed: int,
                  progress: bool) -> FeatureCache:
    """The frozen encoder's tokens of K views of every training image, built once (resumes
    when interrupted; a folder built with other settings or weights is refused)."""
    crop = CropConfig(crops=preset.crops, scale=preset.crop_scale, hflip=True, seed=seed)  # cliparts name no sides
    folder = out / "features" / f"train-{len(data.train)}x{preset.crops}"
    return build_feature_cache(folder, model.image_encoder, data.subset("train"), crop, batch_size=32,
                               progress=progress)


class ClipartPairs(Dataset):
    """(cached image tokens, one text) per training image: the view is the cache's choice
    for the epoch, the text one of `texts[i]` drawn from (seed, i, epoch), so every epoch
    pairs each image with a fresh view and caption and a resumed run draws the same."""

    def __init__(self, features: CachedFeatureDataset, texts: Sequence[Sequence[str]], seed: int = 0):
        if len(texts) != len(features):
            raise ValueError(f"{len(texts)} text lists for {len(features)} images")
        self.features, self.texts, self.seed, self.epoch = features, texts, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.features.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict:
        item = self.features[i]  # image_embeds (N, D_v) fp16, image_id
        options = self.texts[i]
        return {"image_embeds": item["image_embeds"], "image_id": i,
                "text": options[random.Random(f"{self.seed}/{i}/{self.epoch}").randrange(len(options))]}


def stage1_collate(processor: Blip2Processor):
    def collate(items: list[dict]) -> dict:
        text = processor.qformer_text([it["text"] for it in items])  # (B, T) each
        return {"image_embeds": torch.stack([it["image_embeds"] for it in items]),  # (B, N, D_v) fp16
                "text_ids": text["text_ids"], "text_mask": text["text_mask"],
                "image_ids": torch.tensor([it["image_id"] for it in items])}  # (B,)
    return collate


def stage2_collate(processor: Blip2Processor):
    def collate(items: list[dict]) -> dict:
        texts = [it["text"] for it in items]
        return {"image_embeds": torch.stack([it["image_embeds"] for it in items]),  # (B, N, D_v) fp16
                **processor.decoder_batch([processor.caption_prompt] * len(texts), texts)}  # llm_* (B, T)
    return collate


# ---------------------------------------------------------------------------------------
# Stages
# ---------------------------------------------------------------------------------------


def train_config(preset: MiniRealPreset, stage: int, seed: int) -> TrainConfig:
    if stage == 1:
        return TrainConfig(stage=1, losses=("itc", "itm", "itg"), itm_easy_negatives=preset.stage1_itm_easy_negatives,
                           lr=preset.stage1_lr, min_lr=preset.stage1_lr / 10, warmup_steps=preset.warmup,
                           max_steps=preset.stage1_steps, batch_size=preset.stage1_batch,
                           save_every=preset.save_every, seed=seed, out_dir="")
    return TrainConfig(stage=2, losses=("lm",), lr=preset.stage2_lr, min_lr=preset.stage2_lr / 10,
                       warmup_steps=preset.warmup, max_steps=preset.stage2_steps, batch_size=preset.stage2_batch,
                       save_every=preset.save_every, seed=seed, out_dir="")


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _git_commit() -> Optional[str]:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _recipe_record(preset: MiniRealPreset, seed: int, command: Optional[str], timings: dict, data: ClipartData,
                   folder: Path) -> dict:
    return {
        "command": command, "seed": seed, "preset": asdict(preset), "timings_s": timings,
        "peak_rss_mb": round(peak_rss_mb()),
        "data": {"clipart_items": len(data.items), "train_images": len(data.train), "test_images": len(data.test)},
        "weights_bytes": (folder / WEIGHTS_NAME).stat().st_size,
        "machine": {"torch_threads": torch.get_num_threads(), "cpus": _cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "cuda": torch.cuda.is_available()},
        "git_commit": _git_commit(),
    }


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _prepare(out: Path, preset: MiniRealPreset, seed: int, data: Optional[ClipartData], progress: bool,
             llm: bool, timings: dict, stage1: Optional[str | Path] = None):
    """What both stages start from, each step timed into `timings`: the clipart data, a fresh
    model (seeded; with `stage1`, every stage-1 weight loaded and only the LLM side new), its
    processor and the frozen features cached once."""
    with Timer() as t:
        data = load_data(preset, out) if data is None else data
    timings["data"] = t.seconds
    config = config_for(preset, llm=llm)
    torch.manual_seed(seed)  # the fresh parts' init (cross-attention, queries, heads)
    with Timer() as t:
        model = build_model(config)
        if stage1 is not None:
            load_weights_into(model, stage1, fresh=("llm.",))
    timings["build_model"] = t.seconds
    processor = processor_for(config)
    with Timer() as t:
        cache = feature_cache(model, data, preset, out, seed, progress)
    timings["feature_cache"] = t.seconds
    return data, model, processor, cache


def _fit(model: Blip2, cache, texts: list, collate, stage: int, preset: MiniRealPreset, seed: int, out: Path,
         progress: bool, resume: bool, timings: dict) -> list[dict]:
    """One stage of the shared training loop over (cached features, texts) pairs."""
    batch = preset.stage1_batch if stage == 1 else preset.stage2_batch
    stream = BatchStream(ClipartPairs(CachedFeatureDataset(cache, seed=seed), texts, seed), batch, collate, seed=seed)
    with Timer() as t:
        history = train(model, stream, train_config(preset, stage, seed), out_dir=out / "logs" / f"stage{stage}",
                        save_weights=_save_trained, progress=progress, resume=resume)
    timings[f"stage{stage}_train"] = t.seconds
    return history


def train_stage1(out: str | Path, preset: MiniRealPreset, seed: int = 0, data: Optional[ClipartData] = None,
                 progress: bool = True, resume: bool = False, command: Optional[str] = None
                 ) -> tuple[Blip2Pipeline, dict]:
    """Stage 1 (ITC + ITM + ITG) on the clipart captions. Saves out/stage1 (trained parts,
    fp32: stage 2 starts from it) with recipe.json; returns the pipeline and the record."""
    out, timings = Path(out), {}
    data, model, processor, cache = _prepare(out, preset, seed, data, progress, llm=False, timings=timings)
    texts = [data.items[i].captions for i in data.train]
    history = _fit(model, cache, texts, stage1_collate(processor), 1, preset, seed, out, progress, resume, timings)
    folder = out / "stage1"
    pipe = Blip2Pipeline(model.eval(), processor, name="stage1")
    pipe.save(folder, rebuild_frozen=True)
    record = _recipe_record(preset, seed, command, timings, data, folder) | {"stage": 1, "history_ends": _ends(history)}
    (folder / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")
    return pipe, record


def train_stage2(out: str | Path, stage1: Optional[str | Path], preset: MiniRealPreset, seed: int = 0,
                 data: Optional[ClipartData] = None, progress: bool = True, resume: bool = False,
                 command: Optional[str] = None) -> tuple[Path, dict]:
    """Stage 2 on SmolLM2 from a stage-1 folder (its Q-Former, ln_vision and heads start
    here; None: from MiniLM, the paper's Figure 5 ablation). Saves the shipped folder
    out/mini-real (trained parts only, fp16) with recipe.json and returns its path."""
    out, timings = Path(out), {}
    data, model, processor, cache = _prepare(out, preset, seed, data, progress, llm=True, stage1=stage1,
                                             timings=timings)
    texts = [stage2_texts(data.items[i]) for i in data.train]
    history = _fit(model, cache, texts, stage2_collate(processor), 2, preset, seed, out, progress, resume, timings)
    folder = out / SHIPPED_NAME
    Blip2Pipeline(model.eval(), processor, name=SHIPPED_NAME).save(
        folder, dtype=getattr(torch, preset.shipped_dtype), rebuild_frozen=True)
    size = (folder / WEIGHTS_NAME).stat().st_size
    if size > MAX_SHIPPED_BYTES:
        raise RuntimeError(f"{folder / WEIGHTS_NAME} is {size / 1e6:.1f} MB, over the {MAX_SHIPPED_BYTES / 1e6:.0f} MB "
                           f"a free CPU Space takes")
    record = _recipe_record(preset, seed, command, timings, data, folder) | {
        "stage": 2, "stage1": None if stage1 is None else str(stage1), "history_ends": _ends(history)}
    (folder / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")
    return folder, record


def _ends(history: list[dict]) -> dict:
    """Mean of each loss over the first and the last 10% of the steps (at least one)."""
    n = max(1, len(history) // 10)
    keys = [k for k in history[0] if k.endswith("_loss")] if history else []
    return {k: {"first": float(np.mean([h[k] for h in history[:n]])),
                "last": float(np.mean([h[k] for h in history[-n:]]))} for k in keys}


# ---------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------

CAPTION_DECODING = {"min_new_tokens": 1}  # clipart names are 1-3 words: no 9-token minimum for the ITG decoder


def names_object(text: str, words: Sequence[str]) -> bool:
    """Whether `text` names one of `words` (whole words, a plural -s / -es allowed)."""
    lowered = text.lower()
    return any(re.search(rf"\b{re.escape(w)}(?:s|es)?\b", lowered) for w in words)


@torch.no_grad()
def eval_retrieval(pipe: Blip2Pipeline, items: Sequence, images: np.ndarray | Sequence, k_test: int) -> dict:
    """Recall@1/5/10 both ways, ITC alone and ITM re-ranked (evaluate.retrieval_eval), over
    the images and every caption of each (image -> text: any of its captions counts)."""
    from blip2lab.evaluate import retrieval_eval

    model, proc = pipe.scorer()
    embeds = torch.cat([model.encode_image(proc.images([images[j] for j in range(s, min(s + 32, len(items)))])
                                           .to(pipe.device)) for s in range(0, len(items), 32)])  # (n, N, D_v)
    texts = [(i, c) for i, it in enumerate(items) for c in it.captions]
    text = proc.qformer_text([c for _, c in texts])
    img2txts = [[t for t, (i, _) in enumerate(texts) if i == j] for j in range(len(items))]
    return retrieval_eval(model, embeds, text["text_ids"].to(pipe.device), text["text_mask"].to(pipe.device),
                          [i for i, _ in texts], img2txts, k_test=k_test) | {"images": len(items), "texts": len(texts)}


def generate_captions(pipe: Blip2Pipeline, images: Sequence, batch: int = 8) -> list[str]:
    return [c for s in range(0, len(images), batch)
            for c in pipe.caption([images[j] for j in range(s, min(s + batch, len(images)))], **CAPTION_DECODING)]


def eval_captions(pipe: Blip2Pipeline, items: Sequence, images: Sequence, meteor: bool = True) -> dict:
    """Captions of the held-out cliparts scored against their names (the cleaned titles)
    and, separately, against all their captions (name, description, keyword list)."""
    from blip2lab.evaluate import caption_metrics

    captions = generate_captions(pipe, images)
    preds = {it.id: c for it, c in zip(items, captions)}
    return {
        "vs_names": caption_metrics(preds, {it.id: [it.name] for it in items}, meteor=meteor),
        "vs_all_captions": caption_metrics(preds, {it.id: list(it.captions) for it in items}, meteor=meteor),
        "captions": {it.id: {"name": it.name, "caption": c} for it, c in zip(items, captions)},
    }


def eval_photos(pipe: Blip2Pipeline, question: str) -> dict:
    """The real photos bundled with scikit-image / scikit-learn / matplotlib: each one's
    caption (and, with an LLM, its answer to `question`), and whether it names the photo's
    main object (data.photos.PHOTOS lists the acceptable words)."""
    from blip2lab.worlds.minireal.photos import PHOTOS, load_photos

    photos = load_photos()
    names = list(photos)
    captions = pipe.caption([photos[n] for n in names], **CAPTION_DECODING)
    answers = pipe.answer([photos[n] for n in names], question) if pipe.model.llm is not None else [None] * len(names)
    rows = {n: {"caption": c, "caption_names_object": names_object(c, PHOTOS[n].main_object),
                "answer": a, "answer_names_object": None if a is None else names_object(a, PHOTOS[n].main_object),
                "main_object": list(PHOTOS[n].main_object)}
            for n, c, a in zip(names, captions, answers)}
    return {"question": question if pipe.model.llm is not None else None, "photos": len(names),
            "captions_naming_object": sum(r["caption_names_object"] for r in rows.values()),
            "answers_naming_object": None if pipe.model.llm is None else sum(r["answer_names_object"]
                                                                              for r in rows.values()),
            "per_photo": rows}


def evaluate(pipe: Blip2Pipeline, data: ClipartData, preset: MiniRealPreset, meteor: bool = True,
             photos: bool = True) -> dict:
    """Every figure of a mini-real model: held-out clipart retrieval and captions (all the
    preset's test images, and on their own the first n_slice, which a shipped folder must
    reproduce), and the bundled photos."""
    items = [data.items[i] for i in data.test]
    images = data.subset("test")
    n = min(preset.n_slice, len(items))
    with Timer() as t:
        results: dict = {"clipart_test": {"retrieval": eval_retrieval(pipe, items, images, preset.k_test),
                                          "caption": eval_captions(pipe, items, images, meteor)},
                         "slice": evaluate_slice(pipe, items[:n], ImageSubset(data.images, data.test[:n]), preset)}
        if photos:
            results["photos"] = eval_photos(pipe, preset.photo_question)
    results["eval_s"] = t.seconds
    return results


def evaluate_slice(pipe: Blip2Pipeline, items: Sequence, images: Sequence, preset: MiniRealPreset) -> dict:
    """The first test images on their own: per-image captions and their retrieval figures,
    deterministic (beam search, no dropout), so a reloaded folder must give them again."""
    return {"ids": [it.id for it in items], "captions": generate_captions(pipe, images),
            "retrieval": eval_retrieval(pipe, items, images, preset.k_test)}


def evaluate_folder(folder: str | Path, preset: MiniRealPreset, out: Optional[str | Path] = None,
                    meteor: bool = True) -> dict:
    """Load a saved mini-real folder as users will (`blip2lab.load`) and write its eval.json."""
    folder = Path(folder)
    data = load_data(preset, Path(out) if out is not None else folder.parent)
    results = evaluate(load(folder), data, preset, meteor=meteor)
    (folder / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def reevaluate_slice(folder: str | Path, preset: MiniRealPreset) -> tuple[dict, dict]:
    """(the slice in `folder`'s eval.json, the same slice evaluated afresh from the folder).
    Only the slice's few images are decoded, not the whole dataset's cache (767 MB at 224 px
    for the default preset: a check that a folder reproduces its JSON needs neither the time
    nor the disk)."""
    folder = Path(folder)
    saved = json.loads((folder / "eval.json").read_text())["slice"]
    by_id = {it.id: it for it in C.build_cliparts(limit=preset.limit) if it.split == "test"}
    items = [by_id[i] for i in saved["ids"]]
    images = [C.load_image(it) for it in items]  # the same uint8 arrays cache_images stores
    fresh = evaluate_slice(load(folder), items, images, preset)
    return saved, fresh


def build(out: str | Path, preset: MiniRealPreset, seed: int = 0, progress: bool = True,
          command: Optional[str] = None, meteor: bool = True) -> dict:
    """Stage 1, stage 2, then both evaluated from their saved folders; every step timed."""
    out = Path(out)
    with Timer() as t:
        data = load_data(preset, out)
    data_s = t.seconds
    _, stage1 = train_stage1(out, preset, seed, data, progress, command=command)
    folder, stage2 = train_stage2(out, out / "stage1", preset, seed, data, progress, command=command)
    report = {"preset": asdict(preset), "seed": seed, "data_s": data_s}
    for name, path, record in (("stage1", out / "stage1", stage1), ("mini-real", folder, stage2)):
        with Timer() as t:
            results = evaluate(load(path), data, preset, meteor=meteor, photos=name != "stage1")
        (path / "eval.json").write_text(json.dumps(results, indent=2) + "\n")
        record["timings_s"]["eval"] = t.seconds
        record["peak_rss_mb"] = round(peak_rss_mb())
        (path / "recipe.json").write_text(json.dumps(record, indent=2) + "\n")
        report[name] = {"recipe": record, "eval": results}
    report["total_s"] = data_s + sum(sum(report[n]["recipe"]["timings_s"].values()) for n in ("stage1", "mini-real"))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


__all__ = ["MiniRealPreset", "PRESETS", "preset_with", "config_for", "load_data", "feature_cache", "ClipartPairs",
           "train_stage1", "train_stage2", "evaluate", "evaluate_folder", "reevaluate_slice", "build", "names_object"]
