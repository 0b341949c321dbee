"""Initialising the Q-Former from a BERT checkpoint on disk (the paper: bert-base-uncased)."""

import pytest
import torch
from conftest import random_text, tiny_config

from blip2lab.config import QFormerConfig
from blip2lab.formats import build_model
from blip2lab.formats.bert import init_qformer_from_bert
from blip2lab.formats.keys import WeightsError
from blip2lab.model.qformer import QFormer


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    bert = BertForMaskedLM(BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                      attention_probs_dropout_prob=0.0, type_vocab_size=2))
    with torch.no_grad():
        for p in bert.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        # The Q-Former has no token types; with them at zero BERT computes exactly what the
        # Q-Former's text path computes, so outputs can be compared.
        bert.bert.embeddings.token_type_embeddings.weight.zero_()
    path = tmp_path_factory.mktemp("bert")
    bert.save_pretrained(path)
    return path, bert.eval()


def test_copied_weights_and_fresh_cross_attention(bert_dir):
    path, bert = bert_dir
    cfg = tiny_config().qformer
    torch.manual_seed(1)
    qf = QFormer(cfg, 24)
    cross_before = qf.layers[0].cross_attn.k.weight.clone()
    skipped = init_qformer_from_bert(qf, path)
    layer = bert.bert.encoder.layer[1]
    assert torch.equal(qf.layers[1].self_attn.qkv.weight, torch.cat([layer.attention.self.query.weight, layer.attention.self.key.weight, layer.attention.self.value.weight]))
    assert torch.equal(qf.layers[1].text_ffn.fc1.weight, layer.intermediate.dense.weight)
    assert torch.equal(qf.layers[1].query_ffn.fc1.weight, layer.intermediate.dense.weight)  # a copy ...
    assert qf.layers[1].query_ffn.fc1.weight.data_ptr() != qf.layers[1].text_ffn.fc1.weight.data_ptr()  # ... not shared
    assert torch.equal(qf.layers[0].cross_attn.k.weight, cross_before)
    assert torch.equal(qf.word_embeddings.weight[:99], bert.bert.embeddings.word_embeddings.weight)
    assert "bert.embeddings.token_type_embeddings.weight" not in skipped
    assert any("token_type" in k for k in skipped)


@torch.no_grad()
def test_text_path_and_lm_head_compute_what_bert_computes(bert_dir):
    path, bert = bert_dir
    qf = QFormer(tiny_config().qformer, 24).eval()
    init_qformer_from_bert(qf, path)
    ids, mask = random_text(2, 6, torch.Generator().manual_seed(0), pad_from=[6, 4])
    ids = ids.clamp(max=98)
    ours = qf.encode_text(ids, mask)
    theirs = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    real = mask.bool()
    torch.testing.assert_close(ours[real], theirs.hidden_states[-1][real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(qf.lm_head(ours)[..., :99][real], theirs.logits[real], atol=1e-4, rtol=1e-4)


def test_model_initialises_from_config_path(bert_dir):
    path, bert = bert_dir
    cfg = tiny_config(init_from=str(path))
    model = build_model(cfg)
    assert torch.equal(model.qformer.position_embeddings.weight, bert.bert.embeddings.position_embeddings.weight)


def test_shape_mismatch_names_the_field(bert_dir):
    path, _ = bert_dir
    cfg = QFormerConfig(**(tiny_config().qformer.__dict__ | {"num_layers": 3}))
    with pytest.raises(WeightsError, match="qformer.num_layers"):
        init_qformer_from_bert(QFormer(cfg, 24), path)


def test_text_query_init_starts_queries_as_a_sentence_of_words(bert_dir):
    """query_init="text": query i is the checkpoint's embedding of some word at position i
    (QFormerConfig.query_init), drawn the same way every time; "normal" leaves LAVIS's init."""
    from dataclasses import replace

    path, bert = bert_dir
    cfg = replace(tiny_config().qformer, query_init="text", init_from=str(path))
    firsts = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        qf = QFormer(cfg, 24)
        init_qformer_from_bert(qf, path)
        firsts.append(qf.query_tokens.detach().clone())
    assert torch.equal(*firsts)  # a fixed draw, not the global RNG's
    words = bert.bert.embeddings.word_embeddings.weight  # (V, D)
    positions = bert.bert.embeddings.position_embeddings.weight[: cfg.num_queries]  # (Q, D)
    residual = firsts[0][0] - positions  # (Q, D): each row one word's embedding
    match = (residual[:, None, :] - words[None]).abs().amax(-1)  # (Q, V)
    assert bool((match.amin(-1) < 1e-6).all())
    torch.manual_seed(1)
    normal = QFormer(replace(cfg, query_init="normal"), 24)
    init_qformer_from_bert(normal, path)
    assert not torch.allclose(normal.query_tokens, firsts[0])
    with pytest.raises(ValueError, match="query_init"):
        replace(cfg, init_from=None)
    with pytest.raises(ValueError, match="query_init"):
        replace(cfg, query_init="words")
