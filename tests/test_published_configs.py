"""The Salesforce checkpoints as their published config files describe them (tests/published.py):
a tiny random checkpoint per repo, opened by `blip2lab.load` and compared with transformers
on the same folder: ITM and ITC for retrieval, greedy captions and answers for generation.
These configs leave the Q-Former at transformers' defaults (vocab 30522, no [DEC]), which
blip2lab's own tiny builders never did."""

import pytest
import torch
from PIL import Image
from published import PROVENANCE, REPOS, is_retrieval, published, tiny_checkpoint

import blip2lab

MAX_NEW = 6


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("published")
    return {repo: tiny_checkpoint(repo, root / repo) for repo in REPOS}


def _hf_processor(folder):
    """transformers' processor for the folder, its images resized by PIL (BlipImageProcessorPil),
    as LAVIS and blip2lab resize them: transformers 5's default BlipImageProcessor resizes with
    torchvision, within one grey level of PIL's bicubic."""
    from transformers import Blip2Processor, BlipImageProcessorPil

    proc = Blip2Processor.from_pretrained(str(folder))
    proc.image_processor = BlipImageProcessorPil.from_pretrained(str(folder))
    return proc


def _photo(seed: int, size=(300, 200)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(size[1], size[0], 3, generator=g) * 255).byte().numpy())


def test_every_repo_blip2lab_claims_has_a_fixture():
    from blip2lab.formats.hf import KNOWN_CHECKPOINTS

    assert {f"Salesforce/{r}" for r in REPOS} == set(KNOWN_CHECKPOINTS)
    assert set(PROVENANCE) == set(REPOS)  # every file's origin written down (PROVENANCE.md)


@pytest.mark.parametrize("repo", REPOS)
def test_the_published_processor_is_followed(repo, folders):
    pipe = blip2lab.load(folders[repo])
    pre = published(repo, "preprocessor_config.json")
    assert pipe.processor.image_size == pre["size"]["height"] == pipe.model.config.vision.image_size
    assert pipe.processor.mean == tuple(pre["image_mean"]) and pipe.processor.std == tuple(pre["image_std"])
    q = pipe.model.config.qformer
    assert q.num_queries == published(repo)["num_query_tokens"]
    if not is_retrieval(repo):  # BERT's 30522 words, no [DEC]: loads, and refuses only what needs it
        assert (q.vocab_size, q.dec_token_id, q.text_input) == (30522, None, False)
        with pytest.raises(ValueError, match="text side"):
            pipe.model.generate_captions(pipe.model.encode_image(pipe.processor.images([_photo(0)])))


@pytest.mark.parametrize("repo", [r for r in REPOS if is_retrieval(r)])
@torch.no_grad()
def test_retrieval_matches_transformers(repo, folders):
    from transformers import Blip2ForImageTextRetrieval

    folder = folders[repo]
    pipe = blip2lab.load(folder)
    assert pipe.model.config.qformer.dec_token_id == 30522  # from the shipped tokenizer's [DEC]
    hf, proc = Blip2ForImageTextRetrieval.from_pretrained(str(folder)).eval(), _hf_processor(folder)
    images, texts = [_photo(1), _photo(2, (180, 240))], ["a photo of a cat", "a red circle on the blue picture"]
    inputs = proc(images=images, text=texts, padding=True, return_tensors="pt")
    assert torch.equal(pipe.processor.images(images), inputs["pixel_values"])
    inputs = {k: v for k, v in inputs.items() if k in ("pixel_values", "input_ids", "attention_mask")}
    itm = hf(**inputs, use_image_text_matching_head=True).logits_per_image.softmax(-1)[:, 1]
    itc = hf(**inputs, use_image_text_matching_head=False).logits_per_image.diagonal()
    ours = pipe.match(images, texts)
    torch.testing.assert_close(ours["itm_prob"], itm, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours["itc_cosine"], itc, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="LM head was never trained"):
        pipe.caption(images[:1])


def _hf_generate(hf, proc, pipe, image, prompt: str, answer: bool = False) -> str:
    """transformers' greedy tokens for `prompt`, stopped and decoded as blip2lab stops an
    answer (or a caption)."""
    ours = pipe.processor
    inputs = proc(images=image, text=prompt, return_tensors="pt")
    out = hf.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=MAX_NEW,
                      eos_token_id=ours.answer_stop_token_ids if answer else ours.llm_stop_token_ids,
                      pad_token_id=ours.llm_pad_token_id)
    new = out[:, inputs["input_ids"].shape[1]:] if pipe.model.llm.kind == "decoder" else out[:, 1:]  # T5: start token
    return (ours.decode_answers(new) if answer else ours.decode_llm(new))[0]


@pytest.mark.parametrize("repo", [r for r in REPOS if not is_retrieval(r)])
@torch.no_grad()
def test_generation_matches_transformers(repo, folders):
    from transformers import Blip2ForConditionalGeneration

    folder = folders[repo]
    pipe = blip2lab.load(folder)
    hf = Blip2ForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32).eval()
    proc = _hf_processor(folder)
    image = _photo(3)
    caption = pipe.caption(image, num_beams=1, max_new_tokens=MAX_NEW)[0]
    assert caption == _hf_generate(hf, proc, pipe, image, "a photo of")
    question = "what is in the picture?"
    answer = pipe.answer(image, question, num_beams=1, max_new_tokens=MAX_NEW)[0]
    assert answer == _hf_generate(hf, proc, pipe, image, pipe.processor.vqa_prompt(question), answer=True)
    assert len(caption) > 0 and len(answer) > 0


def test_dtype_by_name(folders):
    """transformers' way of naming a dtype works wherever blip2lab takes one."""
    folder = folders["blip2-opt-2.7b"]
    pipe = blip2lab.load(folder, dtype="bfloat16")
    assert {p.dtype for p in pipe.model.parameters()} == {torch.bfloat16}
    assert pipe.caption(_photo(4), num_beams=1, max_new_tokens=3)
    auto = blip2lab.load(folder, dtype="auto", llm_dtype="float16")  # "auto": config.json's float32
    assert {p.dtype for n, p in auto.model.named_parameters() if not n.startswith("llm.model.")} == {torch.float32}
    assert auto.model.llm.model.dtype == torch.float16
    assert auto.set_llm_dtype("bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be a floating torch dtype or one of its names"):
        blip2lab.load(folder, dtype="bfloat17")
    with pytest.raises(ValueError, match="T5"):
        blip2lab.load(folders["blip2-flan-t5-xl"], dtype="float16")
    shipped = blip2lab.load("shapes-stage1", dtype="bfloat16")  # a blip2lab folder takes it too
    assert {p.dtype for p in shipped.model.parameters()} == {torch.bfloat16}
