"""blip2lab.explain (cross-attention maps, Grad-CAM on the ITM score, overlays) and
blip2lab.search.gallery (ITC top k, ITM re-rank), on a tiny random shapes-like pipeline."""

import numpy as np
import pytest
import torch
from app_fixture import build_tiny_shapes_pipeline
from PIL import Image

import blip2lab
from blip2lab import explain
from blip2lab.search.gallery import Gallery
from blip2lab.worlds.shapes import world

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return blip2lab.load(build_tiny_shapes_pipeline(tmp_path_factory.mktemp("tiny") / "shapes-tiny-random"))


@pytest.fixture(scope="module")
def scenes():
    return world.make_gallery("test", 12, seed=0)


def test_cross_attention_maps_are_the_probabilities_of_the_default_pass(pipe, scenes):
    image = world.render(scenes[0])
    maps = pipe.attention_maps(image)
    cfg = pipe.model.config
    X = sum(cfg.qformer.has_cross_attention(i) for i in range(cfg.qformer.num_layers))
    g = cfg.vision.grid_size
    assert maps.probs.shape == (X, cfg.qformer.num_heads, cfg.qformer.num_queries, g, g)
    torch.testing.assert_close(maps.probs.sum(dim=(-1, -2)) + maps.cls, torch.ones(maps.cls.shape))
    # The explicit path that exposes them computes the same queries as the default SDPA path.
    with torch.no_grad():
        x = pipe._image([image])
        fast = pipe.model.qformer.encode_queries(x)
        explicit = pipe.model.qformer.encode_queries(x, output_attentions=True)
    torch.testing.assert_close(explicit.hidden, fast.hidden, atol=1e-5, rtol=1e-5)
    assert fast.cross_attentions is None  # the default pass materialises no probabilities

    layer = maps.layers[-1]
    torch.testing.assert_close(maps.select(layer, None, "mean"), maps.probs[-1].mean(0))
    torch.testing.assert_close(maps.select(layer, 2, "max"), maps.probs[-1, 2])
    torch.testing.assert_close(maps.select(None, None, "max"), maps.probs.amax(0).amax(0))
    with pytest.raises(ValueError, match="no cross-attention"):
        maps.select(99)
    with pytest.raises(ValueError, match="out of range"):
        maps.select(layer, cfg.qformer.num_heads)


def test_gradcam_is_grad_times_attention_clamped_head_mean(pipe, scenes):
    image, text = world.render(scenes[1]), world.caption(scenes[1])
    model = pipe.model
    cam = pipe.gradcam(image, text)
    assert all(p.grad is None for p in model.parameters())  # autograd.grad: no parameter touched

    # The ALBEF recipe written out by hand: retain the probabilities' gradient, backward the ITM logit.
    t = pipe.processor.qformer_text([text])
    with torch.no_grad():
        x = pipe._image([image])
    out = model.qformer.encode_joint(x, t["text_ids"], t["text_mask"], "itm", output_attentions=True)
    probs = out.cross_attentions[cam.layer]
    probs.retain_grad()
    Q = model.config.qformer.num_queries
    logit = model.itm_head(out.hidden[:, :Q]).mean(1)[0, 1]
    logit.backward()
    manual = (probs * probs.grad.clamp(min=0)).mean(1)[0, :, 1:]  # (Q, g*g)
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(cam.query_maps.flatten(1), manual.detach())
    torch.testing.assert_close(cam.text_map, cam.query_maps.sum(0))
    assert cam.itm_logit == pytest.approx(float(logit.detach()), abs=1e-5)
    assert cam.itm_prob == pytest.approx(float(pipe.match(image, text)["itm_prob"][0]), abs=1e-5)

    assert cam.words == text.split() and cam.word_maps.shape == (len(cam.words), *cam.text_map.shape)
    assert (cam.query_maps >= 0).all() and (cam.word_maps >= 0).all()
    assert float(cam.word_scores.sum()) == pytest.approx(1.0, abs=1e-5)
    # A word's map is a weighted mean of the query maps: bounded by them cell by cell.
    assert (cam.word_maps <= cam.query_maps.amax(0) + 1e-6).all()
    with pytest.raises(ValueError, match="no cross-attention"):
        pipe.gradcam(image, text, layer=99)


def test_words_of_joins_wordpiece_pieces():
    tokens = ["[CLS]", "a", "tri", "##angle", "##s", "on", "[SEP]", "[PAD]"]
    assert explain.words_of(tokens, {"[CLS]", "[SEP]", "[PAD]"}) == [("a", [1]), ("triangles", [2, 3, 4]),
                                                                    ("on", [5])]


def test_overlays():
    m = torch.zeros(8, 8)
    m[2, 5] = 1.0
    up = explain.upsample(m, 64)
    assert up.shape == (64, 64) and up.min() == 0 and up.max() == pytest.approx(1.0)
    assert np.unravel_index(up.argmax(), up.shape)[1] > 32  # the hot cell stays on the right
    assert not explain.upsample(torch.ones(8, 8), 32).any()  # nothing stands out
    assert explain.jet(np.array([0.0, 1.0])).tolist() == [[0, 0, 128], [128, 0, 0]]
    out = explain.overlay(Image.new("RGB", (64, 64), (245, 245, 245)), m, size=96)
    assert out.size == (96, 96) and out.mode == "RGB"


def test_gallery_ranks_like_brute_force_matching(pipe, scenes):
    images = [world.render(s) for s in scenes]
    captions = [world.caption(s) for s in scenes]
    gallery = Gallery()
    gallery.add_images(pipe, images[:5], [f"scene:{i}" for i in range(5)])
    gallery.add_images(pipe, images[5:], [f"scene:{i}" for i in range(5, len(images))])  # appended in two goes
    gallery.add_texts(pipe, captions + ["  "])  # blank texts are not indexed
    assert gallery.num_images == gallery.num_texts == len(scenes)

    query = captions[3]
    brute = pipe.match(images, query)  # every image with the query
    hits = gallery.text_to_image(pipe, query, k=4, mode="itc")
    order = brute["itc_cosine"].argsort(descending=True)[:4].tolist()
    assert [h.index for h in hits] == order and [h.rank for h in hits] == [1, 2, 3, 4]
    for h in hits:
        assert h.key == f"scene:{h.index}"
        assert h.itc_cosine == pytest.approx(float(brute["itc_cosine"][h.index]), abs=1e-5)
        assert h.itm_prob == pytest.approx(float(brute["itm_prob"][h.index]), abs=1e-5)
    reranked = gallery.text_to_image(pipe, query, k=4, mode="itc+itm")
    assert {h.index for h in reranked} == set(order)  # the same top k, re-ordered by ITM logit + cosine
    scores = [float(brute["itm_logit"][h.index] + brute["itc_cosine"][h.index]) for h in reranked]
    assert scores == sorted(scores, reverse=True) and [h.score for h in reranked] == pytest.approx(scores, abs=1e-5)

    hits = gallery.image_to_text(pipe, images[2], k=3, mode="itc")
    brute = pipe.match(images[2], captions)
    assert [h.index for h in hits] == brute["itc_cosine"].argsort(descending=True)[:3].tolist()
    assert [h.key for h in hits] == [captions[h.index] for h in hits]
    assert len(gallery.text_to_image(pipe, query, k=100)) == len(scenes)  # k larger than the gallery

    both = gallery + Gallery()
    assert both.num_images == gallery.num_images and torch.equal(both.image_proj, gallery.image_proj)
    with pytest.raises(ValueError, match="no images"):
        Gallery().text_to_image(pipe, query)
    with pytest.raises(ValueError, match="no texts"):
        Gallery().image_to_text(pipe, images[0])
    with pytest.raises(ValueError, match="mode"):
        gallery.text_to_image(pipe, query, mode="bm25")
