"""`blip2lab eval caption`: COCO Karpathy test, NoCaps, any caption file (data.read_captions),
scored with the COCO caption evaluation (`evaluate.caption_metrics`: BLEU-1..4, METEOR,
ROUGE-L, CIDEr; NoCaps files also get CIDEr per domain).

Decoding is the paper's COCO evaluation (LAVIS caption_coco_*_eval.yaml): the captioning
prompt ("a photo of"), 5 beams, at most 30 and at least 8 new tokens; any keyword of
`Blip2Pipeline.caption` overrides it. A model without an LLM captions with its Q-Former
(LAVIS's Q-Former defaults)."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from blip2lab.evaluate import caption_metrics
from blip2lab.pipeline import CAPTION_DECODING, QFORMER_CAPTION_DECODING, decoding_config

from .data import read_captions
from .runner import RunDir, file_record, run_items, skipped_summary

__all__ = ["COCO_EVAL_MIN_NEW_TOKENS", "METRIC_NAMES", "caption_decoding", "evaluate_captions"]

COCO_EVAL_MIN_NEW_TOKENS = 8  # LAVIS's COCO / NoCaps caption evaluation: min_len 8
# pycocoevalcap's names -> the names papers print (and metrics.json uses)
METRIC_NAMES = {"Bleu_1": "BLEU-1", "Bleu_2": "BLEU-2", "Bleu_3": "BLEU-3", "Bleu_4": "BLEU-4",
                "METEOR": "METEOR", "ROUGE_L": "ROUGE-L", "CIDEr": "CIDEr"}


def caption_decoding(pipe, overrides: dict) -> dict:
    """The keywords `pipe.caption` gets: the paper's COCO evaluation under the user's own."""
    if pipe.model.llm is None:  # Q-Former captions keep LAVIS's Q-Former defaults
        return dict(overrides)
    cap = overrides.get("max_new_tokens", CAPTION_DECODING["max_new_tokens"])
    return {"min_new_tokens": min(COCO_EVAL_MIN_NEW_TOKENS, cap)} | dict(overrides)


def evaluate_captions(pipe, annotations: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike, *,
                      split: str = "test", prompt: Optional[str] = None, batch_size: int = 16,
                      limit: Optional[int] = None, skip_bad_images: bool = False, restart: bool = False,
                      meteor: bool = True, progress: bool = True, **decoding: Any) -> dict:
    """Caption every image of `annotations` (a caption file; images under `images`), write
    OUT/predictions.json ([{"image_id", "caption"}], the COCO results format) and
    OUT/metrics.json; resumable (evaluation.runner). Returns the metrics."""
    data = read_captions(annotations, images, split)
    items = data.images[:limit]
    kw = caption_decoding(pipe, decoding)
    defaults = CAPTION_DECODING if pipe.model.llm is not None else QFORMER_CAPTION_DECODING
    used_prompt = (pipe.processor.caption_prompt if prompt is None else prompt) if pipe.model.llm else None
    settings = {"task": "caption", "model": pipe.name, "annotations": file_record(annotations),
                "images": str(Path(images).resolve()), "split": split, "limit": limit, "prompt": used_prompt,
                "decoding": asdict(decoding_config(defaults, **kw))}
    run = RunDir(out, settings, restart)

    def work(batch: list, pixels) -> list[dict]:
        texts = pipe.caption(pixels, prompt=prompt, **kw)
        return [{"key": it.key, "image_id": it.image_id, "caption": t} for it, t in zip(batch, texts)]

    records = run_items(run, items, pipe.processor.image, work, batch_size, skip_bad_images, progress, "caption")
    predictions = [{"image_id": r["image_id"], "caption": r["caption"]} for r in records if "caption" in r]
    metrics = score_captions(predictions, data, meteor) | {"images": len(items), "scored": len(predictions)}
    metrics |= skipped_summary(records) | {"units": "fractions in [0, 1] (CIDEr up to 10); papers print x100"}
    run.write("predictions.json", predictions)
    run.write("metrics.json", metrics | {"settings": settings})
    return metrics


def score_captions(predictions: list[dict], data, meteor: bool = True) -> dict:
    """metrics.json's scores of [{"image_id", "caption"}]: the COCO metrics under their paper
    names, and for a NoCaps file CIDEr per domain ("CIDEr/in-domain", ...)."""
    if not predictions:
        raise ValueError("no image could be captioned: nothing to score")
    by_id = {p["image_id"]: p["caption"] for p in predictions}
    out = {METRIC_NAMES[k]: v for k, v in caption_metrics(by_id, data.references, meteor).items()}
    for domain in sorted(set(data.domains.values())):
        subset = {i: c for i, c in by_id.items() if data.domains.get(i) == domain}
        if subset:
            out[f"CIDEr/{domain}"] = caption_metrics(subset, data.references, meteor=False)["CIDEr"]
    return out
