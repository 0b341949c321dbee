"""The boxes of BLIP-2's Figure 2, one file each, with fresh weights (no file is read here):

    image_encoder/   the frozen image encoder (ViTs from open_clip or transformers, a timm CNN)
    qformer.py       the Querying Transformer: learned queries, one self-attention over
                     [queries ; text] under the three masks, cross-attention to the image
    llm_bridge.py    the fully-connected projection into the frozen LLM and the LLM itself
    blip2.py         the whole model: stage 1's ITC / ITM / ITG, stage 2's generative loss
    losses.py        the losses, pure functions returning named `*_loss` tensors
    speedups.py      what makes it fast without changing a result, each piece switchable

Pretrained parts and checkpoints come in through `blip2lab.formats` (which imports this
package; this package imports no format).
"""

from .blip2 import Blip2, ImageFeatures, TextFeatures
from .image_encoder import ImageEncoder, build_image_encoder
from .llm_bridge import LanguageModel, llm_kind
from .qformer import QFormer, QFormerOutput, attention_mask
from .speedups import ImageKV, RowPlan, Speedups

__all__ = ["Blip2", "ImageFeatures", "TextFeatures", "ImageEncoder", "build_image_encoder", "LanguageModel",
           "llm_kind", "QFormer", "QFormerOutput", "attention_mask", "ImageKV", "RowPlan", "Speedups"]
