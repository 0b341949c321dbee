"""The on-disk cache of frozen-encoder features: K augmented views per image, written once
(streaming, resumable), read back memory-mapped, one view per image per epoch."""

import random

import numpy as np
import pytest
import torch

from blip2lab.config import VisionConfig
from blip2lab.model.image_encoder import build_image_encoder
from blip2lab.training.feature_cache import (
    CachedFeatureDataset,
    CropConfig,
    FeatureCache,
    build_feature_cache,
    crop_params,
    view_pixels,
)
from blip2lab.training.loop import BatchStream


def _encoder(seed=0):
    torch.manual_seed(seed)
    return build_image_encoder(VisionConfig(image_size=32, patch_size=8, width=24, layers=3, heads=4))


def _images(n=10, size=40):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(n)]  # (H, W, 3), larger than S


class Recorded(list):
    """A list of images that records which indices were read and can fail at one of them."""

    def __init__(self, images, fail_at=None):
        super().__init__(images)
        self.read, self.fail_at = [], fail_at

    def __getitem__(self, i):
        if i == self.fail_at:
            raise RuntimeError("interrupted")
        self.read.append(i)
        return super().__getitem__(i)


def _pixels(enc, image, i, k, crop):
    return view_pixels(image, i, k, crop, enc.image_size, enc.mean, enc.std)


def test_cached_views_are_the_encoders_output_on_those_views(tmp_path):
    enc, images = _encoder(), _images()
    crop = CropConfig(crops=3, seed=1)
    cache = build_feature_cache(tmp_path / "c", enc, images, crop, batch_size=4, progress=False)
    assert len(cache) == 10 and cache.crops == 3 and cache.shape == (10, 3, enc.num_tokens, enc.width)
    for i, k in [(0, 0), (3, 2), (9, 1)]:
        with torch.no_grad():
            expected = enc(_pixels(enc, images[i], i, k, crop)[None])[0]  # (N, D_v)
        got = cache.features(i, k)
        assert got.dtype == torch.float16 and got.shape == expected.shape
        torch.testing.assert_close(got.float(), expected, atol=2e-3, rtol=2e-3)  # fp16 rounding only
    assert not torch.equal(cache.features(0, 0), cache.features(0, 1))  # the views differ
    assert torch.equal(_pixels(enc, images[3], 3, 2, crop), _pixels(enc, images[3], 3, 2, crop))  # reproducible


def test_identity_crop_is_the_plain_resized_image(tmp_path):
    enc, images = _encoder(), _images(3, size=32)
    crop = CropConfig(crops=1, scale=(1.0, 1.0), hflip=False)
    assert crop.identity
    cache = build_feature_cache(tmp_path / "c", enc, images, crop, progress=False)
    pixels = (torch.from_numpy(images[1]).permute(2, 0, 1).float() / 255 - torch.tensor(enc.mean).view(3, 1, 1)) \
        / torch.tensor(enc.std).view(3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(cache.features(1, 0).float(), enc(pixels[None])[0], atol=2e-3, rtol=2e-3)


def test_flip_is_configurable():
    """Left half white, right half black: a flipped view has black on its left."""
    image = np.zeros((32, 32, 3), dtype=np.uint8)
    image[:, :16] = 255
    enc = _encoder()

    def left_is_white(crop, view):
        return bool(_pixels(enc, image, 0, view, crop)[:, :, :8].mean() > 0)

    with_flip = CropConfig(crops=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=True)
    no_flip = CropConfig(crops=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=False)
    flipped = [not left_is_white(with_flip, v) for v in range(16)]
    assert 0 < sum(flipped) < 16  # about half of the views are mirrored
    assert all(left_is_white(no_flip, v) for v in range(16))  # never, with hflip off (the shapes world)


def test_crop_params_follow_the_scale_range():
    crop = CropConfig(scale=(0.5, 1.0), hflip=False)
    rng = random.Random(0)
    for _ in range(200):
        top, left, h, w, flip = crop_params(60, 80, crop, rng)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80 and not flip
        assert 0.45 <= h * w / (60 * 80) <= 1.0  # area share in [0.5, 1], up to rounding


def test_interrupted_build_resumes_without_redoing_done_images(tmp_path):
    enc, images = _encoder(), _images()
    crop = CropConfig(crops=2)
    with pytest.raises(RuntimeError, match="interrupted"):
        build_feature_cache(tmp_path / "c", enc, Recorded(images, fail_at=6), crop, batch_size=4, progress=False)
    with pytest.raises(ValueError, match="incomplete"):
        FeatureCache(tmp_path / "c")  # 4 of 10 images done
    second = Recorded(images)
    resumed = build_feature_cache(tmp_path / "c", enc, second, crop, batch_size=4, progress=False)
    assert min(second.read) == 4  # the first batch was not encoded again
    whole = build_feature_cache(tmp_path / "whole", enc, images, crop, batch_size=4, progress=False)
    assert np.array_equal(np.asarray(resumed.store), np.asarray(whole.store))


def test_a_cache_built_otherwise_is_refused(tmp_path):
    enc, images = _encoder(), _images(4)
    build_feature_cache(tmp_path / "c", enc, images, CropConfig(crops=2), progress=False)
    with pytest.raises(ValueError, match="crops"):
        build_feature_cache(tmp_path / "c", enc, images, CropConfig(crops=3), progress=False)
    with pytest.raises(ValueError, match="encoder"):
        build_feature_cache(tmp_path / "c", _encoder(seed=1), images, CropConfig(crops=2), progress=False)
    with pytest.raises(ValueError, match="crops must be"):
        CropConfig(crops=0)


def test_dataset_uses_each_view_once_every_k_epochs_through_batch_stream(tmp_path):
    enc, images = _encoder(), _images(6)
    cache = build_feature_cache(tmp_path / "c", enc, images, CropConfig(crops=3), progress=False)
    data = CachedFeatureDataset(cache, [{"caption": f"image {i}"} for i in range(6)], seed=2)
    for i in range(6):
        assert sorted(data.view_of(i, e) for e in range(3)) == [0, 1, 2]
        assert sorted(data.view_of(i, e) for e in range(3, 6)) == [0, 1, 2]
    # a fresh order each cycle of K epochs (not one fixed rotation)
    assert any([data.view_of(i, e) for e in range(3)] != [data.view_of(i, e) for e in range(3, 6)] for i in range(6))

    def collate(items):
        return {"image_embeds": torch.stack([it["image_embeds"] for it in items]),
                "image_ids": torch.tensor([it["image_id"] for it in items]),
                "captions": [it["caption"] for it in items]}

    stream = BatchStream(data, 6, collate, seed=0)  # one epoch per step
    for epoch in (0, 1, 2, 4):
        batch = stream(epoch)
        for row, i in enumerate(batch["image_ids"].tolist()):
            assert batch["captions"][row] == f"image {i}"
            assert torch.equal(batch["image_embeds"][row], cache.features(i, data.view_of(i, epoch)))
