"""The processor: images -> pixels, strings -> ids with label masks, ids -> strings.

Tokenizers are built here from word lists and a few sentences (no downloads): a
BERT-style WordPiece for the Q-Former, an OPT-like byte-level BPE (BOS = EOS = "</s>",
"<pad>") and a T5-like word-level tokenizer ("</s>" appended, "<pad>" = 0).
"""

import copy
import io
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from blip2lab.config import CLIP_MEAN, CLIP_STD, QFormerConfig
from blip2lab.formats.sources import tokenizer_from_path
from blip2lab.processor import Blip2Processor, clean_caption, load_image, make_qformer_tokenizer

WORDS = ("a an the photo of dog dogs cat man woman red blue green brown sitting standing on in bench grass "
         "what is color question answer short two street car bus tree sky white black small big with "
         "table plate food next to").split()
SENTENCES = [
    "a photo of a dog\n", "a photo of a cat sitting on the grass\n", "a man riding a bus down the street\n",
    "two dogs playing in the snow\n", "a red car parked next to a tree\n", "a plate of food on a table\n",
    "Question: what is the color of the dog? Answer: brown\n", "Question: how many cats are there? Answer: two\n",
    "a woman standing under a blue sky\n", "a small white bird on a branch\n", "an old building with a clock\n",
    "the big black cat sleeps\n", "a green field with cows\n", "people walking on the beach\n",
    "a train at the station\n", "a bowl of fruit\n", "a boy holding a kite\n", "a pizza with cheese\n",
    "Question: what is on the table? Answer: a plate\n", "two men playing tennis\n",
]
S = 16  # image side in most tests


# -- tokenizers -----------------------------------------------------------------------------


def bert_tokenizer() -> PreTrainedTokenizerFast:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + ["?", ":", ".", ",", "##s", "##ing", "##er"]
    ids = {w: i for i, w in enumerate(vocab)}
    tok = Tokenizer(models.WordPiece(ids, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                                   unk_token="[UNK]", mask_token="[MASK]")


def opt_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<pad>", "</s>", "<unk>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SENTENCES, trainer)
    # OPT's BOS is "</s>" (= EOS); its "\n" is the generation EOS of BLIP-2.
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def t5_tokenizer() -> PreTrainedTokenizerFast:
    vocab = ["<pad>", "</s>", "<unk>"] + WORDS + ["?", ":", "Question", "Short", "answer", "Answer"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


@pytest.fixture(scope="module")
def qtok():
    return make_qformer_tokenizer(bert_tokenizer())


@pytest.fixture(scope="module")
def otok():
    return opt_tokenizer()


@pytest.fixture(scope="module")
def ttok():
    return t5_tokenizer()


@pytest.fixture(scope="module")
def dec(qtok, otok):
    return Blip2Processor(S, CLIP_MEAN, CLIP_STD, qtok, otok, "decoder")


@pytest.fixture(scope="module")
def encdec(qtok, ttok):
    return Blip2Processor(S, CLIP_MEAN, CLIP_STD, qtok, ttok, "encoder_decoder")


@pytest.fixture(scope="module")
def proc(qtok):
    return Blip2Processor(S, CLIP_MEAN, CLIP_STD, qtok)


def unnormalise(x: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) normalised -> 0..255 values."""
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x * std + mean) * 255


def rgb_of(proc, image) -> np.ndarray:
    """The processor's pixels back in 0..255, (S, S, 3) rounded."""
    return unnormalise(proc.image(image)).permute(1, 2, 0).round().numpy()


# -- images -----------------------------------------------------------------------------------


def test_matches_lavis_eval_transform(proc):
    """LAVIS's `blip_image_eval`: torchvision Resize((S, S), bicubic) on a PIL image, ToTensor,
    Normalize; the one ImageTransform gives the same pixels, and its identity training view too."""
    from torchvision import transforms as T

    from blip2lab.processor import CropConfig, ImageTransform

    lavis = T.Compose([T.Resize((S, S), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(),
                       T.Normalize(CLIP_MEAN, CLIP_STD)])
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    expected = lavis(img)
    identity = ImageTransform(S, CLIP_MEAN, CLIP_STD).view(img, CropConfig(scale=(1.0, 1.0), hflip=False), 0, 0)
    torch.testing.assert_close(identity, expected, rtol=0, atol=1e-6)
    got = proc.images([img, img])
    assert got.shape == (2, 3, S, S) and got.dtype == torch.float32
    torch.testing.assert_close(got[0], expected, rtol=0, atol=1e-6)


def test_transparency_becomes_white(proc):
    img = Image.new("RGBA", (S, S), (0, 0, 0, 0))  # transparent black: convert("RGB") would give black
    img.putpixel((3, 5), (255, 0, 0, 255))
    out = rgb_of(proc, img)
    assert (out[0, 0] == 255).all()
    assert out[5, 3].tolist() == [255, 0, 0]
    la = Image.new("LA", (S, S), (0, 0))
    assert (rgb_of(proc, la) == 255).all()


def test_grey_palette_cmyk_and_1bit(proc):
    assert (rgb_of(proc, Image.new("L", (S, S), 128)) == 128).all()
    pal = Image.new("P", (S, S), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    assert (rgb_of(proc, pal) == [10, 200, 30]).all()
    pal.info["transparency"] = 1  # the palette entry in use is transparent
    assert (rgb_of(proc, pal) == 255).all()
    assert (rgb_of(proc, Image.new("CMYK", (S, S), (0, 255, 255, 0))) == [255, 0, 0]).all()
    assert (rgb_of(proc, Image.new("1", (S, S), 1)) == 255).all()


def test_16_bit_keeps_its_range(tmp_path):
    ramp = np.linspace(0, 65535, 256).round().astype(np.uint16)[None].repeat(4, 0)  # (4, 256)
    img = Image.fromarray(ramp)
    assert img.mode == "I;16"
    path = tmp_path / "ramp16.png"
    img.save(path)
    for source in (img, path, ramp, img.convert("I")):
        out = np.asarray(load_image(source))
        assert out.shape == (4, 256, 3)
        assert out.min() == 0 and out.max() == 255, type(source)  # PIL's convert clips: all 255
        assert out[0, 128, 0] == 128  # 32896 / 257
    floats = Image.fromarray(np.linspace(0, 1, 256, dtype=np.float32)[None].repeat(4, 0))
    assert floats.mode == "F"
    out = np.asarray(load_image(floats))
    assert out.min() == 0 and out.max() == 255


@pytest.mark.parametrize("shape", [(20, 30), (20, 30, 1), (20, 30, 3), (20, 30, 4)])
@pytest.mark.parametrize("dtype", ["uint8", "uint16", "float32"])
def test_numpy_arrays(proc, shape, dtype):
    full = {"uint8": 255, "uint16": 65535, "float32": 1.0}[dtype]
    a = np.full(shape, full, dtype=dtype)
    if len(shape) == 3 and shape[2] == 4:
        a[..., 3] = full  # opaque
    img = load_image(a)
    assert img.mode == "RGB" and img.size == (30, 20)
    assert (np.asarray(img) == 255).all()
    assert proc.image(a).shape == (3, S, S)


def test_bad_arrays():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        load_image(np.full((4, 4, 3), 2.0, dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        load_image(np.zeros((3, 4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="shape"):
        load_image(np.zeros((4, 4, 5), dtype=np.uint8))


def test_paths_and_bytes(proc, tmp_path):
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 40, 3), dtype=np.uint8))
    path = tmp_path / "x.png"
    img.save(path)
    expected = proc.image(img)
    for source in (path, str(path), path.read_bytes()):
        torch.testing.assert_close(proc.image(source), expected, rtol=0, atol=0)
    with open(path, "rb") as f:
        torch.testing.assert_close(proc.image(f), expected, rtol=0, atol=0)


def test_exif_orientation_is_applied(proc, tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # stored: left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    path = tmp_path / "phone.jpg"
    img.save(path, "JPEG", exif=exif, quality=95)
    upright = load_image(path)
    assert upright.size == (20, 40)  # width and height swapped
    top, bottom = np.asarray(upright)[5, 10], np.asarray(upright)[35, 10]
    assert top[0] > 200 and top[2] < 60  # the left half turned into the top half
    assert bottom[2] > 200 and bottom[0] < 60
    out = rgb_of(proc, path)
    assert out[2, S // 2, 0] > 200 and out[S - 3, S // 2, 2] > 200


@pytest.fixture(scope="module")
def huge_jpeg(tmp_path_factory):
    path = tmp_path_factory.mktemp("big") / "huge.jpg"
    ramp = Image.linear_gradient("L").resize((6000, 6000))
    Image.merge("RGB", (ramp, ramp.transpose(Image.Transpose.ROTATE_90), ramp)).save(path, quality=80)
    return path


def test_huge_jpeg_is_decoded_small(proc, huge_jpeg):
    # Drafted at 1/4 scale: 1500x1500 >= 4 * 224 (the reducing gap), never 6000x6000.
    assert load_image(huge_jpeg, target_size=224).size == (1500, 1500)
    side = load_image(huge_jpeg, target_size=S).size[0]  # 1/8 (the largest DCT step), then box reduce
    assert 4 * S <= side < 8 * S
    x = proc.images([huge_jpeg])
    assert x.shape == (1, 3, S, S) and torch.isfinite(x).all()
    # Small images are left alone, so they match the reference transform exactly.
    assert load_image(Image.new("RGB", (640, 480)), target_size=224).size == (640, 480)
    assert load_image(Image.new("L", (6000, 6000)), target_size=224).size == (1000, 1000)  # box reduce


def test_huge_jpeg_memory_is_bounded(huge_jpeg):
    """Peak RSS growth while processing a 6000x6000 JPEG: the full decode alone would be
    6000 * 6000 * 4 B = 144 MB (PIL keeps RGB as 4 bytes a pixel)."""
    script = textwrap.dedent(f"""
        import resource
        from PIL import Image
        from blip2lab.processor import Blip2Processor
        proc = Blip2Processor(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        proc.image(Image.new("RGB", (300, 300)))  # warm-up: lazy imports, allocator pools
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        x = proc.images([r"{huge_jpeg}", r"{huge_jpeg}"])
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        assert tuple(x.shape) == (2, 3, 224, 224)
        print((after - before) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    grown_mb = int(out.stdout.strip())
    assert grown_mb < 100, f"peak RSS grew by {grown_mb} MB"


def test_too_many_pixels(tmp_path):
    proc = Blip2Processor(S, CLIP_MEAN, CLIP_STD, max_pixels=10_000)
    limit = Image.MAX_IMAGE_PIXELS
    for side in (120, 300):  # PIL's warning range (> limit) and its error range (> 2 x limit)
        path = tmp_path / f"big{side}.png"
        Image.new("RGB", (side, side)).save(path)
        with pytest.raises(ValueError, match="pixels"):
            proc.image(path)
    assert Image.MAX_IMAGE_PIXELS == limit  # PIL's global guard put back
    with pytest.raises(ValueError, match="pixels"):
        proc.image(Image.new("RGB", (200, 200)))
    with pytest.raises(ValueError, match="pixels"):
        proc.image(np.zeros((200, 200, 3), dtype=np.uint8))
    assert proc.image(Image.new("RGB", (100, 100))).shape == (3, S, S)


def test_unreadable_files(proc, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image at all\n")
    with pytest.raises(ValueError, match="notes.txt.*not a readable image"):
        proc.image(text)
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(good, "JPEG")
    broken = tmp_path / "cut.jpg"
    broken.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    with pytest.raises(ValueError, match="cut.jpg.*not a readable image"):
        proc.images([broken])
    with pytest.raises(FileNotFoundError):
        proc.image(tmp_path / "missing.png")


def test_image_batch_errors(proc):
    with pytest.raises(ValueError, match="empty"):
        proc.images([])
    with pytest.raises(TypeError):
        proc.images(Image.new("RGB", (4, 4)))
    with pytest.raises(TypeError):
        proc.image(12)


# -- Q-Former text -------------------------------------------------------------------------------


def test_dec_token_added_once():
    base = bert_tokenizer()
    once = make_qformer_tokenizer(base)
    twice = make_qformer_tokenizer(once)
    assert len(once) == len(base) + 1 == len(twice)
    assert "[DEC]" not in base.get_vocab()  # a copy: the argument is left alone
    proc = Blip2Processor(S, CLIP_MEAN, CLIP_STD, twice)
    assert proc.dec_token_id == len(base) == twice.bos_token_id  # appended, as 30522 after BERT's 30522
    assert (proc.cls_token_id, proc.sep_token_id, proc.pad_token_id) == (2, 3, 0)
    plain = Blip2Processor(S, CLIP_MEAN, CLIP_STD, base)  # a retrieval checkpoint's BERT: matches, cannot caption
    assert plain.dec_token_id is None
    with pytest.raises(ValueError, match="qformer.dec_token_id is 30522 .*make_qformer_tokenizer"):
        plain.check_qformer_config(QFormerConfig(vocab_size=30523, cls_token_id=2, sep_token_id=3,
                                                 pad_token_id=0, dec_token_id=30522))


def test_qformer_text(proc, qtok):
    out = proc.qformer_text(["  A photo of a dog ", "red"])
    ids, mask = out["text_ids"], out["text_mask"]
    words = qtok(["a photo of a dog"], add_special_tokens=False)["input_ids"][0]
    assert ids[0].tolist() == [2, *words, 3]  # [CLS] ... [SEP]
    assert ids[1].tolist() == [2, qtok.convert_tokens_to_ids("red"), 3, 0, 0, 0, 0]  # right padding with [PAD]
    assert mask.tolist() == [[1] * 7, [1, 1, 1, 0, 0, 0, 0]]
    long = proc.qformer_text([" ".join(["dog"] * 50), "cat"])
    assert long["text_ids"].shape == (2, 32)
    assert long["text_ids"][0, 0] == 2 and long["text_ids"][0, -1] == 3 and long["text_mask"][0].all()
    assert proc.qformer_text(["a b c d e f"], max_len=4)["text_ids"].shape == (1, 4)
    with pytest.raises(ValueError, match="empty"):
        proc.qformer_text([])
    q = proc.qformer_questions(["what is on the table?"])
    assert set(q) == {"question_ids", "question_mask"} and q["question_ids"][0, 0] == 2


def test_decode_qformer(proc):
    dog, photo = proc.qformer_tokenizer.convert_tokens_to_ids(["dog", "photo"])
    ids = torch.tensor([[proc.dec_token_id, photo, dog, 3, 0], [proc.dec_token_id, dog, 3, 0, 0]])
    assert proc.decode_qformer(ids) == ["photo dog", "dog"]


def test_check_qformer_config(proc, qtok):
    good = QFormerConfig(vocab_size=len(qtok), cls_token_id=2, sep_token_id=3, pad_token_id=0,
                         dec_token_id=len(qtok) - 1)
    proc.check_qformer_config(good)
    with pytest.raises(ValueError, match="qformer.dec_token_id"):
        proc.check_qformer_config(QFormerConfig(vocab_size=len(qtok), cls_token_id=2, sep_token_id=3,
                                                pad_token_id=0, dec_token_id=5))
    with pytest.raises(ValueError, match="qformer.vocab_size"):
        proc.check_qformer_config(QFormerConfig(vocab_size=10, cls_token_id=2, sep_token_id=3, pad_token_id=0,
                                                dec_token_id=5))


# -- stage-2 training batches ------------------------------------------------------------------


def test_decoder_batch_label_table(dec, otok):
    out = dec.decoder_batch(["a photo of", "Question: what is the color of the dog? Answer:"], ["a dog", "brown"])
    ids, mask, labels = out["llm_ids"], out["llm_mask"], out["llm_labels"]
    row = otok.convert_ids_to_tokens(ids[0, : int(mask[0].sum())].tolist())
    # token      </s>  a     Ġphoto Ġof   Ġa    Ġdog  Ċ
    # label      -100  -100  -100   -100  Ġa    Ġdog  Ċ
    assert row == ["</s>", "a", "Ġphoto", "Ġof", "Ġa", "Ġdog", "Ċ"]
    assert labels[0, :4].tolist() == [-100] * 4
    assert labels[0, 4:7].tolist() == ids[0, 4:7].tolist()
    assert labels[0, 6] == dec.llm_eos_token_id == otok.convert_tokens_to_ids("Ċ")  # "\n" is learned
    assert (labels[0, 7:] == -100).all() and (mask[0, 7:] == 0).all() and (ids[0, 7:] == otok.pad_token_id).all()
    # The prompt ids are exactly the prompt tokenised alone, after BOS; the rest is " brown\n".
    prompt = otok("Question: what is the color of the dog? Answer:", add_special_tokens=False)["input_ids"]
    n = 1 + len(prompt)
    assert ids[1, :n].tolist() == [otok.bos_token_id] + prompt
    assert (labels[1, :n] == -100).all() and mask[1].all()
    assert otok.decode(labels[1, n:].tolist()) == " brown\n"
    # Tokenising apart equals tokenising the joined string here (no merge across the boundary).
    assert ids[0, 1:7].tolist() == otok("a photo of a dog\n", add_special_tokens=False)["input_ids"]


def test_decoder_batch_truncation_and_no_bos(qtok, otok):
    short = Blip2Processor(S, CLIP_MEAN, CLIP_STD, qtok, otok, "decoder", llm_max_len=6)
    out = short.decoder_batch(["a photo of"], ["a dog sitting on the grass"])
    assert out["llm_ids"].shape == (1, 6)
    assert out["llm_labels"][0].tolist()[:4] == [-100] * 4  # the prompt is kept whole
    assert short.llm_eos_token_id not in out["llm_ids"][0].tolist()  # cut text: no "\n" to learn
    with pytest.raises(ValueError, match="llm_max_len"):
        short.decoder_batch(["Question: what is the color of the dog? Answer:"], ["brown"])
    gpt2 = copy.deepcopy(otok)
    gpt2.bos_token = None
    gpt2.pad_token = "</s>"  # pad == eos, as GPT-2 setups do
    proc = Blip2Processor(S, CLIP_MEAN, CLIP_STD, qtok, gpt2, "decoder")
    out = proc.decoder_batch(["a photo of", "a photo of"], ["a dog", "a cat sitting on the grass"])
    n = len(gpt2("a photo of", add_special_tokens=False)["input_ids"])
    assert out["llm_ids"][0, :n].tolist() == gpt2("a photo of", add_special_tokens=False)["input_ids"]
    assert (out["llm_labels"][:, :n] == -100).all() and (out["llm_labels"][:, n] != -100).all()
    assert (out["llm_labels"][out["llm_mask"] == 0] == -100).all()
    with pytest.raises(ValueError, match="prompts for"):
        proc.decoder_batch(["a"], ["b", "c"])


def test_encoder_decoder_batch(encdec, ttok):
    out = encdec.encoder_decoder_batch(["a photo of", "a man"], ["a dog sitting on the grass", "on a bench"])
    enc = ttok(["a photo of", "a man"], add_special_tokens=False)["input_ids"]
    tgt = ttok(["a dog sitting on the grass", "on a bench"], add_special_tokens=False)["input_ids"]
    eos, pad = ttok.eos_token_id, ttok.pad_token_id
    assert out["llm_ids"].tolist() == [enc[0] + [eos], enc[1] + [eos, pad]]
    assert out["llm_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert out["llm_target_ids"].tolist() == [tgt[0] + [eos], tgt[1] + [eos] + [pad] * 3]
    assert out["llm_target_mask"].tolist() == [[1] * 7, [1] * 4 + [0] * 3]
    assert out["llm_labels"].tolist() == [tgt[0] + [eos], tgt[1] + [eos] + [-100] * 3]
    long = encdec.encoder_decoder_batch(["dog " * 40], ["cat " * 40])
    assert long["llm_ids"].shape == (1, 32) and long["llm_ids"][0, -1] == eos  # EOS kept, as tokenizer truncation
    assert long["llm_target_ids"].shape == (1, 32) and long["llm_labels"][0, -1] == eos


def test_prefix_split():
    for n in range(0, 13):
        text = " ".join(f"w{i}" for i in range(n))
        seen = set()
        for seed in range(200):
            prefix, suffix = Blip2Processor.prefix_split(text, random.Random(seed))
            if n < 2:
                assert (prefix, suffix) == ("", text)
                continue
            k = len(prefix.split())
            assert 1 <= k <= n // 2
            assert prefix + " " + suffix == text
            seen.add(k)
        if n >= 2:
            assert seen == set(range(1, n // 2 + 1))  # every split point in [1, n // 2] occurs
    prefix, suffix = Blip2Processor.prefix_split("  a  dog\tsits on grass ", random.Random(0))
    assert prefix == "a" or prefix == "a  dog"
    assert not prefix.startswith(" ") and not suffix.endswith(" ")


# -- prompts ---------------------------------------------------------------------------------------


def test_prompts(dec, encdec, proc):
    assert dec.caption_prompt == "a photo of" == encdec.caption_prompt
    assert dec.vqa_prompt("  what is this?\n") == "Question: what is this? Answer:"
    assert encdec.vqa_prompt("what is this?") == "Question: what is this? Short answer:"
    history = [("what is it?", "a dog"), ("what color is it? ", " brown ")]
    assert dec.chat_prompt(history, "where is it?") == (
        "Question: what is it? Answer: a dog. Question: what color is it? Answer: brown. "
        "Question: where is it? Answer:")
    assert encdec.chat_prompt(history[:1], "where is it?") == (
        "Question: what is it? Short answer: a dog. Question: where is it? Short answer:")
    assert dec.chat_prompt([], "why?") == dec.vqa_prompt("why?")
    for empty in ("", "   \n"):
        with pytest.raises(ValueError, match="empty question"):
            dec.vqa_prompt(empty)
    with pytest.raises(ValueError, match="empty question"):
        dec.chat_prompt([(" ", "a dog")], "why?")
    with pytest.warns(UserWarning, match="truncated"):
        prompt = dec.vqa_prompt("x" * 10_000)
    assert prompt == "Question: " + "x" * 1000 + " Answer:"
    with pytest.raises(ValueError, match="no LLM"):
        proc.vqa_prompt("what?")


def test_chat_template_prompts(qtok, otok):
    """An instruction-tuned LLM (mini-real's SmolLM2) gets its questions in its own chat
    template: turns as messages, the template's leading BOS left to generation_batch, and
    the assistant's opening newline kept."""
    tok = copy.deepcopy(otok)
    tok.chat_template = ("{% for m in messages %}</s>{{ m['role'] }}\n{{ m['content'] }}<pad>\n{% endfor %}"
                         "{% if add_generation_prompt %}</s>assistant\n{% endif %}")
    chat = Blip2Processor(S, CLIP_MEAN, CLIP_STD, qtok, tok, "decoder", chat_template=True)
    assert chat.vqa_prompt(" what is this? ") == "user\nwhat is this?<pad>\n</s>assistant\n"
    assert chat.chat_prompt([("what is it?", " a dog ")], "where?") == (
        "user\nwhat is it?<pad>\n</s>assistant\na dog<pad>\n</s>user\nwhere?<pad>\n</s>assistant\n")
    assert chat.caption_prompt == "a photo of"  # captions keep the plain prompt stage 2 trained on
    ids = chat.generation_batch([chat.vqa_prompt("what is this?")])["llm_ids"][0].tolist()
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 2  # one BOS of ours, one in the template
    assert tok.decode(ids[-1:]).endswith("\n")  # "assistant\n": the newline is not stripped
    with pytest.raises(ValueError, match="empty question"):
        chat.vqa_prompt("  ")
    with pytest.raises(ValueError, match="chat template"):
        Blip2Processor(S, CLIP_MEAN, CLIP_STD, qtok, otok, "decoder", chat_template=True)  # otok has none


def test_clean_caption():
    assert clean_caption("A Dog; sitting... on  the GRASS!\n") == "a dog sitting on the grass"
    assert clean_caption("a b c d", max_words=2) == "a b"


# -- generation ------------------------------------------------------------------------------------


def test_generation_batch_padding_sides(dec, encdec, otok, ttok):
    prompts = ["a photo of", dec.vqa_prompt("what is the color of the dog?")]
    out = dec.generation_batch(prompts)
    ids, mask = out["llm_ids"], out["llm_mask"]
    short = [otok.bos_token_id] + otok("a photo of", add_special_tokens=False)["input_ids"]
    T, n = ids.shape[1], len(short)
    assert ids[0, T - n:].tolist() == short  # [pad ...][BOS][prompt]: left padded
    assert (ids[0, : T - n] == otok.pad_token_id).all() and mask[0].tolist() == [0] * (T - n) + [1] * n
    assert mask[1].all() and mask[:, -1].all()  # every row ends in the last column
    single = dec.generation_batch("a photo of")
    assert single["llm_ids"].tolist() == [short]
    out = encdec.generation_batch(["a photo of", "a man"])
    enc = ttok(["a photo of", "a man"], add_special_tokens=False)["input_ids"]
    assert out["llm_ids"].tolist() == [enc[0] + [1], enc[1] + [1, 0]]  # right padded, EOS appended
    assert out["llm_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]


def test_decode_llm(dec, encdec, otok, ttok):
    enc = lambda s: otok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    rows = [enc(" a dog\nthe cat") + [otok.pad_token_id], enc(" two men playing") + [otok.eos_token_id, 0, 0, 0, 0, 0]]
    width = max(map(len, rows))
    rows = [r + [otok.pad_token_id] * (width - len(r)) for r in rows]
    assert dec.decode_llm(torch.tensor(rows)) == ["a dog", "two men playing"]
    with_prompt = [[otok.bos_token_id] + enc("a photo of") + enc(" a dog\n")]
    assert dec.decode_llm(with_prompt, prompt_width=4) == ["a dog"]  # the prompt is not echoed
    assert dec.decode_llm([enc("\n a cat")]) == [""]
    t5 = ttok(["a dog sitting"], add_special_tokens=False)["input_ids"][0] + [1, 0, 0]
    assert encdec.decode_llm(torch.tensor([t5])) == ["a dog sitting"]
    assert dec.llm_stop_token_ids == [otok.convert_tokens_to_ids("Ċ"), otok.eos_token_id]
    assert encdec.llm_eos_token_id == 1 and encdec.llm_stop_token_ids == [1]


# -- construction ------------------------------------------------------------------------------------


def test_pickles_for_dataloader_workers(dec):
    import pickle

    again = pickle.loads(pickle.dumps(dec))
    assert again.decoder_batch(["a photo of"], ["a dog"])["llm_ids"].tolist() == \
        dec.decoder_batch(["a photo of"], ["a dog"])["llm_ids"].tolist()


def test_constructor_errors(qtok, otok):
    with pytest.raises(ValueError, match="llm_tokenizer"):
        Blip2Processor(S, CLIP_MEAN, CLIP_STD, qtok, None, "decoder")
    with pytest.raises(ValueError, match="llm_kind"):
        Blip2Processor(S, CLIP_MEAN, CLIP_STD, qtok, otok, "gpt")
    with pytest.raises(ValueError, match="std"):
        Blip2Processor(S, CLIP_MEAN, (0.5, 0.0, 0.5), qtok)
    with pytest.raises(ValueError, match="no qformer_tokenizer"):
        Blip2Processor(S, CLIP_MEAN, CLIP_STD).qformer_text(["a"])


def test_from_config_and_tokenizer_from_path(qtok, otok, tmp_path):
    from blip2lab.config import Blip2Config, LLMConfig, VisionConfig

    config = Blip2Config(
        vision=VisionConfig(image_size=32, patch_size=8, width=24, layers=3, heads=4),
        qformer=QFormerConfig(hidden_size=32, num_layers=2, num_heads=4, vocab_size=len(qtok), max_text_len=16,
                              pad_token_id=0, cls_token_id=2, sep_token_id=3, dec_token_id=len(qtok) - 1),
        llm=LLMConfig(kind="decoder", name_or_path="tiny-opt"), embed_dim=16)
    proc = Blip2Processor.from_config(config, qtok, otok)
    assert (proc.image_size, proc.qformer_max_len, proc.llm_kind) == (32, 16, "decoder")
    assert proc.images([Image.new("RGB", (5, 7))]).shape == (1, 3, 32, 32)
    qtok.save_pretrained(tmp_path / "qformer_tok")
    loaded = tokenizer_from_path(tmp_path / "qformer_tok")
    assert loaded("a photo of a dog")["input_ids"] == qtok("a photo of a dog")["input_ids"]
    assert loaded.convert_tokens_to_ids("[DEC]") == proc.dec_token_id
