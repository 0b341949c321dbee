"""Fine-tuning at another image size than the model was pre-trained at (`model.image_size`):
the paper fine-tunes at 364 px a model pre-trained at 224 (Sec. 4, Table 7), and LAVIS does
it by interpolating the ViT's position embeddings when it loads the tower
(`interpolate_pos_embed`).

Here the tower is rebuilt from its config at the new size (so it is exactly what
`blip2lab.load` builds when it reopens the saved folder) and the old tower's weights are
put in it: every tensor as it was, except the position embeddings, which move to the new
patch grid (bicubic, [CLS] kept: `image_encoder.interpolate_pos_embed`). Any other tensor
whose shape depends on the size is an error naming it. The model's own image-position
embedding (`Blip2Config.image_pos_embed`, a deviation), one row per image token, is
interpolated the same way. The Q-Former needs nothing: its cross-attention reads any
number of image tokens. The config says the new size and where it came from
(`vision.resized_from`).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..config import ConfigError, VisionConfig
from ..model import Blip2
from ..model.image_encoder import POS_EMBED_NAMES, ImageEncoder, build_image_encoder, interpolate_pos_embed
from ..processor import Blip2Processor

__all__ = ["resized_vision", "at_image_size"]


def resized_vision(vision: VisionConfig, size: int) -> VisionConfig:
    """`vision` at image size `size`, remembering the size its tower was pre-trained at
    (VisionConfig validates the new size: a multiple of the patch size)."""
    if size == vision.image_size:
        return vision
    origin = vision.resized_from or vision.image_size
    return replace(vision, image_size=size, resized_from=None if size == origin else origin)


def at_image_size(model: Blip2, proc: Blip2Processor, size: int) -> tuple[Blip2, Blip2Processor]:
    """`model` (in place) and a processor for images of `size` px (see the module docstring)."""
    old = model.config.vision
    new = resized_vision(old, size)
    if new is old:
        return model, proc
    model.image_encoder = _rebuilt_tower(model.image_encoder, old, new)
    if model.image_pos is not None:  # (N, D_v): [CLS] + the grid, like the tower's own table
        pos = interpolate_pos_embed(model.image_pos.detach(), old.grid_size, new.grid_size)
        model.image_pos = nn.Parameter(pos, requires_grad=model.image_pos.requires_grad)
    model.config = replace(model.config, vision=new)
    proc = Blip2Processor.from_config(model.config, proc.qformer_tokenizer, proc.llm_tokenizer, check=False,
                                      llm_max_len=proc.llm_max_len, max_pixels=proc.max_pixels,
                                      max_question_chars=proc.max_question_chars)
    return model, proc


def _rebuilt_tower(tower: ImageEncoder, old: VisionConfig, new: VisionConfig) -> ImageEncoder:
    """The tower built from `new` with `tower`'s weights, the position embeddings interpolated.
    Built on the meta device and filled by assignment: the old tensors move over, so the
    tower (EVA ViT-g: 1B parameters) is never held twice."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):  # parameters on meta; buffers (not all saved) real
        built = build_image_encoder(new)
    state, target = tower.state_dict(), built.state_dict()
    for key, value in state.items():
        if key not in target or target[key].shape == value.shape:
            continue  # a key the new tower lacks: load_state_dict below names it
        if key.rsplit(".", 1)[-1] not in POS_EMBED_NAMES:
            raise ConfigError(f"model.image_size={new.image_size}: the tower's {key} {tuple(value.shape)} depends on "
                              f"the image size ({tuple(target[key].shape)} at {new.image_size} px) and is no position "
                              f"embedding that could be interpolated")
        state[key] = interpolate_pos_embed(value, old.grid_size, new.grid_size)
    with torch.no_grad():
        built.load_state_dict(state, strict=True, assign=True)
    if new.gradient_checkpointing:
        built.set_gradient_checkpointing(True)
    return built.freeze()
