"""Parity with transformers' Blip2ForImageTextRetrieval on the same (random, tiny) weights."""

import pytest
import torch
from conftest import CLS, DEC, PAD, SEP, VOCAB, random_text

from blip2lab.formats.hf import from_hf_retrieval
from blip2lab.formats.keys import WeightsError


def _hf_model(seed=0, text_input=True):
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    torch.manual_seed(seed)
    config = Blip2Config(
        vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8, layer_norm_eps=1e-6),
        qformer_config=dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                            intermediate_size=48, encoder_hidden_size=24, max_position_embeddings=64,
                            cross_attention_frequency=2, use_qformer_text_input=text_input),
        num_query_tokens=4,
        image_text_hidden_size=16,
    )
    model = Blip2ForImageTextRetrieval(config).eval()
    with torch.no_grad():  # random init leaves some parts at zero / one: perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _ours(hf):
    return from_hf_retrieval(hf, cls_token_id=CLS, sep_token_id=SEP, dec_token_id=DEC, pad_token_id=PAD).eval()


@pytest.fixture(scope="module")
def pair():
    hf = _hf_model()
    return hf, _ours(hf)


def _inputs():
    g = torch.Generator().manual_seed(5)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    ids, mask = random_text(3, 7, g, pad_from=[7, 4, 5])
    return pixels, ids, mask


@torch.no_grad()
def test_query_outputs_and_text_cls_match(pair):
    hf, ours = pair
    pixels, ids, mask = _inputs()
    image_hf = hf.vision_model(pixel_values=pixels).last_hidden_state
    image = ours.encode_image(pixels)
    torch.testing.assert_close(image, image_hf, atol=1e-5, rtol=1e-5)
    q_hf = hf.qformer(query_embeds=hf.query_tokens.expand(3, -1, -1), encoder_hidden_states=image_hf).last_hidden_state
    torch.testing.assert_close(ours.image_features(image).hidden, q_hf, atol=1e-5, rtol=1e-5)
    t_hf = hf.qformer(query_embeds=hf.embeddings(input_ids=ids), query_length=0, attention_mask=mask).last_hidden_state
    text = ours.text_features(ids, mask)
    torch.testing.assert_close(text.cls, t_hf[:, 0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_itc_similarities_match(pair):
    hf, ours = pair
    pixels, ids, mask = _inputs()
    out = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
    image = ours.encode_image(pixels)
    cos = ours.itc_cosine(ours.image_features(image).proj, ours.text_features(ids, mask).proj)  # (3, 3)
    torch.testing.assert_close(cos, out.logits_per_image, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_itm_logits_match(pair):
    hf, ours = pair
    pixels, ids, mask = _inputs()
    out = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    logits = ours.itm_logits(ours.encode_image(pixels), ids, mask)
    torch.testing.assert_close(logits, out.logits_per_image, atol=1e-5, rtol=1e-5)


def test_model_without_text_side_or_llm_is_refused():
    with pytest.raises(WeightsError, match="use_qformer_text_input"):
        _ours(_hf_model(text_input=False))


def test_leftover_key_is_named():
    from blip2lab.formats.hf import hf_table
    from blip2lab.formats.keys import remap

    hf = _hf_model()
    state = dict(hf.state_dict())
    state["qformer.extra.weight"] = torch.zeros(1)
    ours = _ours(hf)
    with pytest.raises(WeightsError, match="qformer.extra.weight"):
        remap(state, hf_table(ours.config.qformer), "test", ignore=("vision_model.",))
