"""The Q-Former: masks cell by cell, the passes stage 1 uses, attention paths."""

import pytest
import torch

from blip2lab.qformer import QFormer, attention_mask
from conftest import tiny_config, random_text, DEC

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


@pytest.mark.parametrize("checkpointing", [False, True])
def test_keeping_the_rows_read_gives_their_outputs_and_gradients(gen, checkpointing):
    """`keep`: the last layer computes only the rows the caller reads (ITM and a VQA
    question: the queries; ITC's text side: [CLS]), with the same values and gradients."""
    qf, cfg = _qformer(gradient_checkpointing=checkpointing)
    qf.train()
    for module in qf.modules():  # dropout off, so two passes are comparable
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    for attn in (m for m in qf.modules() if hasattr(m, "attn_dropout")):
        attn.attn_dropout = 0.0
    image = torch.randn(3, 17, cfg.vision.width, generator=gen)
    ids, mask = random_text(3, 7, gen, pad_from=[7, 4, 2])
    Q = cfg.qformer.num_queries
    cases = {
        "itm queries": (lambda keep: qf.encode_joint(image, ids, mask, "itm", keep=keep).hidden, Q),
        "itc [CLS]": (lambda keep: qf.encode_text(ids, mask, keep=keep), 1),
    }
    for name, (run, keep) in cases.items():
        weight = torch.randn(keep, cfg.qformer.hidden_size, generator=gen)
        outputs, grads = [], []
        for k in (None, keep):
            qf.zero_grad(set_to_none=True)
            out = run(k)[:, :keep]  # (B, keep, D_q)
            (out * weight).sum().backward()
            outputs.append(out.detach())
            grads.append({n: p.grad.clone() for n, p in qf.named_parameters() if p.grad is not None})
        assert run(keep).shape == (3, keep, cfg.qformer.hidden_size), name
        torch.testing.assert_close(outputs[1], outputs[0], atol=1e-5, rtol=1e-5, msg=name)
        assert grads[1].keys() <= grads[0].keys(), name
        for n in grads[0]:  # what `keep` skips (the last text FFN for ITM) had no gradient to give
            expected = grads[0][n] if n in grads[1] else torch.zeros_like(grads[0][n])
            torch.testing.assert_close(grads[1].get(n, torch.zeros_like(expected)), expected, atol=1e-5,
                                       rtol=1e-4, msg=f"{name}: {n}")
        if name == "itm queries":
            assert not any(n.startswith(f"layers.{cfg.qformer.num_layers - 1}.text_ffn") for n in grads[1])


def test_packed_ffn_rows_come_in_buckets_and_change_no_real_output(gen, monkeypatch):
    """The packed text FFN takes the real rows plus padding rows up to a multiple of
    ROW_BUCKET (fixed matmul shapes for oneDNN's bf16 kernels); real rows' outputs are the same."""
    from blip2lab import qformer as Q

    mask = torch.zeros(5, 9, dtype=torch.long)
    for i, n in enumerate([9, 3, 1, 6, 2]):
        mask[i, :n] = 1
    real = mask.flatten().nonzero().squeeze(1)  # 21 real positions of 45
    assert Q._text_rows(torch.ones(3, 4)) is None  # nothing is padding: every row, unpacked
    for bucket, size in [(8, 24), (16, 32), (64, 45), (1, 21)]:
        monkeypatch.setattr(Q, "ROW_BUCKET", bucket)
        rows = Q._text_rows(mask)
        assert rows.numel() == size and bool((rows[1:] > rows[:-1]).all())
        assert set(real.tolist()) <= set(rows.tolist())
        assert bool((mask.flatten()[rows].sum() == 21))  # the others are padding
    qf, cfg = _qformer()
    ids, text_mask = random_text(5, 9, gen, pad_from=[9, 3, 1, 6, 2])
    outs = []
    for bucket in (1, 64):
        monkeypatch.setattr(Q, "ROW_BUCKET", bucket)
        outs.append(qf.encode_text(ids, text_mask)[text_mask.bool()])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-6)


def test_itg_cached_queries_equal_recomputed(gen):
    """ITG over the queries' cached keys/values equals one joint pass under the ITG mask."""
    qf, cfg = _qformer()
    image = torch.randn(3, 17, cfg.vision.width, generator=gen)
    ids, mask = random_text(3, 7, gen, pad_from=[7, 5, 3])
    ids[:, 0] = DEC
    cached = qf.encode_queries(image, use_cache=True).past_kv
    logits_cached = qf.decode_text(ids, mask, cached)
    joint = qf.encode_joint(image, ids, mask, "itg").hidden
    logits_joint = qf.lm_head(joint[:, 4:])
    real = mask.bool()
    torch.testing.assert_close(logits_cached[real], logits_joint[real], atol=1e-5, rtol=1e-5)


def test_itg_cache_carries_gradient_to_queries(gen):
    qf, cfg = _qformer()
    qf.train()
    image = torch.randn(2, 17, cfg.vision.width, generator=gen)
    ids, mask = random_text(2, 5, gen)
    cached = qf.encode_queries(image, use_cache=True).past_kv
    qf.decode_text(ids, mask, cached).sum().backward()
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
