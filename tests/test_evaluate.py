"""Evaluation: COCO caption metrics (Java), official VQA normalisation and soft accuracy on
hand-worked cases, the retrieval protocol against a brute-force re-run of the model,
recall@K on hand-made score matrices, object-level F1 by hand."""

import math
import shutil

import pytest
import torch
from conftest import random_text, tiny_config

from blip2lab import evaluate as E
from blip2lab.model.blip2 import Blip2

# -- captions ----------------------------------------------------------------------------

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="caption metrics run Java programs")

REFS = {
    1: ["a red circle next to a blue square", "a blue square beside a red circle"],
    2: ["two green triangles on a white background"],
    3: ["a small yellow star above a large purple ring"],
}
CAPTION_KEYS = {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"}


@needs_java
def test_caption_metrics_identical_beats_unrelated():
    same = E.caption_metrics({i: r[0] for i, r in REFS.items()}, REFS)
    assert set(same) == CAPTION_KEYS
    assert same["Bleu_4"] > 0.99 and same["ROUGE_L"] > 0.99 and same["METEOR"] > 0.9
    assert same["CIDEr"] > 3  # CIDEr-D of exact copies with distinct captions per image
    other = E.caption_metrics({1: "an old man rides a horse", 2: "people eat pizza in a kitchen",
                               3: "the dog sleeps on the sofa"}, REFS, meteor=False)
    assert set(other) == CAPTION_KEYS - {"METEOR"}
    assert other["Bleu_4"] < 0.1 and other["CIDEr"] < 0.5 and other["ROUGE_L"] < same["ROUGE_L"]


@needs_java
def test_caption_metrics_empty_predictions_score_zero():
    out = E.caption_metrics({i: "" for i in REFS}, REFS)
    assert set(out) == CAPTION_KEYS and all(v == 0.0 for v in out.values())
    part = E.caption_metrics({1: "", 2: REFS[2][0], 3: "  ...\n"}, REFS, meteor=False)  # no crash, in between
    assert 0 < part["CIDEr"] and part["Bleu_1"] < 1


def test_caption_metrics_bad_input(monkeypatch):
    with pytest.raises(ValueError, match="no references"):
        E.caption_metrics({1: "a cat", 9: "a dog"}, REFS)
    with pytest.raises(TypeError, match="not str"):
        E.caption_metrics({1: None}, REFS)
    monkeypatch.setattr(E.shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="openjdk"):
        E.caption_metrics({1: "a cat"}, REFS)
    assert "SPICE" in E.SPICE_NOTE and "not computed" in E.SPICE_NOTE


# -- VQA ---------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, norm", [
    ("Two", "2"), ("the dog.", "dog"), ("dont", "don't"), ("yes!", "yes"), ("a red car", "red car"),
    ("isnt", "isn't"), ("None", "0"), ("3.5", "3.5"), ("1,000", "1000"), ("black-and-white", "black and white"),
    ("  Ten\tapples\n", "10 apples"), ("An apple, please", "apple please"),
])
def test_normalize_answer_official_rules(raw, norm):
    assert E.normalize_answer(raw) == norm


def test_vqa_soft_accuracy_by_hand():
    # 10 humans, m say "red". Leaving out one of the m "red" voters leaves m - 1 matches,
    # leaving out another leaves m: acc = (m * min(1, (m-1)/3) + (10-m) * min(1, m/3)) / 10.
    def humans(m):
        return ["red"] * m + ["blue"] * (10 - m)

    assert E.vqa_score("red", humans(0)) == 0.0
    assert E.vqa_score("red", humans(1)) == pytest.approx((1 * 0 + 9 * (1 / 3)) / 10)  # 0.3
    assert E.vqa_score("red", humans(2)) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)  # 0.6
    assert E.vqa_score("red", humans(2)) == pytest.approx(0.6)
    assert E.vqa_score("red", humans(3)) == pytest.approx((3 * (2 / 3) + 7 * 1) / 10)  # 0.9
    assert E.vqa_score("red", humans(4)) == pytest.approx(1.0)
    assert E.vqa_score("The red.", humans(2)) == pytest.approx(0.6)  # the prediction is normalised
    # one reference (synthetic data): exact match after normalisation
    assert E.vqa_score("Two", ["2"]) == 1.0 and E.vqa_score("3", ["two"]) == 0.0


def test_vqa_accuracy_per_type():
    preds = ["red", "yes", "3", "no"]
    answers = [["red"] * 2 + ["blue"] * 8, ["yes"] * 10, ["three"] * 3 + ["4"] * 7, ["yes"] * 10]
    out = E.vqa_accuracy(preds, answers, types=["other", "yes/no", "number", "yes/no"])
    assert set(out) == {"accuracy", "accuracy/other", "accuracy/yes/no", "accuracy/number"}
    assert out["accuracy/other"] == pytest.approx(0.6)
    assert out["accuracy/yes/no"] == pytest.approx(0.5)
    assert out["accuracy/number"] == pytest.approx(0.9)
    assert out["accuracy"] == pytest.approx((0.6 + 1 + 0.9 + 0) / 4)
    assert set(E.vqa_accuracy(preds, answers)) == {"accuracy"}
    with pytest.raises(ValueError, match="must match"):
        E.vqa_accuracy(preds, answers[:2])


def test_prior_accuracy_is_the_majority_answer_per_type():
    answers = [["yes"], ["Yes."], ["no"], ["two"], ["three"], ["two"]]
    types = ["exists", "exists", "exists", "count", "count", "count"]
    out = E.prior_accuracy(answers, types)  # "yes" (normalised) for exists, "two" for count
    assert out["accuracy/exists"] == pytest.approx(2 / 3) and out["accuracy/count"] == pytest.approx(2 / 3)
    assert out["accuracy"] == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="must match"):
        E.prior_accuracy(answers, types[:2])


def test_vqa_official_references_mode():
    # vqaEval.py leaves unanimous references untouched (VQAv2 annotations come normalised):
    # a raw "Two" from ten humans never matches the normalised prediction "2" there.
    assert E.vqa_score("two", ["Two"] * 10) == 1.0
    assert E.vqa_score("two", ["Two"] * 10, official_references=True) == 0.0
    assert E.vqa_score("2", ["2"] * 10, official_references=True) == 1.0
    assert E.vqa_score("red", ["red."] * 3 + ["blue"] * 7, official_references=True) == pytest.approx(0.9)
    # ... and its punctuation rule turns "red!" into "red " (a space, never stripped): no match
    assert E.vqa_score("red", ["red!"] * 3 + ["blue"] * 7, official_references=True) == 0.0
    assert E.vqa_score("red", ["red!"] * 3 + ["blue"] * 7) == pytest.approx(0.9)


# -- retrieval ---------------------------------------------------------------------------

N_IMG, N_TXT, K = 5, 7, 3


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Blip2(tiny_config()).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        images = model.encode_image(torch.randn(N_IMG, 3, 32, 32, generator=gen))  # (N_img, N, D_v)
    ids, mask = random_text(N_TXT, 8, gen, pad_from=[8 - (i % 4) for i in range(N_TXT)])
    return model, images, ids, mask


def _brute_force(model, images, ids, mask):
    """ITC and ITM positive logit of every (image, text) pair, one image at a time."""
    with torch.no_grad():
        itc = model.itc_cosine(model.image_features(images).proj, model.text_features(ids, mask).proj)
        itm = torch.stack([model.itm_logits(images[i].expand(N_TXT, -1, -1), ids, mask)[:, 1]
                           for i in range(N_IMG)])  # (N_img, N_txt)
    return itc, itm


def test_retrieval_scores_match_the_model(setup):
    model, images, ids, mask = setup
    s = E.retrieval_scores(model, images, ids, mask, k_test=K, batch_size=4)
    assert s["itc_i2t"].shape == s["itm_i2t"].shape == (N_IMG, N_TXT)
    assert s["itc_t2i"].shape == s["itm_t2i"].shape == (N_TXT, N_IMG)
    itc, itm = _brute_force(model, images, ids, mask)
    torch.testing.assert_close(s["itc_i2t"], itc)
    torch.testing.assert_close(s["itc_t2i"], itc.t())
    for scores, sims, logits in ((s["itm_i2t"], itc, itm), (s["itm_t2i"], itc.t(), itm.t())):
        top = sims.topk(K, dim=1).indices
        kept = torch.zeros_like(scores, dtype=torch.bool).scatter_(1, top, True)
        assert (kept.sum(1) == K).all()
        torch.testing.assert_close(scores[kept], (logits + sims)[kept], atol=1e-5, rtol=1e-5)
        assert torch.isneginf(scores[~kept]).all()


def test_retrieval_scores_callable_images_and_mode(setup):
    model, images, ids, mask = setup
    model.train()
    calls = []

    def fetch(idx):
        calls.append(idx.tolist())
        return images[idx]

    s = E.retrieval_scores(model, fetch, ids, mask, k_test=100, batch_size=3, num_images=N_IMG)
    assert model.training  # restored
    model.eval()
    ref = E.retrieval_scores(model, images, ids, mask, k_test=100)
    for name in ref:
        torch.testing.assert_close(s[name], ref[name], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(ref["itm_i2t"]).all()  # k_test above N: every pair re-ranked
    assert all(len(set(c)) == len(c) for c in calls)  # each image fetched once per pass
    with pytest.raises(ValueError, match="num_images"):
        E.retrieval_scores(model, fetch, ids, mask)


def test_retrieval_eval_keys(setup):
    model, images, ids, mask = setup
    txt2img = [t % N_IMG for t in range(N_TXT)]
    img2txts = [[t for t in range(N_TXT) if txt2img[t] == i] for i in range(N_IMG)]
    out = E.retrieval_eval(model, images, ids, mask, txt2img, img2txts, k_test=K)
    names = [f"{d}_r{k}" for d in ("txt", "img") for k in (1, 5, 10)] + ["txt_r_mean", "img_r_mean", "r_mean"]
    assert set(out) == {f"{p}/{n}" for p in ("itc", "itm") for n in names}
    assert all(0 <= v <= 1 for v in out.values())
    assert out["itc/txt_r10"] == 1.0 and out["itm/img_r5"] == 1.0  # fewer candidates than K


def test_recall_at_k_by_hand():
    eye = torch.eye(4)
    out = E.recall_at_k(eye, eye, [0, 1, 2, 3], [[0], [1], [2], [3]])
    assert all(v == 1.0 for v in out.values())

    # image 0: its text second; image 1: first; image 2: third.
    s = torch.tensor([[0.5, 0.9, 0.1], [0.1, 0.9, 0.2], [0.9, 0.8, 0.1]])
    # Transposed for text -> image. Text 1 ties its image (0.9) with image 0: ties count
    # against the positive, so rank 2; text 2 is third.
    out = E.recall_at_k(s, s.t(), [0, 1, 2], [[0], [1], [2]], ks=(1, 2, 3))
    assert [out[f"txt_r{k}"] for k in (1, 2, 3)] == pytest.approx([1 / 3, 2 / 3, 1])
    assert [out[f"img_r{k}"] for k in (1, 2, 3)] == pytest.approx([0, 2 / 3, 1])
    assert out["r_mean"] == pytest.approx(((1 / 3 + 2 / 3 + 1) / 3 + (0 + 2 / 3 + 1) / 3) / 2)

    # image 0 has texts 0 and 1; only its second caption is ranked first: still a hit.
    i2t = torch.tensor([[0.1, 0.9, 0.5], [0.2, 0.1, 0.8]])
    t2i = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9]])
    out = E.recall_at_k(i2t, t2i, [0, 0, 1], [[0, 1], [2]], ks=(1,))
    assert out["txt_r1"] == 1.0 and out["img_r1"] == 1.0

    # a positive left at -inf (outside the re-ranked top k) is never a lucky tie
    inf = -math.inf
    out = E.recall_at_k(torch.tensor([[inf, 0.3, inf], [0.0, 0.5, inf]]), torch.zeros(3, 2),
                        [0, 1, 1], [[0], [1, 2]], ks=(1, 2, 3))
    assert [out[f"txt_r{k}"] for k in (1, 2, 3)] == [0.5, 0.5, 1.0]


def test_recall_at_k_bad_input():
    with pytest.raises(ValueError, match="must be"):
        E.recall_at_k(torch.zeros(2, 3), torch.zeros(2, 3), [0, 1, 1], [[0], [1, 2]])
    with pytest.raises(ValueError, match="disagree"):
        E.recall_at_k(torch.zeros(2, 3), torch.zeros(3, 2), [0, 1, 1], [[0, 1], [2]])


# -- objects -----------------------------------------------------------------------------


def test_object_f1_by_hand():
    pred = [
        [("red", "circle"), ("blue", "square"), ("blue", "square")],  # 2 right, 1 duplicate
        [("green", "triangle")],  # wrong shape
        [("red", "circle")],  # exact
        [],  # nothing said
    ]
    true = [
        [("red", "circle"), ("blue", "square")],
        [("green", "circle"), ("red", "square")],
        [("red", "circle")],
        [("blue", "circle")],
    ]
    # TP = 2 + 0 + 1 + 0 = 3; predicted 3 + 1 + 1 + 0 = 5; true 2 + 2 + 1 + 1 = 6
    out = E.object_f1(pred, true)
    assert out["precision"] == pytest.approx(3 / 5)
    assert out["recall"] == pytest.approx(3 / 6)
    assert out["f1"] == pytest.approx(2 * 0.6 * 0.5 / 1.1)  # 6/11
    assert out["exact_match"] == pytest.approx(1 / 4)
    # colours alone: TP = 2 + 1 + 1 + 0 = 4 of 5 predicted, 6 true
    colour = E.attribute_f1(pred, true, ["colour", "shape"])
    assert colour["colour/precision"] == pytest.approx(4 / 5)
    assert colour["colour/recall"] == pytest.approx(4 / 6)
    assert colour["colour/f1"] == pytest.approx(8 / 11)
    assert E.object_f1([[]], [[]]) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "exact_match": 1.0}
    with pytest.raises(ValueError, match="scenes"):
        E.object_f1(pred, true[:2])


def test_recall_any_at_k_by_hand():
    from blip2lab.evaluate import recall_any_at_k

    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0], [0.9, 0.1, 0.2, 0.3]])  # (2 texts, 4 images)
    positive = torch.tensor([[False, True, True, False], [False, False, False, True]])
    out = recall_any_at_k(scores, positive, ks=(1, 2))
    # text 0: best right image ranked 2nd; text 1: its only right image ranked 2nd
    assert out["r1"] == 0.0 and out["r2"] == 1.0
    # p2: text 0 has 1 right of its top 2 (of 2 possible), text 1 has 1 of 1 possible
    assert abs(out["p2"] - (0.5 + 1.0) / 2) < 1e-6 and out["p1"] == 0.0
    with pytest.raises(ValueError, match="at least one right image"):
        recall_any_at_k(scores, torch.zeros(2, 4, dtype=torch.bool))
