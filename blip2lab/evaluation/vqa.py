"""`blip2lab eval vqa`: VQAv2, OK-VQA (the VQAv2 format) and GQA, zero-shot as the paper runs
them: the prompt "Question: {q} Answer:" ("Short answer:" for FlanT5), 5 beams, at most 10
and at least 1 new tokens, length penalty -1 (LAVIS vqav2_zeroshot_*_eval.yaml); scored with
the official VQA accuracy and its answer normalisation (`evaluate.vqa_accuracy`: VQAv2 /
OK-VQA against their 10 human answers; GQA as exact match after the same normalisation)."""

from __future__ import annotations

import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

from blip2lab.evaluate import vqa_accuracy
from blip2lab.pipeline import VQA_DECODING, decoding_config

from .data import read_vqa
from .runner import RunDir, file_record, run_items, skipped_summary

__all__ = ["VQA_EVAL_MIN_NEW_TOKENS", "vqa_decoding", "evaluate_vqa"]

VQA_EVAL_MIN_NEW_TOKENS = 1  # LAVIS's VQA evaluation: min_len 1, so no answer is empty


def vqa_decoding(overrides: dict) -> dict:
    """The keywords `pipe.answer` gets: the paper's zero-shot VQA decoding under the user's own."""
    return {"min_new_tokens": VQA_EVAL_MIN_NEW_TOKENS} | dict(overrides)


def evaluate_vqa(pipe, questions: str | os.PathLike, annotations: Optional[str | os.PathLike],
                 images: str | os.PathLike, out: str | os.PathLike, *, image_pattern: Optional[str] = None,
                 subset: Optional[str] = None, batch_size: int = 16, limit: Optional[int] = None,
                 skip_bad_images: bool = False, restart: bool = False, progress: bool = True,
                 **decoding: Any) -> dict:
    """Answer every question, write OUT/predictions.json ([{"question_id", "answer"}], the VQA
    results format) and OUT/metrics.json ("accuracy", "accuracy/<answer type>"); resumable.
    Returns the metrics."""
    data = read_vqa(questions, annotations, images, image_pattern, subset)
    items = data.questions[:limit]
    kw = vqa_decoding(decoding)
    settings = {"task": "vqa", "format": data.format, "model": pipe.name, "questions": file_record(questions),
                "annotations": None if annotations is None else file_record(annotations),
                "images": str(Path(images).resolve()), "image_pattern": image_pattern, "subset": subset,
                "limit": limit, "prompt": pipe.processor.vqa_prompt("{}"),
                "decoding": asdict(decoding_config(VQA_DECODING, **kw))}
    run = RunDir(out, settings, restart)

    def work(batch: list, pixels) -> list[dict]:
        answers = pipe.answer(pixels, [q.question for q in batch], **kw)
        return [{"key": q.key, "question_id": q.question_id, "answer": a} for q, a in zip(batch, answers)]

    records = run_items(run, items, pipe.processor.image, work, batch_size, skip_bad_images, progress, "vqa")
    answered = [(q, r) for q, r in zip(items, records) if "answer" in r]
    if not answered:
        raise ValueError("no question could be answered: nothing to score")
    types = [q.answer_type for q, _ in answered]
    metrics = vqa_accuracy([r["answer"] for _, r in answered], [list(q.answers) for q, _ in answered],
                           types if all(t is not None for t in types) else None, data.official_references)
    metrics |= {"questions": len(items), "scored": len(answered)} | skipped_summary(records)
    metrics["units"] = "fractions in [0, 1]; papers print x100"
    predictions = [{"question_id": r["question_id"], "answer": r["answer"]} for _, r in answered]
    run.write("predictions.json", predictions)
    run.write("metrics.json", metrics | {"settings": settings})
    return metrics
