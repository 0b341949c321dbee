"""The LAVIS-style peer of the stage-1 benchmark (benchmarks/lavis_style.py) computes the
same losses and gradients as blip2lab's step on the same weights and batch, and a short
training run of each, from the same init and data, follows the same curve."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import random_text, tiny_config

from blip2lab.model import losses as L
from blip2lab.model.blip2 import Blip2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from lavis_style import LavisStyleStage1  # noqa: E402

B = 6


def _batch(gen):
    ids, mask = random_text(B, 9, gen, pad_from=[9, 7, 5, 9, 4, 6])  # padded captions of several lengths
    return {"text_ids": ids, "text_mask": mask, "pixels": torch.randn(B, 3, 32, 32, generator=gen),
            "image_ids": torch.arange(B)}


def _model():
    torch.manual_seed(0)
    return Blip2(tiny_config())  # no dropout: one function on both sides


def _ours_with_negatives(model, batch, monkeypatch):
    """Our losses, and the ITM negatives our step drew (to hand to the peer)."""
    drawn = {}
    real = L.sample_hard_negatives

    def spy(*args, **kwargs):
        drawn["negatives"] = real(*args, **kwargs)
        return drawn["negatives"]

    monkeypatch.setattr(L, "sample_hard_negatives", spy)
    out = model(**batch, generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(L, "sample_hard_negatives", real)
    neg_img, neg_txt, ok_t, ok_i = drawn["negatives"]
    assert ok_t.all() and ok_i.all()
    return out, (neg_img, neg_txt)


def _grads(model, losses):
    model.zero_grad(set_to_none=True)
    L.total_loss(losses).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("recompute", [False, True])
def test_peer_losses_and_gradients_equal_ours(gen, monkeypatch, recompute):
    model = _model()
    batch = _batch(gen)
    ours, negatives = _ours_with_negatives(model, batch, monkeypatch)
    ours_grads = _grads(model, ours)
    peer = LavisStyleStage1(model, itg_recompute_queries=recompute)  # pads captions to 16 (max_text_len)
    theirs = peer(**batch, negatives=negatives)
    theirs_grads = _grads(model, theirs)
    for name in ("itc_loss", "itm_loss", "itg_loss"):
        torch.testing.assert_close(theirs[name], ours[name], atol=1e-5, rtol=1e-5, msg=name)
    assert set(theirs_grads) == set(ours_grads) and len(ours_grads) > 20
    for name, g in ours_grads.items():
        torch.testing.assert_close(theirs_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


def test_peer_draws_the_same_negatives_from_the_same_generator(gen):
    """On the CPU, LAVIS's row-by-row multinomial draws what one batched call draws, so
    with the same generator the peer needs no negatives handed over."""
    model = _model().eval()
    batch = _batch(gen)
    ours = model(**batch, generator=torch.Generator().manual_seed(5))
    theirs = LavisStyleStage1(model)(**batch, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(theirs["itm_loss"], ours["itm_loss"], atol=1e-5, rtol=1e-5)


def test_short_training_curves_agree(tmp_path):
    """The benchmark's own contenders, tiny: ours on fp16 cached views, the peer recomputing
    the encoder on the same views' pixels; 8 steps from the same init, no dropout."""
    import stage1_step as bench

    spec = bench.Spec(size="tiny", images=32, batch=8, steps=8, warmup=2, lr=2e-3, dropout=0.0,
                      cache_dir=str(tmp_path / "cache"))
    bench.ensure_cache(spec)
    ours = bench.run_contender(bench.replace(spec, contender="ours"))
    peer = bench.run_contender(bench.replace(spec, contender="lavis"))
    ckpt = bench.run_contender(bench.replace(spec, contender="ours+ckpt"))
    first, last = ours["curve"][0]["loss"], ours["curve"][-1]["loss"]
    assert last < first - 0.1  # it trains
    for a, b, c in zip(ours["curve"], peer["curve"], ckpt["curve"]):
        for name in ("itc_loss", "itm_loss", "itg_loss"):
            # fp16 cached features against the encoder's fp32 output: agreement to ~1e-3
            assert abs(a[name] - b[name]) < 1e-3, (name, a[name], b[name])
            assert abs(a[name] - c[name]) < 1e-5, (name, a[name], c[name])  # checkpointing changes nothing
    assert ckpt["saved_activation_bytes"] < ours["saved_activation_bytes"]
    assert 0 < peer["encoder_s"] < peer["step_s"]  # the share of its step the cache takes out
