"""transformers' `Blip2VisionModel` as BLIP-2's image encoder: the layout of the official
Salesforce/blip2-* checkpoints (EVA-CLIP ViT-g, 39 of its 40 blocks stored).

Shapes: B batch, N image tokens ([CLS] + patches), D_v tower width.
"""

from __future__ import annotations

from torch import Tensor, nn

from ...config import CLIP_MEAN, CLIP_STD, VisionConfig
from .base import ImageEncoder, absolute_index, square

__all__ = ["HFBlip2ImageEncoder"]


class HFBlip2ImageEncoder(ImageEncoder):
    """transformers' `Blip2VisionModel`, tokens from encoder layer `layer_index`.

    The HF checkpoints already dropped EVA-CLIP-g's last block (39 of 40 are stored), so
    the default is their last layer, -1. The output is taken *before* `post_layernorm`:
    those weights are BLIP-2's trainable `ln_vision` (LAVIS name), which the model owns, so
    here `post_layernorm` becomes an Identity and a loader maps
    `vision_model.post_layernorm.*` -> `ln_vision.*`. Layers after `layer_index` are
    dropped. Submodule names match HF (`vision_model.embeddings`, `vision_model.encoder.
    layers.i`), so checkpoint keys load unchanged. The model is modified in place.
    """

    def __init__(self, vision_model: nn.Module, layer_index: int = -1,
                 mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD):
        from transformers import Blip2VisionModel

        if not isinstance(vision_model, Blip2VisionModel):
            raise TypeError(f"HFBlip2ImageEncoder needs a transformers Blip2VisionModel, "
                            f"got {type(vision_model).__name__}")
        hf = vision_model.config
        image_size = square(hf.image_size, "images")
        grid = image_size // square(hf.patch_size, "patches")
        super().__init__(width=hf.hidden_size, num_tokens=grid * grid + 1, image_size=image_size,
                         mean=mean, std=std)
        layers = vision_model.encoder.layers
        self.block_index = absolute_index(layer_index, len(layers), "Blip2VisionModel")
        # (vision_model.config is left as is: it may be shared with a parent Blip2Config.)
        vision_model.encoder.layers = layers[: self.block_index + 1]
        vision_model.post_layernorm = nn.Identity()
        self.vision_model = vision_model

    def set_gradient_checkpointing(self, enabled: bool = True) -> "HFBlip2ImageEncoder":
        # transformers' switch (renamed activation_checkpointing_* in 5.2x; older 5.x has the
        # gradient_checkpointing_* names); its layers checkpoint only in training mode.
        vm = self.vision_model
        if enabled and hasattr(vm, "activation_checkpointing_enable"):
            vm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif enabled:
            vm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        elif vm.is_gradient_checkpointing:
            getattr(vm, "activation_checkpointing_disable", vm.gradient_checkpointing_disable)()
        return self

    def _encode(self, pixels: Tensor) -> Tensor:
        h = self.vision_model.embeddings(pixels)  # (B, N, D_v): [CLS] + patches + positions
        return self.vision_model.encoder(inputs_embeds=h).last_hidden_state  # (B, N, D_v)

    @classmethod
    def from_config(cls, cfg: VisionConfig) -> "HFBlip2ImageEncoder":
        """A randomly initialised Blip2VisionModel shaped by `cfg` (weights from a loader)."""
        from transformers import Blip2VisionConfig, Blip2VisionModel

        hf = Blip2VisionConfig(
            hidden_size=cfg.width,
            intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.layers,
            num_attention_heads=cfg.heads,
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
            layer_norm_eps=cfg.layer_norm_eps,
            qkv_bias=True,  # EVA-CLIP's q_bias / v_bias, as in every official checkpoint
        )
        return cls(Blip2VisionModel(hf), layer_index=cfg.layer_index, mean=cfg.mean, std=cfg.std)
