"""The Q-Former: masks cell by cell, the passes stage 1 uses, attention paths."""

import pytest
import torch
from conftest import random_text, tiny_config

from blip2lab.model.qformer import QFormer, attention_mask

# Two queries, three text tokens of which the last is padding: [q0 q1 | t0 t1 t2=pad].
TEXT_MASK = torch.tensor([[1, 1, 0]])
TABLES = {
    "itc": [  # queries see queries; text sees text (never padding)
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 0],
    ],
    "itm": [  # everyone sees everyone but padding
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
    ],
    "itg": [  # queries see queries; text sees all queries and earlier (or same) text
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0],
    ],
}


@pytest.mark.parametrize("mode", ["itc", "itm", "itg"])
def test_masks_cell_by_cell(mode):
    mask = attention_mask(mode, 2, TEXT_MASK)
    assert mask.dtype == torch.bool and mask.shape == (1, 5, 5)
    assert mask[0].int().tolist() == TABLES[mode]


def test_mask_unknown_mode():
    with pytest.raises(ValueError, match="itc"):
        attention_mask("mlm", 2, TEXT_MASK)


def _qformer(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = tiny_config(**kw)
    return QFormer(cfg.qformer, cfg.vision.width).eval(), cfg


def test_cross_attention_layers_and_shapes(gen):
    qf, cfg = _qformer(num_layers=4, cross_attention_freq=2)
    assert [layer.cross_attn is not None for layer in qf.layers] == [True, False, True, False]
    image = torch.randn(3, 17, cfg.vision.width, generator=gen)
    ids, mask = random_text(3, 6, gen)
    out = qf.encode_joint(image, ids, mask, "itm", output_attentions=True)
    assert out.hidden.shape == (3, 4 + 6, 32)
    assert out.self_attentions[0].shape == (3, 4, 10, 10)
    assert out.cross_attentions[0].shape == (3, 4, 4, 17) and out.cross_attentions[1] is None


def test_itc_mask_joint_pass_equals_separate_passes(gen):
    """The ITC mask makes one joint pass equal to the query-only and text-only passes."""
    qf, cfg = _qformer()
    image = torch.randn(3, 17, cfg.vision.width, generator=gen)
    ids, mask = random_text(3, 7, gen, pad_from=[7, 4, 2])
    joint = qf.encode_joint(image, ids, mask, "itc").hidden
    queries = qf.encode_queries(image).hidden
    text = qf.encode_text(ids, mask)
    torch.testing.assert_close(joint[:, :4], queries, atol=1e-5, rtol=1e-5)
    real = mask.bool()
    torch.testing.assert_close(joint[:, 4:][real], text[real], atol=1e-5, rtol=1e-5)


def test_itg_cache_carries_gradient_to_queries(gen):
    qf, cfg = _qformer()
    qf.train()
    image = torch.randn(2, 17, cfg.vision.width, generator=gen)
    ids, mask = random_text(2, 5, gen)
    cached = qf.encode_queries(image, use_cache=True).past_kv
    qf.lm_head(qf.decode_text(ids, mask, cached)).sum().backward()
    assert qf.query_tokens.grad is not None and qf.query_tokens.grad.abs().sum() > 0
    assert qf.layers[0].cross_attn.k.weight.grad.abs().sum() > 0


def test_probability_path_equals_fused_path(gen):
    qf, cfg = _qformer()
    image = torch.randn(2, 17, cfg.vision.width, generator=gen)
    ids, mask = random_text(2, 6, gen, pad_from=[6, 3])
    fused = qf.encode_joint(image, ids, mask, "itg").hidden
    explicit = qf.encode_joint(image, ids, mask, "itg", output_attentions=True)
    torch.testing.assert_close(fused, explicit.hidden, atol=1e-5, rtol=1e-5)
    probs = explicit.self_attentions[0]  # (B, H, L, L): rows sum to one, masked cells are zero
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
    allowed = attention_mask("itg", 4, mask)[:, None].expand_as(probs)
    assert probs[~allowed].abs().max() == 0


def test_text_positions_start_at_zero_after_queries(gen):
    """Queries get no position embedding; text positions start at 0 (HF / LAVIS)."""
    qf, _ = _qformer()
    ids, _ = random_text(1, 4, gen)
    emb = qf.embed(ids, 1, with_queries=True)
    alone = qf.embed(ids, 1, with_queries=False)
    torch.testing.assert_close(emb[:, 4:], alone)
    torch.testing.assert_close(emb[:, :4], qf.dropout(qf.layernorm(qf.query_tokens)))


def test_bad_ids_and_empty_batch(gen):
    qf, cfg = _qformer()
    ids, mask = random_text(2, 5, gen)
    with pytest.raises(ValueError, match="vocab_size"):
        qf.encode_text(ids + 200, mask)
    with pytest.raises(ValueError, match="vocab_size"):
        qf.encode_text(ids - 5, mask)
    with pytest.raises(ValueError, match="integer"):
        qf.encode_text(ids.float(), mask)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        long_ids = torch.ones(1, 65, dtype=torch.long)
        qf.encode_text(long_ids, torch.ones_like(long_ids))
    with pytest.raises(ValueError, match="empty batch"):
        qf.encode_queries(torch.zeros(0, 17, cfg.vision.width))
