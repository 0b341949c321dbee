"""Gradient checkpointing (issue 7, goal 4): for the Q-Former and for an unfrozen image
encoder, the losses and gradients are those of the plain run (dropout included: the RNG
is replayed), and the activations kept for the backward pass shrink."""

from dataclasses import replace

import pytest
import torch
from conftest import random_text, tiny_config

from blip2lab.model import losses as L
from blip2lab.model.blip2 import Blip2


def _batch(gen):
    ids, mask = random_text(6, 8, gen, pad_from=[8, 6, 5, 8, 7, 4])
    return {"text_ids": ids, "text_mask": mask, "pixels": torch.randn(6, 3, 32, 32, generator=gen)}


def _kept_bytes_and_grads(model, batch):
    """One training step's loss, gradients, and bytes of the tensors kept for backward."""
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(0)  # the same dropout masks in both runs
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch, generator=torch.Generator().manual_seed(1))
    loss = L.total_loss(out)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, sum(kept.values())


def _pair(vision_backend=None, unfreeze=False, **flags):
    """Two models with the same weights, the second with checkpointing switched on."""
    models = []
    for on in (False, True):
        cfg = tiny_config(hidden_dropout=0.1, attention_dropout=0.1)  # dropout: the RNG replay matters
        if vision_backend:
            cfg.vision = replace(cfg.vision, backend=vision_backend, layer_index=-1)
        if "qformer" in flags:
            cfg.qformer = replace(cfg.qformer, gradient_checkpointing=on)
        if "vision" in flags:
            cfg.vision = replace(cfg.vision, gradient_checkpointing=on)
        torch.manual_seed(0)
        model = Blip2(cfg)
        if unfreeze:
            model.image_encoder.unfreeze()
        models.append(model.train())
    assert all(torch.equal(a, b) for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()))
    return models


def _check(plain, ckpt, batch, params=""):
    loss_a, grads_a, kept_a = _kept_bytes_and_grads(plain, batch)
    loss_b, grads_b, kept_b = _kept_bytes_and_grads(ckpt, batch)
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=1e-6)
    assert set(grads_a) == set(grads_b) and any(n.startswith(params) for n in grads_a)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, atol=1e-6, rtol=1e-5, msg=name)
    return kept_a, kept_b


def test_qformer_checkpointing_same_gradients_fewer_kept_activations(gen):
    plain, ckpt = _pair(qformer=True)
    kept_plain, kept_ckpt = _check(plain, ckpt, _batch(gen), "qformer.layers.")
    assert kept_ckpt < 0.6 * kept_plain, (kept_plain, kept_ckpt)


@pytest.mark.parametrize("backend", ["open_clip", "hf_blip2"])
def test_unfrozen_encoder_checkpointing_same_gradients_fewer_kept_activations(gen, backend):
    plain, ckpt = _pair(vision_backend=backend, unfreeze=True, vision=True)
    kept_plain, kept_ckpt = _check(plain, ckpt, _batch(gen), "image_encoder.")
    assert kept_ckpt < kept_plain, (kept_plain, kept_ckpt)


def test_config_flags_round_trip_through_overrides():
    from blip2lab.config import Blip2Config, apply_overrides

    cfg = apply_overrides(Blip2Config(), ["--qformer.gradient_checkpointing=true",
                                          "--vision.gradient_checkpointing=true"])
    assert cfg.qformer.gradient_checkpointing and cfg.vision.gradient_checkpointing
