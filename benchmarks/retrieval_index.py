"""Retrieval at gallery scale (issue 7, goal 3): blip2lab.search.index against a plain full matmul
and against FAISS (IndexFlatIP) on the same stored vectors, in the same run.

    python benchmarks/retrieval_index.py                          # shapes + synthetic, 2 threads
    python benchmarks/retrieval_index.py --only shapes --threads 1 --json shapes.json   # default: runs/retrieval_index/results.json
    OMP_NUM_THREADS=1 python benchmarks/retrieval_index.py --build-only   # just build the cached indexes

Two kinds of data, reported apart:
- "shapes": real embeddings of the shipped shapes-stage1 model (Q = 8 queries x E = 128):
  100,000 rendered test scenes, and the canonical captions of those scenes (100,000; the
  46.5k distinct strings are encoded once). Text queries are captions of indexed scenes,
  image queries indexed images. ITM re-rank of the top 16 is timed here (it needs the model).
- "synthetic": the real BLIP-2 geometry (Q = 32, E = 256), 100,000 images and 500,000
  captions, generated with the structure of trained embeddings (see `synthetic`): a
  shared direction per modality, a mean per query position, and image content seen by every
  query of the image, plus a little isotropic noise. Two spectra: "lowrank" (the content has
  24 directions, like the shapes world) and "fullrank" (254 content directions with a 1/k
  spectrum, what a model of natural images may well look like): the index is exact on both,
  and fast only where the energy sits in a few directions. Which applies to a real BLIP-2
  checkpoint is for a run on its embeddings to say.
- "minireal" (`--only minireal`, not part of "all"): the shipped mini-real model's embeddings
  (real EfficientNet-Lite0 and MiniLM backbones) of the ~5k cliparts and their titles: too
  few for scale, but the nearest thing to real BLIP-2 embeddings offline, so its `structure`
  (how much energy the sketch holds) says which synthetic spectrum real models resemble.

The full matmul is the plain way: every stored vector in RAM in fp32 (as FAISS holds them),
one numpy matmul with the query, the max per item, argpartition. Each search is checked
against it: a valid top k (its scores are the full matmul's k best within 1e-6) for
blip2lab.search.index and FAISS alike, and for blip2lab.search.index how often the indices are the same,
order included (two matmuls may round the same dot product differently by one ulp, so
exact fp32 near-ties can trade places). Indexes are cached under runs/retrieval_index/ and
reused; a build resumes if it was interrupted. Timings: median over the queries, warm page
cache, numpy (OpenBLAS), torch and FAISS all at --threads (default 2). On a machine whose
cores other jobs keep busy, multi-threaded BLAS calls wait for their threads' time slices
and every contender slows down 5-50x, erratically: take --threads=1 there, and compare
only figures from the same run (the JSON records the load average at start and end).

The full first run builds ~4.6 GB under runs/retrieval_index/: on one busy core the shapes
images took 11 min (rendering + encoding, ~150 images/s), each synthetic set ~2 min; a run
that reuses them takes under 2 minutes at --threads=1.
"""

from __future__ import annotations

import os
import sys


def _threads_arg(argv: list[str]) -> str | None:
    """--threads N or --threads=N, read before numpy loads its BLAS, which fixes its thread count then."""
    for i, a in enumerate(argv):
        if a.startswith("--threads="):
            return a.split("=", 1)[1]
        if a == "--threads" and i + 1 < len(argv):
            return argv[i + 1]
    return None


_THREADS = _threads_arg(sys.argv[1:])
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):  # before numpy loads BLAS
    if _THREADS is not None:
        os.environ[_var] = _THREADS
    else:
        os.environ.setdefault(_var, "2")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from blip2lab.search.index import ImageIndex, TextIndex, index_from_embeddings  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "runs" / "retrieval_index"


# -- synthetic embeddings with the structure of trained ones ---------------------------------


SYNTHETIC = {  # content rank r and spectrum exponent alpha (eigenvalue k ~ k^-alpha)
    "lowrank": dict(rank=24, alpha=1.0),
    "fullrank": dict(rank=254, alpha=1.0),
}


class Synthetic:
    """Image query embeddings (N, Q, E) and caption embeddings (K, E), generated in chunks
    deterministically from (seed, chunk start). Per image i and query q:

        z_iq ~ a mu + b p_q + c U (w_q * u_i + s xi_iq) + d eps      (then L2-normalised)

    mu: a direction all images share (trained embeddings sit in a narrow cone); p_q: the
    mean of query position q (BLIP-2's queries specialise); u_i ~ N(0, diag(lambda)) the
    image's content in r directions U, seen by every query through its own gains w_q, plus
    per-query detail xi; eps isotropic noise. A caption of image i: a mu_t + b' mu +
    c' U (u_i + noise) + noise, with mu_t the text cone (the modality gap). The mixing
    weights were chosen to land near the shapes model's statistics (intra-image query
    cosine, same position across images, score spread: `structure` prints them for both)."""

    def __init__(self, rank: int, alpha: float, Q: int = 32, E: int = 256, seed: int = 0):
        g = np.random.default_rng(seed)
        basis, _ = np.linalg.qr(g.standard_normal((E, E)))  # (E, E) orthonormal
        self.mu, self.mu_t = basis[:, 0], basis[:, 1]  # (E,) each
        self.U = basis[:, 2:2 + rank]  # (E, r) content directions
        pos = g.standard_normal((Q, E))
        self.pos = pos / np.linalg.norm(pos, axis=1, keepdims=True)  # (Q, E)
        lam = np.arange(1, rank + 1, dtype=np.float64) ** -alpha
        self.scale = np.sqrt(lam / lam.sum())  # (r,) content std per direction, total variance 1
        gains = np.exp(0.7 * g.standard_normal((Q, rank)))
        self.gains = gains / np.sqrt((gains ** 2).mean(axis=1, keepdims=True))  # (Q, r)
        self.Q, self.E, self.rank, self.seed = Q, E, rank, seed

    def _content(self, start: int, stop: int) -> np.ndarray:
        g = np.random.default_rng([self.seed, 1, start])
        return (g.standard_normal((stop - start, self.rank)) * self.scale).astype(np.float32)  # (n, r)

    def images(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, Q, E) L2-normalised fp32; chunks must start at multiples of CHUNK."""
        a, b, s, d = 0.6, 0.35, 0.5, 0.1
        c = np.sqrt(1 - a * a - b * b - d * d) / np.sqrt(1 + s * s)
        g = np.random.default_rng([self.seed, 2, start])
        n = stop - start
        u = self._content(start, stop)  # (n, r)
        seen = u[:, None] * self.gains[None] + s * g.standard_normal((n, self.Q, self.rank), dtype=np.float32) \
            * self.scale.astype(np.float32)  # (n, Q, r)
        z = c * (seen.reshape(n * self.Q, self.rank) @ self.U.T.astype(np.float32)).reshape(n, self.Q, self.E)
        z += (a * self.mu + b * self.pos).astype(np.float32)  # (n, Q, E)
        z += d / np.sqrt(self.E) * g.standard_normal((n, self.Q, self.E), dtype=np.float32)
        return z / np.linalg.norm(z, axis=-1, keepdims=True)

    def texts(self, image_ids: np.ndarray, seed: int) -> np.ndarray:
        """Captions of the given images: (len, E) L2-normalised fp32."""
        g = np.random.default_rng([self.seed, 3, seed])
        u = self._contents(np.asarray(image_ids))  # (len, r) the images' content
        u = u + 0.5 * g.standard_normal(u.shape).astype(np.float32) * self.scale.astype(np.float32)
        t = 0.5 * self.mu_t + 0.2 * self.mu + 0.75 / np.sqrt(1.25) * (u @ self.U.T) \
            + 0.1 / np.sqrt(self.E) * g.standard_normal((len(u), self.E))
        return (t / np.linalg.norm(t, axis=-1, keepdims=True)).astype(np.float32)

    def _contents(self, image_ids: np.ndarray) -> np.ndarray:
        chunks = {c: self._content(c, c + CHUNK) for c in np.unique(image_ids - image_ids % CHUNK).tolist()}
        return np.stack([chunks[i - i % CHUNK][i % CHUNK] for i in image_ids.tolist()])


CHUNK = 4096  # synthetic rows are generated (and indexed) in chunks of this many


def build_synthetic(name: str, n_images: int, n_texts: int,
                    sketch_dim: int) -> tuple[ImageIndex, TextIndex, Synthetic, dict]:
    """The synthetic image and caption indexes (cached); caption j describes image j % n_images."""
    syn = Synthetic(**SYNTHETIC[name])
    folder = CACHE / f"synthetic-{name}-{n_images}x{syn.Q}x{syn.E}-m{sketch_dim}"
    times = _load_times(folder)
    start = time.perf_counter()
    images = index_from_embeddings(folder / "images", "images", [str(i) for i in range(n_images)], (syn.Q, syn.E),
                                   syn.images, batch_size=CHUNK, sketch_dim=sketch_dim, source={"synthetic": name})
    times.setdefault("images_s", time.perf_counter() - start)
    start = time.perf_counter()
    captions = [f"caption of {j % n_images}" for j in range(n_texts)]
    texts = index_from_embeddings(folder / f"texts-{n_texts}", "texts", captions, (syn.E,),
                                  lambda a, b: syn.texts(np.arange(a, b) % n_images, seed=a), batch_size=16 * CHUNK,
                                  sketch_dim=sketch_dim, source={"synthetic": name})
    times.setdefault(f"texts_{n_texts}_s", time.perf_counter() - start)
    _save_times(folder, times)
    return images, texts, syn, times


def build_shapes(pipe, n_images: int, batch_size: int = 256) -> tuple[ImageIndex, TextIndex, list, dict]:
    """Real shapes-stage1 embeddings (cached): n_images test scenes (seed 0) and their
    canonical captions (distinct strings encoded once)."""
    from blip2lab.search.index import build_image_index
    from blip2lab.worlds.shapes import world as shapes

    folder = CACHE / f"shapes-stage1-{n_images}"
    times = _load_times(folder)
    scenes = shapes.make_split("test", n_images, seed=0)
    start = time.perf_counter()
    images = build_image_index(pipe, [f"test/0/{i}" for i in range(n_images)], folder / "images",
                               load_images=lambda keys: list(render(scenes, keys)), batch_size=batch_size)
    times.setdefault("images_s", time.perf_counter() - start)
    captions = [shapes.caption(s) for s in scenes]
    if not (folder / "texts" / "manifest.json").is_file():
        start = time.perf_counter()
        distinct = sorted(set(captions), key=len)  # similar lengths batch together: less padding
        vectors = np.concatenate([pipe.embed_texts(distinct[s:s + 512]).float().numpy()
                                  for s in range(0, len(distinct), 512)])  # (distinct, E)
        row = {text: i for i, text in enumerate(distinct)}
        order = np.array([row[c] for c in captions])
        model, _ = pipe.scorer()
        index_from_embeddings(folder / "texts", "texts", captions, (model.config.embed_dim,),
                              lambda a, b: vectors[order[a:b]], batch_size=16384, source={"model": pipe.name})
        times["texts_s"] = time.perf_counter() - start
        times["texts_distinct"] = len(distinct)
    _save_times(folder, times)
    return images, TextIndex(folder / "texts"), scenes, times


def build_minireal(pipe, batch_size: int = 64) -> tuple[ImageIndex, TextIndex, list, dict]:
    """Real embeddings from real backbones (cached): the shipped mini-real model (EfficientNet-
    Lite0 + MiniLM + a Q-Former trained here) over every clipart of Debian's Open Clip Art, and
    their titles (`name`). 5,094 images: a check of the embeddings' structure, not of scale."""
    from blip2lab.search.index import build_image_index, build_text_index
    from blip2lab.worlds.minireal import clipart

    folder = CACHE / "minireal"
    times = _load_times(folder)
    items = clipart.build_cliparts()
    cache = clipart.cache_images(items, ROOT / "runs" / "clipart")  # (n, 224, 224, 3) uint8, memory-mapped
    row = {it.id: i for i, it in enumerate(items)}
    start = time.perf_counter()
    images = build_image_index(pipe, [it.id for it in items], folder / "images", batch_size=batch_size,
                               load_images=lambda keys: [np.array(cache[row[k]]) for k in keys])
    times.setdefault("images_s", time.perf_counter() - start)
    start = time.perf_counter()
    texts = build_text_index(pipe, [it.name for it in items], folder / "texts")
    times.setdefault("texts_s", time.perf_counter() - start)
    _save_times(folder, times)
    return images, texts, items, times


def render(scenes: list, keys: list[str]) -> np.ndarray:
    from blip2lab.worlds.shapes import world as shapes

    return shapes.render_batch([scenes[int(k.rsplit("/", 1)[1])] for k in keys])  # (b, H, W, 3) uint8


def _load_times(folder: Path) -> dict:
    path = folder / "build_times.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def _save_times(folder: Path, times: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "build_times.json").write_text(json.dumps(times, indent=2) + "\n")


def _disk_bytes(index) -> int:
    return sum(f.stat().st_size for f in index.path.iterdir() if f.is_file())


# -- the contenders ----------------------------------------------------------------------------


def _top_k(scores: np.ndarray, k: int) -> np.ndarray:
    return np.lexsort((np.arange(len(scores)), -scores))[:k]  # score descending, then index


def _valid_top_k(found: np.ndarray, reference: np.ndarray, k: int) -> bool:
    """found is a top k of `reference` scores: its scores are the k best within 1e-6 (the
    same dot product rounds differently in two matmuls, so fp32 near-ties may trade places)."""
    best = np.sort(reference)[::-1][:k]
    return len(found) == k and len(set(found.tolist())) == k and np.allclose(np.sort(reference[found])[::-1], best,
                                                                            atol=1e-6)


class Faiss:
    """FAISS IndexFlatIP over every stored vector, fp32 in RAM.
    Text -> image: the 10 Q best vectors hold at least 10 distinct images (an image has Q
    vectors), and an image's rank is that of its best vector, so the first 10 distinct images
    among them are the top 10. Image -> text: a caption in the top 10 by max over queries is in
    the top 10 of the query that reaches its max, so the union of the Q top-10 lists holds
    the top 10; their max over all queries is then computed exactly."""

    def __init__(self, index, threads: int):
        import faiss

        faiss.omp_set_num_threads(threads)
        self.rows = index.rows_per_item
        self.flat = faiss.IndexFlatIP(index.dim)
        for s in range(0, len(index), 8192):
            self.flat.add(np.asarray(index.embeddings[s:s + 8192], dtype=np.float32).reshape(-1, index.dim))

    def text_to_image(self, text: np.ndarray, k: int) -> np.ndarray:
        scores, ids = self.flat.search(text[None], k * self.rows)  # (1, k Q) vectors, best first
        images = ids[0] // self.rows  # rows were added item-major: vector q of image i is row i Q + q
        _, first = np.unique(images, return_index=True)
        return images[np.sort(first)][:k]

    def image_to_text(self, queries: np.ndarray, k: int, embeddings: np.ndarray) -> np.ndarray:
        _, ids = self.flat.search(queries, k)  # (Q, k)
        cand = np.unique(ids)
        exact = (np.asarray(embeddings[cand], dtype=np.float32) @ queries.T).max(axis=1)  # (c,)
        return cand[_top_k(exact, k)]

    def free(self) -> None:
        self.flat.reset()


# Each timed call starts on idle cores. After a call OpenBLAS's threads spin for ~0.1 s
# (THREAD_TIMEOUT, 2^28 cycles) and slow whatever runs next on the same cores: run right after
# the full matmul, a 500k-caption search took 157 ms, 0.02 s later 130 ms, 0.1 s later 100 ms,
# alone 89 ms. A query server sees queries apart, not back to back with another library's.
IDLE_S = 0.25


class Matmul:
    """The plain full matmul: every stored vector in RAM in fp32, one BLAS product per query."""

    def __init__(self, index):
        self.rows = np.asarray(index.embeddings, dtype=np.float32).reshape(-1, index.dim)  # (V, E)
        self.per_item = index.rows_per_item

    def scores(self, query: np.ndarray) -> np.ndarray:
        """query (E,) or (Q, E) -> (n,) every item's exact score, max over its vectors and the query's."""
        q = np.atleast_2d(query)  # (P, E)
        return (self.rows @ q.T).reshape(-1, self.per_item * len(q)).max(axis=1)

    def top_k(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = self.scores(query)
        part = np.sort(np.argpartition(-scores, k - 1)[:k])  # in index order, for _top_k's ties
        return part[_top_k(scores[part], k)], scores


def compare(label: str, queries: list[np.ndarray], index, faiss_search, k: int) -> dict:
    """Time blip2lab.search.index, the full matmul and FAISS on each query (interleaved), check them.
    queries: (E,) texts against an ImageIndex or (Q, E) images against a TextIndex."""
    times = {"index": [], "full_matmul": [], "faiss": []}
    fractions, bytes_read, sketch_bytes, same, valid, faiss_valid = [], [], [], 0, 0, 0
    matmul = Matmul(index)
    for method in (lambda: index.search(queries[0], k), lambda: matmul.top_k(queries[0], k),
                   lambda: faiss_search(queries[0])):
        method()  # warm: page cache, BLAS, FAISS
    for q in queries:
        time.sleep(IDLE_S)
        start = time.perf_counter()
        found = index.search(q, k)
        times["index"].append(time.perf_counter() - start)
        time.sleep(IDLE_S)
        start = time.perf_counter()
        full, reference = matmul.top_k(q, k)  # (k,), (n,) every exact score
        times["full_matmul"].append(time.perf_counter() - start)
        time.sleep(IDLE_S)
        start = time.perf_counter()
        theirs = faiss_search(q)
        times["faiss"].append(time.perf_counter() - start)
        same += bool(np.array_equal(found.indices, full))
        valid += _valid_top_k(found.indices, reference, k) and np.allclose(found.scores, reference[found.indices],
                                                                           atol=1e-6)
        faiss_valid += _valid_top_k(theirs, reference, k)
        fractions.append(found.fraction_read)
        bytes_read.append(found.bytes_read)
        sketch_bytes.append(found.sketch_bytes)
    ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    out = {
        "queries": len(queries), "k": k, "items": len(index),
        "ms": {name: round(v, 2) for name, v in ms.items()},
        "speedup_vs_full_matmul": round(ms["full_matmul"] / ms["index"], 2),
        "speedup_vs_faiss": round(ms["faiss"] / ms["index"], 2),
        "valid_top_k": f"{valid}/{len(queries)}",
        "same_indices_as_full_matmul": f"{same}/{len(queries)}",
        "faiss_valid_top_k": f"{faiss_valid}/{len(queries)}",
        "memmap_fraction_read": {"median": round(statistics.median(fractions), 5), "max": round(max(fractions), 5)},
        "memmap_mb_read_median": round(statistics.median(bytes_read) / 2**20, 2),
        "memmap_mb_total": round(index.embeddings.nbytes / 2**20, 1),
        "sketch_mb_scanned_median": round(statistics.median(sketch_bytes) / 2**20, 1),  # 0: the bound was skipped
    }
    print(f"  {label}: index {ms['index']:.1f} ms, full matmul {ms['full_matmul']:.1f} ms "
          f"({out['speedup_vs_full_matmul']}x), FAISS flat {ms['faiss']:.1f} ms ({out['speedup_vs_faiss']}x); "
          f"valid top k {out['valid_top_k']} (same indices {out['same_indices_as_full_matmul']}), FAISS valid "
          f"{out['faiss_valid_top_k']}; read "
          f"{100 * statistics.median(fractions):.2f}% of the memmap (max {100 * max(fractions):.2f}%) + "
          f"{out['sketch_mb_scanned_median']} MB sketch (median)", flush=True)
    return out


def compare_both(images: ImageIndex, texts: TextIndex, text_queries: list[np.ndarray],
                 image_queries: list[np.ndarray], threads: int, k: int = 10) -> dict:
    """`compare` both ways, each against its own FAISS copy (freed before the next is built)."""
    fa = Faiss(images, threads)
    out = {"text_to_image": compare("text -> image", text_queries, images, lambda q: fa.text_to_image(q, k), k)}
    fa.free()
    fa = Faiss(texts, threads)
    out["image_to_text"] = compare("image -> text", image_queries, texts,
                                   lambda q: fa.image_to_text(q, k, texts.embeddings), k)
    fa.free()
    return out


def structure(images: ImageIndex, text_queries: list[np.ndarray]) -> dict:
    """What makes the data easy or hard, to compare synthetic with real: cosines between an
    image's queries and between one query position's outputs for two images, the spread of
    text -> image scores, and the share of the (position-centred) energy the sketch holds."""
    z = np.asarray(images.embeddings[:1000], dtype=np.float32)  # (n, Q, E)
    n, Q, _ = z.shape
    gram = np.einsum("nqe,npe->nqp", z, z)  # (n, Q, Q)
    intra = gram[:, ~np.eye(Q, dtype=bool)].mean()
    cross = np.einsum("nqe,nqe->", z[: n // 2], z[n // 2: 2 * (n // 2)]) / (n // 2) / Q
    scores = [images.full_scan(t[None]) for t in text_queries[:3]]
    centred = (z - images.means).reshape(-1, z.shape[-1])
    head = np.linalg.norm(centred @ images.basis, axis=1) ** 2 / np.linalg.norm(centred, axis=1) ** 2
    return {"intra_image_query_cosine": round(float(intra), 3), "same_position_cosine": round(float(cross), 3),
            "score_median": round(float(np.median(np.concatenate(scores))), 3),
            "score_10th_best": round(float(np.mean([np.sort(s)[-10] for s in scores])), 3),
            "sketch_energy_share": round(float(head.mean()), 3)}


def sizes(images: ImageIndex, texts: TextIndex, times: dict) -> dict:
    return {"build_s": {k: round(v, 1) for k, v in times.items() if k.endswith("_s")},
            "disk_mb": {"images": round(_disk_bytes(images) / 2**20, 1), "texts": round(_disk_bytes(texts) / 2**20, 1)},
            "images": len(images), "texts": len(texts), "queries_per_image": images.rows_per_item, "dim": images.dim,
            "sketch_dim": images.basis.shape[1]}


def run_shapes(args) -> dict:
    import blip2lab

    pipe = blip2lab.load("shapes-stage1")
    images, texts, scenes, times = build_shapes(pipe, args.images)
    info = sizes(images, texts, times)
    print(f"shapes-stage1 (real embeddings): {info}", flush=True)
    if args.build_only:
        return info
    rng = np.random.default_rng(0)
    picks = rng.choice(len(images), args.queries, replace=False)
    text_queries = [pipe.embed_texts(texts.keys[i])[0].numpy() for i in picks]  # a caption of image i
    image_queries = [np.asarray(images.embeddings[i], dtype=np.float32) for i in picks]  # (Q, E)
    out = {"data": "shapes-stage1 real embeddings", **info, "structure": structure(images, text_queries)}
    print(f"  structure: {out['structure']}", flush=True)
    out |= compare_both(images, texts, text_queries, image_queries, args.threads)
    out["itm_rerank"] = time_rerank(pipe, images, texts, scenes, picks[:10])
    return out


def run_minireal(args) -> dict:
    import blip2lab

    pipe = blip2lab.load("mini-real")
    images, texts, items, times = build_minireal(pipe)
    info = sizes(images, texts, times)
    print(f"mini-real (real backbones, cliparts): {info}", flush=True)
    if args.build_only:
        return info
    picks = np.random.default_rng(0).choice(len(images), args.queries, replace=False)
    text_queries = [np.asarray(texts.embeddings[i], dtype=np.float32) for i in picks]  # the title of image i
    image_queries = [np.asarray(images.embeddings[i], dtype=np.float32) for i in picks]  # (Q, E)
    out = {"data": "mini-real real embeddings (cliparts and their titles)", **info,
           "structure": structure(images, text_queries)}
    print(f"  structure: {out['structure']}", flush=True)
    out |= compare_both(images, texts, text_queries, image_queries, args.threads)
    return out


def time_rerank(pipe, images: ImageIndex, texts: TextIndex, scenes: list, picks: np.ndarray) -> dict:
    """search_text / search_image with and without the ITM re-rank of the top 16 (the text
    encoder, or the image tower, runs in both)."""
    load = lambda keys: list(render(scenes, keys))  # noqa: E731
    captions = [texts.keys[i] for i in picks]
    pictures = list(render(scenes, [images.keys[i] for i in picks]))
    runs = {
        "text_to_image_itc": lambda i: images.search_text(pipe, captions[i], 10, rerank=0),
        "text_to_image_itm16": lambda i: images.search_text(pipe, captions[i], 10, rerank=16, load_images=load),
        "image_to_text_itc": lambda i: texts.search_image(pipe, pictures[i], 10, rerank=0),
        "image_to_text_itm16": lambda i: texts.search_image(pipe, pictures[i], 10, rerank=16),
    }
    ms = {}
    for name, fn in runs.items():
        fn(0)
        t = []
        for i in range(len(picks)):
            start = time.perf_counter()
            fn(i)
            t.append(time.perf_counter() - start)
        ms[name] = round(1e3 * statistics.median(t), 1)
    out = {"ms": ms, "rerank_only_ms": {"text_to_image": round(ms["text_to_image_itm16"] - ms["text_to_image_itc"], 1),
                                        "image_to_text": round(ms["image_to_text_itm16"] - ms["image_to_text_itc"], 1)}}
    print(f"  ITM re-rank of the top 16 (shapes-stage1, incl. rendering the 16 scenes): {out}", flush=True)
    return out


def run_synthetic(args, name: str) -> dict:
    images, texts, syn, times = build_synthetic(name, args.images, args.texts, args.sketch_dim)
    info = sizes(images, texts, times)
    print(f"synthetic {name} (Q={syn.Q}, E={syn.E}): {info}", flush=True)
    if args.build_only:
        return info
    rng = np.random.default_rng(0)
    picks = rng.choice(args.images, args.queries, replace=False)
    text_queries = list(syn.texts(picks, seed=10**6))  # new captions of indexed images
    image_queries = [np.asarray(images.embeddings[i], dtype=np.float32) for i in picks]
    out = {"data": f"synthetic {name}: {SYNTHETIC[name]}", **info, "structure": structure(images, text_queries)}
    print(f"  structure: {out['structure']}", flush=True)
    out |= compare_both(images, texts, text_queries, image_queries, args.threads)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["all", "shapes", "synthetic", "minireal"], default="all",
                        help="all: shapes and synthetic at gallery scale; minireal (5,094 real cliparts) only on request")
    parser.add_argument("--synthetic", default="lowrank,fullrank", help="which synthetic spectra, comma-separated")
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--texts", type=int, default=500_000, help="synthetic captions (shapes: one per image)")
    parser.add_argument("--sketch-dim", type=int, default=32, help="sketch width of the synthetic indexes (E = 256)")
    parser.add_argument("--queries", type=int, default=10)
    parser.add_argument("--threads", type=int, default=int(os.environ["OMP_NUM_THREADS"]))
    parser.add_argument("--build-only", action="store_true", help="build (or finish) the cached indexes and stop")
    parser.add_argument("--json", default=str(CACHE / "results.json"), help="where the results are written")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
               "threads": args.threads, "date": time.strftime("%Y-%m-%d"),
               "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "results": {}}
    start = time.perf_counter()
    if args.only in ("all", "shapes"):
        results["results"]["shapes"] = run_shapes(args)
    if args.only == "minireal":
        results["results"]["minireal"] = run_minireal(args)
    if args.only in ("all", "synthetic"):
        for name in args.synthetic.split(","):
            results["results"][f"synthetic-{name}"] = run_synthetic(args, name)
    results["wall_s"] = round(time.perf_counter() - start, 1)
    results["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]  # > cores: the timings are contended
    print(f"done in {results['wall_s']} s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
