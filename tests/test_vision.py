"""The frozen image encoder: shapes, which block's tokens, parity with the unwrapped
towers (open_clip, timm via open_clip, transformers' Blip2VisionModel), freezing, the
preprocess transform and input validation. Tiny towers, CPU only."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image
from torch import nn

from blip2lab.config import ConfigError, VisionConfig
from blip2lab.formats.hf import vision_config_from_hf
from blip2lab.model.image_encoder import HFBlip2ImageEncoder, ImageEncoder, OpenClipImageEncoder, build_image_encoder

S, P, D, L, H = 32, 8, 32, 3, 4  # image size, patch, width, layers, heads
N = (S // P) ** 2 + 1  # 17 tokens: 16 patches + [CLS]


def tiny_cfg(**kw) -> VisionConfig:
    return VisionConfig(**{"image_size": S, "patch_size": P, "width": D, "layers": L, "heads": H, **kw})


def pixels(B: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, 3, S, S, generator=torch.Generator().manual_seed(seed))


def open_clip_visual():
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(image_size=S, patch_size=P, width=D, layers=L, heads=H, mlp_ratio=4.0, output_dim=D)


def hf_vision_model():
    from transformers import Blip2VisionConfig, Blip2VisionModel

    torch.manual_seed(0)
    model = Blip2VisionModel(Blip2VisionConfig(hidden_size=D, intermediate_size=4 * D, num_hidden_layers=L,
                                               num_attention_heads=H, image_size=S, patch_size=P))
    with torch.no_grad():  # non-zero q/v biases, so the qkv bias layout is exercised too
        for layer in model.encoder.layers:
            layer.self_attn.qkv.bias.normal_()
    return model.eval()


# ---------------------------------------------------------------------------------------
# open_clip backend
# ---------------------------------------------------------------------------------------


def test_open_clip_tokens_are_second_to_last_block_by_hand():
    visual = open_clip_visual()
    ref = copy.deepcopy(visual).eval()
    enc = OpenClipImageEncoder(visual).freeze()  # layer_index=-2
    x = pixels()
    out = enc(x)
    assert out.shape == (2, N, D) and enc.num_tokens == N and enc.width == D

    with torch.no_grad():  # embeddings + all blocks but the last, no ln_post
        h = ref._embeds(x)  # (B, N, D_v)
        assert ref.transformer.batch_first
        for blk in ref.transformer.resblocks[:-1]:
            h = blk(h)
    torch.testing.assert_close(out, h)


def test_open_clip_layer_choice_and_pruning():
    x = pixels()
    last = OpenClipImageEncoder(open_clip_visual(), layer_index=-1).freeze()
    second = OpenClipImageEncoder(open_clip_visual(), layer_index=-2).freeze()
    assert not torch.allclose(last(x), second(x))
    # the blocks after the chosen one, the final norm and the head are gone
    assert len(second.visual.transformer.resblocks) == L - 1
    assert len(last.visual.transformer.resblocks) == L
    assert isinstance(second.visual.ln_post, nn.Identity) and second.visual.proj is None
    # a positive index means the same block
    third = OpenClipImageEncoder(open_clip_visual(), layer_index=L - 2).freeze()
    torch.testing.assert_close(third(x), second(x))
    with pytest.raises(ValueError, match="layer_index 3 is outside"):
        OpenClipImageEncoder(open_clip_visual(), layer_index=L)


def test_open_clip_from_config_custom_tower():
    enc = OpenClipImageEncoder.from_config(tiny_cfg(mlp_dim=48, layer_norm_eps=1e-6))
    assert enc.visual.transformer.resblocks[0].mlp.c_fc.out_features == 48
    assert enc.visual.ln_pre.eps == 1e-6
    assert len(enc.visual.transformer.resblocks) == L - 1  # cfg.layer_index defaults to -2
    assert enc(pixels()).shape == (2, N, D)


def test_open_clip_named_model_geometry_is_checked():
    with pytest.raises(ConfigError, match="vision.image_size"):  # checked before building
        OpenClipImageEncoder.from_config(tiny_cfg(model_name="ViT-B-32"))
    with pytest.raises(ConfigError, match="vision.model_name"):
        OpenClipImageEncoder.from_config(tiny_cfg(model_name="no-such-model"))
    # ViT-S-32: 224 px, patch 32, width 384, 12 blocks; a mismatching width is named
    vit_s = dict(model_name="ViT-S-32", image_size=224, patch_size=32, width=384, layers=12, heads=6)
    with pytest.raises(ConfigError, match="vision.width is 768 .* has 384"):
        OpenClipImageEncoder.from_config(VisionConfig(**{**vit_s, "width": 768, "heads": 12}))
    enc = OpenClipImageEncoder.from_config(VisionConfig(**vit_s))
    assert (enc.width, enc.num_tokens, len(enc.visual.transformer.resblocks)) == (384, 50, 11)
    assert enc(torch.randn(1, 3, 224, 224)).shape == (1, 50, 384)


def test_open_clip_model_preprocess_cfg_is_read():
    holder = nn.Module()
    holder.visual = open_clip_visual()
    holder.visual.preprocess_cfg = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    enc = OpenClipImageEncoder.from_open_clip_model(holder, layer_index=-1)
    assert enc.mean == (0.5, 0.5, 0.5) and enc.std == (0.25, 0.25, 0.25)
    plain = OpenClipImageEncoder.from_open_clip_model(open_clip_visual())  # no preprocess_cfg: CLIP's
    assert plain.mean == VisionConfig().mean


def test_open_clip_timm_eva_tower_matches_trunk(monkeypatch):
    # open_clip's EVA01-g-14 (BLIP-2's EVA-CLIP ViT-g) is a TimmModel around timm's
    # `eva_giant_patch14_224`; build that same adapter and class, shrunk to tiny sizes.
    import timm
    from open_clip import timm_model

    create, tiny = timm.create_model, dict(img_size=S, patch_size=P, embed_dim=D, depth=L, num_heads=H)
    monkeypatch.setattr(timm_model.timm, "create_model", lambda name, **kw: create(name, **{**kw, **tiny}))
    torch.manual_seed(0)
    visual = timm_model.TimmModel("eva_giant_patch14_224", embed_dim=D, image_size=S, pool="token", proj=None)
    assert type(visual.trunk).__name__ == "Eva"
    ref = copy.deepcopy(visual).eval()
    enc = OpenClipImageEncoder(visual).freeze()
    assert (enc.width, enc.num_tokens, len(enc.visual.trunk.blocks)) == (D, N, L - 1)
    out = enc(pixels())
    with torch.no_grad():
        patches, prefix = ref.trunk.forward_intermediates(pixels(), indices=[L - 2], intermediates_only=True,
                                                          output_fmt="NLC", return_prefix_tokens=True)[0]
    torch.testing.assert_close(out, torch.cat([prefix, patches], dim=1))  # (B, 1 + grid^2, D_v)


def test_open_clip_non_vit_tower_is_a_type_error():
    from open_clip.modified_resnet import ModifiedResNet

    with pytest.raises(TypeError, match="ModifiedResNet"):
        OpenClipImageEncoder(ModifiedResNet(layers=(1, 1, 1, 1), output_dim=32, heads=4, image_size=64, width=8))


# ---------------------------------------------------------------------------------------
# transformers backend
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layer_index", [-1, -2])
def test_hf_tokens_match_hidden_states_before_post_layernorm(layer_index):
    model = hf_vision_model()
    ref = copy.deepcopy(model)
    enc = HFBlip2ImageEncoder(model, layer_index=layer_index).freeze()
    x = pixels()
    with torch.no_grad():
        hidden = ref(x, output_hidden_states=True).hidden_states  # pre-post_layernorm, one per layer
    out = enc(x)
    assert out.shape == (2, N, D)
    torch.testing.assert_close(out, hidden[layer_index])
    assert len(enc.vision_model.encoder.layers) == L + 1 + layer_index
    assert isinstance(enc.vision_model.post_layernorm, nn.Identity)  # its weights belong to ln_vision


def test_hf_from_config_and_vision_config_from_hf():
    enc = HFBlip2ImageEncoder.from_config(tiny_cfg(layer_index=-1, layer_norm_eps=1e-5))
    hf = enc.vision_model.config
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.qkv_bias) == (D, L, H, True)
    assert enc.vision_model.encoder.layers[0].layer_norm1.eps == 1e-5
    cfg = vision_config_from_hf(hf)
    assert (cfg.backend, cfg.width, cfg.layers, cfg.heads, cfg.intermediate_size) == ("hf_blip2", D, L, H, 4 * D)
    assert cfg.layer_index == -1 and cfg.ln_vision_eps == hf.layer_norm_eps == 1e-5
    assert build_image_encoder(cfg)(pixels()).shape == (2, N, D)


def test_hf_wrong_model_is_a_type_error():
    with pytest.raises(TypeError, match="Blip2VisionModel"):
        HFBlip2ImageEncoder(open_clip_visual())


# ---------------------------------------------------------------------------------------
# freezing, preprocessing, validation (backend-independent)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["open_clip", "hf_blip2"])
def test_freeze_is_sticky_and_idempotent(backend):
    enc = build_image_encoder(tiny_cfg(backend=backend))
    assert enc.frozen and isinstance(enc, ImageEncoder)
    assert all(not p.requires_grad for p in enc.parameters())
    parent = nn.Sequential(enc)
    parent.train()
    assert all(not m.training for m in enc.modules())
    enc.freeze().freeze()
    assert enc.frozen and not enc.training
    assert enc(pixels()).grad_fn is None

    enc.unfreeze().train()
    assert all(p.requires_grad for p in enc.parameters()) and all(m.training for m in enc.modules())
    assert enc(pixels()).grad_fn is not None


def test_frozen_tower_in_lower_precision_takes_float_pixels():
    enc = build_image_encoder(tiny_cfg()).to(torch.bfloat16)
    assert enc(pixels()).dtype == torch.bfloat16


@pytest.mark.parametrize("mode,size", [("RGBA", (50, 40)), ("L", (20, 70)), ("RGB", (S, S))])
def test_any_pil_image_through_the_processor(mode, size):
    from blip2lab.processor import ImageTransform

    enc = build_image_encoder(tiny_cfg())
    image = Image.new(mode, size, color=128 if mode == "L" else (200, 100, 50, 255)[: len(mode)])
    x = ImageTransform(enc.image_size, enc.mean, enc.std)(image)
    assert x.shape == (3, S, S) and x.dtype == torch.float32
    assert enc(x[None]).shape == (1, N, D)


@pytest.mark.parametrize("bad,message", [
    (torch.zeros(1, 2, 3, S, S), "4-D tensor"),
    (torch.zeros(2, 4, S, S), "expected 3 channels (RGB), got 4"),
    (torch.zeros(2, 3, 24, S), f"expected {S}x{S} pixels, got 24x{S}; use Blip2Processor.images()"),
    (torch.zeros(0, 3, S, S), "empty batch"),
    (torch.zeros(2, 3, S, S, dtype=torch.uint8), "floating-point"),
])
def test_bad_pixels_are_named(bad, message):
    enc = build_image_encoder(tiny_cfg())
    with pytest.raises(ValueError) as err:
        enc(bad)
    assert message in str(err.value)
