"""transformers' `generate` keywords in caption / answer / the CLI, with transformers' meaning:
the same tokens as `Blip2ForConditionalGeneration.generate` given the same keywords, on a
tiny checkpoint of the published blip2-opt-2.7b layout (tests/published.py); every other
keyword refused by name."""

import pytest
import torch
from published import tiny_checkpoint

import blip2lab
from blip2lab.cli import main as cli
from blip2lab.pipeline import CAPTION_DECODING, HF_SAMPLING_TOP_K, VQA_DECODING, decoding_config

NEW = 6


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    from transformers import Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessorPil

    folder = tiny_checkpoint("blip2-opt-2.7b", tmp_path_factory.mktemp("kw") / "opt")
    proc = Blip2Processor.from_pretrained(str(folder))
    proc.image_processor = BlipImageProcessorPil.from_pretrained(str(folder))  # PIL resizing, as blip2lab
    hf = Blip2ForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()
    return folder, blip2lab.load(folder), hf, proc


def _photo(seed: int):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(200, 300, 3, generator=g) * 255).byte().numpy())


def _hf(hf, proc, pipe, image, prompt, answer=False, **kw) -> str:
    """transformers' text, ended where blip2lab ends a caption or an answer (Blip2Processor)."""
    ours = pipe.processor
    inputs = proc(images=image, text=prompt, return_tensors="pt")
    out = hf.generate(**inputs, eos_token_id=ours.answer_stop_token_ids if answer else ours.llm_stop_token_ids,
                      pad_token_id=ours.llm_pad_token_id, **kw)
    new = out[:, inputs["input_ids"].shape[1]:]
    return (ours.decode_answers(new) if answer else ours.decode_llm(new))[0]


def test_keywords_map_to_decoding_config():
    assert decoding_config(CAPTION_DECODING, do_sample=False).strategy == "beam"  # the paper's 5 beams stay
    assert decoding_config(CAPTION_DECODING, do_sample=False, num_beams=1).strategy == "greedy"
    sample = decoding_config(CAPTION_DECODING, do_sample=True)
    assert (sample.strategy, sample.num_beams, sample.top_k, sample.top_p) == ("sample", 1, HF_SAMPLING_TOP_K, 1.0)
    assert decoding_config(VQA_DECODING, do_sample=True, top_k=0, top_p=0.9).top_k == 0
    with pytest.raises(ValueError, match="contradict"):
        decoding_config(CAPTION_DECODING, use_nucleus_sampling=True, do_sample=False)
    with pytest.raises(ValueError, match="beam sampling"):
        decoding_config(CAPTION_DECODING, do_sample=True, num_beams=3)
    with pytest.raises(TypeError, match=r"\['max_length'\].*use max_new_tokens"):
        decoding_config(CAPTION_DECODING, max_length=20)
    with pytest.raises(TypeError, match="num_return_sequences"):
        decoding_config(CAPTION_DECODING, num_return_sequences=2)
    with pytest.raises(TypeError, match="do_sample must be True or False"):
        decoding_config(CAPTION_DECODING, do_sample="yes")


@torch.no_grad()
def test_beam_keywords_give_transformers_tokens(opt):
    _, pipe, hf, proc = opt
    image = _photo(1)
    kw = dict(do_sample=False, num_beams=3, max_new_tokens=NEW, min_new_tokens=2, repetition_penalty=1.3,
              no_repeat_ngram_size=2, length_penalty=0.5)
    assert pipe.caption(image, **kw)[0] == _hf(hf, proc, pipe, image, "a photo of", **kw)
    q = "what is in the picture?"
    assert pipe.answer(image, q, **kw)[0] == _hf(hf, proc, pipe, image, pipe.processor.vqa_prompt(q), True, **kw)


@torch.no_grad()
def test_sampling_keywords_give_transformers_tokens(opt):
    """Same seed, same draws: top_k 50 applies unless given, as in transformers."""
    _, pipe, hf, proc = opt
    image = _photo(2)
    for kw in (dict(do_sample=True), dict(do_sample=True, top_p=0.8, top_k=20, temperature=0.7)):
        torch.manual_seed(5)
        ours = pipe.caption(image, max_new_tokens=NEW, **kw)[0]
        torch.manual_seed(5)
        assert ours == _hf(hf, proc, pipe, image, "a photo of", max_new_tokens=NEW, **kw)


def test_cli_takes_the_keywords(opt, tmp_path, capsys):
    folder, *_ = opt
    image = tmp_path / "photo.png"
    _photo(3).save(image)
    args = ["caption", str(image), "--model", str(folder), "--max-new-tokens", "4"]
    assert cli(args + ["--no-do-sample", "--num-beams", "2", "--repetition-penalty", "1.2"]) == 0
    assert capsys.readouterr().out.startswith(f"{image}\t")
    assert cli(args + ["--do-sample", "--top-k", "5", "--temperature", "0.9", "--seed", "1"]) == 0
    capsys.readouterr()
    assert cli(args + ["--do-sample", "--num-beams", "3"]) == 2
    assert "beam sampling" in capsys.readouterr().err
