"""The frozen text backbones of the shapes world (blip2lab/worlds/shapes/text_backbones.py): tokenizers,
corpora, the shipped checkpoints in models/backbones/{opt,t5,bert}, and the pretraining code path."""

import json
from pathlib import Path

import pytest
import torch

from blip2lab.processor import Blip2Processor, make_qformer_tokenizer
from blip2lab.worlds.shapes import text_backbones as T
from blip2lab.worlds.shapes.world import HELD_OUT, NUMBER_WORDS, VOCABULARY, caption, make_split

MODELS = Path(__file__).resolve().parents[1] / "models" / "backbones"
WORDS = list(VOCABULARY) + list(NUMBER_WORDS) + list(T.EXTRA_WORDS)
HELD_OUT_PHRASES = [f"{c} {s}" for c, s in HELD_OUT]


@pytest.fixture(scope="module")
def shipped():
    """(model, tokenizer, recipe) of each shipped backbone, loaded offline."""
    return {name: T.load_text_backbone(MODELS / name) for name in ("opt", "t5", "bert")}


def processor(**kw):
    return Blip2Processor(64, (0.5,) * 3, (0.5,) * 3, **kw)


# -- tokenizers -----------------------------------------------------------------------------


def test_opt_tokenizer_words_newline_and_specials(shipped):
    _, tok, _ = shipped["opt"]
    for w in WORDS:
        assert len(tok(" " + w, add_special_tokens=False)["input_ids"]) == 1, w
    assert len(tok("\n", add_special_tokens=False)["input_ids"]) == 1
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "</s>", "</s>")
    assert (tok.pad_token_id, tok.bos_token_id) == (1, 2)  # OPT's ids
    assert tok("a red circle")["input_ids"][0] == tok.bos_token_id  # OPT's tokenizer prepends </s>
    proc = processor(llm_tokenizer=tok, llm_kind="decoder")
    assert proc.llm_eos_token_id == tok("\n", add_special_tokens=False)["input_ids"][0]
    batch = proc.decoder_batch(["a photo of"], ["a small red circle on the top left"])
    assert tok.decode(batch["llm_ids"][0]) == "</s>a photo of a small red circle on the top left\n"
    assert int((batch["llm_labels"][0] != -100).sum()) == 8 + 1  # the caption's 8 words and "\n"


def test_t5_tokenizer_follows_t5_conventions(shipped):
    model, tok, _ = shipped["t5"]
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert model.config.decoder_start_token_id == tok.pad_token_id
    for w in WORDS:
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w
    assert tok("a red circle")["input_ids"][-1] == tok.eos_token_id
    text = "Question: what size is the red circle? Short answer:"
    assert tok.decode(tok(text)["input_ids"], skip_special_tokens=True) == text
    batch = processor(llm_tokenizer=tok, llm_kind="encoder_decoder").encoder_decoder_batch(["a photo of"], ["a red circle"])
    assert batch["llm_labels"][0].tolist() == tok("a red circle")["input_ids"]


def test_bert_tokenizer_and_its_qformer_tokenizer(shipped):
    bert, tok, _ = shipped["bert"]
    assert [tok.convert_tokens_to_ids(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
    for w in VOCABULARY + NUMBER_WORDS:
        assert len(tok(w, add_special_tokens=False)["input_ids"]) == 1, w
    assert tok("What color?")["input_ids"] == tok("what color?")["input_ids"]  # uncased
    qtok = make_qformer_tokenizer(tok)
    assert qtok.convert_tokens_to_ids("[DEC]") == len(tok) == bert.config.vocab_size
    proc = processor(qformer_tokenizer=qtok)
    ids = proc.qformer_text(["a small red circle"])["text_ids"][0].tolist()
    assert (ids[0], ids[-1], proc.pad_token_id, proc.dec_token_id) == (2, 3, 0, len(tok))


def test_bert_initialises_the_shapes_world_qformer(shipped):
    from blip2lab.config import QFormerConfig
    from blip2lab.formats.bert import init_qformer_from_bert
    from blip2lab.model.qformer import QFormer

    bert, tok, _ = shipped["bert"]
    cfg = QFormerConfig(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=512, num_queries=8,
                        vocab_size=len(tok) + 1, max_position_embeddings=64, pad_token_id=0, cls_token_id=2,
                        sep_token_id=3, dec_token_id=len(tok))
    qformer = QFormer(cfg, 128)
    init_qformer_from_bert(qformer, MODELS / "bert")
    assert torch.equal(qformer.word_embeddings.weight[: len(tok)], bert.bert.embeddings.word_embeddings.weight)


# -- corpora --------------------------------------------------------------------------------


def test_world_corpus_is_train_only_and_teaches_the_stage2_layouts():
    passages = T.world_corpus(400, 0)
    texts = [p.text for p in passages]
    assert not any(h in t for t in texts for h in HELD_OUT_PHRASES)
    assert {p.kind for p in passages} == set(T.DECODER_KINDS)
    qa = next(p for p in passages if p.kind == "qa_context")
    assert qa.text.startswith(T.BOS) and ". Question: " in qa.text and " Answer: " in qa.text and qa.text.endswith("\n")
    for p in passages:
        assert len(p.target_types) == len(p.targets)
        for start, end in p.targets:  # every target span is an answer (or caption) and its terminator
            assert p.text[end - 1] in ".\n"
            if p.kind.startswith("qa"):
                assert p.text[:start].endswith("Answer: ")
    visual = next(p for p in passages if p.kind == "caption_visual")
    assert f"{T.BOS}a photo of " in visual.text and not visual.text.startswith(T.BOS)
    assert T.world_corpus(50, 0) == passages[:50]  # deterministic and prefix-stable


def test_t5_and_bert_corpora_are_train_only():
    examples = T.t5_corpus(300, 0)
    assert {k for _, _, k in examples} == set(T.T5_KINDS)
    assert not any(h in i + " " + t for i, t, _ in examples for h in HELD_OUT_PHRASES)
    assert all(i.endswith("Short answer:") and t for i, t, k in examples if k == "qa")
    pairs = T.bert_corpus(300, 0)
    assert not any(h in f"{a} {b}" for a, b in pairs for h in HELD_OUT_PHRASES)
    assert any(b == "" for _, b in pairs) and any(b.endswith(("yes", "no")) for _, b in pairs)


def test_target_and_context_tokens_are_weighted():
    tok = T.train_opt_tokenizer([p.text for p in T.world_corpus(300, 0)])
    desc = "a small red circle on the top left"
    text = f"{T.BOS}{desc}. Question: what color is the circle? Answer: red\n"
    start = text.index("Answer: ") + len("Answer: ")
    passage = T.Passage(text, ((start, len(text)),), "qa_context", (len(T.BOS), len(T.BOS) + len(desc)), ("color",))
    row = T.decoder_rows([passage], tok, 4.0, 0.1, 64, type_weights={"color": 2.0})[0]
    tokens = tok.convert_ids_to_tokens(row["ids"])
    assert [t for t, f in zip(tokens, row["targets"]) if f] == ["Ġred", "Ċ"]
    assert [w for w, f in zip(row["weights"], row["targets"]) if f] == [8.0, 8.0]
    assert row["weights"][1:9] == [0.1] * 8  # the description's 8 words
    assert set(row["weights"][9:-2]) == {1.0}  # ". Question: ... Answer:"


def test_local_position_bias_starts_as_alibi():
    from transformers import T5ForConditionalGeneration

    tok = T.train_t5_tokenizer(["a small red circle on the top left"])
    model = T5ForConditionalGeneration(T.t5_config(tok, d_model=32, d_kv=8))
    T.local_position_bias_(model, [1.0, 0.5, 0.25, 0.0])
    enc = model.encoder.block[0].layer[0].SelfAttention.compute_bias(12, 12)[0]  # (heads, q, k)
    dec = model.decoder.block[0].layer[0].SelfAttention.compute_bias(12, 12)[0]
    # offsets up to 8 have buckets of their own: exactly -slope * |offset|, both ways in the encoder
    assert torch.equal(enc[:, 5, 2], torch.tensor([-3.0, -1.5, -0.75, 0.0]))
    assert torch.equal(enc[:, 2, 5], torch.tensor([-3.0, -1.5, -0.75, 0.0]))
    assert torch.equal(dec[:, 7, 0], torch.tensor([-7.0, -3.5, -1.75, 0.0]))
    assert torch.equal(enc[:, 4, 4], torch.zeros(4))
    # beyond, log-spaced buckets: the nearest offset of the bucket, so the bias never rises with distance
    far = enc[0, 0]  # head 0, from position 0 to 0..11
    assert all(far[i + 1] <= far[i] for i in range(11))


def test_order_sensitivity_tells_a_bag_of_words_from_an_ordered_encoder():
    # T5's own start (biases near zero) is nearly order-blind; the ALiBi start is not. A T5
    # trained from T5's start measured 0.013; the shipped one, from the ALiBi start, 0.47.
    from transformers import T5ForConditionalGeneration

    texts = [caption(s) for s in make_split("test", 8, 0)]
    tok = T.train_t5_tokenizer(texts)
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T.t5_config(tok)).eval()
    blind = T.order_sensitivity(model, tok, texts)
    T.local_position_bias_(model, [1.0, 0.5, 0.25, 0.0])
    ordered = T.order_sensitivity(model, tok, texts)
    assert ordered > 5 * blind and ordered > 0.1, (blind, ordered)


# -- shipped backbones ------------------------------------------------------------------------


def test_shipped_opt_answers_from_its_context(shipped):
    model, tok, recipe = shipped["opt"]
    got = T.in_context_qa_accuracy(model, tok, make_split("test", 25, 0), layout="context")
    assert got["overall"] >= recipe["metrics"]["qa_context"]["overall"] - 0.06
    assert got["per_type"]["count"] == 1.0


def test_shipped_t5_answers_from_its_context(shipped):
    model, tok, recipe = shipped["t5"]
    got = T.in_context_qa_accuracy(model, tok, make_split("test", 25, 0))
    assert got["overall"] >= recipe["metrics"]["qa_context"]["overall"] - 0.06


def test_shipped_bert_fills_masks(shipped):
    model, tok, recipe = shipped["bert"]
    got = T.masked_token_accuracy(model, tok, T.bert_corpus(300, 0, split="test"))
    assert got["masked_accuracy"] >= recipe["metrics"]["masked_accuracy"] - 0.05


def test_shipped_backbones_are_small_and_documented():
    total = 0
    for name in ("opt", "t5", "bert"):
        recipe = json.loads((MODELS / name / "recipe.json").read_text())
        assert recipe["function"].endswith(f"pretrain_{name}") and recipe["train_seconds"] > 0
        total += sum(f.stat().st_size for f in (MODELS / name).iterdir())
    assert total < 40e6


# -- the pretraining code path ------------------------------------------------------------------


def _first_last(history, k=4):
    losses = [h["loss"] for h in history]
    return sum(losses[:k]) / k, sum(losses[-k:]) / k


@pytest.mark.parametrize("which", ["opt", "t5", "bert"])
def test_tiny_pretraining_lowers_the_loss(which, tmp_path):
    torch.manual_seed(0)
    fn = {"opt": T.pretrain_opt, "t5": T.pretrain_t5, "bert": T.pretrain_bert}[which]
    small = {"opt": {"hidden_size": 32, "word_embed_proj_dim": 32}, "t5": {"d_model": 32, "d_kv": 8},
             "bert": {"hidden_size": 32}}[which]
    result = fn(tmp_path / which, steps=20, n_scenes=300, batch_size=8, warmup=2, lr=3e-3, final_eval=False,
                model_overrides=small)
    first, last = _first_last(result["history"])
    assert last < first - 0.3
    model, tok, recipe = T.load_text_backbone(tmp_path / which)
    assert recipe["call"]["steps"] == 20 and len(recipe["loss_curve"]) == 1
