"""CapFilt, BLIP's caption bootstrapping (Li et al. 2022, Sec. 3.3), as BLIP-2 builds its
pre-training data (paper Sec. 3.4): for every image a captioner writes synthetic captions
by nucleus sampling (top-p 0.9, as BLIP: more diverse than beam search, which BLIP found
better for the filtered data), and a filter keeps, of the synthetic captions and the
original ones, those whose ITM match probability passes a threshold. The result is a new
caption file in any format `blip2lab train` reads.

BLIP-2 ranks candidates by CLIP similarity and keeps the top two; BLIP filters with its ITM
head and a threshold. Here the ITM head of a BLIP-2 model (the captioner's own stage-1 heads
or `filter_model`'s) with a threshold, as BLIP.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..images import load_image
from .data_sources import DataConfig, read_records, write_captions

__all__ = ["CapFiltConfig", "capfilt"]


@dataclass
class CapFiltConfig:
    samples: int = 3  # synthetic captions drawn per image
    threshold: float = 0.5  # ITM match probability a caption needs to be kept
    top_p: float = 0.9  # nucleus sampling (BLIP)
    max_new_tokens: int = 30
    batch_size: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        if self.samples < 0 or not 0.0 <= self.threshold <= 1.0 or not 0 < self.top_p <= 1:
            raise ValueError("capfilt: need samples >= 0, threshold in [0, 1] and top_p in (0, 1]")


def _images(records) -> dict[str, list[str]]:
    """{image path as written in the file: its original captions}, in file order."""
    out: dict[str, list[str]] = {}
    for r in records:
        out.setdefault(r.path, []).append(r.text.strip())
    return out


@torch.no_grad()
def _candidates(pipe, images: list, originals: list[list[str]], cfg: CapFiltConfig, batch_no: int) -> list[list]:
    """Per image: [(text, is_synthetic)], originals first, synthetic captions deduplicated."""
    out = [[(t, False) for t in caps if t] for caps in originals]
    for s in range(cfg.samples):
        torch.manual_seed(cfg.seed * 1_000_003 + batch_no * 101 + s)
        texts = pipe.caption(images, use_nucleus_sampling=True, top_p=cfg.top_p, num_beams=1,
                             max_new_tokens=cfg.max_new_tokens)
        for cands, text in zip(out, texts):
            if text.strip() and text.strip() not in {t for t, _ in cands}:
                cands.append((text.strip(), True))
    return out


def capfilt(model: str, data: str, out: str | Path, images: Optional[str] = None, filter_model: Optional[str] = None,
            cfg: CapFiltConfig = CapFiltConfig(), device: str = "cpu", log=print) -> dict:
    """Write `out` (the kept captions, image paths as in `data`) and return the counts."""
    from ..pipeline import load

    records, root = read_records(DataConfig(path=data, images=images))
    captioner = load(model, device=device)
    scorer = load(filter_model, device=device) if filter_model else captioner
    by_image = _images(records)
    paths = list(by_image)
    rows, counts = [], dict(images=len(paths), originals=0, originals_kept=0, synthetic=0, synthetic_kept=0,
                            images_without_caption=0)
    for b, start in enumerate(range(0, len(paths), cfg.batch_size)):
        chunk = paths[start:start + cfg.batch_size]
        pil = [load_image(p if Path(p).is_absolute() else Path(root) / p) for p in chunk]
        cands = _candidates(captioner, pil, [by_image[p] for p in chunk], cfg, b)
        pairs = [(i, text, synth) for i, cs in enumerate(cands) for text, synth in cs]
        probs = scorer.match([pil[i] for i, _, _ in pairs], [t for _, t, _ in pairs])["itm_prob"].tolist()
        kept_images = set()
        for (i, text, synth), p in zip(pairs, probs):
            key = "synthetic" if synth else "originals"
            counts[key] += 1
            if p >= cfg.threshold:
                counts[key + "_kept"] += 1
                rows.append({"image": chunk[i], "caption": text})
                kept_images.add(i)
        counts["images_without_caption"] += len(chunk) - len(kept_images)
    write_captions(rows, out)
    report = counts | {"kept": len(rows), "dropped": counts["originals"] - counts["originals_kept"],
                       "added": counts["synthetic_kept"], "threshold": cfg.threshold, "out": str(out),
                       "image_root": root}
    log(f"capfilt: {report['images']} images; originals kept {counts['originals_kept']} of {counts['originals']}, "
        f"dropped {report['dropped']}; synthetic added {report['added']} of {counts['synthetic']}; wrote {out}")
    return report
