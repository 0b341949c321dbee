"""Retrieval at gallery scale: BLIP-2 ITC embeddings on disk, and an exact top-k search that
reads a small part of them.

Two folders, one per direction of search (each `open`ed without loading its embeddings):

- `ImageIndex` (text -> image): per image its Q query embeddings, L2-normalised, fp16,
  `embeddings.npy` (M, Q, E), memory-mapped; `keys.jsonl` names each image (a path, or
  whatever the caller's loader understands);
- `TextIndex` (image -> text): per caption its [CLS] embedding, fp16, `embeddings.npy`
  (K, E); `keys.jsonl` holds the captions.

Both are built by streaming batches through the model (`build_image_index`,
`build_text_index`) with a progress bar. A build is resumable: after each batch its rows
are flushed, then `progress.json` is advanced (written beside, then renamed), so a rerun
after an interruption continues from the last completed batch and ends with the same
bytes. `manifest.json`, written last, marks a finished index.

The score is BLIP-2's ITC similarity (paper Sec. 3.2, LAVIS `compute_sim_matrix`): of text t
and image i, s_i = max over queries q of <t, z_iq>. Search returns the same top k as the
full matmul over the stored vectors (ties aside), without reading most of them. With
d = z - mu_q (mu_q the mean of query position q over the images),

    <t, z> = <t, mu_q> + <B^T t, B^T d> + <P t, P d> <= <t, mu_q> + <B^T t, B^T d> + ||P t|| ||P d||

where B (E, m) holds the m leading principal directions of the d's and P = I - B B^T
(Cauchy-Schwarz on the part outside span(B)). Each stored vector keeps its m "head"
coordinates B^T d and its tail norm ||P d||: the sketch, fp32 (m + 1, V), memory-mapped and
scanned whole by every query (one (m + 1)-vector x sketch product, then the max per image).
Exact scores are then computed from the embeddings in decreasing bound order until the k-th
best exact score is at least every bound left. The result is exact whatever the data; how
much is read depends on the data, on how much of the d's energy the m directions hold:
about 1% of the images on the shapes model at m = 16, and everything for embeddings whose
energy is spread over most of the E directions, where the search falls back to one
sequential pass (SCAN_ALL_FRACTION, `_scan_top_k`). `SearchResult` says what a query read.

That pass is itself exact and bounded: a fast score of every item within a known error err
(text -> image: torch's fp16 matrix-vector product straight from the memmap, 2x the speed of
converting to fp32 first; image -> text: torch's fp32 matmul), then exact scores of the items
within 2 err of the k-th best fast score, which hold the whole exact top k.

Why not a per-image bound (centroid c_i, radius r_i = max_q ||z_iq - c_i||, bound
<t, c_i> + ||t|| r_i)? The queries of one image are far apart: on the shipped shapes model r_i
is 0.9 on average, and the bound exceeded the 10th best score for 99.8% of the images (2,048
scenes, 1,000 captions), so it prunes nothing. Per-image boxes in the rotated coordinates
did no better (91% at m = 16).

Shape legend: M indexed images, K indexed texts, Q queries, E ITC width, m sketch width, N image
tokens, D_v image width, V stored vectors (M Q or K), P query vectors (1 for a text, Q for an image), k hits.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from threadpoolctl import ThreadpoolController

from blip2lab.search.gallery import Hit

INDEX_VERSION = 1
MANIFEST, PROGRESS = "manifest.json", "progress.json"
EMBEDDINGS, KEYS, SKETCH, BASIS, MEANS = "embeddings.npy", "keys.jsonl", "sketch.npy", "basis.npy", "means.npy"
# Added to every bound. The bound is exact arithmetic's; fp32 rounding of the sketch, the
# basis's orthonormality and the product move it by ~1e-6 for unit vectors, so 1e-4
# keeps it an upper bound with a wide berth and costs nothing measurable in pruning.
BOUND_MARGIN = 1e-4
# How far two fp32 computations of the same exact score (different summation orders) may
# differ, for unit vectors: the candidates of `_scan_top_k` keep this much room.
EXACT_ERROR = 1e-5
NORM_TOLERANCE = 1e-2  # stored vectors must be L2-normalised to within this (fp16 keeps ~1e-3)
BASIS_SAMPLE = 4096  # items whose vectors estimate the second moment (the basis' quality, not its exactness)
FIRST_ROUND = 64  # items evaluated exactly before the first threshold (at least 4 k)
ROUND = 2048  # items evaluated per later round, highest bounds first
# When more than this fraction of the items is still in play after the first round, the
# bound is too loose for this query (data whose energy is spread over many directions):
# one sequential pass over the memmap is then cheaper than scattered reads.
SCAN_ALL_FRACTION = 0.25
# After this many searches in a row that made that pass, the index stops computing bounds
# (for such data they cost time and save nothing) and goes straight
# to the pass, trying the bound again every RETRY_BOUND-th search in case the queries changed.
SKIP_BOUND_AFTER = 3
RETRY_BOUND = 16
# Vectors converted to fp32 and multiplied at a time: the fp32 copy stays in cache. On one
# core of the project's machine a full scan of 100k x 32 x 256 took 0.14 s at 2,048
# vectors a step and 2.1 s at 131,072.
SCAN_VECTORS = 2048
# The sequential pass's blocks: fp16 rows multiplied in place (no fp32 copy to keep in cache).
FP16_SCAN_ITEMS = 4096
FAST_SCAN_ROWS = 4096  # captions per block of the image -> text pass (4 MB in fp32)


@dataclass
class SearchResult:
    """Top k of one query, best first, and what the search touched to find them."""

    indices: np.ndarray  # (k,) item positions in the index
    scores: np.ndarray  # (k,) exact ITC cosines, max over queries
    evaluated: int  # items whose exact score was computed (read from the memmap)
    total: int  # items in the index
    bytes_read: int  # bytes of embeddings.npy those reads cover
    sketch_bytes: int  # bytes of the sketch scanned (all of it, or none where the bound was skipped)

    @property
    def fraction_read(self) -> float:
        return self.evaluated / self.total


class _Index:
    """What both directions share: the memmap, the sketch, the bound and the exact search."""

    kind = ""  # "images" or "texts"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / MANIFEST).is_file():
            hint = " (an interrupted build: rerun it to finish)" if (self.path / PROGRESS).is_file() else ""
            raise FileNotFoundError(f"{self.path} holds no finished index: no {MANIFEST}{hint}")
        self.manifest = json.loads((self.path / MANIFEST).read_text())
        if self.manifest.get("kind") != self.kind:
            raise ValueError(f"{self.path} is an index of {self.manifest.get('kind')!r}, not {self.kind!r}")
        if self.manifest.get("version") != INDEX_VERSION:
            raise ValueError(f"{self.path}: index version {self.manifest.get('version')}, "
                             f"this code reads {INDEX_VERSION}")
        self.embeddings = np.load(self.path / EMBEDDINGS, mmap_mode="r")  # (M, Q, E) or (K, E), fp16
        self.means = np.load(self.path / MEANS)  # (R, E) fp32: the mean of each query position (R = 1 for texts)
        self.basis = np.load(self.path / BASIS)  # (E, m) fp32
        self.sketch = np.load(self.path / SKETCH, mmap_mode="r")  # (m + 1, V) fp32; paged in on first use
        self._passes_in_a_row = self._skipped = 0  # searches that made the full pass; bounds skipped since

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[-1]

    @property
    def rows_per_item(self) -> int:  # R: Q vectors per image, 1 per text
        return self.embeddings.shape[1] if self.embeddings.ndim == 3 else 1

    @cached_property
    def keys(self) -> list[str]:
        with open(self.path / KEYS, encoding="utf-8") as f:
            return [json.loads(line) for line in f]

    def _weights(self, query: np.ndarray) -> np.ndarray:
        """query vectors (P, E) -> the sketch weights (P, m + 1): head coordinates, tail norm."""
        head = query @ self.basis  # (P, m)
        tail = np.linalg.norm(query.astype(np.float64) - head.astype(np.float64) @ self.basis.T.astype(np.float64),
                              axis=1)  # (P,)
        return np.concatenate([head, tail[:, None].astype(np.float32)], axis=1)

    def upper_bounds(self, query: np.ndarray) -> np.ndarray:
        """query (P, E) -> (len,) an upper bound of every item's score, max over its vectors and the query's."""
        margin = np.float32(BOUND_MARGIN * max(1.0, float(np.linalg.norm(query, axis=1).max())))
        return self._bounds(self._weights(query), query @ self.means.T) + margin  # offsets (P, R)

    def _bounds(self, w: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def exact_scores(self, query: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """query (P, E), idx (c,) sorted -> (c,) exact scores, max over (p, r), in fp32."""
        step = max(1, SCAN_VECTORS // self.rows_per_item)
        return np.concatenate([np.empty(0, np.float32)] + [self._scores(query, self.embeddings[idx[s:s + step]])
                                                           for s in range(0, len(idx), step)])

    def full_scan(self, query: np.ndarray) -> np.ndarray:
        """Every item's exact score, reading the whole memmap in order: the plain full matmul. (len,)"""
        step = max(1, SCAN_VECTORS // self.rows_per_item)
        with _one_blas_thread():
            return np.concatenate([self._scores(query, self.embeddings[s:s + step]) for s in range(0, len(self), step)])

    def _scores(self, query: np.ndarray, half: np.ndarray) -> np.ndarray:
        """query (P, E), half (c, R, E) or (c, E) fp16 -> (c,) max over (p, r)."""
        rows = _fp32(half).reshape(-1, self.dim)  # (c R, E)
        return (rows @ query.T).reshape(len(half), -1).max(axis=1)  # (c R, P) -> (c,)

    def _scan_top_k(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The exact top k (indices, scores) by one sequential pass. With a_i a fast score
        within err of the exact s_i and a_(k) the k-th best a: the k items with a >= a_(k) have
        s >= a_(k) - err, so the k-th best s is too, and any item of the exact top k has
        a >= s - err >= a_(k) - 2 err. Only those are scored exactly."""
        fast, err = self._fast_scores(query)  # (n,), float
        kth = np.partition(fast, len(fast) - k)[len(fast) - k]
        cand = np.flatnonzero(fast >= kth - 2 * err)
        scores = self.exact_scores(query, cand)
        keep = np.lexsort((cand, -scores))[:k]  # score descending, then index
        return cand[keep], scores[keep]

    def _fast_scores(self, query: np.ndarray) -> tuple[np.ndarray, float]:
        """query (P, E) -> (every item's score within err (n,), err)."""
        raise NotImplementedError

    def _search(self, query: np.ndarray, k: int) -> SearchResult:
        """query: (P, E) fp32, checked by _as_query."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(k, len(self))
        skip = self._passes_in_a_row >= SKIP_BOUND_AFTER and self._skipped < RETRY_BOUND
        with _one_blas_thread():
            if skip:
                self._skipped += 1
                (idx, scores), evaluated = self._scan_top_k(query, k), len(self)
            else:
                bounds = self.upper_bounds(query)  # (n,)
                idx, scores, evaluated = _bounded_top_k(bounds, lambda i: self.exact_scores(query, i), k,
                                                        lambda: self._scan_top_k(query, k))
                self._skipped = 0
                self._passes_in_a_row = self._passes_in_a_row + 1 if evaluated == len(self) else 0
        item_bytes = self.rows_per_item * self.dim * self.embeddings.itemsize
        return SearchResult(idx, scores, evaluated, len(self), evaluated * item_bytes, 0 if skip else self.sketch.nbytes)


class ImageIndex(_Index):
    """Text -> image: M images' query embeddings (M, Q, E)."""

    kind = "images"

    def _bounds(self, w: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """w (1, m + 1), offsets (1, Q): one text -> (M,): one product over all M Q vectors,
        each query position's offset <t, mean_q>, then the max over queries."""
        per_vector = (w[0] @ self.sketch).reshape(self.rows_per_item, len(self))  # (Q M,) -> (Q, M)
        return (per_vector + offsets[0, :, None]).max(axis=0)  # (M,)

    def _fast_scores(self, query: np.ndarray) -> tuple[np.ndarray, float]:
        """query (1, E) -> every image's score within err: the fp16 rows times the unit query in
        fp16 (torch's kernel reads fp16 and accumulates in fp32: faster than converting to fp32
        first, docs/performance.md), scaled back by ||t||. err, for fp32
        accumulation: the query's rounding to fp16 (<= 2^-11 ||z||) plus the result's (half an
        ulp of a score <= 1 + NORM_TOLERANCE: 2^-11) plus the sum's (E 2^-24), doubled.
        Where this build's kernel is not that accurate (`_fp16_matvec_error`), the fp32 scan."""
        norm = float(np.linalg.norm(query))
        if norm == 0.0:  # every score is 0
            return np.zeros(len(self), np.float32), 0.0
        err = 2 * (2.0 ** -11 * (2 + NORM_TOLERANCE) + self.dim * 2.0 ** -24)
        if _fp16_matvec_error(self.dim) > err / 2:
            return self.full_scan(query), EXACT_ERROR * norm
        unit = torch.from_numpy(query[0] / norm).half()  # (E,)
        out = np.empty(len(self), np.float32)
        for s in range(0, len(self), FP16_SCAN_ITEMS):
            rows = _tensor(self.embeddings[s:s + FP16_SCAN_ITEMS]).reshape(-1, self.dim)  # (b Q, E) fp16
            out[s:s + FP16_SCAN_ITEMS] = (rows @ unit).reshape(-1, self.rows_per_item).amax(dim=1).float().numpy()
        return out * np.float32(norm), err * norm

    def search(self, text_embedding: np.ndarray | torch.Tensor, k: int = 10) -> SearchResult:
        """text_embedding: (E,) or (1, E), e.g. `pipe.embed_texts(text)[0]` -> the k images
        with the highest ITC score, exact."""
        query = _as_query(text_embedding, self.dim)  # (1, E)
        if query.shape[0] != 1:
            raise ValueError(f"one text at a time: got {query.shape[0]} embeddings")
        return self._search(query, k)

    def search_text(self, pipe, text: str, k: int = 10, rerank: int = 16,
                    load_images: Optional[Callable[[list[str]], Sequence[Any]]] = None) -> list[Hit]:
        """The k images that best match `text`. rerank > 0: the ITC top max(k, rerank) go
        through the ITM head and the first `rerank` are re-ordered by ITM logit + ITC cosine
        (LAVIS); `load_images(keys)` returns the images of those keys (default: the keys are
        paths or anything else the processor loads)."""
        _check_rerank(rerank)
        model, proc = pipe.scorer()
        t = {n: v.to(pipe.device) for n, v in proc.qformer_text([text]).items()}  # (1, T) each
        with torch.no_grad():
            text_proj = model.text_features(t["text_ids"], t["text_mask"]).proj  # (1, E)
        found = self.search(text_proj, max(k, rerank))
        keys = [self.keys[i] for i in found.indices.tolist()]
        r = min(rerank, len(keys))
        logits = None
        if r:
            with torch.no_grad():
                image = pipe._image(list((load_images or list)(keys[:r])), model)  # (r, N, D_v)
                logits = model.itm_logits(image, t["text_ids"].expand(r, -1), t["text_mask"].expand(r, -1))  # (r, 2)
        return _reranked(found, keys, logits)[:k]


class TextIndex(_Index):
    """Image -> text: K captions' [CLS] embeddings (K, E)."""

    kind = "texts"

    def _bounds(self, w: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """w (Q, m + 1), offsets (Q, 1): one image's queries -> (K,): the max over queries, in
        blocks that stay in cache."""
        out = np.empty(len(self), dtype=np.float32)
        step = 8192
        for s in range(0, len(self), step):
            out[s:s + step] = (w @ self.sketch[:, s:s + step] + offsets).max(axis=0)  # (Q, b) -> (b,)
        return out

    def _fast_scores(self, query: np.ndarray) -> tuple[np.ndarray, float]:
        """query (Q, E) -> every caption's score, max over queries, by torch's fp32 matmul in
        blocks converted into one reused buffer (a fresh fp32 block each time has its pages
        faulted in anew). Exact but for the rounding of another summation order."""
        q = torch.from_numpy(query).T  # (E, Q)
        out = torch.empty(len(self))
        rows, prod = torch.empty(FAST_SCAN_ROWS, self.dim), torch.empty(FAST_SCAN_ROWS, len(query))  # (b, E), (b, Q)
        for s in range(0, len(self), FAST_SCAN_ROWS):
            half = _tensor(self.embeddings[s:s + FAST_SCAN_ROWS])  # (b, E) fp16
            b = len(half)
            rows[:b].copy_(half)
            torch.mm(rows[:b], q, out=prod[:b])
            torch.amax(prod[:b], dim=1, out=out[s:s + b])
        return out.numpy(), EXACT_ERROR * float(np.linalg.norm(query, axis=1).max())

    def search(self, image_embedding: np.ndarray | torch.Tensor, k: int = 10) -> SearchResult:
        """image_embedding: one image's query embeddings (Q, E) or (1, Q, E), e.g.
        `pipe.embed_images(image)[0]` -> the k captions with the highest ITC score, exact."""
        x = image_embedding
        if x.ndim == 3:
            if x.shape[0] != 1:
                raise ValueError(f"one image at a time: got {tuple(x.shape)}")
            x = x[0]
        return self._search(_as_query(x, self.dim), k)  # (Q, E)

    def search_image(self, pipe, image: Any, k: int = 10, rerank: int = 16) -> list[Hit]:
        """The k captions that best match `image` (anything the processor loads); rerank as
        in `ImageIndex.search_text`."""
        _check_rerank(rerank)
        model, proc = pipe.scorer()
        with torch.no_grad():
            x = pipe._image([image], model)  # (1, N, D_v)
            found = self.search(model.image_features(x).proj[0], max(k, rerank))  # (Q, E) query
        keys = [self.keys[i] for i in found.indices.tolist()]
        r = min(rerank, len(keys))
        logits = None
        if r:
            t = {n: v.to(pipe.device) for n, v in proc.qformer_text(keys[:r]).items()}  # (r, T) each
            with torch.no_grad():
                logits = model.itm_logits(x.expand(r, -1, -1), t["text_ids"], t["text_mask"])  # (r, 2)
        return _reranked(found, keys, logits)[:k]


# -- the search ----------------------------------------------------------------------------


def _as_query(query: np.ndarray | torch.Tensor, dim: int) -> np.ndarray:
    """(E,) or (P, E), numpy or torch -> (P, E) fp32 numpy, checked."""
    q = query.detach().float().cpu().numpy() if isinstance(query, torch.Tensor) else np.asarray(query, np.float32)
    if q.ndim == 1:
        q = q[None]
    if q.ndim != 2 or q.shape[1] != dim or q.shape[0] == 0:
        raise ValueError(f"query must be (E,) or (P, E) with E = {dim}, got {tuple(np.shape(query))}")
    if not np.isfinite(q).all():
        raise ValueError("query holds NaN or inf")
    return np.ascontiguousarray(q, dtype=np.float32)


def _one_blas_thread():
    """numpy's BLAS on one thread for a search. A scan alternates torch's fp16 -> fp32 (its
    OpenMP threads) with numpy's matmul (OpenBLAS's threads); with both pools at 2 threads on
    2 cores each spun on the cores the other needed, and a full scan ran ~60x slower
    (docs/performance.md). Small matmuls: one thread loses little. The limit
    is process-wide while a search runs (two overlapping searches may leave it at one)."""
    return _threadpools().limit(limits=1, user_api="blas")


@cache
def _threadpools() -> ThreadpoolController:
    """The process's thread pools, found once (a fresh lookup walks every loaded library: ms)."""
    return ThreadpoolController()


def _tensor(half: np.ndarray) -> torch.Tensor:
    """A tensor over fp16 rows without a copy (read-only memmap slices too: they are only read)."""
    with warnings.catch_warnings():  # torch warns that the array is read-only
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(half))


def _fp32(half: np.ndarray) -> np.ndarray:
    """fp16 rows -> fp32: torch converts ~4x faster than numpy's astype."""
    return _tensor(half).float().numpy()


@cache
def _fp16_matvec_error(dim: int) -> float:
    """The worst error, against fp64, of torch's fp16 matrix-vector product on 2,048 unit
    vectors of width dim (half of them with positive entries, where a sum kept in fp16 drifts
    by ~1e-3): ~2^-12 where the kernel accumulates in fp32, as the CPU kernels do."""
    g = np.random.default_rng(0)
    z = g.standard_normal((2048, dim))
    z[:1024] = np.abs(z[:1024])
    z = (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float16)
    t = np.abs(g.standard_normal(dim))
    t = (t / np.linalg.norm(t)).astype(np.float16)
    fast = (torch.from_numpy(z) @ torch.from_numpy(t)).double().numpy()
    return float(np.abs(fast - z.astype(np.float64) @ t.astype(np.float64)).max())


def _bounded_top_k(bounds: np.ndarray, exact: Callable[[np.ndarray], np.ndarray], k: int,
                   scan_all: Optional[Callable[[], np.ndarray]] = None) -> tuple[np.ndarray, np.ndarray, int]:
    """The k items with the highest exact score, given an upper bound of every item's score.

    bounds: (n,). exact(idx (c,) sorted) -> (c,) scores. Items are evaluated highest bound
    first, in rounds; after each round tau = the k-th best exact score so far, and only
    items whose bound exceeds tau can still enter the top k. Ends when none is left: every
    item not evaluated scores <= its bound <= tau. Ties are broken by the lower index.
    scan_all() -> the exact top k (indices, scores) by one pass over every item: used instead
    when more than SCAN_ALL_FRACTION of the items are left after the first round.
    -> (indices (k,), scores (k,), items evaluated)."""
    n = len(bounds)
    seen = np.zeros(n, dtype=bool)
    best_idx, best = np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    cand = _highest(bounds, np.arange(n), max(FIRST_ROUND, 4 * k))
    while len(cand):
        cand = np.sort(cand)  # memmap reads in file order
        seen[cand] = True
        idx, scores = np.concatenate([best_idx, cand]), np.concatenate([best, exact(cand)])
        keep = np.lexsort((idx, -scores))[:k]  # score descending, then index
        best_idx, best = idx[keep], scores[keep]
        tau = best[-1] if len(best) == k else -np.inf
        left = np.flatnonzero((bounds > tau) & ~seen)
        if scan_all is not None and len(left) > SCAN_ALL_FRACTION * n:
            return *scan_all(), n
        scan_all = None  # only after the first round: later rounds shrink `left` anyway
        cand = _highest(bounds, left, ROUND)
    return best_idx, best, int(seen.sum())


def _highest(values: np.ndarray, idx: np.ndarray, count: int) -> np.ndarray:
    """The `count` entries of idx with the highest values (all of them if fewer)."""
    if len(idx) <= count:
        return idx
    return idx[np.argpartition(-values[idx], count - 1)[:count]]


def _check_rerank(rerank: int) -> None:
    if not isinstance(rerank, int) or rerank < 0:
        raise ValueError(f"rerank must be an int >= 0 (0: ITC only), got {rerank!r}")


def _reranked(found: SearchResult, keys: list[str], itm_logits: Optional[torch.Tensor]) -> list[Hit]:
    """ITC hits, the first len(itm_logits) re-ordered by ITM logit + ITC cosine (LAVIS), the rest after in ITC order."""
    itc = [float(s) for s in found.scores]
    r = 0 if itm_logits is None else itm_logits.shape[0]
    prob = itm_logits.softmax(dim=-1)[:, 1].tolist() if r else []
    score = [float(itm_logits[i, 1]) + itc[i] for i in range(r)] + itc[r:]
    order = sorted(range(r), key=lambda i: -score[i]) + list(range(r, len(itc)))  # stable: ties keep ITC order
    return [Hit(rank=n + 1, index=int(found.indices[i]), key=keys[i], itc_cosine=itc[i],
                itm_prob=prob[i] if i < r else math.nan, score=score[i]) for n, i in enumerate(order)]


# -- building ------------------------------------------------------------------------------


def build_image_index(pipe, keys: Sequence[str], out: str | Path,
                      load_images: Optional[Callable[[list[str]], Sequence[Any]]] = None, batch_size: int = 64,
                      sketch_dim: int = 16, progress: bool = True) -> ImageIndex:
    """Embed the images named by `keys` into an ImageIndex at `out` (or finish an
    interrupted build there). load_images(keys) -> the images (default: the keys are paths
    or anything the processor loads); it is called once per batch."""
    model, _ = pipe.scorer()
    load_images = load_images or list

    @torch.no_grad()
    def encode(start: int, stop: int) -> np.ndarray:
        image = pipe._image(list(load_images(list(keys[start:stop]))), model)  # (b, N, D_v)
        return model.image_features(image).proj.float().cpu().numpy()  # (b, Q, E)

    row_shape = (model.config.qformer.num_queries, model.config.embed_dim)
    _build(Path(out), ImageIndex.kind, keys, row_shape, encode, batch_size, sketch_dim, _source(pipe, model), progress)
    return ImageIndex(out)


def build_text_index(pipe, texts: Sequence[str], out: str | Path, batch_size: int = 256, sketch_dim: int = 16,
                     progress: bool = True) -> TextIndex:
    """Embed `texts` (e.g. captions) into a TextIndex at `out` (or finish an interrupted build)."""
    model, _ = pipe.scorer()
    if any(not isinstance(t, str) or not t.strip() for t in texts):
        raise ValueError("texts must be non-empty strings")

    def encode(start: int, stop: int) -> np.ndarray:
        return pipe.embed_texts(list(texts[start:stop])).float().cpu().numpy()  # (b, E)

    _build(Path(out), TextIndex.kind, texts, (model.config.embed_dim,), encode, batch_size, sketch_dim,
           _source(pipe, model), progress)
    return TextIndex(out)


def index_from_embeddings(out: str | Path, kind: str, keys: Sequence[str], row_shape: tuple[int, ...],
                          embed: Callable[[int, int], np.ndarray], batch_size: int = 4096, sketch_dim: int = 16,
                          source: Optional[dict] = None, progress: bool = True) -> _Index:
    """An index of vectors computed elsewhere: embed(start, stop) -> rows [start, stop) of
    shape (b, *row_shape), L2-normalised (kind "images": (Q, E); "texts": (E,))."""
    cls = {ImageIndex.kind: ImageIndex, TextIndex.kind: TextIndex}.get(kind)
    if cls is None:
        raise ValueError(f"kind must be 'images' or 'texts', got {kind!r}")
    if len(row_shape) != (2 if cls is ImageIndex else 1):
        raise ValueError(f"row_shape of {kind} must be {'(Q, E)' if cls is ImageIndex else '(E,)'}, got {row_shape}")
    _build(Path(out), kind, keys, tuple(row_shape), embed, batch_size, sketch_dim, source or {}, progress)
    return cls(out)


def _source(pipe, model) -> dict:
    """What the embeddings come from, so that a resumed build cannot mix two models: the
    pipeline's name and a digest of the scorer's weights (not of its config, which gains
    fields as the code grows). Hashing reads every weight once (~1 GB/s)."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {"model": pipe.name, "weights_blake2b": digest.hexdigest()}


def _build(out: Path, kind: str, keys: Sequence[str], row_shape: tuple[int, ...],
           encode: Callable[[int, int], np.ndarray], batch_size: int, sketch_dim: int, source: dict,
           progress: bool) -> None:
    """Stream rows into out/embeddings.npy batch by batch (resumable), then write the sketch and the manifest."""
    keys = list(keys)
    n, E = len(keys), row_shape[-1]
    if n == 0:
        raise ValueError("nothing to index: no keys")
    if any(not isinstance(k, str) for k in keys):
        raise TypeError("keys must be strings")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 1 <= sketch_dim <= E:
        raise ValueError(f"sketch_dim must be in [1, {E}] (the embedding width), got {sketch_dim}")
    state = {"version": INDEX_VERSION, "kind": kind, "count": n, "row_shape": list(row_shape), "dtype": "float16",
             "batch_size": batch_size, "sketch_dim": sketch_dim, "source": source,
             "keys_sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest()}
    if (out / MANIFEST).is_file():
        _check_same(json.loads((out / MANIFEST).read_text())["build"], state, out / MANIFEST)
        return  # built already
    out.mkdir(parents=True, exist_ok=True)
    if (out / PROGRESS).is_file():
        saved = json.loads((out / PROGRESS).read_text())
        done = saved.pop("done")
        _check_same(saved, state, out / PROGRESS)
        embeddings = np.load(out / EMBEDDINGS, mmap_mode="r+")
    else:
        done = 0
        _write_atomic(out / KEYS, "".join(json.dumps(k, ensure_ascii=False) + "\n" for k in keys).encode())
        embeddings = np.lib.format.open_memmap(out / EMBEDDINGS, mode="w+", dtype=np.float16, shape=(n, *row_shape))
        _write_atomic(out / PROGRESS, _json({**state, "done": 0}))
    if embeddings.shape != (n, *row_shape) or embeddings.dtype != np.float16:
        raise ValueError(f"{out / EMBEDDINGS} is {embeddings.dtype} {embeddings.shape}, "
                         f"expected float16 {(n, *row_shape)}")

    from tqdm.auto import tqdm

    with tqdm(total=n, initial=done, desc=f"index {kind}", unit=kind[:-1], disable=not progress,
              dynamic_ncols=True) as bar:
        for start in range(done, n, batch_size):
            stop = min(start + batch_size, n)
            rows = np.asarray(encode(start, stop), dtype=np.float32)
            _check_rows(rows, (stop - start, *row_shape), start)
            embeddings[start:stop] = rows  # fp16
            embeddings.flush()  # the rows are on disk before progress says so
            _write_atomic(out / PROGRESS, _json({**state, "done": stop}))
            bar.update(stop - start)
    del embeddings

    stored = np.load(out / EMBEDDINGS, mmap_mode="r")
    means, basis = _basis(stored, sketch_dim)  # (R, E), (E, m)
    _save_npy_atomic(out / MEANS, means)
    _save_npy_atomic(out / BASIS, basis)
    _save_npy_atomic(out / SKETCH, _sketch(stored, means, basis))
    _write_atomic(out / MANIFEST, _json({"version": INDEX_VERSION, "kind": kind, "build": state}))
    (out / PROGRESS).unlink()


def _check_rows(rows: np.ndarray, shape: tuple[int, ...], start: int) -> None:
    if rows.shape != shape:
        raise ValueError(f"batch at {start}: got rows of shape {rows.shape}, expected {shape}")
    if not np.isfinite(rows).all():
        raise ValueError(f"batch at {start}: rows hold NaN or inf")
    norms = np.linalg.norm(rows, axis=-1)
    if np.abs(norms - 1).max() > NORM_TOLERANCE:
        raise ValueError(f"batch at {start}: rows must be L2-normalised "
                         f"(norms from {norms.min():.3g} to {norms.max():.3g})")


def _check_same(saved: dict, state: dict, where: Path) -> None:
    differ = sorted(k for k in set(saved) | set(state) if saved.get(k) != state.get(k))
    if differ:
        raise ValueError(f"{where} was written for another build (differs in {differ}); "
                         "remove the folder or choose another one")


def _basis(stored: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """From a sample of items: the mean vector of each position r (R, E) and the m leading
    principal directions of the vectors minus their position's mean (E, m), fp32. The
    means carry what all images share at a query position (on the shapes model, a query's
    outputs for two images have cosine 0.73), so the sketch spends its m directions on
    what differs."""
    n, E = stored.shape[0], stored.shape[-1]
    pick = np.unique(np.linspace(0, n - 1, min(n, BASIS_SAMPLE)).astype(np.int64))
    sample = np.asarray(stored[pick], dtype=np.float64).reshape(len(pick), -1, E)  # (S, R, E)
    means = sample.mean(axis=0)  # (R, E)
    centred = (sample - means).reshape(-1, E)  # (S R, E)
    _, vectors = np.linalg.eigh(centred.T @ centred)  # ascending eigenvalues
    return means.astype(np.float32), np.ascontiguousarray(vectors[:, ::-1][:, :m], dtype=np.float32)


def _sketch(stored: np.ndarray, means: np.ndarray, basis: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """stored (n, R, E) or (n, E), means (R, E), basis (E, m) -> (m + 1, R n) fp32: per
    vector, with d = v - mean_r, its head coordinates B^T d and tail norm ||d - B B^T d||;
    vector r of item i at column r n + i."""
    n, E, m = stored.shape[0], stored.shape[-1], basis.shape[1]
    R = stored.shape[1] if stored.ndim == 3 else 1
    table = np.empty((m + 1, R, n), dtype=np.float32)
    for s in range(0, n, chunk):
        v = (np.asarray(stored[s:s + chunk], dtype=np.float32).reshape(-1, R, E) - means).reshape(-1, E)  # (c R, E)
        head = v @ basis  # (c R, m)
        tail = np.linalg.norm(v - head @ basis.T, axis=-1)  # (c R,); fp32 error ~1e-6, inside BOUND_MARGIN
        table[:m, :, s:s + chunk] = head.reshape(-1, R, m).transpose(2, 1, 0)  # (m, R, c)
        table[m, :, s:s + chunk] = tail.reshape(-1, R).T
    return table.reshape(m + 1, R * n)


def _json(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
