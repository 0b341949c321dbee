"""`blip2lab.load` and the pipeline: captions, answers, chat, match, embeddings, the CLI,
and the bad input a user will send."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_processor import bert_tokenizer, opt_tokenizer, t5_tokenizer

import blip2lab
from blip2lab.cli import main as cli
from blip2lab.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from blip2lab.model.blip2 import Blip2
from blip2lab.pipeline import VQA_DECODING, Blip2Pipeline, decoding_config, lavis_decoding
from blip2lab.processor import Blip2Processor, make_qformer_tokenizer


def _pipeline(kind="decoder", qformer_question=False):
    from transformers import OPTConfig, OPTForCausalLM, T5Config, T5ForConditionalGeneration

    qtok = make_qformer_tokenizer(bert_tokenizer())
    ltok = opt_tokenizer() if kind == "decoder" else t5_tokenizer()
    torch.manual_seed(0)
    if kind == "decoder":
        lm = OPTForCausalLM(OPTConfig(vocab_size=len(ltok), hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                      num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=512,
                                      bos_token_id=ltok.bos_token_id, eos_token_id=ltok.eos_token_id,
                                      pad_token_id=ltok.pad_token_id))
    else:
        lm = T5ForConditionalGeneration(T5Config(vocab_size=len(ltok), d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                 num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    cfg = Blip2Config(
        vision=VisionConfig(image_size=32, patch_size=8, width=24, layers=3, heads=4),
        qformer=QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, num_queries=4, vocab_size=len(qtok),
                              cls_token_id=qtok.cls_token_id, sep_token_id=qtok.sep_token_id,
                              pad_token_id=qtok.pad_token_id, dec_token_id=qtok.bos_token_id, init_std=0.15),
        llm=LLMConfig(kind=kind, name_or_path="(built in test)"),
        embed_dim=16, qformer_question=qformer_question)
    model = Blip2(cfg, language_model=lm)
    return Blip2Pipeline(model, Blip2Processor.from_config(cfg, qtok, ltok), name="tiny")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny-opt"
    _pipeline().save(path)
    return path


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(path)
    return path


def test_load_round_trip_gives_the_same_answers(saved, image_file):
    original = _pipeline()
    pipe = blip2lab.load(saved)
    assert pipe.caption([image_file], num_beams=1) == original.caption([image_file], num_beams=1)
    a = pipe.answer(image_file, "what is on the table?", num_beams=1, max_new_tokens=5)
    assert a == original.answer(image_file, "what is on the table?", num_beams=1, max_new_tokens=5)
    assert isinstance(a[0], str) and "Question" not in a[0]  # the prompt is never echoed


def test_images_as_pil_numpy_and_paths(saved, image_file):
    pipe = blip2lab.load(saved)
    arr = np.asarray(Image.open(image_file))
    out = pipe.caption([Image.open(image_file), arr, str(image_file)], num_beams=1, max_new_tokens=4)
    assert len(out) == 3 and out[0] == out[1] == out[2]


def test_chat_history_and_broadcast(saved, image_file):
    pipe = blip2lab.load(saved)
    two = pipe.answer(image_file, ["what is it?", "how many?"], num_beams=1, max_new_tokens=4)
    assert len(two) == 2
    chat = pipe.answer([image_file], ["and now?"], history=[[("what is it?", "a dog")]], num_beams=1,
                       max_new_tokens=4)
    assert len(chat) == 1


def test_match_returns_named_scores(saved, image_file):
    pipe = blip2lab.load(saved)
    scores = pipe.match([image_file, image_file], ["a dog", "a cat"])
    assert set(scores) == {"itm_prob", "itm_logit", "itc_cosine"}
    assert all(v.shape == (2,) for v in scores.values())
    assert ((scores["itm_prob"] >= 0) & (scores["itm_prob"] <= 1)).all()
    assert ((scores["itc_cosine"] >= -1) & (scores["itc_cosine"] <= 1)).all()
    img, txt = pipe.embed_images([image_file]), pipe.embed_texts(["a dog", "a cat"])
    assert img.shape == (1, 4, 16) and txt.shape == (2, 16)
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(torch.einsum("qe,e->q", img[0], txt[0]).max(), scores["itc_cosine"][0])


def test_t5_pipeline_answers():
    pipe = _pipeline("encoder_decoder")
    img = Image.new("RGB", (32, 32), (200, 30, 30))
    out = pipe.answer(img, "what color is the dog?", num_beams=2, max_new_tokens=4)
    assert len(out) == 1 and isinstance(out[0], str)


def test_question_aware_queries_pipeline():
    pipe = _pipeline(qformer_question=True)
    img = Image.new("RGB", (32, 32), (200, 30, 30))
    assert len(pipe.answer(img, "what is on the table?", num_beams=1, max_new_tokens=3)) == 1


def test_bad_input(saved, image_file, tmp_path):
    pipe = blip2lab.load(saved)
    with pytest.raises(ValueError, match="empty question"):
        pipe.answer(image_file, "   ")
    with pytest.warns(UserWarning, match="truncated"):
        pipe.answer(image_file, "what " * 2000, num_beams=1, max_new_tokens=2)
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    with pytest.raises(ValueError, match="notes.txt"):
        pipe.caption([text_file])
    for mode in ("RGBA", "L", "P", "CMYK"):
        assert len(pipe.caption([Image.new(mode, (20, 30))], num_beams=1, max_new_tokens=2)) == 1
    with pytest.raises(TypeError, match="num_beam"):
        pipe.caption([image_file], num_beam=3)


def test_prompt_longer_than_the_llm_is_a_clear_error(image_file):
    pipe = _pipeline()
    pipe.processor.max_question_chars = 100_000
    with pytest.raises(ValueError, match="positions"):
        pipe.answer(image_file, "what " * 3000, num_beams=1, max_new_tokens=2)


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        blip2lab.load("no-such-model")


def test_decoding_options():
    assert decoding_config({"strategy": "beam", "num_beams": 5}, num_beams=1).strategy == "greedy"
    assert decoding_config({"strategy": "greedy"}, num_beams=4).strategy == "beam"
    cfg = decoding_config({"strategy": "beam", "num_beams": 5}, use_nucleus_sampling=True)
    assert cfg.strategy == "sample" and cfg.top_p == 0.9


def test_lavis_decoding_options():
    """LAVIS's generate() knobs: each strategy keeps what it reads; min_length <= max_new_tokens."""
    beam = lavis_decoding(False, 3, 12, 2, temperature=0.7, top_p=0.8, length_penalty=0.5, repetition_penalty=1.2,
                          seed=9)
    assert beam == dict(max_new_tokens=12, min_new_tokens=2, repetition_penalty=1.2, num_beams=3, length_penalty=0.5)
    cfg = decoding_config(VQA_DECODING, **beam)
    assert (cfg.strategy, cfg.num_beams, cfg.max_new_tokens, cfg.min_new_tokens, cfg.length_penalty,
            cfg.repetition_penalty) == ("beam", 3, 12, 2, 0.5, 1.2)
    assert decoding_config(VQA_DECODING, **lavis_decoding(False, 1, 5)).strategy == "greedy"
    nucleus = lavis_decoding(True, 3, 12, 20, temperature=0.7, top_p=0.8, length_penalty=0.5, seed=9)
    assert "num_beams" not in nucleus and "length_penalty" not in nucleus
    cfg = decoding_config(VQA_DECODING, **nucleus)
    assert (cfg.strategy, cfg.top_p, cfg.temperature, cfg.seed, cfg.min_new_tokens) == ("sample", 0.8, 0.7, 9, 12)


def test_cli(saved, image_file, capsys):
    assert cli(["caption", str(image_file), "--model", str(saved), "--beams", "1", "--max-new-tokens", "4"]) == 0
    line = capsys.readouterr().out.rstrip("\n")
    assert line.startswith(str(image_file) + "\t")
    assert cli(["vqa", str(image_file), "what is it?", "--model", str(saved), "--beams", "1"]) == 0
    capsys.readouterr()
    assert cli(["match", str(image_file), "a dog", "--model", str(saved)]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert set(scores) == {"itm_prob", "itm_logit", "itc_cosine"}
    assert cli(["caption", str(image_file), "--model", "no-such-model"]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_half_precision_storage_and_a_linked_retrieval_model(tmp_path, image_file):
    """save(dtype=fp16) halves the weights file and loads back into fp32 with fp16-rounded
    values; a folder linking a retrieval model (pipeline.json) opens it beside itself, shares
    the frozen tower, and scores with it rather than with its own (stage-2) heads."""
    from blip2lab.formats.native import WEIGHTS_NAME

    generator, scorer = _pipeline(), _pipeline()
    with torch.no_grad():  # a scorer that differs from the generator's own heads
        scorer.model.itm_head.bias.add_(1.0)
    scorer.save(tmp_path / "stage1", dtype=torch.float16)  # same frozen tower, same rounding: shared
    generator.save(tmp_path / "full")
    generator.save(tmp_path / "stage2", dtype=torch.float16, retrieval="../stage1")
    full, half = ((tmp_path / d / WEIGHTS_NAME).stat().st_size for d in ("full", "stage2"))
    assert half < 0.55 * full
    pipe = blip2lab.load(tmp_path / "stage2")
    w = pipe.model.qformer.query_tokens
    assert w.dtype == torch.float32
    torch.testing.assert_close(w, generator.model.qformer.query_tokens.half().float(), rtol=0, atol=0)
    assert pipe.retrieval is not None and pipe.retrieval.image_encoder is pipe.model.image_encoder
    got = pipe.match(image_file, "a dog")["itm_logit"]
    torch.testing.assert_close(got, blip2lab.load(tmp_path / "stage1").match(image_file, "a dog")["itm_logit"])
    (tmp_path / "stage2" / "pipeline.json").write_text('{"retrieval": "../nowhere"}')
    with pytest.raises(ValueError, match="not a blip2lab checkpoint folder"):
        blip2lab.load(tmp_path / "stage2")


def test_no_loops_guards_chat_template_models_only():
    from types import SimpleNamespace

    from blip2lab.pipeline import NO_LOOP_DECODING, no_loops

    vqa = lavis_decoding(False, 5, 40, 0, length_penalty=-1.0)
    assert no_loops(SimpleNamespace(chat_template=False), vqa) == vqa  # the paper's decoding, untouched
    guarded = no_loops(SimpleNamespace(chat_template=True), vqa)
    assert guarded["repetition_penalty"] == NO_LOOP_DECODING["repetition_penalty"] == 1.5
    assert guarded["no_repeat_ngram_size"] == 3 and guarded["length_penalty"] == 1.0
    assert guarded["max_new_tokens"] == 40  # the chat's length is honoured
    assert no_loops(SimpleNamespace(chat_template=True), vqa | {"repetition_penalty": 1.8})["repetition_penalty"] == 1.8
    sampled = no_loops(SimpleNamespace(chat_template=True), lavis_decoding(True, 1, 20, seed=0))
    assert "length_penalty" not in sampled and sampled["no_repeat_ngram_size"] == 3
    decoding_config(VQA_DECODING, **guarded)  # valid options
    decoding_config(VQA_DECODING, **sampled)
