"""`blip2lab eval retrieval`: image-text retrieval on Flickr30k / COCO (any caption file),
BLIP-2's protocol (BLIP2_REFERENCE.md Sec. 5; LAVIS `compute_sim_matrix`, k_test 128): ITC
for every pair, each query's top k_test re-ranked by the ITM head, final score ITM logit +
ITC cosine; recall@1/5/10 both ways (`evaluate.recall_at_k`). metrics.json holds that
ranking at the top level (txt_r1 ... img_r10, the numbers BLIP-2 reports), "itc/..." for ITC
alone and "itm/..." for the ITM logit alone inside the top k.

Texts are cleaned as LAVIS's eval text processor does (`clean_caption`) and tokenised to 35
tokens, LAVIS's max_length here. The expensive parts are resumable: image features are
written chunk by chunk (work/images-*.pt), ITM logits every ITM_FILE_BATCHES batches
(work/itm-*.pt)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

from blip2lab.evaluate import itc_matrix, itm_pair_logits, recall_at_k, rerank, retrieval_candidates
from blip2lab.processor import clean_caption

from .data import read_captions
from .runner import RunDir, batches, check_images, file_record, skipped_summary

__all__ = ["LAVIS_TEXT_LEN", "ITM_FILE_BATCHES", "evaluate_retrieval"]

LAVIS_TEXT_LEN = 35  # compute_sim_matrix: tokenizer(..., truncation=True, max_length=35)
LAVIS_MAX_WORDS = 50  # BlipCaptionProcessor's default max_words
ITM_FILE_BATCHES = 64  # ITM batches per work file: the most a killed run recomputes
TOP = 10  # ranked candidates written per query


def evaluate_retrieval(pipe, annotations: str | os.PathLike, images: str | os.PathLike, out: str | os.PathLike, *,
                       split: str = "test", k_test: int = 128, batch_size: int = 64, limit: Optional[int] = None,
                       skip_bad_images: bool = False, restart: bool = False, progress: bool = True) -> dict:
    """Retrieve both ways over the images of `annotations` and their captions; write
    OUT/predictions.json (each query's top 10) and OUT/metrics.json. Returns the metrics."""
    if k_test < 1 or batch_size < 1:
        raise ValueError(f"k_test and batch_size must be >= 1, got {k_test} and {batch_size}")
    model, proc = pipe.scorer()  # a stage-2 model retrieves with its linked stage-1 model
    data = read_captions(annotations, images, split)
    items = data.images[:limit]
    settings = {"task": "retrieval", "model": pipe.name, "annotations": file_record(annotations),
                "images": str(Path(images).resolve()), "split": split, "limit": limit, "k_test": k_test,
                "chunk": batch_size, "text_len": LAVIS_TEXT_LEN}
    run = RunDir(out, settings, restart)
    gallery, skipped = _encode_images(run, model, proc, items, batch_size, skip_bad_images, progress)
    texts, img2txts, txt2img = _gallery_texts(gallery, data.references)
    with torch.no_grad():
        scores, logit, in_i2t, in_t2i = _scores(run, model, proc, gallery, texts, k_test, batch_size, progress)
    metrics = recall_at_k(scores["itm_i2t"], scores["itm_t2i"], txt2img, img2txts)
    metrics |= {f"itc/{k}": v for k, v in recall_at_k(scores["itc_i2t"], scores["itc_t2i"], txt2img, img2txts).items()}
    neg_inf = torch.tensor(float("-inf"))
    alone = recall_at_k(torch.where(in_i2t, logit, neg_inf), torch.where(in_t2i, logit.t(), neg_inf), txt2img, img2txts)
    metrics |= {f"itm/{k}": v for k, v in alone.items()}
    metrics |= {"images": len(items), "texts": len(texts), "scored_images": len(gallery.items)}
    metrics |= skipped_summary(skipped) | {"units": "fractions in [0, 1]; papers print x100"}
    run.write("predictions.json", _rankings(scores, gallery.items, texts, txt2img))
    run.write("metrics.json", metrics | {"settings": settings})
    return metrics


class _Gallery:
    """The kept images, their ITC projections (N_img, Q, E) and a fetch of their ln_vision
    outputs for the ITM head (from the work files, memory-mapped)."""

    def __init__(self, items: list, proj: Tensor, tokens: list[Tensor], device: torch.device):
        self.items, self.proj, self.device = items, proj.to(device), device
        self._tokens = tokens
        self._where = [(c, r) for c, t in enumerate(tokens) for r in range(t.shape[0])]

    def fetch(self, idx: Tensor) -> Tensor:
        rows = [self._tokens[c][r] for c, r in (self._where[i] for i in idx.tolist())]
        return torch.stack(rows).to(self.device)  # (len(idx), N, D_v)


def _encode_images(run: RunDir, model, proc, items: list, batch_size: int, skip_bad: bool,
                   progress: bool) -> tuple[_Gallery, list[dict]]:
    """ln_vision outputs and ITC projections of every image, one work file per chunk of
    `batch_size` images; a resumed run starts at the first chunk without its file."""
    from tqdm.auto import tqdm

    skipped = check_images(items, skip_bad)
    gone = {r["key"] for r in skipped}
    items = [it for it in items if it.key not in gone]
    n_chunks = -(-len(items) // batch_size)
    start = next((j for j in range(n_chunks) if run.load_tensors(f"images-{j:05d}.pt") is None), n_chunks)
    device = model.ln_vision.weight.device
    with torch.no_grad(), tqdm(total=len(items), initial=start * batch_size, desc="images", unit="img",
                               disable=not progress) as bar:
        chunks = batches(items[start * batch_size:], proc.image, batch_size, skip_bad)
        for j, (good, pixels, bad) in enumerate(chunks, start):
            image = model.encode_image(pixels.to(device)) if good else torch.zeros(0)
            proj = model.image_features(image).proj if good else torch.zeros(0)
            run.save_tensors(f"images-{j:05d}.pt", {"image": image.cpu(), "proj": proj.cpu(), "bad": bad,
                                                     "keys": [it.key for it in good]})
            bar.update(len(good) + len(bad))
    kept, proj, tokens = [], [], []
    by_key = {it.key: it for it in items}
    for j in range(n_chunks):
        saved = run.load_tensors(f"images-{j:05d}.pt")
        skipped += saved["bad"]
        if saved["keys"]:
            kept += [by_key[k] for k in saved["keys"]]
            proj.append(saved["proj"])
            tokens.append(saved["image"])
    if not kept:
        raise ValueError("no image could be encoded: nothing to retrieve")
    return _Gallery(kept, torch.cat(proj), tokens, device), skipped


def _gallery_texts(gallery: _Gallery, references: dict) -> tuple[list[str], list[list[int]], list[int]]:
    """Every caption of the kept images, cleaned as LAVIS's eval does: (texts, img2txts, txt2img)."""
    texts, img2txts, txt2img = [], [], []
    for k, it in enumerate(gallery.items):
        caps = references[it.image_id]
        img2txts.append(list(range(len(texts), len(texts) + len(caps))))
        txt2img += [k] * len(caps)
        texts += [clean_caption(c, LAVIS_MAX_WORDS) for c in caps]
    return texts, img2txts, txt2img


def _scores(run: RunDir, model, proc, gallery: _Gallery, texts: list[str], k_test: int, batch_size: int,
            progress: bool):
    """`evaluate.rerank`'s score matrices, the ITM logits (N_img, N_txt) and the top-k masks."""
    device = gallery.device
    max_len = min(LAVIS_TEXT_LEN, model.config.qformer.max_position_embeddings)
    t = {k: v.to(device) for k, v in proc.qformer_text(texts, max_len=max_len).items()}
    text_proj = torch.cat([model.text_features(t["text_ids"][s: s + batch_size], t["text_mask"][s: s + batch_size]).proj
                           for s in range(0, len(texts), batch_size)])  # (N_txt, E)
    itc = itc_matrix(model, gallery.proj, text_proj)  # (N_img, N_txt)
    in_i2t, in_t2i = retrieval_candidates(itc, k_test)
    pairs = (in_i2t | in_t2i.t()).nonzero()  # (M, 2), image-major
    logit = torch.full_like(itc, float("-inf"))
    logit[pairs[:, 0], pairs[:, 1]] = _itm_logits(run, model, gallery, t, pairs, batch_size, progress).to(device)
    return rerank(itc, logit, in_i2t, in_t2i), logit.cpu(), in_i2t.cpu(), in_t2i.cpu()


def _itm_logits(run: RunDir, model, gallery: _Gallery, text: dict, pairs: Tensor, batch_size: int,
                progress: bool) -> Tensor:
    """ITM logits (M,) of `pairs`, every ITM_FILE_BATCHES batches saved to a work file; the
    files of a resumed run are used when its pairs are the same ones."""
    from tqdm.auto import tqdm

    saved = run.load_tensors("itm-pairs.pt")
    if saved is None or not torch.equal(saved["pairs"], pairs.cpu()):
        if saved is not None:  # features recomputed differently (another device): start the ITM part over
            warnings.warn(f"{run.work}: the top-k pairs changed since the run stopped; recomputing ITM logits")
            for old in run.work.glob("itm-*.pt"):
                old.unlink()
        run.save_tensors("itm-pairs.pt", {"pairs": pairs.cpu()})
    per_file, out = batch_size * ITM_FILE_BATCHES, []
    with tqdm(total=pairs.shape[0], desc="ITM pairs", unit="pair", disable=not progress) as bar:
        for j, s in enumerate(range(0, pairs.shape[0], per_file)):
            got = run.load_tensors(f"itm-{j:05d}.pt")
            if got is None:
                logits = itm_pair_logits(model, gallery.fetch, text["text_ids"], text["text_mask"],
                                         pairs[s: s + per_file], batch_size)
                got = {"logits": logits.cpu()}
                run.save_tensors(f"itm-{j:05d}.pt", got)
            out.append(got["logits"])
            bar.update(got["logits"].shape[0])
    return torch.cat(out)


def _rankings(scores: dict, items: list, texts: list[str], txt2img: list[int]) -> dict:
    """Each query's top TOP candidates by the final score (predictions.json)."""
    def top(matrix: Tensor, i: int) -> tuple[list[int], list]:
        s, idx = matrix[i].topk(min(TOP, matrix.shape[1]))
        return idx.tolist(), [round(v, 6) if v != float("-inf") else None for v in s.tolist()]

    i2t, t2i = [], []
    for i, it in enumerate(items):
        idx, s = top(scores["itm_i2t"], i)
        i2t.append({"image_id": it.image_id, "texts": idx, "scores": s})
    for t, caption in enumerate(texts):
        idx, s = top(scores["itm_t2i"], t)
        t2i.append({"text": t, "caption": caption, "image_id": items[txt2img[t]].image_id,
                    "images": [items[k].image_id for k in idx], "scores": s})
    return {"texts": [{"text": t, "caption": c, "image_id": items[txt2img[t]].image_id}
                      for t, c in enumerate(texts)], "i2t": i2t, "t2i": t2i}
