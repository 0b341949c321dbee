"""InstructBLIP checkpoints in Hugging Face layout (tests/instructblip.py: tiny random folders of
the Salesforce/instructblip-* layout, written without the hub, see PROVENANCE.md there), opened
by `blip2lab.load` and compared with transformers' `InstructBlipForConditionalGeneration` on the
same folder: the instruction-aware query outputs, greedy and beam answers, captions, batches.
One decoder-only LLM (Vicuna = Llama) and one encoder-decoder (FlanT5)."""

import pytest
import torch
from instructblip import REPOS, family, tiny_instructblip
from PIL import Image

import blip2lab
from blip2lab.formats.hf import INSTRUCTBLIP_CHECKPOINTS

MAX_NEW = 6


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("instructblip")
    return {repo: tiny_instructblip(repo, root / repo) for repo in REPOS}


@pytest.fixture(scope="module")
def pair(folders):
    """repo -> (blip2lab pipeline, transformers model, transformers processor) on the same folder."""
    from transformers import BlipImageProcessorPil, InstructBlipForConditionalGeneration, InstructBlipProcessor

    out = {}
    for repo, folder in folders.items():
        proc = InstructBlipProcessor.from_pretrained(str(folder))
        proc.image_processor = BlipImageProcessorPil.from_pretrained(str(folder))  # PIL resizing, as blip2lab
        hf = InstructBlipForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()
        out[repo] = (blip2lab.load(folder), hf, proc)
    return out


def _photo(seed: int, size=(300, 200)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy())


def _hf_generate(pipe, hf, proc, images, prompts, **kw) -> list[str]:
    """transformers' answers, stopped at the LLM tokenizer's EOS and decoded as LAVIS's InstructBLIP
    does (special tokens skipped, stripped). A batch for a decoder-only LLM is left-padded; the
    Q-Former text stays right-padded: transformers' processor would left-pad it too (the LLM
    tokenizer's padding side reaches both tokenizers in 5.25), which moves its text positions."""
    side = "left" if pipe.model.llm.kind == "decoder" else "right"
    inputs = proc(images=images, text=prompts, padding=True, padding_side=side, return_tensors="pt")
    qformer = proc.qformer_tokenizer(prompts, padding=True, padding_side="right", return_tensors="pt")
    inputs["qformer_input_ids"], inputs["qformer_attention_mask"] = qformer["input_ids"], qformer["attention_mask"]
    out = hf.generate(**inputs, eos_token_id=proc.tokenizer.eos_token_id, pad_token_id=proc.tokenizer.pad_token_id,
                      **kw)
    new = out[:, inputs["input_ids"].shape[1]:] if pipe.model.llm.kind == "decoder" else out[:, 1:]  # T5: start
    return [t.strip() for t in proc.tokenizer.batch_decode(new, skip_special_tokens=True)]


def test_fixtures_are_known_checkpoints():
    assert {f"Salesforce/{r}" for r in REPOS} <= set(INSTRUCTBLIP_CHECKPOINTS)
    assert {"llama", "t5"} == {family(r) for r in REPOS}


@pytest.mark.parametrize("repo", REPOS)
def test_loads_with_the_instruction_aware_qformer(repo, pair):
    pipe, _, _ = pair[repo]
    config = pipe.model.config
    assert config.qformer_question and config.qformer_instruction
    assert (config.qformer.vocab_size, config.qformer.dec_token_id) == (30523, 30522)
    assert not pipe.model.has_stage1_heads and pipe.model.qformer.lm_head is None
    assert pipe.processor.qformer_max_len == 128 and pipe.processor.qformer_tokenizer.truncation_side == "left"
    assert pipe.model.official.architecture == "InstructBlipForConditionalGeneration"
    assert pipe.processor.llm_stop_token_ids == [pipe.processor.llm_tokenizer.eos_token_id]  # never "\n"
    with pytest.raises(ValueError, match="no ITC/ITM heads"):
        pipe.match(_photo(0), "a cat")


@pytest.mark.parametrize("repo", REPOS)
@torch.no_grad()
def test_query_outputs_match_transformers(repo, pair):
    """The soft visual prompt, Q-Former text of two lengths (padding) in one batch."""
    pipe, hf, proc = pair[repo]
    images = [_photo(1), _photo(2, (180, 240))]
    prompts = [pipe.processor.vqa_prompt("what is in the picture?"), pipe.processor.vqa_prompt("how many?")]
    inputs = proc(images=images, text=prompts, padding=True, return_tensors="pt")
    theirs = hf.get_image_features(inputs["pixel_values"], inputs["qformer_input_ids"],
                                   inputs["qformer_attention_mask"]).pooler_output
    image = pipe.model.encode_image(pipe.processor.images(images))
    ours = pipe.model.llm.visual_prompt(pipe.model.query_outputs(image, **pipe.processor.qformer_instructions(prompts)))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("repo", REPOS)
@torch.no_grad()
def test_answers_and_captions_match_transformers(repo, pair):
    pipe, hf, proc = pair[repo]
    image, question = _photo(3), "what color is the circle?"
    prompt = pipe.processor.vqa_prompt(question)
    assert prompt == ("Question: what color is the circle? " +
                      ("Answer:" if pipe.model.llm.kind == "decoder" else "Short answer:"))
    greedy = pipe.answer(image, question, num_beams=1, max_new_tokens=MAX_NEW)
    assert greedy == _hf_generate(pipe, hf, proc, image, prompt, do_sample=False, num_beams=1, max_new_tokens=MAX_NEW)
    assert greedy[0]
    # the paper's VQA decoding (beams 5, 10 new tokens, length penalty -1) as transformers' keywords
    assert pipe.answer(image, question) == _hf_generate(pipe, hf, proc, image, prompt, num_beams=5,
                                                        max_new_tokens=10, length_penalty=-1.0)
    caption = pipe.caption(image, num_beams=1, max_new_tokens=MAX_NEW)  # the caption prompt enters the Q-Former too
    assert caption == _hf_generate(pipe, hf, proc, image, "a photo of", num_beams=1, max_new_tokens=MAX_NEW)


@pytest.mark.parametrize("repo", REPOS)
@torch.no_grad()
def test_batched_answers_match_transformers(repo, pair):
    pipe, hf, proc = pair[repo]
    images, questions = [_photo(4), _photo(5, (240, 180))], ["what is in the picture?", "how many?"]
    prompts = [pipe.processor.vqa_prompt(q) for q in questions]
    ours = pipe.answer(images, questions, num_beams=1, max_new_tokens=MAX_NEW)
    assert ours == _hf_generate(pipe, hf, proc, images, prompts, num_beams=1, max_new_tokens=MAX_NEW)


def test_a_long_instruction_keeps_its_end(pair):
    """LAVIS and the published Q-Former tokenizer cut a long instruction from the left, at 128."""
    pipe, _, proc = pair[REPOS[0]]
    long = "what is " * 100 + "the color of the circle? Answer:"
    ours = pipe.processor.qformer_instructions([long])["question_ids"][0].tolist()
    assert ours == proc.qformer_tokenizer(long, truncation=True, max_length=128).input_ids
    assert len(ours) == 128 and ours[-3] != ours[1]


def test_saved_as_a_blip2lab_folder_it_answers_the_same(pair, tmp_path):
    pipe, _, _ = pair[REPOS[-1]]
    image = _photo(6)
    again = blip2lab.load(pipe.save(tmp_path / "saved"))
    assert again.model.config.qformer_instruction and not again.model.has_stage1_heads
    assert again.answer(image, "what is it?", num_beams=1, max_new_tokens=4) == \
        pipe.answer(image, "what is it?", num_beams=1, max_new_tokens=4)


def test_vicuna_text_ends_at_eos_not_at_a_newline(pair):
    """LAVIS's InstructBLIP Vicuna trains on text + </s> and decodes past newlines; BLIP-2's OPT
    rows end with "\\n" instead (processor.stop_at_newline)."""
    pipe, _, proc = pair["instructblip-vicuna-7b"]
    tok, p = proc.tokenizer, pipe.processor
    ids = tok("a red\ncircle", add_special_tokens=False).input_ids
    assert p.decode_llm([ids + [tok.eos_token_id]]) == [tok.decode(ids).strip()] and "\n" in p.decode_llm([ids])[0]
    row = p.decoder_batch(["Question: what? Answer:"], ["a red circle"])
    last = int(row["llm_mask"][0].sum()) - 1
    assert row["llm_ids"][0, last] == tok.eos_token_id and row["llm_labels"][0, last] == tok.eos_token_id
