"""Frozen-encoder features cached on disk, with the paper's augmentation baked in.

The image encoder is frozen in both stages (paper Sec. 3.1), so its output for a given
input never changes; LAVIS still recomputes it at every step, and at the real size that
forward (EVA ViT-g) costs more than the whole Q-Former step. Here it runs once per image
and crop: every image of a dataset gets K augmented views, each encoded once and stored
as fp16 in one memory-mapped file; training then reads one of the K views per image per
epoch (each view once every K epochs) instead of a fresh crop.

The augmentation is the paper's (Sec. 4: "random resized cropping and horizontal
flipping"; LAVIS `Blip2ImageTrainProcessor`: RandomResizedCrop(scale 0.5-1.0, bicubic)
then RandomHorizontalFlip), configurable: the shapes world names left and right in its
captions, so flipping must be off there, and a strong crop can cut objects out.
What K views lose against a fresh crop every step: variety (K per image instead of one
per visit). What they cost: K x N x D_v x 2 bytes per image (257 x 1408 fp16 is 0.7 MB a
view at the real size), so a dataset of 100k images at K = 4 is 290 GB.

Layout of a cache folder:
    features.f16   raw fp16, C order, shape (n, K, N, D_v)
    cache.json     n, K, N, D_v, the crop settings, the encoder's fingerprint, and `done`:
                   how many images are complete (the build resumes from there)

Shapes: n images, K crops per image, N image tokens, D_v encoder width, S image size.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..formats.native import fingerprint
from ..images import CropConfig, ImageTransform, crop_params

FEATURES_NAME = "features.f16"
META_NAME = "cache.json"
FORMAT = "blip2lab-feature-cache-1"


def view_pixels(image: Any, index: int, view: int, crop: CropConfig, size: int,
                mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """View `view` of image `index` through the one image transform (processor.ImageTransform):
    (3, S, S) float. The same call always gives the same pixels, so the peer that recomputes
    the encoder (benchmarks/lavis_style.py) can see the very views cached."""
    return ImageTransform(size, mean, std).view(image, crop, index, view)


# ---------------------------------------------------------------------------------------
# Building (streaming, resumable) and reading
# ---------------------------------------------------------------------------------------


def _write_meta(folder: Path, meta: dict) -> None:
    tmp = folder / (META_NAME + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n")
    tmp.replace(folder / META_NAME)  # `done` never runs ahead of the data on disk


@torch.no_grad()
def build_feature_cache(folder: str | Path, encoder, images: Sequence, crop: CropConfig = CropConfig(),
                        batch_size: int = 64, device: str | torch.device = "cpu", progress: bool = True
                        ) -> "FeatureCache":
    """Encode K views of every image once into `folder` and return the cache.

    `encoder`: a frozen `ImageEncoder` (pixels (B, 3, S, S) -> (B, N, D_v)); `images`: a
    sequence (len + indexing) of PIL images or (H, W, 3) / (3, H, W) uint8 arrays or
    tensors, read one batch at a time (never all in memory). Streaming: images are
    processed in batches in index order; after each batch the data is flushed and `done`
    advanced, so an interrupted build resumes where it stopped (call it again with the
    same arguments). A folder built with other settings or encoder weights is an error."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n, K, N, D = len(images), crop.crops, encoder.num_tokens, encoder.width
    meta = {"format": FORMAT, "images": n, "crops": K, "tokens": N, "width": D, "crop": asdict(crop),
            "image_size": encoder.image_size, "encoder": fingerprint(encoder), "done": 0}
    meta = json.loads(json.dumps(meta))  # as it reads back from disk (tuples become lists)
    file = folder / FEATURES_NAME
    if (folder / META_NAME).is_file():
        old = json.loads((folder / META_NAME).read_text())
        differ = [k for k in meta if k != "done" and old.get(k) != meta[k]]
        if differ:
            raise ValueError(f"{folder} holds a cache built with other {differ} "
                             f"({', '.join(f'{k}: {old.get(k)} there, {meta[k]} now' for k in differ)}); "
                             f"use another folder or delete it")
        meta["done"] = int(old["done"])
    if not file.is_file() or meta["done"] == 0:
        with open(file, "wb") as f:
            f.truncate(n * K * N * D * 2)  # sparse: pages are written as the build goes
    _write_meta(folder, meta)
    store = np.memmap(file, dtype=np.float16, mode="r+", shape=(n, K, N, D))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, initial=meta["done"], desc="feature cache", unit="img", dynamic_ncols=True)
    was_training = encoder.training
    encoder.eval()
    try:
        for start in range(meta["done"], n, batch_size):
            stop = min(start + batch_size, n)
            batch = [images[i] for i in range(start, stop)]
            for view in range(K):
                pixels = torch.stack([view_pixels(img, start + j, view, crop, encoder.image_size, encoder.mean,
                                                  encoder.std) for j, img in enumerate(batch)])  # (b, 3, S, S)
                feats = encoder(pixels.to(device))  # (b, N, D_v)
                store[start:stop, view] = feats.to("cpu", torch.float16).numpy()
            store.flush()
            meta["done"] = stop
            _write_meta(folder, meta)
            if bar is not None:
                bar.update(stop - start)
    finally:
        encoder.train(was_training)
        if bar is not None:
            bar.close()
        del store
    return FeatureCache(folder)


class FeatureCache:
    """A complete cache folder, memory-mapped read-only: `features(i, k)` -> (N, D_v) fp16."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        meta_file = self.folder / META_NAME
        if not meta_file.is_file():
            raise FileNotFoundError(f"{self.folder} has no {META_NAME}: not a feature cache (build_feature_cache)")
        self.meta = json.loads(meta_file.read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{meta_file}: format {self.meta.get('format')!r}, expected {FORMAT!r}")
        if self.meta["done"] != self.meta["images"]:
            raise ValueError(f"{self.folder} is incomplete ({self.meta['done']} of {self.meta['images']} images): "
                             f"run build_feature_cache again with the same arguments to finish it")
        self.shape = (self.meta["images"], self.meta["crops"], self.meta["tokens"], self.meta["width"])
        self._store: Optional[np.memmap] = None  # opened on first use (and again in a forked worker)

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def crops(self) -> int:
        return self.shape[1]

    @property
    def store(self) -> np.memmap:
        if self._store is None:
            self._store = np.memmap(self.folder / FEATURES_NAME, dtype=np.float16, mode="r", shape=self.shape)
        return self._store

    def __getstate__(self) -> dict:
        return self.__dict__ | {"_store": None}  # a map is reopened, not pickled

    def features(self, index: int, view: int) -> Tensor:
        """View `view` of image `index`: (N, D_v) fp16, copied out of the map."""
        return torch.from_numpy(np.array(self.store[index, view]))


class CachedFeatureDataset(Dataset):
    """One item per image: `image_embeds` (N, D_v) fp16 from one of its K cached views and
    `image_id`, plus the fields of `items[i]` (a dict: its caption, ...) when given.

    The view of image i in epoch e is a pure function of (seed, i, e): a fresh permutation
    of the K views every K epochs, so each view is used once per K epochs. `BatchStream`
    calls `set_epoch` (as torch's DistributedSampler has it), which keeps resuming exact."""

    def __init__(self, cache: FeatureCache, items: Optional[Sequence[dict]] = None, seed: int = 0):
        if items is not None and len(items) != len(cache):
            raise ValueError(f"items has {len(items)} entries for a cache of {len(cache)} images")
        self.cache, self.items, self.seed, self.epoch = cache, items, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def view_of(self, index: int, epoch: Optional[int] = None) -> int:
        epoch = self.epoch if epoch is None else epoch
        K = self.cache.crops
        order = list(range(K))
        random.Random(f"{self.seed}/{index}/{epoch // K}").shuffle(order)
        return order[epoch % K]

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, index: int) -> dict:
        item = {"image_embeds": self.cache.features(index, self.view_of(index)), "image_id": index}
        return item | dict(self.items[index]) if self.items is not None else item


__all__ = ["CachedFeatureDataset", "CropConfig", "FeatureCache", "build_feature_cache", "crop_params",
           "view_pixels"]
