"""Stage-1 losses of BLIP-2 (paper Sec. 3.2; BLIP2_REFERENCE.md Sec. 2) as pure functions.

Each loss function returns a dict of named `*_loss` tensors; the training loop sums every
value whose key ends in `_loss` and logs each (open_clip's convention). The helpers that
build their inputs (similarities, hard negatives) are pure functions too, so each can be
checked on a case worked out by hand.

Shape legend: B local batch, W world size, Q queries, E embedding width, T text length, V vocab.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def itc_similarity(image_feats: Tensor, text_feat: Tensor, image_feats_all: Tensor, text_feat_all: Tensor,
                   temp: Tensor) -> tuple[Tensor, Tensor]:
    """Query-text similarity: the max over the Q query embeddings of the dot product with
    the text's [CLS] embedding, divided by the temperature.

    image_feats (B, Q, E) and text_feat (B, E) are this rank's (L2-normalised); the `_all`
    versions are gathered from every rank (W*B rows). Returns sim_i2t (B, W*B) and
    sim_t2i (B, W*B)."""
    # In fp32 even under bf16 autocast: cosines over a temperature of ~0.07 span about +-14,
    # where bf16 steps by 0.06, and the contrastive softmax would see those steps
    # (tests/test_losses.py measures the error; one quick shapes stage 1 with this in bf16
    # ended with ITC 10% above fp32, but runs of the same code differ by as much across seeds).
    with torch.autocast(image_feats.device.type, enabled=False):
        image_feats, text_feat, image_feats_all, text_feat_all, temp = (
            t.float() for t in (image_feats, text_feat, image_feats_all, text_feat_all, temp))
        # (B, 1, Q, E) @ (W*B, E, 1) -> (B, W*B, Q, 1) -> max over queries -> (B, W*B)
        sim_i2t = torch.einsum("bqe,ne->bnq", image_feats, text_feat_all).amax(dim=-1) / temp
        sim_t2i = torch.einsum("be,nqe->bnq", text_feat, image_feats_all).amax(dim=-1) / temp
    return sim_i2t, sim_t2i


def itc_loss(sim_i2t: Tensor, sim_t2i: Tensor, rank: int = 0, label_smoothing: float = 0.1) -> dict[str, Tensor]:
    """Image-text contrastive loss: cross-entropy both ways, averaged. Row i's positive is
    column rank * B + i (this rank's block of the gathered batch)."""
    B = sim_i2t.shape[0]
    targets = torch.arange(rank * B, rank * B + B, device=sim_i2t.device)  # (B,)
    loss = (F.cross_entropy(sim_i2t, targets, label_smoothing=label_smoothing)
            + F.cross_entropy(sim_t2i, targets, label_smoothing=label_smoothing)) / 2
    return {"itc_loss": loss}


def positive_pairs(text_ids: Tensor, text_ids_all: Tensor, rank: int = 0,
                   image_ids: Optional[Tensor] = None, image_ids_all: Optional[Tensor] = None) -> Tensor:
    """Which (local row, gathered column) pairs are positives and so must never be drawn as
    ITM negatives: the diagonal, any other example with the very same caption (duplicate
    captions are common: "a man riding a horse"), and any example of the same image
    (`image_ids`, several captions per image). Returns (B, W*B) bool."""
    B = text_ids.shape[0]
    cols = torch.arange(text_ids_all.shape[0], device=text_ids.device)
    positive = cols[None, :] == (torch.arange(B, device=text_ids.device) + rank * B)[:, None]  # (B, W*B)
    if text_ids.shape[1] == text_ids_all.shape[1]:
        positive |= (text_ids[:, None, :] == text_ids_all[None, :, :]).all(dim=-1)  # same caption
    if image_ids is not None and image_ids_all is not None:
        positive |= image_ids[:, None] == image_ids_all[None, :]
    return positive


def true_pairs(text_true_of: Tensor, positive: Tensor, rank: int = 0) -> tuple[Tensor, Tensor]:
    """`positive` (B, W*B) widened by pairs known to match although they are different
    examples: text_true_of (B, B), text i of this rank's batch is true of its image j (a
    partial description, "a red circle", of another scene holding a red circle). Returns
    the masks for the text rows (text i, image j) and for the image rows (image i, text j).
    Only this rank's block is known; pairs across ranks keep `positive` alone."""
    B = text_true_of.shape[0]
    t2i, i2t = positive.clone(), positive.clone()
    t2i[:, rank * B:(rank + 1) * B] |= text_true_of
    i2t[:, rank * B:(rank + 1) * B] |= text_true_of.t()
    return t2i, i2t


@torch.no_grad()
def sample_hard_negatives(sim_i2t: Tensor, sim_t2i: Tensor, positive: Tensor,
                          generator: Optional[torch.Generator] = None,
                          easy_share: float = 0.0,
                          positive_i2t: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ITM hard-negative mining (BLIP2_REFERENCE.md Sec. 2): mask the positives, softmax each
    row of the (temperature-scaled) similarities, draw one negative per row with
    torch.multinomial. No gradient.

    `easy_share` (a deviation, 0 in the paper): draw from the mixture
    (1 - easy_share) * softmax + easy_share * uniform over the non-positives, so a share of
    the negatives are random ones. In the shapes world ITC soon finds negatives that differ
    from the positive in one attribute; a small Q-Former facing only those never leaves the
    "no match" prior, while with some easy negatives it learns matching and then the hard ones.

    Returns neg_image_for_text (B,), neg_text_for_image (B,) as indices into the gathered
    batch, and valid_text (B,), valid_image (B,): False where a row has no negative at all
    (batch of one, or every other caption is the same); such rows get no negative pair
    instead of a mislabelled one.

    `positive` masks the text rows (sim_t2i: local text i, gathered image j) and, unless
    `positive_i2t` is given, the image rows too: every relation `positive_pairs` builds is
    symmetric; one that is not ("text i is true of image j", `true_pairs`) needs both."""
    def draw(sim: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
        sim = sim.float().masked_fill(positive, float("-inf"))  # (B, W*B)
        allowed = torch.isfinite(sim)  # (B, W*B)
        valid = allowed.any(dim=1)  # (B,)
        # Rows without a negative draw from a uniform dummy, flagged invalid: no row is cut out
        # of the batch here, which on a GPU would wait for it (a host sync) at every step.
        weights = torch.softmax(sim.masked_fill(~valid[:, None], 0.0), dim=1)
        if easy_share > 0:
            uniform = allowed.float() / allowed.sum(dim=1, keepdim=True).clamp(min=1)
            weights = (1 - easy_share) * weights + easy_share * torch.where(valid[:, None], uniform, weights)
        return torch.multinomial(weights, 1, generator=generator).squeeze(1), valid

    neg_image_for_text, valid_text = draw(sim_t2i, positive)
    neg_text_for_image, valid_image = draw(sim_i2t, positive if positive_i2t is None else positive_i2t)
    return neg_image_for_text, neg_text_for_image, valid_text, valid_image


def itm_loss(logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Image-text matching: plain 2-way cross-entropy over (B + negatives) pairs.
    logits (M, 2) are the itm_head outputs averaged over queries; labels (M,) 1 = match."""
    return {"itm_loss": F.cross_entropy(logits, labels)}


def itg_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.1) -> dict[str, Tensor]:
    """Image-grounded text generation: next-token prediction. logits (B, T, V) at every
    text position; labels (B, T) are the input ids ([DEC] first) with padding = -100.
    Position t predicts token t + 1, so [DEC] is never a target."""
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])  # (B*(T-1), V)
    targets = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    return {"itg_loss": F.cross_entropy(shifted, targets, ignore_index=-100, label_smoothing=label_smoothing)}


def itg_targets(labels: Tensor) -> tuple[Tensor, Tensor]:
    """The positions of labels (B, T) that predict a token (the next one is not -100), as
    indices (M,) into the flattened B*T positions, and their targets (M,). `itg_loss` over
    the logits of those positions only equals `itg_loss` over all of them."""
    following = F.pad(labels[:, 1:], (0, 1), value=-100).flatten()  # (B*T,) the token each position predicts
    rows = (following != -100).nonzero().squeeze(1)  # (M,)
    return rows, following[rows]


def itg_loss_rows(logits: Tensor, targets: Tensor, label_smoothing: float = 0.1) -> dict[str, Tensor]:
    """`itg_loss` given the logits (M, V) of the predicting positions only (`itg_targets`)."""
    return {"itg_loss": F.cross_entropy(logits, targets, label_smoothing=label_smoothing)}


def lm_loss(logits: Tensor, labels: Tensor, shift: bool = True, per_item: bool = False) -> dict[str, Tensor]:
    """Stage-2 language-modelling loss: plain cross-entropy (no smoothing, as LAVIS / HF)
    over the positions whose label is not -100. `shift`: position t predicts token t + 1
    (decoder-only); an encoder-decoder's logits are already aligned with its targets.
    `per_item`: average each item's tokens first, then the items (a deviation: LAVIS and HF
    average all tokens of the batch, so a 27-token caption weighs ~10x a 2-token answer).
    logits (B, L, V), labels (B, L)."""
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    flat_logits, flat_labels = logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1)
    if not per_item:
        return {"lm_loss": F.cross_entropy(flat_logits, flat_labels, ignore_index=-100)}
    # (B, L), 0 where ignored
    nll = F.cross_entropy(flat_logits, flat_labels, ignore_index=-100, reduction="none").view_as(labels)
    counts = (labels != -100).sum(1)  # (B,) targets per item
    has_target = counts > 0
    return {"lm_loss": (nll.sum(1)[has_target] / counts[has_target]).mean()}


def total_loss(losses: dict[str, Tensor]) -> Tensor:
    """The sum the optimiser sees: every `*_loss` entry, weight 1 as in the paper."""
    return sum(v for k, v in losses.items() if k.endswith("_loss"))
