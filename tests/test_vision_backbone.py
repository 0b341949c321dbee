"""The shapes-world image encoder (blip2lab/worlds/shapes/vision_backbone.py): its tower has the
layout a Blip2 model expects, the shipped weights load offline and pass their gate on a
small slice, and the pretraining recipe's code path lowers the loss."""

import json
from dataclasses import replace

import pytest
import torch
from conftest import tiny_config

from blip2lab.config import Blip2Config
from blip2lab.formats.keys import load_strict
from blip2lab.model.blip2 import Blip2
from blip2lab.model.image_encoder import OpenClipImageEncoder
from blip2lab.worlds.shapes.vision_backbone import (
    CELLS,
    DEFAULT_DIR,
    SHAPES_VISION_CONFIG,
    ParseBatches,
    build_tower,
    cell_pooling,
    linear_probe,
    load_shapes_vision,
    pretrain_vision,
    scene_labels,
    vision_state_for_blip2,
)
from blip2lab.worlds.shapes.world import Scene, make_split, place_object

SHIPPED = DEFAULT_DIR


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny CPU workloads on a shared 2-core machine: a second thread only adds contention.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def test_tower_has_the_layout_of_from_config(monkeypatch):
    # Capture the tower from_config builds before OpenClipImageEncoder prunes it.
    seen = {}
    original = OpenClipImageEncoder.__init__

    def spy(self, visual, *args, **kwargs):
        seen["unpruned"] = _shapes(visual.state_dict())
        original(self, visual, *args, **kwargs)

    monkeypatch.setattr(OpenClipImageEncoder, "__init__", spy)
    reference = OpenClipImageEncoder.from_config(SHAPES_VISION_CONFIG)
    monkeypatch.undo()
    tower = build_tower(SHAPES_VISION_CONFIG)
    assert _shapes(tower.state_dict()) == seen["unpruned"]
    pruned = OpenClipImageEncoder(tower, layer_index=SHAPES_VISION_CONFIG.layer_index)
    assert _shapes(pruned.state_dict()) == _shapes(reference.state_dict())
    assert pruned.num_tokens == SHAPES_VISION_CONFIG.num_tokens == 65


def test_shipped_weights_load_into_blip2():
    encoder = load_shapes_vision(SHIPPED)  # offline: a folder, no hub
    assert encoder.frozen and not any(p.requires_grad for p in encoder.parameters())
    config = Blip2Config(vision=SHAPES_VISION_CONFIG, qformer=replace(tiny_config().qformer), embed_dim=16)
    model = Blip2(config)
    state = vision_state_for_blip2(SHIPPED)
    assert set(state) == {k for k in model.state_dict() if k.startswith("image_encoder.")}
    load_strict(model, {**model.state_dict(), **state})  # every key named, shapes asserted
    pixels = torch.randn(2, 3, 64, 64)
    assert torch.equal(model.image_encoder(pixels), encoder(pixels))  # (2, 65, 128)
    assert encoder(pixels).shape == (2, 65, 128)


def test_shipped_encoder_passes_its_gate_on_a_small_slice():
    recipe = json.loads((SHIPPED / "recipe.json").read_text())
    # The recorded gate used 4,000 train / 1,000 test scenes; a quarter of that is enough to
    # check the shipped weights still pass it (below 1,000 train scenes the probe overfits).
    probe = linear_probe(load_shapes_vision(SHIPPED), n_train=1500, n_test=300)
    for name in ("occupancy", "shape", "color", "size"):
        assert probe["seen"][name] >= recipe["probe"]["seen"][name] - 0.05, (name, probe["seen"], recipe["probe"])
        assert probe["seen"][name] >= 0.95, (name, probe["seen"])
    for name in ("shape", "color", "size"):  # held-out combinations: report, and do not regress
        assert probe["novel"][name] >= recipe["probe"]["novel"][name] - 0.05, (name, probe["novel"], recipe["probe"])


def test_cell_pooling_table():
    # 64 px, patch 8: patch centres x = 4, 12, ..., 60; columns split at 21.3 and 42.7 px,
    # rows at 32 px. Patch column j goes to left (j <= 2), middle (3, 4), right (5..7).
    pool = cell_pooling(64, 8)  # (C, 64)
    cell_of_patch = pool.argmax(0).view(8, 8)
    expected_row = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    for r in range(8):
        assert torch.equal(cell_of_patch[r], expected_row + (3 if r >= 4 else 0))
    assert torch.allclose(pool.sum(1), torch.ones(6))


def test_scene_labels_by_hand():
    scene = Scene(objects=[place_object("triangle", "red", "large", "bottom", "middle"),
                           place_object("circle", "orange", "small", "top", "left")])
    labels = scene_labels([scene])
    assert CELLS[0] == ("top", "left") and CELLS[4] == ("bottom", "middle")
    assert labels["shape"].tolist() == [[1, 0, 0, 0, 3, 0]]  # none, circle, square, triangle
    assert labels["color"].tolist() == [[6, 0, 0, 0, 1, 0]]  # none, red, green, blue, yellow, purple, orange
    assert labels["size"].tolist() == [[1, 0, 0, 0, 2, 0]]  # none, small, large


def test_batches_are_the_train_split():
    data = ParseBatches(batch_size=4, seed=0)
    batch = data(1)
    assert batch["pixels"].shape == (4, 3, 64, 64) and batch["shape"].shape == (4, 6)
    scenes = make_split("train", 8, 0)[4:]
    assert torch.equal(batch["shape"], scene_labels(scenes)["shape"])
    assert data.scenes(0, 2) == make_split("train", 2, 0)  # replays the past


@pytest.mark.parametrize("cell_bias", [True, False])
def test_twenty_pretraining_steps_lower_the_loss(tmp_path, cell_bias):
    tiny = replace(SHAPES_VISION_CONFIG, width=32, layers=2, heads=2, mlp_dim=64)
    recipe = pretrain_vision(tmp_path, steps=20, batch_size=16, lr=3e-3, warmup_steps=2, cfg=tiny, probe=False,
                             log_every=1, cell_bias=cell_bias)
    assert f"cell_bias={cell_bias}" in recipe["call"]
    losses = [row["loss"] for row in recipe["curve"]]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "recipe.json").is_file()
    encoder = load_shapes_vision(tmp_path)
    assert encoder(torch.randn(1, 3, 64, 64)).shape == (1, 65, 32)


def test_shipped_tokens_tell_learned_queries_where_things_are():
    """What the Q-Former needs from the frozen tokens: 8 learned queries and one
    cross-attention layer (no position of their own) must read which shape sits in each cell.
    The tower pretrained with a per-cell attention bias in its heads stayed at the "none"
    prior (0.67); the shipped one (no bias) reaches 0.99 in 300 steps."""
    import random

    from blip2lab.worlds.shapes.world import SHAPES, render_batch, sample_scene

    torch.manual_seed(0)
    encoder = load_shapes_vision(SHIPPED)
    rng = random.Random(5)
    scenes = [sample_scene(rng) for _ in range(2500)]
    labels = torch.zeros(len(scenes), 6, dtype=torch.long)  # (n, cells): 0 empty, 1 + shape index
    for i, scene in enumerate(scenes):
        for o in scene.objects:
            labels[i, o.cell[0] * 3 + o.cell[1]] = 1 + SHAPES.index(o.shape)
    mean, std = torch.tensor(encoder.mean).view(1, 3, 1, 1), torch.tensor(encoder.std).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = torch.cat([encoder((torch.from_numpy(render_batch(scenes[i:i + 250])).permute(0, 3, 1, 2) / 255
                                     - mean) / std) for i in range(0, len(scenes), 250)])  # (n, 65, 128)
    tokens = torch.nn.functional.layer_norm(tokens, tokens.shape[-1:])
    queries = torch.nn.Parameter(torch.randn(8, 128) * 0.08)
    attn = torch.nn.MultiheadAttention(128, 4, batch_first=True)
    head = torch.nn.Linear(8 * 128, 6 * 4)

    def read(x):
        out, _ = attn(queries.expand(len(x), -1, -1), x, x)  # (B, 8, 128)
        return head(out.flatten(1)).view(-1, 6, 4)

    opt = torch.optim.AdamW([queries, *attn.parameters(), *head.parameters()], 1e-3)
    for _ in range(300):
        idx = torch.randint(0, 2000, (64,))
        loss = torch.nn.functional.cross_entropy(read(tokens[idx]).flatten(0, 1), labels[idx].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = (read(tokens[2000:]).argmax(-1) == labels[2000:]).float().mean().item()
    assert accuracy >= 0.9, accuracy
