"""Images in: decoding any image a user hands over (`load_image`) and the one image transform
of blip2lab (`ImageTransform`), which training crops, evaluation, serving and feature caches
all go through, so a model is served the pixels it was trained on.

Shapes: S image side, B batch.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torch import Tensor

__all__ = ["DEFAULT_MAX_PIXELS", "load_image", "CropConfig", "crop_params", "ImageTransform"]

DEFAULT_MAX_PIXELS = 100_000_000  # 100 megapixels: a 10000x10000 photo; beyond that, refuse
# A large image is shrunk while decoding (JPEG DCT scaling) or by box reduction, but never
# below REDUCING_GAP x the target side, so the final bicubic resize still downsamples by
# that factor and its result is practically unchanged (the `reducing_gap` idea of PIL's
# `thumbnail`/`resize`). Images under 4 S per side (a COCO photo at S = 224) are not
# touched, so they match LAVIS's transform bit for bit.
REDUCING_GAP = 4
_REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "RGBX", "CMYK")  # box averaging is meaningful there (not "P")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_PIL_LIMIT_LOCK = threading.Lock()  # PIL's bomb limit is a module global; swap it one thread at a time


def load_image(image: Any, *, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
               target_size: Optional[int] = None) -> Image.Image:
    """An image as an upright 8-bit RGB PIL image.

    `image`: a PIL image; a numpy array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) of uint8,
    uint16 (full 16-bit range) or floats in [0, 1]; a path (str / Path); bytes or a binary
    file object. Handled on the way: EXIF orientation; transparency (RGBA, LA, palette or
    tRNS) composited over white, not the black that `convert("RGB")` gives; 16-bit and
    32-bit grey scaled to 8 bits instead of clipped; palette, 1-bit and CMYK images.

    `max_pixels`: images with more pixels raise ValueError (None: no limit). Files are
    checked from their header, before anything is decoded.
    `target_size`: the side S the caller will resize to. When given, images larger than
    REDUCING_GAP * S per side are decoded at reduced resolution (JPEG draft) or box-reduced
    first, which bounds memory and time for huge photos. None returns full resolution.
    """
    if isinstance(image, Image.Image):
        _check_pixels(image.size, max_pixels, "image")
        img = image
    elif isinstance(image, np.ndarray):
        _check_pixels((image.shape[1], image.shape[0]) if image.ndim >= 2 else (0, 0), max_pixels, "array")
        img = _array_to_pil(image)
    elif isinstance(image, (str, os.PathLike, bytes, bytearray)) or hasattr(image, "read"):
        img = _open(image, max_pixels, target_size)
    else:
        raise TypeError(f"cannot load an image from {type(image).__name__}; pass a PIL image, a numpy "
                        f"array, a path, bytes or a binary file object")
    img = _upright(img)
    img = _to_8bit(img)
    if target_size is not None:
        img = _shrink(img, target_size)
    return _flatten(img)


def _check_pixels(size: tuple[int, int], max_pixels: Optional[int], name: str) -> None:
    w, h = size
    if max_pixels is not None and w * h > max_pixels:
        raise ValueError(f"{name}: {w}x{h} = {w * h:,} pixels exceeds max_pixels = {max_pixels:,}; "
                         f"raise max_pixels if the image is trusted")


@contextlib.contextmanager
def _pil_pixel_limit(max_pixels: Optional[int]):
    """PIL's decompression-bomb guard set to `max_pixels` for one `Image.open`, its warning
    made an error, and the global put back afterwards: no lasting change to PIL's state.
    (Threads of this module take turns; other code opening images at that very moment
    would see our limit for the few microseconds a header parse takes.)"""
    with _PIL_LIMIT_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = max_pixels
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                yield
        finally:
            Image.MAX_IMAGE_PIXELS = old


def _open(source: Any, max_pixels: Optional[int], target_size: Optional[int]) -> Image.Image:
    """Decode a file, bytes or file object, bounded by `max_pixels`, shrunk early for large JPEGs."""
    if isinstance(source, (bytes, bytearray)):
        name, fp = "<bytes>", io.BytesIO(source)
    elif hasattr(source, "read"):
        name, fp = getattr(source, "name", "<file object>"), source
    else:
        name, fp = str(source), source  # a missing file raises FileNotFoundError, as open() does
    try:
        with _pil_pixel_limit(max_pixels):
            img = Image.open(fp)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{name}: image exceeds max_pixels = {max_pixels:,} pixels ({e})") from e
    except (UnidentifiedImageError, SyntaxError) as e:
        raise ValueError(f"{name} is not a readable image: {e}") from e
    with img:
        _check_pixels(img.size, max_pixels, name)
        if target_size is not None:
            # JPEG: DCT-domain downscaling by 1/2, 1/4 or 1/8 while decoding, so a 6000x6000
            # photo at S = 224 is decoded as 1500x1500 and never exists at full size.
            # Other formats ignore draft() and are box-reduced after decoding (_shrink).
            img.draft(None, (REDUCING_GAP * target_size, REDUCING_GAP * target_size))
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated or corrupt data
            raise ValueError(f"{name} is not a readable image: {e}") from e
    return img


def _upright(img: Image.Image) -> Image.Image:
    # Phones store pixels sideways and an EXIF Orientation tag; apply it so the model sees
    # what a viewer shows. Checked first, since exif_transpose copies even when it has nothing to do.
    if img.getexif().get(ExifTags.Base.Orientation, 1) in (None, 1):
        return img
    return ImageOps.exif_transpose(img)


def _uint16_to_uint8(a: np.ndarray) -> np.ndarray:
    """Full 16-bit range onto 8 bits with rounding: 0 -> 0, 65535 -> 255 (never a clip at 255)."""
    return ((a.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _stretch_to_uint8(a: np.ndarray) -> np.ndarray:
    """Min-max onto [0, 255], for values with no standard range (32-bit ints, odd floats)."""
    a = a.astype(np.float32)
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, dtype=np.uint8)
    return np.rint((a - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _array_to_uint8(a: np.ndarray) -> np.ndarray:
    if a.dtype == np.uint8:
        return a
    if a.dtype == np.bool_:
        return a.astype(np.uint8) * 255
    if a.dtype == np.uint16:
        return _uint16_to_uint8(a)
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise ValueError("float image array contains NaN or infinity")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(f"float image arrays must hold values in [0, 1], got [{lo:g}, {hi:g}]; "
                             f"divide 0-255 data by 255 or pass it as uint8")
        return np.rint(a.astype(np.float32) * 255.0).astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer):
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            raise ValueError(f"{a.dtype} image array has values in [{lo}, {hi}], outside [0, 255]; "
                             f"pass 16-bit data as uint16")
        return a.astype(np.uint8)
    raise ValueError(f"unsupported image array dtype {a.dtype}; use uint8, uint16 or float in [0, 1]")


def _array_to_pil(a: np.ndarray) -> Image.Image:
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (2, 3, 4))):
        raise ValueError(f"expected an image array of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) "
                         f"(channels last), got {tuple(a.shape)}")
    return Image.fromarray(np.ascontiguousarray(_array_to_uint8(a)))  # mode L, LA, RGB or RGBA from the shape


def _to_8bit(img: Image.Image) -> Image.Image:
    """1-bit, 16-bit and 32-bit modes -> 8-bit L. PIL's own convert("L"/"RGB") clips 16-bit
    values at 255, which turns most 16-bit photos white; scale instead."""
    mode = img.mode
    if mode == "1":
        return img.convert("L")
    if mode.startswith("I;16"):
        return Image.fromarray(_uint16_to_uint8(np.asarray(img)))
    if mode == "I":
        # 32-bit ints carry no range of their own: 8-bit data stays, 16-bit data is scaled
        # (PIL opened 16-bit PNGs as "I" for years), anything else is stretched.
        a = np.asarray(img)
        lo, hi = int(a.min()), int(a.max())
        if lo >= 0 and hi <= 255:
            return Image.fromarray(a.astype(np.uint8))
        if lo >= 0 and hi <= 65535:
            return Image.fromarray(_uint16_to_uint8(a))
        return Image.fromarray(_stretch_to_uint8(a))
    if mode == "F":
        a = np.nan_to_num(np.asarray(img), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0.0 and hi <= 1.0:
            return Image.fromarray(np.rint(a * 255.0).astype(np.uint8))
        if lo >= 0.0 and hi <= 255.0:
            return Image.fromarray(np.rint(a).astype(np.uint8))
        return Image.fromarray(_stretch_to_uint8(a))
    return img


def _shrink(img: Image.Image, target_size: int) -> Image.Image:
    """Integer box reduction of a huge image, down to no less than REDUCING_GAP x target."""
    factor = min(img.size) // (REDUCING_GAP * target_size)
    if factor >= 2 and img.mode in _REDUCIBLE_MODES:
        return img.reduce(factor)  # PIL premultiplies alpha for RGBA / LA here
    return img


def _flatten(img: Image.Image) -> Image.Image:
    """Any 8-bit mode -> RGB; transparency composited over white. LAVIS's convert("RGB")
    keeps whatever colour transparent pixels happen to store (often black): a logo on a
    transparent background would become a logo on black, which no caption describes."""
    if img.mode in _ALPHA_MODES or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode == "RGB":
        return img
    try:
        return img.convert("RGB")  # L, P, CMYK, YCbCr, RGBX, ...
    except (ValueError, OSError) as e:
        raise ValueError(f"cannot convert an image of mode {img.mode!r} to RGB: {e}") from e


# -- the image transform (training crops, evaluation, serving) ----------------------------

@dataclass(frozen=True)
class CropConfig:
    """The training augmentation whose outputs are cached, and how many views per image."""

    crops: int = 4  # K views stored per image; training reads one per image per epoch
    # Area share of the crop, as RandomResizedCrop's `scale` (LAVIS min_scale 0.5, max_scale 1.0).
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # aspect range of the crop (torchvision's default)
    # The paper's horizontal flip (p = 0.5). Off where captions say "left" / "right" (the
    # shapes world): a flipped image would contradict its caption.
    hflip: bool = True
    seed: int = 0  # the views are a pure function of (seed, image index, view index)

    def __post_init__(self) -> None:
        if self.crops < 1:
            raise ValueError(f"crops must be >= 1, got {self.crops}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {self.ratio}")

    @property
    def identity(self) -> bool:
        """No augmentation at all: every view is the whole image, resized."""
        return self.scale == (1.0, 1.0) and self.ratio[0] <= 1 <= self.ratio[1] and not self.hflip


def crop_params(height: int, width: int, crop: CropConfig, rng: random.Random) -> tuple[int, int, int, int, bool]:
    """(top, left, h, w, flip) of one view: torchvision's RandomResizedCrop.get_params
    (10 tries at a random area and log-uniform aspect, else a central crop), drawn from
    `rng` instead of torch's global generator so a view is reproducible on its own."""
    flip = crop.hflip and rng.random() < 0.5
    area = height * width
    log_ratio = (math.log(crop.ratio[0]), math.log(crop.ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*crop.scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w, flip
    in_ratio = width / height  # fallback: the largest central crop within the ratio range
    if in_ratio < crop.ratio[0]:
        w, h = width, int(round(width / crop.ratio[0]))
    elif in_ratio > crop.ratio[1]:
        h, w = height, int(round(height * crop.ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w, flip


class ImageTransform:
    """The one image transform of blip2lab: training, evaluation, serving and feature caches
    all call it, so what a model is trained on and what it is served are the same pixels.

    The whole image (`__call__`: evaluation, serving) or a crop of it (`view`: the paper's
    training augmentation, RandomResizedCrop + horizontal flip) is resized to S x S with PIL's
    bicubic filter, as LAVIS's transforms do on PIL images (`blip_image_eval`,
    `blip_image_train`) and transformers' BlipImageProcessorPil; then ToTensor and Normalize.
    Images already S x S (rendered scenes) skip the resize (`normalize`)."""

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float],
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS):
        self.image_size = int(image_size)
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.max_pixels = max_pixels

    def __call__(self, image: Any) -> Tensor:
        """One image (anything load_image takes) -> normalised pixels (3, S, S), float32."""
        S = self.image_size
        img = load_image(image, max_pixels=self.max_pixels, target_size=S)
        return self.normalize(img.resize((S, S), Image.Resampling.BICUBIC))

    def view(self, image: Any, crop: CropConfig, index: int, view: int) -> Tensor:
        """View `view` of image `index`: its crop box and flip drawn from (crop.seed, index,
        view) alone (`crop_params`), resized, flipped, normalised -> (3, S, S). The identity
        crop gives exactly `__call__`'s pixels."""
        S = self.image_size
        img = load_image(_channels_last(image), max_pixels=self.max_pixels)
        rng = random.Random(f"{crop.seed}/{index}/{view}")
        top, left, h, w, flip = (0, 0, img.height, img.width, False) if crop.identity else \
            crop_params(img.height, img.width, crop, rng)
        out = img.resize((S, S), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        return self.normalize(out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out)

    def normalize(self, pixels: Any) -> Tensor:
        """S x S uint8 pixels - a PIL image, (S, S, 3) or a batch (B, S, S, 3) array - ->
        float (3, S, S) or (B, 3, S, S), normalised with mean / std."""
        x = torch.from_numpy(np.array(pixels, dtype=np.uint8))  # (..., S, S, 3), a copy torch may write
        x = x.movedim(-1, -3).float().div_(255.0)  # (..., 3, S, S)
        mean, std = torch.tensor(self.mean).view(3, 1, 1), torch.tensor(self.std).view(3, 1, 1)
        return x.sub_(mean).div_(std)


def _channels_last(image: Any) -> Any:
    """A (3, H, W) array or tensor -> (H, W, 3) numpy, for load_image; anything else as is."""
    if isinstance(image, Tensor):
        image = image.cpu().numpy()
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        return np.ascontiguousarray(image.transpose(1, 2, 0))
    return image
