"""Official checkpoints in and out (blip2lab/formats/hf.py and lavis.py), on tiny random models:
HF layout (folders written by transformers' save_pretrained) -> blip2lab with equal outputs,
blip2lab -> HF layout opened by transformers with no missing/unexpected keys, LAVIS layout
both ways, and the failure modes (damaged files, leftover/missing keys, pickles, offline hub)."""

import os
import re
import threading
import time

import pytest
import torch
from conftest import CLS, DEC, PAD, SEP, random_text
from safetensors.torch import load_file, save_file
from test_hf_parity import _hf_model as hf_retrieval
from test_stage2_parity import IMAGE_TOKEN, Q
from test_stage2_parity import _hf as hf_generation

import blip2lab
from blip2lab import pipeline
from blip2lab.formats import hf as official
from blip2lab.formats.hf import (
    HF_ABSENT,
    KNOWN_CHECKPOINTS,
    export_hf,
    from_hf,
    load_official,
    load_official_tokenizers,
)
from blip2lab.formats.keys import WeightsError
from blip2lab.formats.lavis import export_lavis, load_lavis, save_lavis
from blip2lab.pipeline import Blip2Pipeline

IDS = dict(cls_token_id=CLS, sep_token_id=SEP, dec_token_id=DEC, pad_token_id=PAD)


def _silent_save(hf, path, **kw):
    hf.save_pretrained(str(path), **kw)
    return path


@pytest.fixture(scope="module", params=["opt", "t5"])
def generation(request, tmp_path_factory):
    hf = hf_generation(request.param)
    return request.param, hf, _silent_save(hf, tmp_path_factory.mktemp(f"hf_{request.param}"))


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    hf = hf_retrieval()
    return hf, _silent_save(hf, tmp_path_factory.mktemp("hf_itm"))


def _inputs(B=2, T=5):
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, 3, 32, 32, generator=g), torch.randint(3, 58, (B, T), generator=g)


@torch.no_grad()
def _llm_logits(kind, ours, hf, pixels, ids):
    """Our visual prompt + text through our LLM, and HF's forward with image tokens."""
    B = ids.shape[0]
    visual = ours.llm.visual_prompt(ours.query_outputs(ours.encode_image(pixels)))  # (B, Q, D_lm)
    embeds = torch.cat([visual, ours.llm.embed(ids)], dim=1)
    mask = torch.ones(B, Q + ids.shape[1], dtype=torch.long)
    hf_ids = torch.cat([torch.full((B, Q), IMAGE_TOKEN), ids], dim=1)
    extra = {}
    if kind == "t5":
        extra["decoder_input_ids"] = hf.language_model._shift_right(ids[:, :3])
    theirs = hf(pixel_values=pixels, input_ids=hf_ids, attention_mask=mask, **extra).logits
    mine = ours.llm.model(inputs_embeds=embeds, attention_mask=mask, **extra).logits
    return mine, theirs


def _assert_same_state(a, b, skip=()):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    different = [k for k in sa if k not in skip and not torch.equal(sa[k], sb[k])]
    assert not different


# ---------------------------------------------------------------------------------------
# HF layout -> blip2lab
# ---------------------------------------------------------------------------------------


def test_generation_checkpoint_matches_transformers(generation):
    kind, hf, folder = generation
    ours = load_official(folder, **IDS)
    assert ours.official.architecture == "Blip2ForConditionalGeneration"
    assert ours.official.image_token_index == IMAGE_TOKEN
    assert ours.llm.kind == ("decoder" if kind == "opt" else "encoder_decoder") and not ours.has_stage1_heads
    # the LLM's tied weights are one tensor again (the file stores them once)
    assert ours.llm.model.get_output_embeddings().weight is ours.llm.model.get_input_embeddings().weight
    mine, theirs = _llm_logits(kind, ours, hf, *_inputs())
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    _assert_same_state(ours, from_hf(hf, **IDS))  # the same weights as the in-memory converter


@torch.no_grad()
def test_retrieval_checkpoint_matches_transformers(retrieval):
    hf, folder = retrieval
    ours = load_official(folder, **IDS)
    assert ours.official.architecture == "Blip2ForImageTextRetrieval" and ours.llm is None
    g = torch.Generator().manual_seed(5)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    ids, mask = random_text(3, 7, g, pad_from=[7, 4, 5])
    image = ours.encode_image(pixels)
    itm = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    torch.testing.assert_close(ours.itm_logits(image, ids, mask), itm.logits_per_image, atol=1e-5, rtol=1e-5)
    itc = hf(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=False)
    cos = ours.itc_cosine(ours.image_features(image).proj, ours.text_features(ids, mask).proj)
    torch.testing.assert_close(cos, itc.logits_per_image, atol=1e-5, rtol=1e-5)
    # the parts HF never stores got their initial values
    assert ours.temp.item() == pytest.approx(ours.config.temp_init)
    assert torch.equal(ours.qformer.lm_head.norm.weight, torch.ones_like(ours.qformer.lm_head.norm.weight))
    assert ours.qformer.lm_head.dense.weight.std() > 0


def test_sharded_checkpoint_loads(retrieval, tmp_path):
    hf, folder = retrieval
    sharded = _silent_save(hf, tmp_path / "sharded", max_shard_size="50KB")
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 2
    model = load_official(sharded, **IDS)
    _assert_same_state(model, load_official(folder, **IDS), skip=HF_ABSENT)
    with pytest.warns(UserWarning, match="no place for"):
        export_hf(model, sharded)  # over the sharded checkpoint it was loaded from
    assert [f.name for f in sharded.glob("*.safetensors")] == ["model.safetensors"]
    _assert_same_state(load_official(sharded), model, skip=HF_ABSENT)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _release_free_memory():
    import gc

    from blip2lab.training.loop import release_free_memory

    gc.collect()
    release_free_memory()  # glibc keeps freed heap pages otherwise


def test_loading_is_lazy_and_holds_the_weights_once(tmp_path, monkeypatch):
    """A ~50 MB checkpoint: the model is built without weights (all on meta when filling
    starts), and resident memory grows by about the checkpoint's size, not twice it."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, OPTConfig

    text = OPTConfig(vocab_size=1000, hidden_size=512, num_hidden_layers=4, ffn_dim=2048, num_attention_heads=8,
                     max_position_embeddings=64, word_embed_proj_dim=512)
    config = Blip2Config(vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=1,
                                            num_attention_heads=4, image_size=32, patch_size=8),
                         qformer_config=dict(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                             intermediate_size=48, encoder_hidden_size=24),
                         text_config=text.to_dict(), num_query_tokens=Q, image_token_index=999)
    hf = Blip2ForConditionalGeneration(config)
    _silent_save(hf, tmp_path, max_shard_size="15MB")
    size = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    assert size > 45e6
    del hf
    _release_free_memory()  # so the freed HF model's pages cannot hide the loader's growth

    real_fill = official.fill

    def fill_spy(model, *args, **kwargs):
        assert [n for n, p in model.named_parameters() if not p.is_meta] == []  # nothing materialised before
        real_fill(model, *args, **kwargs)

    monkeypatch.setattr(official, "fill", fill_spy)
    if not os.path.exists("/proc/self/statm"):
        load_official(tmp_path, **IDS)
        return
    peak, done = [_rss()], threading.Event()

    def sample():
        while not done.is_set():
            peak.append(_rss())
            time.sleep(0.001)

    baseline = _rss()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        model = load_official(tmp_path, **IDS)
        peak.append(_rss())
    finally:
        done.set()
        sampler.join()
    growth = max(peak) - baseline
    # About 1x; a second copy of the weights (random init + checkpoint) would be 2x.
    assert growth < 1.75 * size, f"peak RSS grew by {growth / 1e6:.0f} MB loading {size / 1e6:.0f} MB"
    assert sum(p.numel() * p.element_size() for p in model.parameters()) > 0.95 * size
    # The model owns its memory (not a map of the file): overwriting the file changes nothing.
    embed = model.llm.model.get_input_embeddings().weight
    before = embed.clone()
    for file in tmp_path.glob("*.safetensors"):
        with open(file, "r+b") as f:
            f.seek(4096)
            f.write(b"\0" * (file.stat().st_size - 4096))
    assert torch.equal(embed, before)


def test_truncated_safetensors_is_a_clear_error(retrieval, tmp_path):
    hf, _ = retrieval
    folder = _silent_save(hf, tmp_path / "ckpt")
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match=re.escape(str(file)) + ".*not a complete safetensors file"):
        load_official(folder, **IDS)
    file.write_bytes(data[:5])  # not even a header
    with pytest.raises(WeightsError, match=re.escape(str(file))):
        load_official(folder, **IDS)


def test_hub_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so "Salesforce/blip2-opt-2.7b" is no local folder
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="no local folder at 'Salesforce/blip2-opt-2.7b' and the hub could "
                                                r"not be reached: pass a local directory with the checkpoint"):
        load_official("Salesforce/blip2-opt-2.7b")
    assert time.monotonic() - start < 10
    with pytest.raises(FileNotFoundError, match="no local folder at"):
        load_official(tmp_path / "nowhere" / "x" / "y")


def test_leftover_and_missing_keys_are_named(retrieval, tmp_path):
    hf, folder = retrieval
    state = load_file(str(folder / "model.safetensors"))
    for name, edit in (("extra", lambda s: s | {"qformer.extra.weight": torch.zeros(2)}),
                       ("missing", lambda s: {k: v for k, v in s.items() if k != "qformer.layernorm.weight"})):
        target = tmp_path / name
        target.mkdir()
        (target / "config.json").write_text((folder / "config.json").read_text())
        save_file(edit(dict(state)), str(target / "model.safetensors"))
        key = "qformer.extra.weight" if name == "extra" else "qformer.layernorm.weight"
        with pytest.raises(WeightsError, match=re.escape(key)):
            load_official(target, **IDS)
    (tmp_path / "missing" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors"):
        load_official(tmp_path / "missing", **IDS)


def test_device_map_and_dtype(generation):
    kind, hf, folder = generation
    ours = load_official(folder, device_map={"": "cpu"}, **IDS)
    assert ours.llm.model.hf_device_map == {"": "cpu"}
    mine, theirs = _llm_logits(kind, ours, hf, *_inputs())
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    half = load_official(folder, dtype=torch.bfloat16, **IDS)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    if kind == "t5":
        with pytest.raises(ValueError, match="T5"):
            load_official(folder, dtype=torch.float16, **IDS)


def test_llm_dtype_reads_the_llm_straight_into_it(generation, monkeypatch):
    """`llm_dtype`: the LLM's tensors in that dtype as they are read (no fp32 copy first), the
    rest as `dtype`; the same values as loading in fp32 and casting the LLM after."""
    kind, hf, folder = generation
    full = load_official(folder, **IDS)
    half = load_official(folder, llm_dtype=torch.bfloat16, **IDS)
    assert half.config.llm.dtype == "bfloat16"
    theirs = dict(full.named_parameters())
    for name, p in half.named_parameters():
        in_llm = name.startswith("llm.model.")
        assert p.dtype == (torch.bfloat16 if in_llm else torch.float32), name
        assert torch.equal(p, theirs[name].to(p.dtype)), name
    # blip2lab.load hands the dtype to the loader rather than casting an fp32 LLM after it
    # (these tiny folders carry no tokenizers, so the loader is watched, not the whole pipeline).
    seen = {}

    def watched(source, **kwargs):
        seen.update(kwargs)
        return Blip2Pipeline(load_official(source, **kwargs), processor=None)

    monkeypatch.setattr(pipeline, "_load_official", lambda source, device, **kw: watched(source, **kw))
    pipe = blip2lab.load(folder, llm_dtype="bfloat16", **IDS)
    assert seen["llm_dtype"] == torch.bfloat16 and pipe.model.llm.model.dtype == torch.bfloat16
    if kind == "t5":
        with pytest.raises(ValueError, match="T5"):
            load_official(folder, llm_dtype=torch.float16, **IDS)


def test_tokenizers_shipped_with_the_checkpoint(retrieval, tmp_path):
    from transformers import BertTokenizer

    _, folder = retrieval
    assert load_official_tokenizers(folder) == (None, None)
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photo", "of", "cat"]) + "\n")
    tok = BertTokenizer(str(vocab))
    ckpt = tmp_path / "ckpt"
    tok.save_pretrained(str(ckpt))
    tok.save_pretrained(str(ckpt / "qformer_tokenizer"))
    qformer_tok, llm_tok = load_official_tokenizers(ckpt)
    assert llm_tok("a photo of cat")["input_ids"] == qformer_tok("a photo of cat")["input_ids"] == [2, 5, 6, 7, 8, 3]


def test_registry_of_known_checkpoints():
    assert len(KNOWN_CHECKPOINTS) == 9
    assert {k for k, v in KNOWN_CHECKPOINTS.items() if v["task"] == "retrieval"} == {
        "Salesforce/blip2-itm-vit-g", "Salesforce/blip2-itm-vit-g-coco"}
    assert KNOWN_CHECKPOINTS["Salesforce/blip2-flan-t5-xl"]["llm_kind"] == "encoder_decoder"
    assert KNOWN_CHECKPOINTS["Salesforce/blip2-opt-2.7b"]["vqa_prompt"] == "Question: {} Answer:"


# ---------------------------------------------------------------------------------------
# blip2lab -> HF layout
# ---------------------------------------------------------------------------------------


def test_export_hf_generation_round_trip(generation, tmp_path):
    from transformers import Blip2ForConditionalGeneration

    kind, hf, _ = generation
    ours = from_hf(hf, **IDS).eval()
    export_hf(ours, tmp_path)
    back, info = Blip2ForConditionalGeneration.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    mine, theirs = _llm_logits(kind, ours, back.eval(), *_inputs())
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5)
    _assert_same_state(load_official(tmp_path), ours)  # bitwise; token ids come back from blip2lab_config.json


@torch.no_grad()
def test_export_hf_retrieval_round_trip(retrieval, tmp_path):
    from transformers import Blip2ForImageTextRetrieval

    hf, folder = retrieval
    ours = load_official(folder, **IDS)
    with pytest.warns(UserWarning, match="no place for .*temp"):
        export_hf(ours, tmp_path)
    back, info = Blip2ForImageTextRetrieval.from_pretrained(str(tmp_path), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    g = torch.Generator().manual_seed(3)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    ids, mask = random_text(2, 6, g, pad_from=[6, 4])
    theirs = back.eval()(pixel_values=pixels, input_ids=ids, attention_mask=mask, use_image_text_matching_head=True)
    torch.testing.assert_close(ours.itm_logits(ours.encode_image(pixels), ids, mask), theirs.logits_per_image,
                               atol=1e-5, rtol=1e-5)
    _assert_same_state(load_official(tmp_path), ours, skip=HF_ABSENT)


@pytest.mark.filterwarnings("ignore:the HF layout has no place")
def test_export_hf_warns_when_ln_vision_eps_differs(retrieval, tmp_path):
    import dataclasses

    hf, _ = retrieval
    ours = from_hf(hf, **IDS)
    ours.config.vision = dataclasses.replace(ours.config.vision, ln_vision_eps=1e-5)  # LAVIS's eps
    with pytest.warns(UserWarning, match=r"ln_vision_eps \(1e-05\) != the vision layer_norm_eps"):
        export_hf(ours, tmp_path)


def test_export_hf_refuses_a_model_hf_cannot_hold(generation):
    _, hf, _ = generation
    ours = from_hf(hf, **IDS)
    ours.config.qformer.text_input = True  # a Q-Former text side and an LLM: no HF class has both
    with pytest.raises(WeightsError, match="either a generation model"):
        export_hf(ours, "/nonexistent")


# ---------------------------------------------------------------------------------------
# LAVIS layout
# ---------------------------------------------------------------------------------------


def _zero_key_bias(model):
    """EVA (LAVIS) has no key bias: the random HF towers of these tests do; zero it."""
    D = model.config.vision.width
    with torch.no_grad():
        for layer in model.image_encoder.vision_model.encoder.layers:
            layer.self_attn.qkv.bias[D:2 * D] = 0
    return model


@pytest.fixture(scope="module")
def stage1_model(retrieval):
    hf, _ = retrieval
    model = _zero_key_bias(from_hf(hf, **IDS))
    with torch.no_grad():  # HF never stores these: give them values worth checking
        model.temp.fill_(0.05)
        model.qformer.lm_head.dense.weight.normal_()
        model.qformer.lm_head.bias.normal_()
    return model


def _assert_same_tensors(a: dict, b: dict):
    assert set(a) == set(b), set(a) ^ set(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []


def test_lavis_round_trip_stage1(stage1_model, tmp_path):
    state = export_lavis(stage1_model)
    names = ("visual_encoder.cls_token", "visual_encoder.blocks.1.attn.q_bias", "visual_encoder.blocks.1.attn.v_bias",
             "Qformer.bert.encoder.layer.0.crossattention.self.key.weight", "Qformer.cls.predictions.decoder.weight",
             "Qformer.bert.encoder.layer.1.intermediate_query.dense.weight", "temp", "itm_head.bias")
    assert all(n in state for n in names) and not any("k_bias" in k or ".k." in k for k in state)
    path = save_lavis(stage1_model, tmp_path / "blip2.pth")
    loaded = load_lavis(path, stage1_model.config)
    _assert_same_tensors(export_lavis(loaded), state)
    _assert_same_state(loaded, stage1_model)
    # the EVA biases by hand: ours is cat(q_bias, 0, v_bias)
    qkv = loaded.image_encoder.vision_model.encoder.layers[1].self_attn.qkv.bias
    q_bias, v_bias = state["visual_encoder.blocks.1.attn.q_bias"], state["visual_encoder.blocks.1.attn.v_bias"]
    assert torch.equal(qkv, torch.cat([q_bias, torch.zeros_like(q_bias), v_bias]))


def test_lavis_stage2_with_and_without_llm_weights(generation):
    kind, hf, _ = generation
    ours = _zero_key_bias(from_hf(hf, **IDS))
    state = export_lavis(ours)
    prefix = "opt" if kind == "opt" else "t5"
    assert f"{prefix}_proj.weight" in state and any(k.startswith(f"{prefix}_model.") for k in state)
    assert not any(k.startswith("Qformer.bert.embeddings.word_embeddings") for k in state)  # stage 2: no text side
    fresh = type(ours.llm.model)(ours.llm.model.config)  # random: the file's weights must replace them
    loaded = load_lavis({"model": state}, ours.config, language_model=fresh)
    _assert_same_tensors(export_lavis(loaded), state)
    assert loaded.llm.model.get_output_embeddings().weight is loaded.llm.model.get_input_embeddings().weight
    # LAVIS's own checkpoints: trainable tensors only; ViT and LLM come from elsewhere
    trainable = export_lavis(ours, include_frozen=False)
    vit = {k: v for k, v in state.items() if k.startswith("visual_encoder.")}
    assert not any(k.startswith(("visual_encoder.", f"{prefix}_model.")) for k in trainable)
    with pytest.raises(WeightsError, match=r"visual_encoder\.cls_token.*pass vision_weights"):
        load_lavis(trainable, ours.config, language_model=ours.llm.model)
    with pytest.warns(UserWarning, match=f"no {prefix}_model"):
        again = load_lavis(trainable, ours.config, language_model=ours.llm.model,
                           vision_weights={k.removeprefix("visual_encoder."): v for k, v in vit.items()})
    _assert_same_tensors(export_lavis(again), state)


def test_lavis_leftover_missing_and_extra_blocks_are_named(stage1_model):
    state = export_lavis(stage1_model)
    with pytest.raises(WeightsError, match=re.escape("Qformer.bert.extra.weight")):
        load_lavis(state | {"Qformer.bert.extra.weight": torch.zeros(1)}, stage1_model.config)
    gone = "Qformer.bert.encoder.layer.0.attention.self.query.weight"
    with pytest.raises(WeightsError, match=re.escape(gone)):
        load_lavis({k: v for k, v in state.items() if k != gone}, stage1_model.config)
    with pytest.raises(WeightsError, match=re.escape("visual_encoder.blocks.1.attn.v_bias")):
        load_lavis({k: v for k, v in state.items() if not k.endswith("blocks.1.attn.v_bias")}, stage1_model.config)
    # the MLM decoder is tied to the word embeddings: a file where it is not is refused
    decoder = "Qformer.cls.predictions.decoder.weight"
    untied = state | {decoder: torch.zeros_like(state[decoder])}
    with pytest.raises(WeightsError, match="must be tied"):
        load_lavis(untied, stage1_model.config)


def _vit(state: dict, prefixed: bool = True) -> dict:
    return {(k if prefixed else k.removeprefix("visual_encoder.")): v for k, v in state.items()
            if k.startswith("visual_encoder.")}


def _eva_file(state: dict, n: int) -> dict:
    """eva_vit_g.pth as LAVIS reads it: one block more than BLIP-2 runs (40 for 39), the
    ImageNet classifier head and the final norm of EVA's model, no `visual_encoder.` prefix."""
    vit = _vit(state, prefixed=False)
    D = vit["cls_token"].shape[-1]
    extra = {k.replace(f"blocks.{n - 1}.", f"blocks.{n}."): v.clone() for k, v in vit.items() if f"blocks.{n - 1}." in k}
    return vit | extra | {"head.weight": torch.randn(10, D), "head.bias": torch.zeros(10),
                          "norm.weight": torch.ones(D), "norm.bias": torch.zeros(D)}


def test_lavis_eva_file_with_its_head_and_extra_block(stage1_model):
    """eva_vit_g.pth holds 40 blocks and a 1000-way head: LAVIS loads it strict=False into its
    39-block model, which never runs the rest; so does load_lavis, saying so in one warning."""
    state = export_lavis(stage1_model)
    n = len(stage1_model.image_encoder.vision_model.encoder.layers)
    trainable = {k: v for k, v in state.items() if not k.startswith("visual_encoder.")}
    with pytest.warns(UserWarning, match=rf"never runs them: vision_weights blocks {n}\.\.{n}.*visual_encoder\.head\.\*, "
                                         r"visual_encoder\.norm\.\*"):
        loaded = load_lavis(trainable, stage1_model.config, vision_weights=_eva_file(state, n))
    _assert_same_tensors(export_lavis(loaded), state)


def test_lavis_finetuned_vit_keeps_every_block(stage1_model):
    """A fine-tuned ViT saved by LAVIS's runner (freeze_vit False: its head and norm are
    trainable, so saved too) ran every block it holds. A config that would keep fewer - the
    defaults layers=39 with layer_index=-2 keep 38 of LAVIS's 39 - is refused by name."""
    import dataclasses

    state = export_lavis(stage1_model)
    n = len(stage1_model.image_encoder.vision_model.encoder.layers)
    D = state["visual_encoder.cls_token"].shape[-1]
    finetuned = state | {"visual_encoder.head.weight": torch.randn(10, D), "visual_encoder.head.bias": torch.zeros(10),
                         "visual_encoder.norm.weight": torch.ones(D), "visual_encoder.norm.bias": torch.zeros(D)}
    with pytest.warns(UserWarning, match=r"visual_encoder\.head\.\*"):
        _assert_same_tensors(export_lavis(load_lavis(finetuned, stage1_model.config)), state)
    cfg = stage1_model.config
    default_index = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, layer_index=-2))
    with pytest.raises(WeightsError, match=r"vision\.layer_index=-1"):
        load_lavis(finetuned, default_index)
    shallow = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, layers=n - 1))
    with pytest.raises(WeightsError, match=rf"has {n} blocks.*set vision\.layers={n}"):
        load_lavis(finetuned, shallow)


def test_lavis_own_vit_and_vision_weights_is_refused(stage1_model):
    state = export_lavis(stage1_model)
    n = len(stage1_model.image_encoder.vision_model.encoder.layers)
    with pytest.raises(WeightsError, match="holds its own ViT .*pass one or the other"):
        load_lavis(state, stage1_model.config, vision_weights=_eva_file(state, n))


def test_lavis_stage2_file_keeps_the_llms_tied_copies(generation):
    """LAVIS's runner deletes the frozen tensors `named_parameters()` lists, which skips a tied
    tensor's second name: OPT's lm_head.weight, T5's encoder/decoder embed_tokens stay in the
    file (in the LLM's fp16). They are copies, not the LLM: checked against it and dropped."""
    kind, hf, _ = generation
    ours = _zero_key_bias(from_hf(hf, **IDS))
    state = export_lavis(ours)
    prefix = "opt" if kind == "opt" else "t5"
    copies = ["lm_head.weight"] if kind == "opt" else ["encoder.embed_tokens.weight", "decoder.embed_tokens.weight"]
    embed = ours.llm.model.get_input_embeddings().weight.detach()
    trainable = export_lavis(ours, include_frozen=False) | {f"{prefix}_model.{c}": embed.half() for c in copies}
    vit = _vit(state)
    with pytest.warns(UserWarning) as seen:
        loaded = load_lavis(trainable, ours.config, language_model=ours.llm.model, vision_weights=vit)
    said = " | ".join(str(w.message) for w in seen)
    assert all(f"{prefix}_model.{c}" in said for c in copies) and "tied copies" in said
    _assert_same_tensors(export_lavis(loaded), state)
    other = trainable | {f"{prefix}_model.{copies[0]}": (embed + 1).half()}
    with pytest.raises(WeightsError, match=rf"{prefix}_model\.{re.escape(copies[0])} .*trained with another LLM"):
        load_lavis(other, ours.config, language_model=ours.llm.model, vision_weights=vit)


def test_export_lavis_refuses_a_key_bias(stage1_model):
    model = from_hf(hf_retrieval(seed=1), **IDS)  # random towers have a key bias EVA cannot store
    with pytest.raises(WeightsError, match="key part of the qkv bias"):
        export_lavis(model)


class NotATensor:
    """Anything a pickle could smuggle in besides tensors."""


def test_lavis_pickle_with_objects_is_refused(stage1_model, tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": export_lavis(stage1_model), "payload": NotATensor()}, path)
    with pytest.raises(WeightsError, match=re.escape(str(path)) + ".*weights_only=True"):
        load_lavis(path, stage1_model.config)
    with pytest.raises(FileNotFoundError, match="no LAVIS checkpoint"):
        load_lavis(tmp_path / "missing.pth", stage1_model.config)
