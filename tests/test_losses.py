"""Stage-1 losses on cases worked out by hand, and the ITM negative sampler."""

import math

import pytest
import torch

from blip2lab.model import losses as L


def _ce_smoothed(logits, target, eps=0.1):
    """Cross-entropy with label smoothing written out: (1-eps) one-hot + eps/C uniform."""
    logp = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), 0)
    C = len(logits)
    return -sum(((1 - eps) * (c == target) + eps / C) * logp[c] for c in range(C)).item()


def test_itc_hand_worked():
    # Two images of two queries each, two texts, E = 2, temperature 0.5.
    image = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.6, 0.8], [-1.0, 0.0]]])
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    sim_i2t, sim_t2i = L.itc_similarity(image, text, image, text, torch.tensor(0.5))
    # max over queries of the dot products, / 0.5:
    # img0: text0 max(1, 0) = 1, text1 max(0, 1) = 1; img1: text0 max(.6, -1) = .6, text1 max(.8, 0) = .8
    torch.testing.assert_close(sim_i2t, torch.tensor([[2.0, 2.0], [1.2, 1.6]]))
    torch.testing.assert_close(sim_t2i, torch.tensor([[2.0, 1.2], [2.0, 1.6]]))
    # Row-by-row: i2t rows [2, 2]->0 = ln 2 and [1.2, 1.6]->1; t2i rows [2, 1.2]->0 and [2, 1.6]->1.
    assert _ce_smoothed([2, 2], 0) == pytest.approx(math.log(2))
    expected = ((math.log(2) + 0.533039) / 2 + (0.411101 + 0.893015) / 2) / 2  # = 0.632576
    loss = L.itc_loss(sim_i2t, sim_t2i, label_smoothing=0.1)["itc_loss"]
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    assert loss.item() == pytest.approx(0.632576, abs=1e-5)
    # Without smoothing: plain cross-entropy.
    plain = L.itc_loss(sim_i2t, sim_t2i, label_smoothing=0.0)["itc_loss"]
    assert plain.item() == pytest.approx(((math.log(2) - math.log(torch.sigmoid(torch.tensor(.4)).item())) / 2
                                          + (-math.log(torch.sigmoid(torch.tensor(.8)).item())
                                             - math.log(torch.sigmoid(torch.tensor(-.4)).item())) / 2) / 2, abs=1e-6)


def test_itc_targets_follow_rank():
    """On rank r the positives sit in columns r*B .. r*B+B-1 of the gathered batch."""
    sim = torch.full((2, 4), -5.0)
    sim[0, 2] = sim[1, 3] = 5.0  # rank 1's own block
    assert L.itc_loss(sim, sim, rank=1, label_smoothing=0.0)["itc_loss"].item() < 1e-3
    assert L.itc_loss(sim, sim, rank=0, label_smoothing=0.0)["itc_loss"].item() > 5


def test_itc_similarity_stays_fp32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(4, 3, 16, generator=g), dim=-1)  # (B, Q, E)
    txt = torch.nn.functional.normalize(torch.randn(4, 16, generator=g), dim=-1)  # (B, E)
    temp = torch.tensor(0.07)
    expected = L.itc_similarity(img, txt, img, txt, temp)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = L.itc_similarity(img, txt, img, txt, temp)
    for e, o in zip(expected, got):
        assert o.dtype == torch.float32 and torch.allclose(o, e, atol=1e-5)  # bf16 would be off by ~0.03


def test_positive_pairs_diagonal_duplicates_and_image_ids():
    ids = torch.tensor([[1, 5, 2], [1, 6, 2], [1, 5, 2], [1, 7, 2]])  # rows 0 and 2 share a caption
    pos = L.positive_pairs(ids, ids)
    expected = torch.eye(4, dtype=torch.bool)
    expected[0, 2] = expected[2, 0] = True
    assert torch.equal(pos, expected)
    pos = L.positive_pairs(ids, ids, image_ids=torch.tensor([0, 1, 2, 1]), image_ids_all=torch.tensor([0, 1, 2, 1]))
    expected[1, 3] = expected[3, 1] = True
    assert torch.equal(pos, expected)
    # rank 1 of 2: local rows are columns 2, 3 of the gathered batch
    pos = L.positive_pairs(ids[2:], ids, rank=1)
    assert pos.tolist() == [[True, False, True, False], [False, False, False, True]]


def test_hard_negatives_never_positive_even_with_duplicates():
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[1, 5, 2], [1, 5, 2], [1, 6, 2], [1, 7, 2], [1, 5, 2]])  # three copies of one caption
    pos = L.positive_pairs(ids, ids)
    # Similarities that favour the duplicates strongly: a naive sampler would pick them.
    sim = torch.zeros(5, 5)
    sim[pos] = 50.0
    for _ in range(200):
        neg_img, neg_txt, ok_t, ok_i = L.sample_hard_negatives(sim, sim, pos, g)
        assert ok_t.all() and ok_i.all()
        assert not pos[torch.arange(5), neg_img].any()
        assert not pos[torch.arange(5), neg_txt].any()


def test_hard_negatives_follow_similarity():
    g = torch.Generator().manual_seed(0)
    pos = torch.eye(3, dtype=torch.bool)
    sim = torch.tensor([[0.0, 20.0, -20.0], [-20.0, 0.0, 20.0], [20.0, -20.0, 0.0]])
    neg_img, neg_txt, _, _ = L.sample_hard_negatives(sim, sim, pos, g)
    assert neg_img.tolist() == [1, 2, 0] and neg_txt.tolist() == [1, 2, 0]


def test_easy_negative_share_mixes_in_uniform_draws():
    """easy_share=0: the hardest negative nearly always; easy_share=0.5: each of the two
    other candidates about half of 1/2 the time plus the hard share; never a positive."""
    g = torch.Generator().manual_seed(0)
    pos = torch.eye(3, dtype=torch.bool).repeat(1, 1)
    sim = torch.tensor([[0.0, 30.0, -30.0]] * 3)
    sim[1] = torch.tensor([30.0, 0.0, -30.0])
    sim[2] = torch.tensor([30.0, -30.0, 0.0])
    counts = {0.0: torch.zeros(3), 0.5: torch.zeros(3)}
    for share in counts:
        for _ in range(2000):
            neg_img, _, _, _ = L.sample_hard_negatives(sim, sim, pos, g, easy_share=share)
            assert not pos[torch.arange(3), neg_img].any()
            counts[share][neg_img[0]] += 1  # row 0: hard = 1, easy = 2
    assert counts[0.0][2] == 0
    # P(easy) = 0.5 * 1/2 = 0.25 under the mixture
    assert abs(counts[0.5][2].item() / 2000 - 0.25) < 0.04


def test_hard_negatives_rows_without_any_negative():
    """Batch of one, or all captions equal: no negative exists, so none is invented."""
    g = torch.Generator().manual_seed(0)
    pos = torch.ones(2, 2, dtype=torch.bool)
    _, _, ok_t, ok_i = L.sample_hard_negatives(torch.zeros(2, 2), torch.zeros(2, 2), pos, g)
    assert not ok_t.any() and not ok_i.any()


def test_itg_shift_and_ignore_index():
    # T = 3: [DEC] a pad. Only position 0 predicts a target (a); position 1 would predict pad (-100).
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 0.0, 9.0], [5.0, 5.0, 5.0]]])
    labels = torch.tensor([[2, 0, -100]])  # [DEC] (never a target), a = 0, padding
    loss = L.itg_loss(logits, labels, label_smoothing=0.0)["itg_loss"]
    assert loss.item() == pytest.approx(-torch.log_softmax(torch.tensor([2.0, 0.0, 0.0]), 0)[0].item(), abs=1e-6)
    smoothed = L.itg_loss(logits, labels, label_smoothing=0.1)["itg_loss"]
    assert smoothed.item() == pytest.approx(_ce_smoothed([2.0, 0.0, 0.0], 0), abs=1e-6)


def test_total_loss_sums_only_named_losses():
    out = {"itc_loss": torch.tensor(1.0), "itm_loss": torch.tensor(2.0), "temp": torch.tensor(0.07)}
    assert L.total_loss(out).item() == pytest.approx(3.0)


def test_lm_loss_per_item_weighs_items_alike():
    # Two items: item 0 has three targets, item 1 one (after the shift); -100 elsewhere.
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([[-100, 1, 2, 3, -100], [-100, -100, -100, 4, -100]])
    nll = -torch.log_softmax(logits[:, :-1], -1)  # position t predicts labels[:, t + 1]
    item0 = torch.stack([nll[0, 0, 1], nll[0, 1, 2], nll[0, 2, 3]])
    item1 = nll[1, 2, 4]
    per_token = L.lm_loss(logits, labels)["lm_loss"]
    assert per_token.item() == pytest.approx(torch.cat([item0, item1[None]]).mean().item(), abs=1e-6)
    per_item = L.lm_loss(logits, labels, per_item=True)["lm_loss"]
    assert per_item.item() == pytest.approx(((item0.mean() + item1) / 2).item(), abs=1e-6)
    # An item with no target at all does not count (and does not divide by zero).
    empty = torch.full((1, 5), -100)
    both = L.lm_loss(torch.cat([logits, logits[:1]]), torch.cat([labels, empty]), per_item=True)["lm_loss"]
    assert both.item() == pytest.approx(per_item.item(), abs=1e-6)


def test_true_pairs_are_never_drawn_as_negatives_either_way():
    """Text 0 ("a red circle") is true of image 2 too: image 2 is never its negative, nor is
    text 0 image 2's; the relation is not symmetric, so text 2 may still be image 0's."""
    g = torch.Generator().manual_seed(0)
    true_of = torch.eye(3, dtype=torch.bool)
    true_of[0, 2] = True
    pos = torch.eye(3, dtype=torch.bool)
    t2i, i2t = L.true_pairs(true_of, pos)
    assert t2i.tolist() == [[True, False, True], [False, True, False], [False, False, True]]
    assert torch.equal(i2t, t2i.t())
    sim = torch.zeros(3, 3)
    sim[0, 2] = sim[2, 0] = 50.0  # a naive sampler picks the true pair
    drawn = set()
    for _ in range(200):
        neg_img, neg_txt, _, _ = L.sample_hard_negatives(sim, sim, t2i, g, positive_i2t=i2t)
        assert neg_img[0] != 2 and neg_txt[2] != 0
        drawn.add(int(neg_txt[0]))
    assert 2 in drawn  # image 0's negative may be text 2: text 2 is not true of image 0
    # rank 1 of 2: this rank's block is columns 3..5
    t2i, _ = L.true_pairs(true_of, torch.zeros(3, 6, dtype=torch.bool), rank=1)
    assert t2i[:, :3].sum() == 0 and torch.equal(t2i[:, 3:], true_of)
