"""Strings and image files in, tensors out, and back: the one processor of blip2lab.

Everything that is not a tensor stops here (STYLE.md point 7): image decoding and the eval
transform, Q-Former tokenisation, the stage-2 LLM sequences with their label masks, the
prompts of the paper, and decoding generated tokens back to text. Datasets, evaluation,
the pipeline, notebooks and the app all call the same methods, so training and serving
cannot drift apart.

Sources: the paper (Li et al. 2023, Sec. 3.3 and 4), LAVIS `blip2_qformer.py`,
`blip2_opt.py`, `blip2_t5.py` (sequence layout, label masking, EOS = "\\n" for OPT), and the
facts collected in shared/design/BLIP2_REFERENCE.md Sec. 1, 3 and 8.

Shapes: B batch, S image side, T text length (Q-Former or LLM input), L target / generated length.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import random
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torch import Tensor

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "load_image",
    "CropConfig",
    "crop_params",
    "ImageTransform",
    "Blip2Processor",
    "make_qformer_tokenizer",
    "qformer_token_ids",
    "clean_caption",
]

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


# -- images ------------------------------------------------------------------------------


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


def _as_uint8_chw(image: Any) -> Tensor:
    """A PIL image, or an (H, W, 3) / (3, H, W) uint8 array or tensor -> (3, H, W) uint8."""
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.ascontiguousarray(image))
    if isinstance(image, Tensor):
        t = image.permute(2, 0, 1) if image.ndim == 3 and image.shape[0] != 3 else image  # (H, W, 3) -> (3, H, W)
    else:
        from torchvision.transforms.functional import pil_to_tensor

        t = pil_to_tensor(image.convert("RGB"))
    if t.dtype != torch.uint8 or t.ndim != 3 or t.shape[0] != 3:
        raise ValueError(f"images must be RGB uint8 (PIL, or (H, W, 3) / (3, H, W) array or tensor); "
                         f"got {t.dtype} {tuple(t.shape)}")
    return t


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


# -- tokenizers ----------------------------------------------------------------------------


def make_qformer_tokenizer(base):
    """A copy of a bert-base-uncased-like tokenizer with `[DEC]` as its BOS, the token the
    Q-Former's image-grounded text generation starts from (LAVIS `init_tokenizer`:
    `add_special_tokens({"bos_token": "[DEC]"})`, id 30522 for bert-base-uncased).
    Idempotent: a tokenizer that already has it gets no second one."""
    tok = copy.deepcopy(base)
    if tok.bos_token != "[DEC]":
        tok.add_special_tokens({"bos_token": "[DEC]"})
    return tok


def qformer_token_ids(qformer_tokenizer) -> dict[str, Optional[int]]:
    """A Q-Former tokenizer's special ids by their QFormerConfig names; dec_token_id None when
    it has no [DEC] (see make_qformer_tokenizer)."""
    tok = qformer_tokenizer
    dec = tok.convert_tokens_to_ids("[DEC]") if "[DEC]" in tok.get_vocab() else None
    return dict(cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
                dec_token_id=dec)


def clean_caption(text: str, max_words: int = 50) -> str:
    """LAVIS's caption cleaning (`BlipCaptionProcessor.pre_caption`), for training data that
    should match the reference: lower case, the characters .!"()*#:;~ become spaces,
    whitespace collapsed, at most `max_words` words."""
    text = re.sub(r"([.!\"()*#:;~])", " ", text.lower())
    text = re.sub(r"\s{2,}", " ", text).strip()
    return " ".join(text.split(" ")[:max_words])


def _batch_list(x: Sequence[str] | str, what: str) -> list[str]:
    if isinstance(x, str):
        raise TypeError(f"{what} must be a list of strings, got a single string")
    x = list(x)
    if not x:
        raise ValueError(f"empty batch: got 0 {what}")
    for s in x:
        if not isinstance(s, str):
            raise TypeError(f"{what} must be strings, got {type(s).__name__}")
    return x


def _pad(rows: list[list[int]], pad_id: int, side: str) -> tuple[Tensor, Tensor]:
    """Ragged id lists -> ids (B, T) and mask (B, T), padded on `side` ("left" / "right")."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), T), dtype=torch.long)  # (B, T), 1 = real token
    for i, r in enumerate(rows):
        if not r:
            continue
        span = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[i, span] = torch.tensor(r, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


# -- the processor ----------------------------------------------------------------------------


class Blip2Processor:
    """Images and strings -> model tensors, and generated ids -> strings.

    image_size, mean, std: the frozen image tower's eval transform (VisionConfig).
    qformer_tokenizer: bert-base-uncased-like with `[DEC]` (see make_qformer_tokenizer);
        None for a processor that never feeds text to the Q-Former.
    llm_tokenizer, llm_kind: the frozen LLM's tokenizer and family ("decoder": OPT, Llama,
        GPT-2; "encoder_decoder": T5 / FlanT5; "none": a stage-1 model).
    qformer_max_len: Q-Former text length, [CLS] and [SEP] included (paper / LAVIS: 32).
    llm_max_len: LLM training sequence length without the visual tokens (LAVIS max_txt_len 32).
    max_question_chars: longer questions are cut (with a warning) so a pasted essay
        cannot blow up the prompt.
    max_pixels: larger images are refused (see load_image).
    caption_prompt: the captioning prompt (paper: "a photo of").
    chat_template: questions through the LLM tokenizer's chat template (instruction-tuned
        decoder-only LLMs), not "Question: {q} Answer:".
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], qformer_tokenizer=None,
                 llm_tokenizer=None, llm_kind: Literal["none", "decoder", "encoder_decoder"] = "none",
                 qformer_max_len: int = 32, llm_max_len: int = 32, max_question_chars: int = 1000,
                 max_pixels: Optional[int] = DEFAULT_MAX_PIXELS, caption_prompt: str = "a photo of",
                 chat_template: bool = False):
        if image_size <= 0:
            raise ValueError(f"image_size must be > 0, got {image_size}")
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be > 0, got {tuple(std)}")
        if llm_kind not in ("none", "decoder", "encoder_decoder"):
            raise ValueError(f"llm_kind must be 'none', 'decoder' or 'encoder_decoder', got {llm_kind!r}")
        if (llm_kind == "none") != (llm_tokenizer is None):
            raise ValueError(f"llm_tokenizer is required when llm_kind is 'decoder' or 'encoder_decoder' and "
                             f"must be None when it is 'none' (llm_kind={llm_kind!r})")
        if qformer_max_len < 2:
            raise ValueError(f"qformer_max_len must be >= 2 ([CLS] and [SEP]), got {qformer_max_len}")
        if llm_max_len < 2:
            raise ValueError(f"llm_max_len must be >= 2, got {llm_max_len}")
        if max_question_chars <= 0:
            raise ValueError(f"max_question_chars must be > 0, got {max_question_chars}")
        if max_pixels is not None and max_pixels <= 0:
            raise ValueError(f"max_pixels must be > 0 or None, got {max_pixels}")
        self.transform = ImageTransform(image_size, mean, std, max_pixels)
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.qformer_tokenizer = qformer_tokenizer
        self.llm_tokenizer = llm_tokenizer
        self.llm_kind = llm_kind
        self.qformer_max_len = int(qformer_max_len)
        self.llm_max_len = int(llm_max_len)
        self.max_question_chars = int(max_question_chars)
        self.max_pixels = max_pixels
        self.caption_prompt = caption_prompt
        self.chat_template = bool(chat_template)
        if self.chat_template and (llm_kind != "decoder" or not getattr(llm_tokenizer, "chat_template", None)):
            raise ValueError("chat_template needs a decoder-only LLM whose tokenizer has a chat template")
        if qformer_tokenizer is not None:
            self._check_qformer_tokenizer()
        if llm_kind == "decoder":
            self._newline_id = self._find_newline_id()
            self._joiner = self._find_joiner()
        if llm_kind == "encoder_decoder" and llm_tokenizer.eos_token_id is None:
            raise ValueError("llm_tokenizer has no eos_token: an encoder-decoder target must end with EOS")

    @classmethod
    def from_config(cls, config, qformer_tokenizer=None, llm_tokenizer=None, check: bool = True,
                    **kwargs) -> "Blip2Processor":
        """The processor matching a Blip2Config (image side and normalisation, text length,
        LLM kind and prompt). `check` compares the Q-Former tokenizer's special ids and size
        with config.qformer, the mismatch that otherwise trains on the wrong tokens."""
        proc = cls(config.vision.image_size, config.vision.mean, config.vision.std, qformer_tokenizer,
                   llm_tokenizer, config.llm.kind, qformer_max_len=config.qformer.max_text_len,
                   caption_prompt=config.llm.prompt, chat_template=config.llm.chat_template, **kwargs)
        if check and qformer_tokenizer is not None and config.qformer.text_input:  # else no vocabulary to check
            proc.check_qformer_config(config.qformer)
        return proc

    # -- images ------------------------------------------------------------------------------

    def image(self, image: Any) -> Tensor:
        """One image (anything load_image takes) -> normalised pixels (3, S, S), float32:
        the whole image squashed to S x S (`ImageTransform`), as LAVIS's `blip_image_eval`."""
        self.transform.max_pixels = self.max_pixels  # callers (the app) may tighten the limit after building
        return self.transform(image)

    def images(self, images: Sequence[Any]) -> Tensor:
        """A list of images -> pixels (B, 3, S, S), float32, normalised."""
        if not isinstance(images, (list, tuple)):
            raise TypeError(f"images() takes a list of images, got {type(images).__name__}; use image() for one")
        if not images:
            raise ValueError("empty batch: got 0 images")
        return torch.stack([self.image(x) for x in images])  # (B, 3, S, S)

    # -- Q-Former text ------------------------------------------------------------------------

    def _check_qformer_tokenizer(self) -> None:
        tok = self.qformer_tokenizer
        for attr, token in (("cls_token", "[CLS]"), ("sep_token", "[SEP]"), ("pad_token", "[PAD]")):
            if getattr(tok, attr + "_id") is None:
                raise ValueError(f"qformer_tokenizer has no {attr} ({token})")

    def _need_qformer(self):
        if self.qformer_tokenizer is None:
            raise ValueError("this processor has no qformer_tokenizer")
        return self.qformer_tokenizer

    @property
    def cls_token_id(self) -> int:
        return self._need_qformer().cls_token_id

    @property
    def sep_token_id(self) -> int:
        return self._need_qformer().sep_token_id

    @property
    def pad_token_id(self) -> int:
        return self._need_qformer().pad_token_id

    @property
    def dec_token_id(self) -> Optional[int]:
        """[DEC], the BOS of ITG and Q-Former captions; None for a tokenizer without it (a
        retrieval checkpoint's plain BERT tokenizer: such a model matches but cannot caption)."""
        return qformer_token_ids(self._need_qformer())["dec_token_id"]

    def check_qformer_config(self, qformer_config) -> None:
        """ValueError naming the field when the tokenizer disagrees with a QFormerConfig."""
        tok = self._need_qformer()
        # The words (added tokens aside: an LLM-side `<image>` past the table is never Q-Former
        # text); the special ids are checked one by one below.
        if tok.vocab_size > qformer_config.vocab_size:
            raise ValueError(f"qformer.vocab_size ({qformer_config.vocab_size}) is smaller than the "
                             f"qformer_tokenizer's {tok.vocab_size} words")
        for name in ("cls_token_id", "sep_token_id", "pad_token_id", "dec_token_id"):
            mine, theirs = getattr(self, name), getattr(qformer_config, name)
            if mine != theirs:
                hint = " (it has no [DEC]: wrap it with make_qformer_tokenizer())" if mine is None else ""
                raise ValueError(f"qformer.{name} is {theirs} but the qformer_tokenizer's is {mine}{hint}")

    def qformer_text(self, texts: Sequence[str], max_len: Optional[int] = None) -> dict[str, Tensor]:
        """Texts -> text_ids (B, T) = [CLS] tokens [SEP] [PAD]..., text_mask (B, T).
        Right padding to the longest row; tokens cut so the row fits `max_len`
        (default qformer_max_len), [SEP] kept. [CLS] is the row LAVIS swaps for [ENC]/[DEC]
        per task; the model does that."""
        tok = self._need_qformer()
        texts = _batch_list(texts, "texts")
        max_len = self.qformer_max_len if max_len is None else int(max_len)
        if max_len < 2:
            raise ValueError(f"max_len must be >= 2 ([CLS] and [SEP]), got {max_len}")
        pieces = tok([t.strip() for t in texts], add_special_tokens=False)["input_ids"]
        rows = [[tok.cls_token_id, *p[: max_len - 2], tok.sep_token_id] for p in pieces]
        ids, mask = _pad(rows, tok.pad_token_id, "right")
        return {"text_ids": ids, "text_mask": mask}

    def qformer_questions(self, questions: Sequence[str]) -> dict[str, Tensor]:
        """Questions for question-aware queries (paper Sec. 4.3 VQA fine-tuning):
        question_ids (B, T), question_mask (B, T), tokenised as qformer_text."""
        out = self.qformer_text([self._clean_question(q) for q in _batch_list(questions, "questions")])
        return {"question_ids": out["text_ids"], "question_mask": out["text_mask"]}

    def decode_qformer(self, token_ids: Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Q-Former ids (B, L) -> texts, special tokens ([DEC], [SEP], [PAD]) dropped."""
        rows = token_ids.tolist() if isinstance(token_ids, Tensor) else [list(r) for r in token_ids]
        return [t.strip() for t in self._need_qformer().batch_decode(rows, skip_special_tokens=True)]

    # -- LLM tokens ---------------------------------------------------------------------------

    def _need_llm(self, kind: Optional[str] = None):
        if self.llm_tokenizer is None:
            raise ValueError("this processor has no LLM (llm_kind is 'none')")
        if kind is not None and self.llm_kind != kind:
            raise ValueError(f"this needs llm_kind={kind!r}, the processor has {self.llm_kind!r}")
        return self.llm_tokenizer

    def _encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids without any special token: those are placed by hand below, so the
        layout does not depend on each tokenizer's post-processing template."""
        return self.llm_tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _find_newline_id(self) -> int:
        # LAVIS blip2_opt: `eos_token_id = tokenizer("\n", add_special_tokens=False).input_ids[0]`.
        # The last id, so a sentencepiece tokenizer's leading "▁" piece is skipped (Llama).
        ids = self._encode(["\n"])[0]
        if not ids or "\n" not in self.llm_tokenizer.decode([ids[-1]]):
            raise ValueError(f"llm_tokenizer has no token for '\\n' (got ids {ids}); decoder-only LLMs "
                             f"end their text with it")
        return ids[-1]

    def _find_joiner(self) -> str:
        """What goes between a prompt and its text when they are tokenised apart, so the ids
        equal those of the joined string: " " for byte-level BPE (OPT, GPT-2: "Ġa" is a
        different token from "a"), "" for tokenizers that add their own word-start marker.
        Tokenising apart is what makes the prompt length exact (LAVIS's `prompt_length`
        silently assumes no merge across the boundary)."""
        prompt, text = "a photo of", "a dog"
        joint = self._encode([f"{prompt} {text}"])[0]
        head = self._encode([prompt])[0]
        for joiner in (" ", ""):
            if head + self._encode([joiner + text])[0] == joint:
                return joiner
        return " "

    @property
    def llm_bos_token_id(self) -> Optional[int]:
        return self._need_llm().bos_token_id

    @property
    def llm_pad_token_id(self) -> int:
        """The tokenizer's pad; GPT-2 and Llama have none, so their EOS pads (masked anyway)."""
        tok = self._need_llm()
        for value in (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id):
            if value is not None:
                return value
        return 0

    @property
    def llm_eos_token_id(self) -> int:
        """Where generated text ends: the id of "\\n" for decoder-only LLMs (what they are
        trained to emit after the text, LAVIS blip2_opt), EOS for encoder-decoders."""
        tok = self._need_llm()
        return self._newline_id if self.llm_kind == "decoder" else tok.eos_token_id

    @property
    def llm_stop_token_ids(self) -> list[int]:
        """llm_eos_token_id plus the tokenizer's own EOS: a model that emits </s> instead of
        "\\n" (quantised or lightly trained) then stops rather than rambling."""
        ids = [self.llm_eos_token_id]
        eos = self._need_llm().eos_token_id
        if eos is not None and eos not in ids:
            ids.append(eos)
        return ids

    def _join(self, prompt: str, text: str) -> str:
        return (self._joiner if prompt and text else "") + text

    def decoder_batch(self, prompts: Sequence[str], texts: Sequence[str]) -> dict[str, Tensor]:
        """Decoder-only LLM training rows (paper Sec. 3.3, LAVIS blip2_opt):

            llm_ids    [BOS][prompt][text]["\\n"][PAD]...   (B, T), right padded
            llm_mask   1 on real tokens                      (B, T)
            llm_labels llm_ids, -100 on BOS, prompt, padding (B, T)

        The model prepends the Q visual tokens (label -100). Prompt and text are stripped and
        tokenised apart, so the number of masked prompt tokens is exact. Rows longer than
        llm_max_len lose the end of their text (and "\\n": the text did not end there), never
        the prompt; a prompt that leaves no room for text is an error.
        """
        tok = self._need_llm("decoder")
        prompts, texts = _batch_list(prompts, "prompts"), _batch_list(texts, "texts")
        if len(prompts) != len(texts):
            raise ValueError(f"got {len(prompts)} prompts for {len(texts)} texts")
        prompts = [p.strip() for p in prompts]
        bos = [] if tok.bos_token_id is None else [tok.bos_token_id]
        heads = [bos + p for p in self._encode(prompts)]
        tails = self._encode([self._join(p, t.strip()) + "\n" for p, t in zip(prompts, texts)])
        rows, n_masked = [], []
        for i, (head, tail) in enumerate(zip(heads, tails)):
            room = self.llm_max_len - len(head)
            if room < 1:
                raise ValueError(f"prompt {i} is {len(head)} tokens with BOS, leaving no room for text within "
                                 f"llm_max_len = {self.llm_max_len}; raise llm_max_len or shorten the prompt")
            rows.append(head + tail[:room])
            n_masked.append(len(head))
        ids, mask = _pad(rows, self.llm_pad_token_id, "right")  # (B, T)
        labels = ids.masked_fill(mask == 0, -100)  # (B, T); by mask, as pad may equal EOS (GPT-2)
        for i, n in enumerate(n_masked):
            labels[i, :n] = -100
        return {"llm_ids": ids, "llm_mask": mask, "llm_labels": labels}

    def encoder_decoder_batch(self, inputs: Sequence[str], targets: Sequence[str]) -> dict[str, Tensor]:
        """Encoder-decoder LLM training rows (paper Sec. 3.3, LAVIS blip2_t5):

            llm_ids, llm_mask                 encoder input  [input][EOS][PAD]...  (B, T)
            llm_target_ids, llm_target_mask   decoder target [target][EOS][PAD]... (B, L)
            llm_labels                        llm_target_ids, -100 on padding       (B, L)

        Both right padded, each cut to llm_max_len with EOS kept (the tokenizer truncation
        LAVIS uses). The model builds the decoder inputs by shifting the targets right.
        For pre-training, `inputs`/`targets` come from prefix_split; for captioning, the
        input is the caption prompt and the target the caption."""
        tok = self._need_llm("encoder_decoder")
        inputs, targets = _batch_list(inputs, "inputs"), _batch_list(targets, "targets")
        if len(inputs) != len(targets):
            raise ValueError(f"got {len(inputs)} inputs for {len(targets)} targets")
        eos, n = tok.eos_token_id, self.llm_max_len - 1
        src = [p[:n] + [eos] for p in self._encode([s.strip() for s in inputs])]
        tgt = [p[:n] + [eos] for p in self._encode([t.strip() for t in targets])]
        ids, mask = _pad(src, self.llm_pad_token_id, "right")  # (B, T)
        target_ids, target_mask = _pad(tgt, self.llm_pad_token_id, "right")  # (B, L)
        labels = target_ids.masked_fill(target_mask == 0, -100)  # (B, L)
        return {"llm_ids": ids, "llm_mask": mask, "llm_target_ids": target_ids,
                "llm_target_mask": target_mask, "llm_labels": labels}

    @staticmethod
    def prefix_split(text: str, rng: random.Random) -> tuple[str, str]:
        """The prefix-LM split of encoder-decoder pre-training (paper Sec. 3.3: "we split a
        text into two parts; the prefix text is concatenated with the visual representation
        as input to the LLM's encoder; the suffix text is the generation target").

        The paper does not say where to split. Here, as recorded in BLIP2_REFERENCE.md
        Sec. 3: at a word boundary, the prefix being k words with k uniform in
        [1, n_words // 2], so at least one word is given and at least half is generated.
        A text of fewer than 2 words has an empty prefix and is all suffix. Spacing inside
        each part is kept: for single-spaced text, prefix + " " + suffix == text.
        """
        spans = [m.span() for m in re.finditer(r"\S+", text)]  # (start, end) of each word
        if len(spans) < 2:
            return "", text.strip()
        k = rng.randint(1, len(spans) // 2)
        return text[spans[0][0]: spans[k - 1][1]], text[spans[k][0]: spans[-1][1]]

    # -- prompts ---------------------------------------------------------------------------

    def _clean_question(self, question: str) -> str:
        if not isinstance(question, str):
            raise TypeError(f"a question must be a string, got {type(question).__name__}")
        question = question.strip()
        if not question:
            raise ValueError("empty question")
        if len(question) > self.max_question_chars:
            warnings.warn(f"question truncated to max_question_chars = {self.max_question_chars} characters",
                          stacklevel=3)
            question = question[: self.max_question_chars].rstrip()
        return question

    def _answer_word(self) -> str:
        # Paper Sec. 4.2 / LAVIS: OPT is prompted "Answer:", FlanT5 "Short answer:".
        self._need_llm()
        return "Short answer:" if self.llm_kind == "encoder_decoder" else "Answer:"

    def vqa_prompt(self, question: str) -> str:
        """"Question: {q} Answer:" (decoder-only) or "Question: {q} Short answer:" (encoder-decoder);
        with `chat_template`, the question as the user's turn of the LLM's chat template."""
        if self.chat_template:
            return self.chat_prompt([], question)
        return f"Question: {self._clean_question(question)} {self._answer_word()}"

    def chat_prompt(self, history: Sequence[tuple[str, str]], question: str) -> str:
        """Multi-turn chat as in the paper's demos: past turns as "Question: {q} Answer: {a}."
        joined by spaces, then " Question: {q} Answer:" ("Short answer:" for T5). The caller
        keeps the history short: nothing is truncated here but each question.

        With `chat_template`: user / assistant messages rendered by the tokenizer's template,
        ending in the assistant's opening (SmolLM2: "...<|im_start|>assistant\n"). The
        template's leading BOS is dropped: `generation_batch` places BOS itself, after the
        visual prompt, as for every decoder-only row."""
        if self.chat_template:
            messages = []
            for q, a in history:
                messages += [{"role": "user", "content": self._clean_question(q)},
                             {"role": "assistant", "content": a.strip()}]
            messages.append({"role": "user", "content": self._clean_question(question)})
            text = self.llm_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            bos = self.llm_tokenizer.bos_token
            return text[len(bos):] if bos and text.startswith(bos) else text
        word = self._answer_word()
        turns = [f"Question: {self._clean_question(q)} {word} {a.strip()}." for q, a in history]
        return " ".join(turns + [self.vqa_prompt(question)])

    # -- generation ---------------------------------------------------------------------------

    def generation_batch(self, prompts: Sequence[str] | str) -> dict[str, Tensor]:
        """Prompts for LLM generation -> llm_ids (B, T), llm_mask (B, T); a single string is
        a batch of one. Decoder-only rows are [PAD]...[BOS][prompt], LEFT padded: every row's
        last prompt token sits in the last column, where the first new token follows (right
        padding would make short rows continue after their pads). Encoder-decoder rows are
        [prompt][EOS][PAD]..., right padded. Prompts are not truncated (LAVIS cuts them at
        max_txt_len from the right, which drops the "Answer:" of a long question). A chat-
        template prompt keeps its trailing newline (the assistant's turn opens with it)."""
        tok = self._need_llm()
        prompts = _batch_list([prompts] if isinstance(prompts, str) else prompts, "prompts")
        pieces = self._encode([p.lstrip() if self.chat_template and p.endswith("\n") else p.strip() for p in prompts])
        if self.llm_kind == "decoder":
            bos = [] if tok.bos_token_id is None else [tok.bos_token_id]
            rows = [bos + p for p in pieces]
            if not any(rows):
                raise ValueError("empty prompts and a tokenizer without BOS leave nothing to generate from")
            ids, mask = _pad(rows, self.llm_pad_token_id, "left")
        else:
            ids, mask = _pad([p + [tok.eos_token_id] for p in pieces], self.llm_pad_token_id, "right")
        return {"llm_ids": ids, "llm_mask": mask}

    def decode_llm(self, token_ids: Tensor | Sequence[Sequence[int]], prompt_width: int = 0) -> list[str]:
        """Generated ids (B, L) -> texts. `token_ids` are the new tokens only (what
        Blip2.generate_text returns); for full sequences pass `prompt_width` = the prompt's
        padded width to drop it, so the prompt is never echoed. Special tokens are skipped,
        decoder-only output is cut at the first "\\n" (its EOS), and whitespace stripped."""
        tok = self._need_llm()
        rows = token_ids.tolist() if isinstance(token_ids, Tensor) else [list(r) for r in token_ids]
        if rows and isinstance(rows[0], int):
            rows = [rows]  # one 1-D sequence
        rows = [r[prompt_width:] for r in rows]
        if self.llm_kind == "decoder":
            rows = [r[: r.index(self._newline_id)] if self._newline_id in r else r for r in rows]
        texts = tok.batch_decode(rows, skip_special_tokens=True)
        if self.llm_kind == "decoder":
            texts = [t.split("\n", 1)[0] for t in texts]  # a merged token ("\n\n", ".\n") may hide one
        return [t.strip() for t in texts]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(image_size={self.image_size}, llm_kind={self.llm_kind!r}, "
                f"qformer_max_len={self.qformer_max_len}, llm_max_len={self.llm_max_len})")
