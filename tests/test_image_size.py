"""Fine-tuning at another image size (`model.image_size`, training/resolution.py): a tiny model
built at 32 px fine-tuned at 48 px has its ViT position embeddings (and its own image-position
embedding) on the new grid, exactly torch's bicubic interpolation of the old one with [CLS]
kept, for transformers' Blip2VisionModel tower and open_clip's; the saved folder reopens at
48 px and captions."""

import pytest
import torch
import torch.nn.functional as F
import train_data as D

import blip2lab
from blip2lab.config import Blip2Config, ConfigError, LLMConfig, QFormerConfig, VisionConfig
from blip2lab.model.image_encoder import OpenClipImageEncoder
from blip2lab.paths import MODELS_DIR
from blip2lab.pipeline import Blip2Pipeline
from blip2lab.training import run as R
from blip2lab.training import sources

BERT, OPT = str(MODELS_DIR / "backbones" / "bert"), str(MODELS_DIR / "backbones" / "opt")
POS = {"hf_blip2": "vision_model.embeddings.position_embedding", "open_clip": "visual.positional_embedding"}
D_V = 32


def _reference(pos: torch.Tensor, old: int, new: int) -> torch.Tensor:
    """[CLS] row kept, the old x old grid of the others bicubically resized to new x new."""
    rows = pos.reshape(-1, D_V)  # (1 + old^2, D_v)
    grid = rows[1:].reshape(1, old, old, D_V).permute(0, 3, 1, 2)  # (1, D_v, old, old)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([rows[:1], grid.permute(0, 2, 3, 1).reshape(new * new, D_V)]).reshape(*pos.shape[:-2], -1, D_V)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("size")
    rows = D.write_images(root / "images", D.scenes(4))
    D.write_csv(root / "images" / "captions.csv", rows)
    return root


def _source(root, backend: str):
    """A model built at 32 px (patch 8: a 4 x 4 grid), random position tables, saved."""
    build = Blip2Config(vision=VisionConfig(backend=backend, image_size=32, patch_size=8, width=D_V, layers=2,
                                            heads=4, layer_index=-1),
                        qformer=QFormerConfig(init_from=BERT, num_queries=4),
                        llm=LLMConfig(kind="decoder", name_or_path=OPT), image_pos_embed=True)
    model, proc = sources.fresh(build, None)
    with torch.no_grad():
        model.image_pos.normal_()  # zero at the start: a table worth interpolating
    return model, Blip2Pipeline(model, proc).save(root / f"source-{backend}")


@pytest.mark.parametrize("backend", ["hf_blip2", "open_clip"])
def test_a_32px_model_fine_tuned_at_48px(data, tmp_path, backend):
    source, folder = _source(data, backend)
    pos = source.image_encoder.state_dict()[POS[backend]]
    sets = (f"data.path={data / 'images'}", f"model.source={folder}", "model.image_size=48", f"out={tmp_path / 'out'}",
            "train.max_steps=1", "train.batch_size=2", "progress=false", "data.crop.hflip=false")
    model, proc = R.load_model(R.resolve("finetune", None, sets))
    assert (model.config.vision.image_size, model.config.vision.resized_from, proc.image_size) == (48, 32, 48)
    torch.testing.assert_close(model.image_encoder.state_dict()[POS[backend]], _reference(pos, 4, 6), rtol=0, atol=0)
    torch.testing.assert_close(model.image_pos.detach(), _reference(source.image_pos.detach(), 4, 6), rtol=0, atol=0)
    before = {k: v for k, v in source.image_encoder.state_dict().items() if k != POS[backend]}
    assert all(torch.equal(v, model.image_encoder.state_dict()[k]) for k, v in before.items())
    R.run(R.resolve("finetune", None, sets))
    pipe = blip2lab.load(str(tmp_path / "out"))
    assert pipe.processor.image_size == 48 and pipe.model.image_encoder.num_tokens == 1 + 6 * 6
    # the tower is frozen in the paper's mode: the saved table is the interpolated one
    torch.testing.assert_close(pipe.model.image_encoder.state_dict()[POS[backend]], _reference(pos, 4, 6), rtol=0,
                               atol=0)
    assert isinstance(pipe.caption(str(data / "images" / "img_000.png"), max_new_tokens=3)[0], str)
    with pytest.raises(ConfigError, match="multiple of vision.patch_size"):
        R.load_model(R.resolve("finetune", None, (f"model.source={folder}", "model.image_size=50")))


def test_a_named_open_clip_tower_rebuilds_at_its_fine_tuning_size():
    """What `blip2lab.load` builds for a folder whose named tower was moved to another size."""
    vit_s = dict(model_name="ViT-S-32", patch_size=32, width=384, layers=12, heads=6)
    with pytest.raises(ConfigError, match="vision.image_size"):  # not said to be resized: refused, as before
        OpenClipImageEncoder.from_config(VisionConfig(image_size=256, **vit_s))
    enc = OpenClipImageEncoder.from_config(VisionConfig(image_size=256, resized_from=224, **vit_s))
    assert enc.num_tokens == 1 + 8 * 8 and enc.visual.positional_embedding.shape == (65, 384)
