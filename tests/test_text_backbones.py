"""The frozen text backbones of the shapes world (blip2lab/backbones/text.py): the corpora and
the pretraining code path. (Tests of the shipped checkpoints join when models/backbones/{opt,t5,bert}
are shipped.)"""

import pytest
import torch

from blip2lab.backbones import text as T
from blip2lab.data.shapes import HELD_OUT

HELD_OUT_PHRASES = [f"{c} {s}" for c, s in HELD_OUT]


def test_world_corpus_is_train_only_and_teaches_the_stage2_layouts():
    passages = T.world_corpus(400, 0)
    texts = [p.text for p in passages]
    assert not any(h in t for t in texts for h in HELD_OUT_PHRASES)
    assert {p.kind for p in passages} == set(T.DECODER_KINDS)
    qa = next(p for p in passages if p.kind == "qa_context")
    assert qa.text.startswith(T.BOS) and ". Question: " in qa.text and " Answer: " in qa.text and qa.text.endswith("\n")
    for p in passages:
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
    qa = [(i, t) for i, t, k in examples if k == "qa"]
    assert all(i.endswith("Short answer:") and t for i, t in qa)
    pairs = T.bert_corpus(300, 0)
    assert not any(h in f"{a} {b}" for a, b in pairs for h in HELD_OUT_PHRASES)
    assert any(b == "" for _, b in pairs) and any(b.endswith(("yes", "no")) for _, b in pairs)


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


def test_shipped_opt_answers_from_its_context():
    """The shipped OPT (models/backbones/opt) re-evaluates to its recipe.json on a slice."""
    from pathlib import Path

    from blip2lab.data.shapes import make_split
    from blip2lab.processor import Blip2Processor

    model, tok, recipe = T.load_text_backbone(Path(__file__).resolve().parents[1] / "models" / "backbones" / "opt")
    Blip2Processor(64, (0.5,) * 3, (0.5,) * 3, llm_tokenizer=tok, llm_kind="decoder")  # fits stage 2's processor
    result = T.in_context_qa_accuracy(model.eval(), tok, make_split("test", 25, 0))
    assert result["overall"] >= recipe["metrics"]["qa_context"]["overall"] - 0.06
    assert result["per_type"]["count"] == 1.0
