"""`blip2lab eval zeroshot`: zero-shot image classification by ITC over class prompts, CLIP's
recipe with BLIP-2's similarity: each class is the mean of its prompts' L2-normalised ITC
text embeddings (one prompt per template, "a photo of a {}." by default), normalised again;
an image's score for a class is the ITC cosine, max over the 32 query embeddings
(`Blip2.itc_cosine`). The paper reports no classification numbers: this is a probe of the
stage-1 representation. metrics.json: top1, top5 (with 5 classes or more) and
mean_per_class (the mean of per-class recalls)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import read_classes
from .runner import RunDir, file_record, run_items, skipped_summary

__all__ = ["DEFAULT_TEMPLATES", "class_embeddings", "evaluate_zeroshot"]

DEFAULT_TEMPLATES = ("a photo of a {}.",)


@torch.no_grad()
def class_embeddings(model, proc, classes: Sequence[str], templates: Sequence[str]) -> Tensor:
    """(C, E): per class, the normalised mean of its prompts' normalised ITC text embeddings."""
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"every template needs a '{{}}' for the class name, got {list(templates)}")
    device = model.ln_vision.weight.device
    out = []
    for name in classes:
        t = {k: v.to(device) for k, v in proc.qformer_text([tpl.format(name) for tpl in templates]).items()}
        out.append(model.text_features(t["text_ids"], t["text_mask"]).proj.mean(0))  # (E,)
    return F.normalize(torch.stack(out), dim=-1)  # (C, E)


def evaluate_zeroshot(pipe, annotations: Optional[str | os.PathLike], images: str | os.PathLike,
                      out: str | os.PathLike, *, templates: Sequence[str] = DEFAULT_TEMPLATES, batch_size: int = 32,
                      limit: Optional[int] = None, skip_bad_images: bool = False, restart: bool = False,
                      progress: bool = True) -> dict:
    """Classify every image (a labelled list, or class folders under `images`); write
    OUT/predictions.json ([{"image", "label", "prediction", "top5"}]) and OUT/metrics.json."""
    model, proc = pipe.scorer()
    data = read_classes(annotations, images)
    items, labels = data.images[:limit], data.labels[:limit]
    settings = {"task": "zeroshot", "model": pipe.name, "images": str(Path(images).resolve()),
                "annotations": None if annotations is None else file_record(annotations), "limit": limit,
                "classes": data.classes, "templates": list(templates)}
    run = RunDir(out, settings, restart)
    classes = class_embeddings(model, proc, data.classes, templates)  # (C, E)
    k = min(5, len(data.classes))

    @torch.no_grad()
    def work(batch: list, pixels: Tensor) -> list[dict]:
        image = model.encode_image(pixels.to(classes.device))
        sims = model.itc_cosine(model.image_features(image).proj, classes)  # (B, C)
        top = sims.topk(k, dim=1).indices.tolist()
        return [{"key": it.key, "image": it.image_id, "top5": [data.classes[c] for c in row], "top5_index": row}
                for it, row in zip(batch, top)]

    records = run_items(run, items, proc.image, work, batch_size, skip_bad_images, progress, "zeroshot")
    scored = [(r, y) for r, y in zip(records, labels) if "top5" in r]
    if not scored:
        raise ValueError("no image could be classified: nothing to score")
    metrics = _accuracy(scored, len(data.classes)) | {"images": len(items), "scored": len(scored),
                                                      "classes": len(data.classes)} | skipped_summary(records)
    predictions = [{"image": r["image"], "label": data.classes[y], "prediction": r["top5"][0], "top5": r["top5"]}
                   for r, y in scored]
    run.write("predictions.json", predictions)
    run.write("metrics.json", metrics | {"settings": settings})
    return metrics


def _accuracy(scored: list[tuple[dict, int]], n_classes: int) -> dict:
    hit1 = [r["top5_index"][0] == y for r, y in scored]
    out = {"top1": sum(hit1) / len(hit1)}
    if n_classes >= 5:
        out["top5"] = sum(y in r["top5_index"] for r, y in scored) / len(scored)
    per_class: dict[int, list[bool]] = {}
    for (_, y), h in zip(scored, hit1):
        per_class.setdefault(y, []).append(h)
    out["mean_per_class"] = sum(sum(v) / len(v) for v in per_class.values()) / len(per_class)
    return out
