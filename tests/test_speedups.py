"""Every speed-up of blip2lab.model.speedups equals the plain path (the paper's passes, every
row computed) in outputs and gradients: piece by piece on the Q-Former, and together on
stage 1's three losses, with each switch off in turn."""

from dataclasses import fields, replace

import pytest
import torch
from conftest import DEC, random_text, tiny_config

from blip2lab.model import Blip2, QFormer, RowPlan, Speedups
from blip2lab.model import speedups as S


def _no_dropout(module):
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        if hasattr(m, "attn_dropout"):
            m.attn_dropout = 0.0
    return module


def _qformer(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = tiny_config(**kw)
    return _no_dropout(QFormer(cfg.qformer, cfg.vision.width).train()), cfg


def _outputs_and_grads(module, run, weight):
    module.zero_grad(set_to_none=True)
    out = run()
    (out * weight).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _assert_same(a, b, what):
    (out_a, grads_a), (out_b, grads_b) = a, b
    torch.testing.assert_close(out_a, out_b, atol=1e-5, rtol=1e-5, msg=what)
    for n in grads_a.keys() | grads_b.keys():  # a part one path skips had no gradient to give
        ga = grads_a.get(n, torch.zeros_like(grads_b.get(n, torch.zeros(1))))
        gb = grads_b.get(n, torch.zeros_like(ga))
        torch.testing.assert_close(ga, gb, atol=1e-5, rtol=1e-4, msg=f"{what}: {n}")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_prune_last_layer(gen, checkpointing):
    """RowPlan.keep: the last layer computes only the rows read (ITM: the queries; ITC's
    text side: [CLS]), with the same values and gradients."""
    qf, cfg = _qformer(gradient_checkpointing=checkpointing)
    image = torch.randn(3, 17, cfg.vision.width, generator=gen)
    ids, mask = random_text(3, 7, gen, pad_from=[7, 4, 2])
    Q = cfg.qformer.num_queries
    cases = {"itm queries": (lambda rows: qf.encode_joint(image, ids, mask, "itm", rows=rows).hidden, Q),
             "itc [CLS]": (lambda rows: qf.encode_text(ids, mask, rows=rows), 1)}
    for name, (run, keep) in cases.items():
        weight = torch.randn(keep, cfg.qformer.hidden_size, generator=gen)
        plain = _outputs_and_grads(qf, lambda: run(None)[:, :keep], weight)
        fast = _outputs_and_grads(qf, lambda: run(RowPlan(keep=keep)), weight)
        assert fast[0].shape == (3, keep, cfg.qformer.hidden_size)
        _assert_same(plain, fast, name)
        if name == "itm queries":  # the last text FFN never ran
            assert not any(n.startswith(f"layers.{cfg.qformer.num_layers - 1}.text_ffn") for n in fast[1])


def test_pack_text_ffn(gen, monkeypatch):
    """RowPlan.text_rows: padding rows skip the text FFN; the packed rows come in multiples of
    ROW_BUCKET; every real row's output and every gradient is the plain path's."""
    mask = torch.zeros(5, 9, dtype=torch.long)
    for i, n in enumerate([9, 3, 1, 6, 2]):
        mask[i, :n] = 1
    real = mask.flatten().nonzero().squeeze(1)  # 21 real positions of 45
    assert S.text_rows(torch.ones(3, 4)) is None  # nothing is padding: every row, unpacked
    for bucket, size in [(8, 24), (16, 32), (64, 45), (1, 21)]:
        monkeypatch.setattr(S, "ROW_BUCKET", bucket)
        rows = S.text_rows(mask)
        assert rows.numel() == size and bool((rows[1:] > rows[:-1]).all())
        assert set(real.tolist()) <= set(rows.tolist()) and int(mask.flatten()[rows].sum()) == 21
    monkeypatch.setattr(S, "ROW_BUCKET", 8)
    qf, cfg = _qformer()
    ids, text_mask = random_text(5, 9, gen, pad_from=[9, 3, 1, 6, 2])
    weight = torch.randn(int(text_mask.sum()), cfg.qformer.hidden_size, generator=gen)
    plain = _outputs_and_grads(qf, lambda: qf.encode_text(ids, text_mask)[text_mask.bool()], weight)
    packed = _outputs_and_grads(
        qf, lambda: qf.encode_text(ids, text_mask, rows=RowPlan(text_rows=S.text_rows(text_mask)))[text_mask.bool()],
        weight)
    _assert_same(plain, packed, "packed text FFN")


def test_image_kv_once(gen):
    """The image's cross-attention keys/values, projected once and indexed, give the query
    outputs and gradients of projecting them inside every pass."""
    qf, cfg = _qformer()
    image = torch.randn(3, 17, cfg.vision.width, generator=gen, requires_grad=True)
    ids, mask = random_text(3, 5, gen)
    rows = torch.tensor([2, 0, 2])
    weight = torch.randn(3, cfg.qformer.num_queries, cfg.qformer.hidden_size, generator=gen)
    plain = _outputs_and_grads(qf, lambda: qf.encode_joint(image[rows], ids, mask, "itm").hidden[:, :4], weight)
    once = _outputs_and_grads(qf, lambda: qf.encode_joint(qf.image_kv(image).select(rows), ids, mask,
                                                           "itm").hidden[:, :4], weight)
    _assert_same(plain, once, "image K/V once")


def test_itg_reuses_the_queries(gen):
    """ITG's text over the queries' cached keys/values equals the text rows of one joint pass
    under the ITG mask, values and gradients (they flow back through the cache)."""
    qf, cfg = _qformer()
    image = torch.randn(3, 17, cfg.vision.width, generator=gen)
    ids, mask = random_text(3, 7, gen, pad_from=[7, 5, 3])
    ids[:, 0] = DEC
    Q, real = cfg.qformer.num_queries, mask.bool()
    weight = torch.randn(int(real.sum()), cfg.qformer.hidden_size, generator=gen)
    joint = _outputs_and_grads(qf, lambda: qf.encode_joint(image, ids, mask, "itg").hidden[:, Q:][real], weight)
    cached = _outputs_and_grads(
        qf, lambda: qf.decode_text(ids, mask, qf.encode_queries(image, use_cache=True).past_kv)[real], weight)
    _assert_same(joint, cached, "ITG over cached queries")


def _stage1_losses_and_grads(model, batch, generator_seed=0):
    model.zero_grad(set_to_none=True)
    out = model(**batch, generator=torch.Generator().manual_seed(generator_seed))
    total = sum(v for k, v in out.items() if k.endswith("_loss"))
    total.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


@pytest.mark.parametrize("switch", [None] + [f.name for f in fields(Speedups)])
def test_stage1_with_and_without_each_speedup(gen, switch):
    """ITC + ITM + ITG: every speed-up on (the default) against the plain path, and each
    switched off alone against all on: the same losses and gradients."""
    torch.manual_seed(0)
    model = _no_dropout(Blip2(tiny_config()).train())
    ids, mask = random_text(6, 8, gen, pad_from=[8, 3, 5, 8, 2, 6])
    batch = {"pixels": torch.randn(6, 3, 32, 32, generator=gen), "text_ids": ids, "text_mask": mask,
             "losses": ("itc", "itm", "itg")}
    fast = _stage1_losses_and_grads(model, batch)
    model.speedups = Speedups.off() if switch is None else replace(Speedups(), **{switch: False})
    other = _stage1_losses_and_grads(model, batch)
    for name in ("itc_loss", "itm_loss", "itg_loss"):
        torch.testing.assert_close(fast[0][name], other[0][name], atol=1e-5, rtol=1e-5, msg=f"{switch}: {name}")
    assert fast[1].keys() == other[1].keys()
    for n in fast[1]:
        torch.testing.assert_close(fast[1][n], other[1][n], atol=1e-5, rtol=1e-4, msg=f"{switch}: {n}")


def test_itg_predicting_rows_is_losses_itg_loss(gen):
    """With every speed-up off, ITG is `losses.itg_loss` over the full (B, T, V) logits of the
    joint ITG pass, computed here by hand from the Q-Former's own passes."""
    from blip2lab.model import losses as L

    torch.manual_seed(0)
    model = _no_dropout(Blip2(tiny_config()).eval())
    model.speedups = Speedups.off()
    ids, mask = random_text(4, 7, gen, pad_from=[7, 3, 5, 2])
    pixels = torch.randn(4, 3, 32, 32, generator=gen)
    got = model(pixels=pixels, text_ids=ids, text_mask=mask, losses=("itg",))["itg_loss"]
    dec = ids.clone()
    dec[:, 0] = DEC
    image = model.encode_image(pixels)
    Q = model.config.qformer.num_queries
    logits = model.qformer.lm_head(model.qformer.encode_joint(image, dec, mask, "itg").hidden[:, Q:])
    expected = L.itg_loss(logits, dec.masked_fill(mask == 0, -100), 0.1)["itg_loss"]
    torch.testing.assert_close(got, expected)
