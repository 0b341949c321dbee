"""Stage 2 against transformers' Blip2ForConditionalGeneration on the same random weights:
logits within 1e-4 (fp32) and greedy generation token-identical, for OPT and for T5."""

import pytest
import torch
from conftest import CLS, DEC, PAD, SEP

from blip2lab.decoding.generation import DecodingConfig
from blip2lab.formats.hf import from_hf

Q, IMAGE_TOKEN, BOS, EOS_OPT = 4, 59, 2, 2


def _hf(kind: str, seed: int = 0):
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig, T5Config

    torch.manual_seed(seed)
    if kind == "opt":
        text = OPTConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, ffn_dim=32, num_attention_heads=2,
                         max_position_embeddings=100, word_embed_proj_dim=16, bos_token_id=BOS,
                         eos_token_id=EOS_OPT, pad_token_id=1)
    else:
        text = T5Config(vocab_size=60, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=2,
                        num_heads=2, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    config = Blip2Config(
        vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        qformer_config=dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=48, encoder_hidden_size=24, max_position_embeddings=64),
        text_config=text.to_dict(), num_query_tokens=Q, image_token_index=IMAGE_TOKEN,
    )
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # decisive logits: greedy choices far from ties
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def _ours(hf):
    return from_hf(hf, cls_token_id=CLS, sep_token_id=SEP, dec_token_id=DEC, pad_token_id=PAD)


@pytest.fixture(scope="module", params=["opt", "t5"])
def pair(request):
    hf = _hf(request.param)
    return request.param, hf, _ours(hf)


def _inputs(B=3, T=5):
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(B, 3, 32, 32, generator=g)
    ids = torch.randint(3, 58, (B, T), generator=g)
    return pixels, ids


@torch.no_grad()
def test_logits_match(pair):
    kind, hf, ours = pair
    pixels, ids = _inputs()
    B = ids.shape[0]
    visual = ours.llm.visual_prompt(ours.query_outputs(ours.encode_image(pixels)))  # (B, Q, D_lm)
    embeds = torch.cat([visual, ours.llm.embed(ids)], dim=1)
    mask = torch.ones(B, Q + ids.shape[1], dtype=torch.long)
    hf_ids = torch.cat([torch.full((B, Q), IMAGE_TOKEN), ids], dim=1)
    if kind == "opt":
        theirs = hf(pixel_values=pixels, input_ids=hf_ids, attention_mask=mask).logits
        mine = ours.llm.model(inputs_embeds=embeds, attention_mask=mask).logits
    else:
        target = torch.randint(2, 58, (B, 4), generator=torch.Generator().manual_seed(2))
        dec = hf.language_model._shift_right(target)
        theirs = hf(pixel_values=pixels, input_ids=hf_ids, attention_mask=mask, decoder_input_ids=dec).logits
        mine = ours.llm.model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec).logits
    torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("strategy", ["greedy", "beam"])
@torch.no_grad()
def test_generation_token_identical(pair, strategy):
    kind, hf, ours = pair
    pixels, ids = _inputs()
    B = ids.shape[0]
    if kind == "opt":
        ids[:, 0] = BOS
    mask = torch.ones_like(ids)
    hf_ids = torch.cat([torch.full((B, Q), IMAGE_TOKEN), ids], dim=1)
    eos = EOS_OPT if kind == "opt" else 1
    beams = 3 if strategy == "beam" else 1
    theirs = hf.generate(pixel_values=pixels, input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids),
                         max_new_tokens=8, do_sample=False, num_beams=beams, eos_token_id=eos,
                         pad_token_id=hf.config.text_config.pad_token_id)
    theirs = theirs[:, hf_ids.shape[1]:] if kind == "opt" else theirs[:, 1:]  # the new tokens only
    mine = ours.generate_text(ours.encode_image(pixels), ids, mask,
                              DecodingConfig(strategy=strategy, num_beams=beams, max_new_tokens=8),
                              eos_token_id=eos, pad_token_id=hf.config.text_config.pad_token_id)
    assert mine.tolist() == theirs.tolist()


def test_stage2_checkpoint_has_no_stage1_heads(pair):
    _, _, ours = pair
    assert not ours.has_stage1_heads and not hasattr(ours, "itm_head")
    assert ours.qformer.layers[0].text_ffn is None and ours.qformer.lm_head is None
    with pytest.raises(ValueError, match="text_input"):
        ours(torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3, dtype=torch.long), pixels=torch.randn(1, 3, 32, 32))


def test_frozen_llm_and_trainable_bridge(pair):
    kind, _, ours = pair
    ours.train()
    assert not ours.llm.model.training
    assert all(not p.requires_grad for p in ours.llm.model.parameters())
    assert all(p.requires_grad for p in ours.llm.projection.parameters())
