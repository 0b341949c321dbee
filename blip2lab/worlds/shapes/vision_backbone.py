"""The frozen image encoder of the shapes world: its tower, its pretraining and its gate.

BLIP-2 keeps its image encoder frozen (paper Sec. 3.1), so whatever the captions talk
about must already be in the encoder's tokens. A CLIP-style prototype was the bottleneck
(shared/design/SHAPES_WORLD_NOTES.md, point 1: after 600 CLIP steps a linear probe read
shape at 0.45, size at 0.82). This module pretrains the tower with an objective chosen for
that job, and gates it with a per-cell linear probe before BLIP-2 sees it.

The objective: supervised dense scene parsing, the shapes-world analogue of an
ImageNet-supervised backbone. A caption is a function of the scene's 2x3 grid: for each
cell, whether it holds an object and that object's shape, colour and size (the row and
column are the cell itself). So the tower learns to predict exactly that: six learned
cell queries cross-attend over the tower's tokens (one attention layer, then one linear
classifier per attribute, "none" included). The head is deliberately weak - attention
pooling plus a linear map, the same kind of read-out the Q-Former's cross-attention
does - so the attributes must become (nearly) linearly decodable in the tokens
themselves. A contrastive caption loss would add nothing the parse does not already
supervise, and its text tower costs as much again per step.

Which tokens are supervised: BLIP-2 drops the last block and reads the second-to-last
(`layer_index=-2`). The tower is pretrained at full depth - one head on the final tokens
(normed by the tower's own `ln_post`), as the paper's EVA-CLIP was - plus, by default, a
second head on the `layer_index` tokens that BLIP-2 actually reads (deep supervision, as
GoogLeNet's auxiliary heads), so the gate does not depend on luck in what the penultimate
block happens to keep.

Data: the train split only (`make_split("train", ...)`: no purple triangle, no orange
square), rendered on the fly. One augmentation: a quarter of the images turned greyscale,
their colour labels ignored, so that shape is read from form rather than hue (a run
without it, and without the head's cell bias, left the probe reading the held-out purple
triangles / orange squares' shape at 0.48; with both, 0.88). No geometric augmentation:
flips and shifts would break the cells' meaning. The held-out combinations are the test
of compositional generalisation: the probe reports them apart ("held_out"). A probe
also fitted on novel val scenes reads them at 0.98 (shape) / 0.99 (colour): the
information is in the tokens; what a train-only probe misses is the split's correlation.

Position: the heads once had a learned per-cell attention bias (`cell_bias=True`) that
found each cell for them. The tower then had no reason to keep where a token is in a form
attention can match, and the Q-Former's learned queries - which have no such bias - could
not find positions: one cross-attention layer of 8 learned queries over its layer -2
tokens read each cell's shape at 0.67 (the "none" prior), and a stage-1 Q-Former's query
outputs gave a lone object's cell at 0.45 (probe; ITC chose the right cell of six at 0.21).
Without the bias (the default, `--no-cell-bias` in the shipped recipe) the heads must find
their cells from the tokens, and the same one-layer read-out reaches 0.997. The cost: the
linear probe on held-out colour-shape pairs drops (shape 0.88 -> 0.44), the price of
positions the tokens now carry next to the attributes.

Recipe (models/backbones/vit/recipe.json): 600 steps of batch 128, AdamW 2e-3 cosine to
1e-4, about 9 minutes on one quiet CPU thread (17.6 on a shared one); the probe then reads
every attribute of seen test scenes at >= 0.98.

The gate (`linear_probe`): frozen tower, layer -2 tokens [CLS + patches]. A cell's feature
is [CLS ; mean of the patch tokens whose centre lies in the cell] - a fixed linear
pooling, so the probe is a linear map of the token set - standardised, then one
logistic regression per (cell, attribute), fitted with full-batch Adam on train scenes
and scored on test scenes: occupancy on every cell, shape / colour / size on occupied
cells, "object" when all three are right.

Shapes: B batch, N image tokens (1 + 64 at 64 px / patch 8), D_v tower width,
C cells (6), K classes of an attribute, F probe features (2 D_v).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from blip2lab.config import TrainConfig, VisionConfig, load_json, save_json, to_dict
from blip2lab.formats.keys import load_strict
from blip2lab.images import ImageTransform
from blip2lab.model.image_encoder import OpenClipImageEncoder, build_open_clip_tower
from blip2lab.paths import MODELS_DIR
from blip2lab.worlds.shapes.world import (
    COLORS,
    COLUMNS,
    HELD_OUT,
    ROWS,
    SHAPES,
    SIZES,
    Scene,
    iter_split,
    make_split,
    render_batch,
)

__all__ = [
    "SHAPES_VISION_CONFIG", "DEFAULT_DIR", "ATTRIBUTES", "CELLS",
    "build_tower", "scene_labels", "ParseBatches", "CellParseHead", "SceneParser",
    "pretrain_vision", "save_tower", "load_tower", "load_shapes_vision", "vision_state_for_blip2",
    "encode_scenes", "cell_features", "linear_probe",
]

# 64 px / patch 8 = 8x8 patches + [CLS] = 65 tokens; width 128, 5 blocks of which BLIP-2
# runs 4 (layer_index=-2): 1.04M parameters stored, 0.83M of them used. Width, patch and image size
# follow the prototype (SHAPES_WORLD_NOTES.md); one block more than its 4 so that BLIP-2
# still reads four blocks after pruning the last.
SHAPES_VISION_CONFIG = VisionConfig(image_size=64, patch_size=8, width=128, layers=5, heads=4, mlp_dim=512,
                                    layer_index=-2)
DEFAULT_DIR = MODELS_DIR / "backbones" / "vit"
WEIGHTS_NAME, CONFIG_NAME, RECIPE_NAME = "model.safetensors", "config.json", "recipe.json"

# What a caption says about each cell; index 0 is "no object here".
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": ("none", *SHAPES),
    "color": ("none", *COLORS),
    "size": ("none", *SIZES),
}
CELLS: tuple[tuple[str, str], ...] = tuple((r, c) for r in ROWS for c in COLUMNS)  # reading order


# ---------------------------------------------------------------------------------------
# The tower
# ---------------------------------------------------------------------------------------


def build_tower(cfg: VisionConfig = SHAPES_VISION_CONFIG) -> nn.Module:
    """The full (unpruned) open_clip `VisionTransformer`, built with exactly the arguments
    `OpenClipImageEncoder.from_config(cfg)` uses, so its weight names and shapes are the
    ones a `Blip2` built from `cfg` holds (before that prunes the blocks after layer_index)."""
    if cfg.backend != "open_clip" or cfg.model_name is not None:
        raise ValueError("build_tower builds the custom open_clip ViT: need vision.backend='open_clip' "
                         f"and vision.model_name=None, got {cfg.backend!r} / {cfg.model_name!r}")
    return build_open_clip_tower(cfg)


def _normalise(images: np.ndarray, cfg: VisionConfig) -> Tensor:
    """uint8 renders (B, S, S, 3) -> float (B, 3, S, S), through the one image transform."""
    return ImageTransform(cfg.image_size, cfg.mean, cfg.std).normalize(images)


# ---------------------------------------------------------------------------------------
# Data: scenes -> pixels and per-cell labels
# ---------------------------------------------------------------------------------------


def scene_labels(scenes: Sequence[Scene]) -> dict[str, Tensor]:
    """Per-cell class indices, each (B, C) long, index 0 = empty cell."""
    labels = {name: torch.zeros(len(scenes), len(CELLS), dtype=torch.long) for name in ATTRIBUTES}
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            c = CELLS.index((obj.row, obj.column))
            for name, classes in ATTRIBUTES.items():
                labels[name][i, c] = classes.index(getattr(obj, name))
    return labels


class ParseBatches:
    """Pretraining data as a pure function of the step (resumable, like `BatchStream`):
    step s gets scenes [s B, (s + 1) B) of the train split's endless, deterministic stream,
    rendered on the fly (~4,000 images/s, a few % of a step).

    `grey`: the fraction of images turned to greyscale (ITU-R 601 luma), their colour labels
    ignored (-100) - SimCLR's random-greyscale augmentation. It makes the shape code depend on
    form rather than hue, which is what lets a purple triangle (never in the train split)
    still read as a triangle; it never shows a held-out combination, since a grey image has
    no colour at all."""

    def __init__(self, batch_size: int, seed: int = 0, cfg: VisionConfig = SHAPES_VISION_CONFIG, grey: float = 0.0):
        if not 0.0 <= grey <= 1.0:
            raise ValueError(f"grey must be in [0, 1], got {grey}")
        self.batch_size, self.seed, self.cfg, self.grey = batch_size, seed, cfg, grey
        self._restart()

    def _restart(self) -> None:
        self._stream = iter_split("train", self.seed, image_size=self.cfg.image_size)
        self._base, self._buffer = 0, []  # scenes [base, base + len(buffer)) of the stream

    def scenes(self, start: int, stop: int) -> list[Scene]:
        """Scenes [start, stop) of the train stream (== make_split("train", stop, seed)[start:])."""
        if start < self._base:  # asked for the past (e.g. a resumed run): replay the stream
            self._restart()
        while self._base + len(self._buffer) < stop:
            self._buffer.append(next(self._stream))
        self._buffer = self._buffer[start - self._base:]  # keep memory flat: drop what is behind
        self._base = start
        return self._buffer[: stop - start]

    def __call__(self, step: int) -> dict[str, Tensor]:
        scenes = self.scenes(step * self.batch_size, (step + 1) * self.batch_size)
        images, labels = render_batch(scenes), scene_labels(scenes)  # (B, S, S, 3) uint8; (B, C) each
        if self.grey > 0:
            rng = np.random.default_rng([self.seed, step])  # a pure function of the step
            grey = rng.random(len(scenes)) < self.grey  # (B,)
            luma = images[grey].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # (b, S, S)
            images[grey] = np.round(luma).astype(np.uint8)[..., None]  # (b, S, S, 1) -> broadcast to 3 channels
            labels["color"][torch.from_numpy(grey)] = -100  # cross_entropy's ignore_index
        return {"pixels": _normalise(images, self.cfg), **labels}


# ---------------------------------------------------------------------------------------
# The pretraining model: tower + cell-query parse heads
# ---------------------------------------------------------------------------------------


class CellParseHead(nn.Module):
    """Six learned cell queries cross-attend over the tokens (one attention layer), then one
    linear classifier per attribute. Weak on purpose: the tokens must do the work.

    `cell_bias=True`: a learned attention bias (C, N) starts each query on its own cell's
    patches (and [CLS]); faster at first, but the tokens then need not say where they are
    (see the module docstring). Without it the loss sits near the class prior for ~100 steps
    before the queries find their cells from the tokens."""

    def __init__(self, width: int, heads: int, image_size: int, patch_size: int, norm: Optional[nn.Module] = None,
                 outside_bias: float = -4.0, cell_bias: bool = False):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(len(CELLS), width) * width**-0.5)  # (C, D_v)
        inside = cell_pooling(image_size, patch_size) > 0  # (C, N-1)
        bias = torch.where(inside, 0.0, outside_bias)  # (C, N-1)
        # cell_bias=False: the queries must find their cells from the tokens alone, so the
        # tokens have to carry where they are in a form attention can match - what the
        # Q-Former's learned queries need later (with the bias, the tower's tokens came out
        # position-blind to attention: one cross-attention layer over them read a cell's
        # shape at the "none" prior, 0.67, while tokens + a learned position embedding: 0.99).
        self.cell_bias = (nn.Parameter(torch.cat([torch.zeros(len(CELLS), 1), bias], dim=1))  # (C, N), [CLS] first
                          if cell_bias else None)
        self.norm = norm if norm is not None else nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.classifiers = nn.ModuleDict({name: nn.Linear(width, len(classes)) for name, classes in ATTRIBUTES.items()})

    def forward(self, tokens: Tensor) -> dict[str, Tensor]:
        """tokens (B, N, D_v) -> logits {attribute: (B, C, K)}."""
        kv = self.norm(tokens)  # (B, N, D_v)
        q = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1)  # (B, C, D_v)
        cells, _ = self.attn(q, kv, kv, attn_mask=self.cell_bias, need_weights=False)  # (B, C, D_v)
        return {name: clf(cells) for name, clf in self.classifiers.items()}  # (B, C, K) each


def parse_losses(logits: dict[str, Tensor], labels: dict[str, Tensor],
                 label_smoothing: float = 0.0) -> dict[str, Tensor]:
    """Cross-entropy per attribute over every cell ("none" is a class): {"shape_loss", ...}."""
    return {f"{name}_loss": F.cross_entropy(logits[name].flatten(0, 1), labels[name].flatten(),  # (B C, K), (B C,)
                                            label_smoothing=label_smoothing)
            for name in ATTRIBUTES}


class SceneParser(nn.Module):
    """The full tower and one parse head per supervised block; forward returns the loss dict
    the training loop sums (`shape_loss`, `color_loss`, `size_loss`, averaged over heads)."""

    def __init__(self, cfg: VisionConfig = SHAPES_VISION_CONFIG, supervise: Sequence[int] = (-1, -2),
                 cell_bias: bool = False):
        super().__init__()
        self.cfg = cfg
        self.tower = build_tower(cfg)
        depth = len(self.tower.transformer.resblocks)
        self.blocks = sorted({i % depth for i in supervise})  # absolute block indices
        if not self.blocks:
            raise ValueError("supervise must name at least one block")
        # The final block's head reads through the tower's own ln_post (trained, not left at init).
        self.heads = nn.ModuleDict({
            str(i): CellParseHead(cfg.width, cfg.heads, cfg.image_size, cfg.patch_size,
                                  norm=self.tower.ln_post if i == depth - 1 else None, cell_bias=cell_bias)
            for i in self.blocks})

    def block_tokens(self, pixels: Tensor) -> list[Tensor]:
        """The tokens [CLS + patches] after each supervised block: a list of (B, N, D_v)."""
        out = self.tower.forward_intermediates(pixels, indices=self.blocks, stop_early=True, intermediates_only=True,
                                               output_fmt="NLC", output_extra_tokens=True)
        return [torch.cat([cls, patches], dim=1)  # (B, 1, D_v) + (B, N-1, D_v) -> (B, N, D_v)
                for cls, patches in zip(out["image_intermediates_prefix"], out["image_intermediates"])]

    def forward(self, pixels: Tensor, shape: Tensor, color: Tensor, size: Tensor,
                losses: Sequence[str] = ("parse",), label_smoothing: float = 0.0) -> dict[str, Tensor]:
        """pixels (B, 3, S, S); shape / color / size (B, C) class indices. `losses` is the
        loop's stage switch: this model has the one objective, "parse"."""
        if tuple(losses) != ("parse",):
            raise ValueError(f"SceneParser trains the 'parse' objective only, got losses={tuple(losses)}")
        labels = {"shape": shape, "color": color, "size": size}
        total: dict[str, Tensor] = {}
        for block, tokens in zip(self.blocks, self.block_tokens(pixels)):
            for k, v in parse_losses(self.heads[str(block)](tokens), labels, label_smoothing).items():
                total[k] = total.get(k, 0.0) + v / len(self.blocks)
        return total


# ---------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------


def save_tower(tower: nn.Module, out_dir: str | Path, cfg: VisionConfig = SHAPES_VISION_CONFIG) -> Path:
    """`model.safetensors` (the full tower, open_clip key names) + `config.json` (its VisionConfig)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tower.state_dict().items()}, str(out / WEIGHTS_NAME))
    save_json(cfg, out / CONFIG_NAME)
    return out


def load_tower(path: str | Path = DEFAULT_DIR) -> tuple[nn.Module, VisionConfig]:
    """The full pretrained tower (unpruned, trainable) and its config, strictly loaded."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = load_json(VisionConfig, path / CONFIG_NAME)
    tower = build_tower(cfg)
    load_strict(tower, load_file(str(path / WEIGHTS_NAME)), source=str(path / WEIGHTS_NAME))
    return tower, cfg


def load_shapes_vision(path: str | Path = DEFAULT_DIR) -> OpenClipImageEncoder:
    """The frozen encoder BLIP-2 uses: the pretrained tower pruned after `layer_index` (-2),
    tokens (B, N, D_v) before any final norm. Pass it as `Blip2(config, image_encoder=...)`."""
    tower, cfg = load_tower(path)
    return OpenClipImageEncoder(tower, layer_index=cfg.layer_index, mean=cfg.mean, std=cfg.std).freeze()


def vision_state_for_blip2(path: str | Path = DEFAULT_DIR, prefix: str = "image_encoder.") -> dict[str, Tensor]:
    """The pruned encoder's weights keyed as in a `Blip2` model built from the folder's
    VisionConfig (`image_encoder.visual.*`): `load_strict(blip2.image_encoder, ...)` with
    prefix="" or merge into a full Blip2 state dict with the default prefix."""
    return {prefix + k: v for k, v in load_shapes_vision(path).state_dict().items()}


# ---------------------------------------------------------------------------------------
# Pretraining
# ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_threads(n: Optional[int]):
    """Run with `n` torch threads (None: leave as is), restored after. On 2-core machines
    shared with other jobs, 1 thread avoids oversubscription (2 threads ran 6x slower)."""
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def pretrain_vision(out_dir: str | Path = DEFAULT_DIR, steps: int = 600, seed: int = 0, batch_size: int = 128,
                    lr: float = 2e-3, min_lr: float = 1e-4, warmup_steps: int = 100, weight_decay: float = 0.05,
                    label_smoothing: float = 0.0, supervise: Sequence[int] = (-1, -2), grey: float = 0.25,
                    cfg: VisionConfig = SHAPES_VISION_CONFIG, probe: bool = True, num_threads: Optional[int] = None,
                    log_every: int = 50, command: Optional[str] = None, cell_bias: bool = False) -> dict:
    """Pretrain the tower by scene parsing with blip2lab's training loop, save the tower
    (`model.safetensors`, `config.json`) and `recipe.json` (the call, wall time, steps/s,
    loss curve and, with `probe=True`, the linear-probe gate) into `out_dir`. Returns the
    recipe dict. `num_threads`: torch threads for the run (restored after)."""
    from blip2lab.training.loop import train

    with _torch_threads(num_threads):
        torch.manual_seed(seed)
        model = SceneParser(cfg, supervise=supervise, cell_bias=cell_bias)
        # The loop's TrainConfig names BLIP-2's losses; the backbone's objective goes in through
        # loss_kwargs (which override cfg.losses), so `losses` below is only a placeholder.
        tcfg = TrainConfig(losses=("itc",), lr=lr, min_lr=min_lr, warmup_steps=warmup_steps, max_steps=steps,
                           batch_size=batch_size, weight_decay=weight_decay, seed=seed)
        curve: list[dict] = []
        start = time.perf_counter()

        def on_step(step: int, logs: dict[str, float]) -> None:
            if step % log_every == 0 or step == steps - 1:
                row = {"step": step, "seconds": round(time.perf_counter() - start, 1),
                       **{k: round(v, 4) for k, v in logs.items() if k.endswith("_loss") or k == "loss"}}
                curve.append(row)
                print(json.dumps(row), flush=True)

        history = train(model, ParseBatches(batch_size, seed, cfg, grey=grey), tcfg,
                        loss_kwargs={"losses": ("parse",), "label_smoothing": label_smoothing}, on_step=on_step)
        wall = time.perf_counter() - start
        out = save_tower(model.tower, out_dir, cfg)
        n_params = sum(p.numel() for p in model.tower.parameters())
        recipe = {
            "call": command or (f"pretrain_vision(out_dir={str(out_dir)!r}, steps={steps}, seed={seed}, "
                                f"batch_size={batch_size}, lr={lr}, min_lr={min_lr}, warmup_steps={warmup_steps}, "
                                f"weight_decay={weight_decay}, label_smoothing={label_smoothing}, "
                                f"supervise={tuple(supervise)}, grey={grey}, cell_bias={cell_bias})"),
            "objective": "supervised scene parsing: per cell of the 2x3 grid, shape/color/size (+none), "
                         "cell-query cross-attention heads on blocks " + str(model.blocks)
                         + ("" if cell_bias else ", no per-cell attention bias (the tokens carry position)"),
            "data": f"make_split('train', {steps * batch_size}, seed={seed}) rendered on the fly; "
                    f"a fraction {grey} turned greyscale (colour labels ignored)",
            "seed": seed, "steps": steps, "batch_size": batch_size,
            "optimizer": {"lr": lr, "min_lr": min_lr, "warmup_steps": warmup_steps, "weight_decay": weight_decay,
                          "betas": list(tcfg.betas), "grad_clip": tcfg.grad_clip, "schedule": "linear warm-up, cosine"},
            "vision_config": to_dict(cfg),
            "tower_params": n_params,
            "wall_seconds": round(wall, 1),
            "steps_per_second": round(steps / wall, 3),
            "threads": torch.get_num_threads(),
            "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
            "final_losses": {k: round(v, 4) for k, v in history[-1].items() if k.endswith("_loss") or k == "loss"},
            "curve": curve,
        }
        if probe:
            with torch.no_grad():
                encoder = load_shapes_vision(out)
                t0 = time.perf_counter()
                recipe["probe"] = linear_probe(encoder, seed=seed)
                recipe["probe_seconds"] = round(time.perf_counter() - t0, 1)
        (out / RECIPE_NAME).write_text(json.dumps(recipe, indent=2) + "\n")
        return recipe


# ---------------------------------------------------------------------------------------
# The gate: a per-cell linear probe of the frozen tokens
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def encode_scenes(encoder: OpenClipImageEncoder, scenes: Sequence[Scene], batch_size: int = 250) -> Tensor:
    """Frozen tokens of the scenes, as BLIP-2 sees them: (n, N, D_v)."""
    cfg = replace(SHAPES_VISION_CONFIG, mean=encoder.mean, std=encoder.std)
    chunks = []
    for i in range(0, len(scenes), batch_size):
        pixels = _normalise(render_batch(scenes[i:i + batch_size]), cfg)  # (b, 3, S, S)
        chunks.append(encoder(pixels))  # (b, N, D_v)
    return torch.cat(chunks)


def cell_pooling(image_size: int, patch_size: int) -> Tensor:
    """(C, G*G) weights averaging the patches whose centre lies in each cell."""
    g = image_size // patch_size
    centre = (torch.arange(g) + 0.5) * patch_size  # (G,) pixel centres of patch rows / columns
    row = (centre * len(ROWS) // image_size).long()  # (G,)
    col = (centre * len(COLUMNS) // image_size).long()
    cell = (row[:, None] * len(COLUMNS) + col[None, :]).flatten()  # (G*G,) cell of each patch, row-major
    pool = F.one_hot(cell, len(CELLS)).T.float()  # (C, G*G)
    return pool / pool.sum(dim=1, keepdim=True)


def cell_features(tokens: Tensor, image_size: int, patch_size: int) -> Tensor:
    """tokens (n, N, D_v) -> per-cell features (n, C, 2 D_v): [CLS ; mean of the cell's patches]."""
    pool = cell_pooling(image_size, patch_size)  # (C, N-1)
    cells = torch.einsum("cp,npd->ncd", pool, tokens[:, 1:])  # (n, C, D_v)
    cls = tokens[:, :1].expand(-1, len(CELLS), -1)  # (n, C, D_v)
    return torch.cat([cls, cells], dim=-1)  # (n, C, 2 D_v)


def _probe_targets(labels: dict[str, Tensor]) -> dict[str, Tensor]:
    """The probe's tasks, (n, C) each, -1 = not scored: occupancy on every cell; shape,
    colour and size (without "none") on occupied cells."""
    occupied = labels["shape"] > 0
    targets = {"occupancy": occupied.long()}
    for name in ATTRIBUTES:
        targets[name] = torch.where(occupied, labels[name] - 1, torch.full_like(labels[name], -1))
    return targets


def _fit_probes(x: Tensor, targets: dict[str, Tensor], n_classes: dict[str, int], steps: int, lr: float,
                weight_decay: float) -> dict[str, tuple[Tensor, Tensor]]:
    """One multinomial logistic regression per (cell, task), fitted by full-batch Adam:
    x (n, C, F), targets {task: (n, C), -1 ignored} -> {task: (W (C, F, K), b (C, K))}.
    The tasks share one batched matmul over a concatenated weight (sum K columns) but no
    parameter, so this is the same as fitting each on its own (Adam is per-coordinate)."""
    xc = x.transpose(0, 1).contiguous()  # (C, n, F): one matmul per cell
    width = sum(n_classes.values())
    W = torch.zeros(x.shape[1], x.shape[2], width, requires_grad=True)  # (C, F, sum K)
    b = torch.zeros(x.shape[1], 1, width, requires_grad=True)  # (C, 1, sum K)
    spans, start = {}, 0
    for name, k in n_classes.items():
        spans[name], start = slice(start, start + k), start + k
    opt = torch.optim.Adam([W, b], lr=lr)
    for _ in range(steps):
        logits = torch.baddbmm(b, xc, W)  # (C, n, sum K)
        loss = weight_decay * W.square().sum()
        for name, span in spans.items():
            task_logits = logits[..., span].flatten(0, 1)  # (C n, K)
            loss = loss + F.cross_entropy(task_logits, targets[name].T.flatten(), ignore_index=-1)  # targets (C n,)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {name: (W.detach()[..., span], b.detach()[:, 0, span]) for name, span in spans.items()}


def linear_probe(encoder: OpenClipImageEncoder, n_train: int = 4000, n_test: int = 1000, seed: int = 0,
                 steps: int = 300, lr: float = 0.05, weight_decay: float = 1e-4,
                 split: Literal["val", "test"] = "test") -> dict:
    """The gate: per-cell linear probes of the frozen layer-`layer_index` tokens, fitted on
    `n_train` train scenes, scored on `n_test` seen scenes and `n_test` novel ones of `split`
    ("val" for choosing a recipe, "test" for the record).

    Returns {"seen": {attr: acc}, "novel": {...}, "held_out": {...}, "n": {...}}: "novel" is every
    occupied cell of the novel scenes, "held_out" only the purple triangles and orange
    squares in them. Attributes: occupancy (all cells), shape / color / size (occupied
    cells), object (shape, colour and size all right)."""
    size, patch = encoder.image_size, encoder.image_size // int(round((encoder.num_tokens - 1) ** 0.5))
    splits = {"train": make_split("train", n_train, seed, image_size=size),
              "seen": make_split(split, n_test, seed, image_size=size),
              "novel": make_split(split, n_test, seed, novel=True, image_size=size)}
    feats = {k: cell_features(encode_scenes(encoder, v), size, patch) for k, v in splits.items()}  # (n, C, F)
    mu, sd = feats["train"].mean(dim=(0, 1)), feats["train"].std(dim=(0, 1)) + 1e-6
    feats = {k: (v - mu) / sd for k, v in feats.items()}
    targets = {k: _probe_targets(scene_labels(v)) for k, v in splits.items()}
    held = torch.zeros(n_test, len(CELLS), dtype=torch.bool)  # (n, C): a held-out combination sits here
    for i, scene in enumerate(splits["novel"]):
        for obj in scene.objects:
            held[i, CELLS.index((obj.row, obj.column))] = obj.combo in HELD_OUT

    n_classes = {"occupancy": 2, **{name: len(classes) - 1 for name, classes in ATTRIBUTES.items()}}
    with torch.enable_grad():
        probes = _fit_probes(feats["train"], targets["train"], n_classes, steps, lr, weight_decay)
    result: dict = {"split": split, "n": {"train": n_train, "test": n_test, "held_out_objects": int(held.sum())}}
    for part, data in (("seen", "seen"), ("novel", "novel"), ("held_out", "novel")):
        right = {}
        for name, (W, b) in probes.items():
            pred = (torch.einsum("ncf,cfk->nck", feats[data], W) + b).argmax(-1)  # (n, C)
            right[name] = pred == targets[data][name]  # (n, C)
        scored = targets[data]["shape"] >= 0  # (n, C) occupied cells
        if part == "held_out":
            scored = scored & held
        acc = {"occupancy": right["occupancy"].float().mean().item()} if part != "held_out" else {}
        for name in ATTRIBUTES:
            acc[name] = right[name][scored].float().mean().item()
        acc["object"] = (right["shape"] & right["color"] & right["size"])[scored].float().mean().item()
        result[part] = {k: round(v, 4) for k, v in acc.items()}
    return result


# ---------------------------------------------------------------------------------------
# Command line: python -m blip2lab.worlds.shapes.vision_backbone --out models/backbones/vit --steps 600
# ---------------------------------------------------------------------------------------


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Pretrain the shapes-world image encoder by scene parsing.")
    p.add_argument("--out", default=str(DEFAULT_DIR))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--supervise", default="-1,-2", help="blocks with a parse head, e.g. -1,-2")
    p.add_argument("--grey", type=float, default=0.25, help="fraction of greyscale images (colour ignored)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-probe", action="store_true")
    p.add_argument("--cell-bias", action="store_true",
                   help="parse heads with a learned per-cell attention bias (the tokens then lose position)")
    p.add_argument("--no-cell-bias", dest="cell_bias", action="store_false",
                   help="the default: no per-cell attention bias, the tokens must carry position")
    args = p.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = "python -m blip2lab.worlds.shapes.vision_backbone " + " ".join(map(shlex.quote, given))
    recipe = pretrain_vision(args.out, steps=args.steps, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                             min_lr=args.min_lr, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
                             label_smoothing=args.label_smoothing,
                             supervise=tuple(int(s) for s in args.supervise.split(",")), grey=args.grey,
                             probe=not args.no_probe, num_threads=args.threads, command=command,
                             cell_bias=args.cell_bias)
    print(json.dumps({k: recipe[k] for k in ("wall_seconds", "steps_per_second", "final_losses", "probe")
                      if k in recipe}, indent=2))


if __name__ == "__main__":
    main()
