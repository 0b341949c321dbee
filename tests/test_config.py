"""Typed configuration: derived values, JSON round trip, --a.b=value overrides, errors."""

import json
from dataclasses import dataclass, field

import pytest

from blip2lab.config import (
    Blip2Config,
    ConfigError,
    QFormerConfig,
    TrainConfig,
    VisionConfig,
    apply_overrides,
    from_dict,
    from_preset,
    load_json,
    save_json,
    to_dict,
)


@dataclass
class RunConfig:
    """Any nesting of configs takes the same overrides (the recipes' presets, the train command)."""

    model: Blip2Config = field(default_factory=Blip2Config)
    train: TrainConfig = field(default_factory=TrainConfig)


def test_derived_values_follow_their_inputs():
    q = QFormerConfig(hidden_size=64, num_heads=4)
    assert q.ffn_size == 256 and q.head_dim == 16  # computed, not a stale default
    assert QFormerConfig(hidden_size=64, num_heads=4, intermediate_size=100).ffn_size == 100
    assert QFormerConfig().cross_attention_layers == [0, 2, 4, 6, 8, 10]
    v = VisionConfig()
    assert v.num_tokens == 257 and v.intermediate_size == 4 * 1408
    assert VisionConfig(image_size=364).num_tokens == 677  # the 364 px fine-tuning size of the paper
    assert VisionConfig(layers=40, layer_index=-2).used_layers == 39


def test_json_round_trip(tmp_path):
    cfg = apply_overrides(RunConfig(), ["--train.lr=3e-4", "--model.qformer.num_queries=8"])
    save_json(cfg, tmp_path / "c.json")
    assert load_json(RunConfig, tmp_path / "c.json") == cfg
    assert json.loads((tmp_path / "c.json").read_text())["train"]["betas"] == [0.9, 0.98]


def test_overrides_parse_by_declared_type():
    cfg = apply_overrides(RunConfig(), [
        "--train.lr=3e-4", "--train.max_steps=10", "--train.losses=itc,itm", "--train.betas=[0.9,0.999]",
        "--train.grad_clip=none", "--model.vision.model_name=ViT-B-16", "--model.qformer.init_from=/tmp/bert",
        "--train.stage=2", "--model.temp_init=0.1",
    ])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.max_steps, int)
    assert cfg.train.losses == ("itc", "itm") and cfg.train.betas == (0.9, 0.999)
    assert cfg.train.grad_clip is None and cfg.model.vision.model_name == "ViT-B-16"
    assert cfg.train.stage == 2 and cfg.model.temp_init == 0.1


@pytest.mark.parametrize("arg, words", [
    ("--train.lrr=1", ["train.lrr", "lr"]),  # unknown key, with the known ones listed
    ("--model.qformer.nope=1", ["model.qformer.nope"]),
    ("--train.lr.x=1", ["train.lr.x"]),
    ("--train.lr=abc", ["train.lr", "float"]),  # mistyped
    ("--train.max_steps=1.5", ["train.max_steps", "int"]),
    ("--model.vision.backend=timm", ["model.vision.backend"]),
    ("--train.betas=[0.9]", ["train.betas", "2 values"]),
    ("--model.qformer.num_heads=7", ["qformer.hidden_size", "qformer.num_heads"]),  # validation
    ("--train.losses=itc,mlm", ["train.losses", "mlm"]),
    ("train.lr", ["a.b=value"]),
    ("--=3", ["a.b=value"]),
])
def test_bad_overrides_name_the_problem(arg, words):
    with pytest.raises(ConfigError) as err:
        apply_overrides(RunConfig(), [arg])
    for w in words:
        assert w in str(err.value)


def test_one_syntax_with_or_without_dashes_and_for_presets():
    assert apply_overrides(TrainConfig(), ["lr=3e-4"]) == apply_overrides(TrainConfig(), ["--lr=3e-4"])
    presets = {"small": TrainConfig(max_steps=10), "big": TrainConfig(max_steps=1000)}
    assert from_preset(presets, "small", ["batch_size=8"]) == TrainConfig(max_steps=10, batch_size=8)
    with pytest.raises(ConfigError, match="unknown preset 'medium'; known: \\['big', 'small'\\]"):
        from_preset(presets, "medium")


def test_betas_are_checked():
    with pytest.raises(ConfigError, match="train.betas"):
        TrainConfig(betas=(1.5, -2.0))
    with pytest.raises(ConfigError, match="train.betas"):
        apply_overrides(TrainConfig(), ["betas=[0.9,1.0]"])


def test_from_dict_rejects_unknown_and_mistyped_fields():
    data = to_dict(Blip2Config())
    data["qformer"]["num_querys"] = 8
    with pytest.raises(ConfigError, match="qformer.num_querys"):
        from_dict(Blip2Config, data)
    data = to_dict(Blip2Config())
    data["qformer"]["num_queries"] = "32"
    with pytest.raises(ConfigError, match="qformer.num_queries must be an int"):
        from_dict(Blip2Config, data)


@pytest.mark.parametrize("make, field", [
    (lambda: VisionConfig(image_size=225), "vision.image_size"),
    (lambda: VisionConfig(layer_index=39, layers=39), "vision.layer_index"),
    (lambda: QFormerConfig(num_queries=0), "qformer.num_queries"),
    (lambda: QFormerConfig(vocab_size=100), "qformer.cls_token_id"),
    (lambda: QFormerConfig(hidden_dropout=1.5), "qformer.hidden_dropout"),
    (lambda: TrainConfig(losses=()), "train.losses"),
    (lambda: TrainConfig(lr=1e-5, min_lr=1e-4), "train.min_lr"),
    (lambda: Blip2Config(temp_init=0.9), "temp_max"),
])
def test_validation_names_the_field(make, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        make()
