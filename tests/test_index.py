"""blip2lab.search.index: exact top k against a brute-force matmul (random, structured and
shapes-model data), resumable builds, the on-disk layout, the ITM re-rank, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import blip2lab
from blip2lab.search import index as ix
from blip2lab.worlds.shapes import world as shapes


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _structured(n: int, Q: int, E: int, rank: int, seed: int) -> np.ndarray:
    """(n, Q, E) unit vectors in a few directions: a shared one, one per query position, `rank` of content."""
    g = np.random.default_rng(seed)
    basis = np.linalg.qr(g.standard_normal((E, E)))[0]
    content = g.standard_normal((n, 1, rank)) + 0.3 * g.standard_normal((n, Q, rank))  # (n, Q, r)
    z = 0.6 * basis[:, 0] + 0.4 * g.standard_normal((Q, 1)) * basis[:, 1] + 0.3 * content @ basis[:, 2:2 + rank].T
    return _unit(z + 0.002 * g.standard_normal((n, Q, E)))


def _brute(embeddings: np.ndarray, query: np.ndarray) -> np.ndarray:
    """The full matmul over the stored fp16 vectors: every item's score, max over vectors. (n,)"""
    v = np.asarray(embeddings, dtype=np.float32)
    return (v.reshape(len(v), -1, v.shape[-1]) @ np.atleast_2d(query).T).reshape(len(v), -1).max(axis=1)


def _assert_top_k(found: ix.SearchResult, scores: np.ndarray, k: int) -> None:
    """found is the top k of `scores`, best first. Up to fp32 ties: the same dot product can
    round differently in two matmuls (BLAS picks kernels by shape), so items within 1e-6 of
    the k-th score may trade places; every item clearly above it must be there, in order."""
    k = min(k, len(scores))
    best = np.sort(scores)[::-1][:k]
    np.testing.assert_allclose(found.scores, best, atol=1e-6)
    np.testing.assert_allclose(scores[found.indices], found.scores, atol=1e-6)
    assert len(set(found.indices.tolist())) == k
    clear = np.lexsort((np.arange(len(scores)), -scores))[:k]
    clear = clear[scores[clear] > best[-1] + 1e-6]
    assert set(clear.tolist()) <= set(found.indices.tolist())


def _index(tmp_path, kind: str, vectors: np.ndarray, name: str = "idx", **kw) -> ix._Index:
    return ix.index_from_embeddings(tmp_path / name, kind, [f"item {i}" for i in range(len(vectors))],
                                    vectors.shape[1:], lambda a, b: vectors[a:b], progress=False, **kw)


# -- exactness ----------------------------------------------------------------------------------


@pytest.mark.parametrize("data", ["random", "structured"])
def test_text_to_image_is_the_full_matmul(tmp_path, data):
    g = np.random.default_rng(1)
    n, Q, E = 3000, 8, 64
    z = _unit(g.standard_normal((n, Q, E))) if data == "random" else _structured(n, Q, E, rank=6, seed=1)
    images = _index(tmp_path, "images", z, batch_size=700, sketch_dim=8)
    texts = _unit(g.standard_normal((12, E))) if data == "random" else z[g.choice(n, 12), 0] + 0.05
    evaluated = []
    for t, k in zip(texts, [1, 5, 10, 10, 32, 100, 10, 10, 10, 3, 10, 10]):
        found, scores = images.search(t, k), _brute(images.embeddings, t)
        _assert_top_k(found, scores, k)
        assert (images.upper_bounds(t[None]) >= scores).all()
        if k <= 10:
            evaluated.append(found.evaluated)
        assert found.bytes_read == found.evaluated * Q * E * 2
    if data == "structured":  # the bound prunes: a top 10 reads a small part of the memmap
        assert max(evaluated) < n / 10, evaluated


@pytest.mark.parametrize("data", ["random", "structured"])
def test_image_to_text_is_the_full_matmul(tmp_path, data):
    g = np.random.default_rng(2)
    K, Q, E = 5000, 8, 64
    z = _structured(40, Q, E, rank=6, seed=2)
    captions = _unit(g.standard_normal((K, E))) if data == "random" else _unit(
        z[g.integers(0, 40, K), g.integers(0, Q, K)] + 0.1 * g.standard_normal((K, E)) / np.sqrt(E))
    texts = _index(tmp_path, "texts", captions, sketch_dim=8)
    for image, k in zip(z[:10], [1, 10, 10, 16, 50, 10, 10, 10, 2, 10]):
        found, scores = texts.search(image, k), _brute(texts.embeddings, image)
        _assert_top_k(found, scores, k)
        assert (texts.upper_bounds(image) >= scores).all()
    if data == "structured":
        assert found.evaluated < K / 10


@pytest.mark.parametrize("kind", ["images", "texts"])
def test_the_sequential_pass_keeps_every_item_its_fast_score_could_hide(tmp_path, monkeypatch, kind):
    # Full-rank vectors: the bound prunes nothing and the search makes one pass, which scores
    # every item fast (within err), then exactly those within 2 err of the k-th fast score.
    # Fast scores off by up to err in the worst direction (the top items pushed down, the
    # rest up) must still give the exact top k.
    g = np.random.default_rng(6)
    shape = (4000, 8, 64) if kind == "images" else (20000, 64)
    idx = _index(tmp_path, kind, _unit(g.standard_normal(shape)), sketch_dim=4)
    queries = _unit(g.standard_normal((4, 64))) if kind == "images" else _unit(g.standard_normal((4, 8, 64)))
    for query in queries:
        q = np.atleast_2d(query)
        exact = _brute(idx.embeddings, query)
        fast, err = idx._fast_scores(q)
        assert np.abs(fast - exact).max() <= err
        found = idx.search(query, 10)
        assert found.evaluated == len(idx)  # the pass, not the bound
        _assert_top_k(found, exact, 10)
        kth = np.sort(exact)[-10]
        skewed = np.where(exact >= kth, exact - err, exact + err).astype(np.float32)
        monkeypatch.setattr(idx, "_fast_scores", lambda q, skewed=skewed, err=err: (skewed, err))
        _assert_top_k(idx.search(query, 10), exact, 10)
        monkeypatch.undo()


def test_a_bound_that_never_prunes_is_skipped_and_retried(tmp_path):
    g = np.random.default_rng(8)
    images = _index(tmp_path, "images", _unit(g.standard_normal((3000, 8, 64))), sketch_dim=4)
    texts = _unit(g.standard_normal((ix.SKIP_BOUND_AFTER + ix.RETRY_BOUND + 2, 64)))
    used_bound = []
    for t in texts:
        found = images.search(t, 10)
        _assert_top_k(found, _brute(images.embeddings, t), 10)
        used_bound.append(found.sketch_bytes > 0)
    n, r = ix.SKIP_BOUND_AFTER, ix.RETRY_BOUND
    assert used_bound == [True] * n + [False] * r + [True] + [False]  # tried again once, still no use
    structured = _index(tmp_path, "images", _structured(3000, 8, 64, rank=6, seed=1), name="s", sketch_dim=8)
    for t in texts[:n + 2]:  # where the bound prunes it stays in use
        assert structured.search(structured.embeddings[0, 0].astype(np.float32) + 0.01 * t, 10).sketch_bytes > 0


def test_an_fp16_kernel_that_rounds_its_sums_falls_back_to_fp32(tmp_path, monkeypatch):
    g = np.random.default_rng(7)
    images = _index(tmp_path, "images", _unit(g.standard_normal((2000, 8, 64))), sketch_dim=4)
    t = _unit(g.standard_normal(64))
    assert ix._fp16_matvec_error(64) < 5e-4  # torch's CPU kernel accumulates in fp32
    fast, err = images._fast_scores(t[None])
    assert err > 1e-3 and not np.array_equal(fast, _brute(images.embeddings, t))  # fp16 results
    monkeypatch.setattr(ix, "_fp16_matvec_error", lambda dim: 1.0)
    fast, err = images._fast_scores(t[None])
    np.testing.assert_allclose(fast, _brute(images.embeddings, t), atol=1e-6)
    assert err < 1e-4
    _assert_top_k(images.search(t, 10), _brute(images.embeddings, t), 10)


def test_searches_run_numpy_blas_on_one_thread_and_restore_it(tmp_path, monkeypatch):
    # torch's OpenMP threads (fp16 -> fp32) and OpenBLAS's (the matmul) alternate in a scan;
    # both at 2 threads on 2 cores made a 100k full scan 50x slower. BLAS runs on one thread
    # during a search, and the caller's setting comes back after it.
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads() -> set[int]:
        return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}

    idx = _index(tmp_path, "images", _structured(64, 4, 32, rank=4, seed=0))
    seen = []
    scores = idx._scores
    monkeypatch.setattr(idx, "_scores", lambda q, half: (seen.append(blas_threads()), scores(q, half))[1])
    with threadpool_limits(limits=2, user_api="blas"):
        before = blas_threads()
        query = _unit(np.random.default_rng(1).standard_normal(32)).astype(np.float32)
        idx.search(query, k=3)
        idx.full_scan(query[None])
        assert seen and all(s == {1} for s in seen)
        assert blas_threads() == before


def test_duplicates_all_come_back_ordered_by_score_then_index(tmp_path):
    g = np.random.default_rng(3)
    z = _structured(50, 4, 32, rank=4, seed=3)
    z = np.concatenate([z, z[::-1], z])  # every image three times: (nearly) equal scores
    images = _index(tmp_path, "images", z, sketch_dim=4)
    for t in _unit(g.standard_normal((5, 32))):
        found = images.search(t, 21)
        _assert_top_k(found, _brute(images.embeddings, t), 21)
        base = [i if i < 50 else 99 - i if i < 100 else i - 100 for i in found.indices.tolist()]  # the original
        assert sorted(base.count(b) for b in set(base)) == [3] * 7  # 7 images, each with its 2 copies
        order = np.lexsort((found.indices, -found.scores))  # score descending, then index
        np.testing.assert_array_equal(order, np.arange(21))


def test_k_larger_than_the_index_returns_everything(tmp_path):
    z = _structured(7, 4, 16, rank=3, seed=4)
    found = _index(tmp_path, "images", z, sketch_dim=4).search(z[0, 0], 50)
    assert sorted(found.indices.tolist()) == list(range(7)) and found.evaluated == 7


# -- the build: layout, resume --------------------------------------------------------------------


def test_layout_is_fp16_memmap_with_manifest(tmp_path):
    z = _structured(300, 8, 32, rank=4, seed=5)
    images = _index(tmp_path, "images", z, batch_size=64, sketch_dim=6)
    assert isinstance(images.embeddings, np.memmap)
    assert images.embeddings.dtype == np.float16 and images.embeddings.shape == (300, 8, 32)
    np.testing.assert_array_equal(images.embeddings, z.astype(np.float16))
    assert images.sketch.shape == (7, 8 * 300) and images.sketch.dtype == np.float32
    assert images.basis.shape == (32, 6) and images.means.shape == (8, 32)
    manifest = json.loads((images.path / ix.MANIFEST).read_text())
    assert manifest["kind"] == "images" and manifest["build"]["count"] == 300
    assert not (images.path / ix.PROGRESS).exists()
    assert images.keys == [f"item {i}" for i in range(300)]
    texts = _index(tmp_path, "texts", z[:, 0], name="texts", sketch_dim=6)
    assert texts.embeddings.shape == (300, 32) and texts.sketch.shape == (7, 300)


def test_an_interrupted_build_resumes_to_the_same_bytes(tmp_path):
    z = _structured(500, 8, 32, rank=4, seed=6)
    keys = [f"img{i}" for i in range(500)]
    calls = []

    def crashing(a, b):
        calls.append(a)
        if len(calls) == 4:
            raise KeyboardInterrupt("simulated interruption")
        return z[a:b]

    with pytest.raises(KeyboardInterrupt):
        ix.index_from_embeddings(tmp_path / "resumed", "images", keys, (8, 32), crashing, batch_size=64,
                                 progress=False)
    assert json.loads((tmp_path / "resumed" / ix.PROGRESS).read_text())["done"] == 3 * 64
    with pytest.raises(FileNotFoundError, match="interrupted build"):
        ix.ImageIndex(tmp_path / "resumed")
    resumed_from = []
    ix.index_from_embeddings(tmp_path / "resumed", "images", keys, (8, 32),
                             lambda a, b: resumed_from.append(a) or z[a:b], batch_size=64, progress=False)
    assert resumed_from[0] == 3 * 64  # continued after the last completed batch
    ix.index_from_embeddings(tmp_path / "clean", "images", keys, (8, 32), lambda a, b: z[a:b], batch_size=64,
                             progress=False)
    names = sorted(p.name for p in (tmp_path / "clean").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "resumed").iterdir())
    for name in names:
        assert (tmp_path / "clean" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name


def test_a_finished_index_is_not_rebuilt_and_another_build_is_refused(tmp_path):
    z = _structured(100, 4, 16, rank=3, seed=7)
    _index(tmp_path, "images", z, sketch_dim=4)
    ix.index_from_embeddings(tmp_path / "idx", "images", [f"item {i}" for i in range(100)], (4, 16),
                             lambda a, b: pytest.fail("re-encoded a finished index"), sketch_dim=4, progress=False)
    with pytest.raises(ValueError, match="keys_sha256"):
        ix.index_from_embeddings(tmp_path / "idx", "images", [f"other {i}" for i in range(100)], (4, 16),
                                 lambda a, b: z[a:b], sketch_dim=4, progress=False)


# -- bad input ----------------------------------------------------------------------------------


def test_bad_input_is_refused(tmp_path):
    z = _structured(50, 4, 16, rank=3, seed=8)
    images = _index(tmp_path, "images", z, sketch_dim=4)
    with pytest.raises(ValueError, match="E = 16"):
        images.search(np.ones(8, np.float32))
    with pytest.raises(ValueError, match="one text at a time"):
        images.search(z[0])
    with pytest.raises(ValueError, match="NaN"):
        images.search(np.full(16, np.nan, np.float32))
    with pytest.raises(ValueError, match="k must be"):
        images.search(z[0, 0], k=0)
    with pytest.raises(ValueError, match="not 'texts'"):
        ix.TextIndex(images.path)
    with pytest.raises(ValueError, match="L2-normalised"):
        _index(tmp_path, "images", z * 2, name="unnormalised")
    with pytest.raises(ValueError, match="expected"):
        ix.index_from_embeddings(tmp_path / "shape", "images", ["a", "b"], (4, 16), lambda a, b: z[a:b, :2])
    with pytest.raises(ValueError, match="sketch_dim"):
        _index(tmp_path, "images", z, name="wide", sketch_dim=17)
    with pytest.raises(ValueError, match="no keys"):
        ix.index_from_embeddings(tmp_path / "empty", "texts", [], (16,), lambda a, b: z[a:b, 0])
    with pytest.raises(ValueError, match="kind"):
        ix.index_from_embeddings(tmp_path / "kind", "videos", ["a"], (16,), lambda a, b: z[a:b, 0])
    with pytest.raises(FileNotFoundError, match="no finished index"):
        ix.ImageIndex(tmp_path / "nothing")


# -- the shapes model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_world(tmp_path_factory):
    torch.manual_seed(0)
    pipe = blip2lab.load("shapes-stage1")
    scenes = shapes.make_split("test", 96, seed=3)
    keys = [str(i) for i in range(len(scenes))]
    load = lambda ks: list(shapes.render_batch([scenes[int(k)] for k in ks]))  # noqa: E731
    folder = tmp_path_factory.mktemp("shapes")
    images = ix.build_image_index(pipe, keys, folder / "images", load_images=load, batch_size=32, progress=False)
    captions = list(dict.fromkeys(shapes.caption(s) for s in scenes))
    texts = ix.build_text_index(pipe, captions, folder / "texts", batch_size=40, progress=False)
    return pipe, scenes, load, images, texts


def test_shapes_model_embeddings_are_stored_and_searched_exactly(shapes_world):
    pipe, scenes, load, images, texts = shapes_world
    model, _ = pipe.scorer()
    assert images.embeddings.shape == (96, model.config.qformer.num_queries, model.config.embed_dim)
    direct = pipe.embed_images(load(images.keys[:8])).numpy()  # (8, Q, E) fp32
    np.testing.assert_allclose(images.embeddings[:8], direct, atol=2e-3)
    for caption in texts.keys[:10]:
        t = pipe.embed_texts(caption)[0].numpy()
        _assert_top_k(images.search(t, 10), _brute(images.embeddings, t), 10)
    for i in range(10):
        z = np.asarray(images.embeddings[i], np.float32)
        _assert_top_k(texts.search(z, 10), _brute(texts.embeddings, z), 10)


def test_a_build_with_other_weights_is_refused(shapes_world, tmp_path):
    pipe, scenes, load, images, texts = shapes_world
    model, _ = pipe.scorer()
    keys = images.keys
    ix.build_image_index(pipe, keys, images.path, load_images=lambda ks: pytest.fail("re-encoded"), batch_size=32,
                         progress=False)
    saved = model.ln_vision.bias.detach().clone()
    with torch.no_grad():
        model.ln_vision.bias.add_(1.0)
    try:
        with pytest.raises(ValueError, match="source"):
            ix.build_image_index(pipe, keys, images.path, load_images=load, batch_size=32, progress=False)
    finally:
        with torch.no_grad():
            model.ln_vision.bias.copy_(saved)


def test_itm_rerank_order_is_the_scorers(shapes_world):
    pipe, scenes, load, images, texts = shapes_world
    caption = texts.keys[3]
    hits = images.search_text(pipe, caption, k=16, rerank=16, load_images=load)
    itc_top = images.search(pipe.embed_texts(caption)[0], 16)
    assert sorted(h.index for h in hits) == sorted(itc_top.indices.tolist())
    scored = pipe.match(load([images.keys[i] for i in itc_top.indices]), caption)  # the pipeline's own scorer
    expected = (scored["itm_logit"] + scored["itc_cosine"]).argsort(descending=True, stable=True)
    assert [h.index for h in hits] == [int(itc_top.indices[i]) for i in expected]
    np.testing.assert_allclose([h.itm_prob for h in hits], scored["itm_prob"][expected].numpy(), atol=1e-5)
    assert [h.rank for h in hits] == list(range(1, 17))

    image = load([images.keys[5]])[0]
    hits = texts.search_image(pipe, image, k=10, rerank=16)
    candidates = [texts.keys[i] for i in texts.search(pipe.embed_images([image])[0], 16).indices]
    scored = pipe.match([image], candidates)
    expected = (scored["itm_logit"] + scored["itc_cosine"]).argsort(descending=True, stable=True)[:10]
    assert [h.key for h in hits] == [candidates[i] for i in expected]
    with pytest.raises(ValueError, match="rerank"):
        texts.search_image(pipe, image, rerank=-1)
    itc_only = images.search_text(pipe, caption, k=5, rerank=0)
    assert [h.index for h in itc_only] == itc_top.indices[:5].tolist() and np.isnan(itc_only[0].itm_prob)
