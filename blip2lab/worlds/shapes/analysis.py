"""Measurements the notebooks make on models and maps, kept here so they are tested and
shared rather than pasted into cells.

- `box_cover`, `mass_in_box`: how much of a patch-grid map falls inside an object's box,
  and what a uniform map would put there (the chance level).
- `localisation`: over many scenes, whether the Q-Former's cross-attention and the ITM
  Grad-CAM (`blip2lab.explain`) land on the object a text names.
- `map_spread`: how spread out the queries' cross-attention is and how much the queries
  differ, on any image (no boxes needed: mini-real's photos against the shapes scenes).
- `query_collapse`: how alike the Q-Former's queries are, layer by layer, on one image.
- `image_neighbours`: nearest-neighbour image retrieval with the frozen tower alone.

Shape legend: g patch grid side, Q queries, N image tokens (1 + g*g), D_v image width.
"""

from __future__ import annotations

import random
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from blip2lab.worlds.shapes import world

__all__ = ["box_cover", "mass_in_box", "localisation", "summarise_localisation",
           "map_spread", "query_collapse", "image_neighbours", "shared_attributes", "altered_scene"]


# ---------------------------------------------------------------------------------------
# Maps and boxes
# ---------------------------------------------------------------------------------------


def box_cover(box: Sequence[float], image_size: int, grid: int) -> np.ndarray:
    """(g, g) share of each patch's area inside `box` = (x0, y0, x1, y1) in pixels of an
    image of side `image_size` cut into g x g patches (rows = y, columns = x)."""
    edges = np.linspace(0.0, float(image_size), grid + 1)  # (g + 1,) patch edges in pixels
    x0, y0, x1, y1 = box

    def overlap(a: float, b: float) -> np.ndarray:  # (g,) share of each patch interval inside [a, b]
        return np.clip(np.minimum(edges[1:], b) - np.maximum(edges[:-1], a), 0.0, None) / (edges[1] - edges[0])

    return np.outer(overlap(y0, y1), overlap(x0, x1))  # (g, g)


def mass_in_box(heat: Tensor | np.ndarray, box: Sequence[float], image_size: int) -> tuple[float, float]:
    """(share of the map's mass inside `box`, the share a uniform map would put there).
    `heat`: a non-negative (g, g) map over the patches; patches cut by the box edge count
    by the fraction of their area inside it. A map with no mass gives (0, chance)."""
    h = np.clip(np.asarray(heat, dtype=np.float64), 0.0, None)
    if h.ndim != 2 or h.shape[0] != h.shape[1]:
        raise ValueError(f"heat must be a square (g, g) map, got shape {h.shape}")
    cover = box_cover(box, image_size, h.shape[0])  # (g, g)
    total = h.sum()
    chance = float(cover.sum() / cover.size)
    return (float((h * cover).sum() / total) if total > 0 else 0.0), chance


def _unique_objects(scene: world.Scene) -> list[world.ShapeObject]:
    """Objects whose (colour, shape) is unique in their scene: "a red circle" names one thing."""
    combos = [o.combo for o in scene.objects]
    return [o for o in scene.ordered if combos.count(o.combo) == 1]


def localisation(pipe, scenes: Sequence[world.Scene], layer: Optional[int] = None,
                 texts: Sequence[str] = ("name", "phrase"), max_objects: Optional[int] = None) -> list[dict]:
    """Where the maps of `blip2lab.explain` put their mass, object by object.

    For every object of every scene (those with a colour-shape pair unique in the scene):
    - Grad-CAM of the ITM score for a text naming it (`pipe.gradcam`; whole-text map, the
      queries' maps summed): "name" = "a red circle", "phrase" = "a small red circle on the
      top left"; its mass inside this object's box, inside the other objects' boxes (the
      map should not be there), and the uniform-map chance level;
    - the queries' cross-attention (`pipe.attention_maps`, heads and cross-attention layers
      averaged): the largest mass any query puts inside the box, and the mean over queries.

    Returns one dict per object; `summarise_localisation` averages them."""
    rows = []
    for si, scene in enumerate(scenes):
        image = world.render(scene)
        maps = pipe.attention_maps(image).select(layer=layer)  # (Q, g, g), heads averaged
        size = scene.image_size
        for obj in _unique_objects(scene):
            others = [o for o in scene.objects if o is not obj]
            row: dict[str, Any] = {"scene": si, "object": f"{obj.size} {obj.color} {obj.shape}",
                                   "n_objects": len(scene.objects), "held_out": obj.combo in world.HELD_OUT}
            per_query = [mass_in_box(m, obj.box, size) for m in maps]
            row["xattn_max_query"] = max(m for m, _ in per_query)
            row["xattn_mean_query"] = float(np.mean([m for m, _ in per_query]))
            row["chance"] = per_query[0][1]
            for kind in texts:
                text = f"a {obj.color} {obj.shape}" if kind == "name" else obj.phrase()
                cam = pipe.gradcam(image, text, layer=layer)
                row[f"gradcam_{kind}"] = mass_in_box(cam.text_map, obj.box, size)[0]
                if others:  # mass on the other objects, per unit of their area, scaled to this box's area
                    other = [mass_in_box(cam.text_map, o.box, size) for o in others]
                    row[f"gradcam_{kind}_others"] = float(np.mean([m / c for m, c in other])) * row["chance"]
                row[f"itm_prob_{kind}"] = cam.itm_prob
            rows.append(row)
            if max_objects is not None and len(rows) >= max_objects:
                return rows
    return rows


def summarise_localisation(rows: Sequence[dict]) -> dict[str, dict[str, float]]:
    """Mean and standard error of every numeric column of `localisation`'s rows (missing
    values skipped), plus the count."""
    out: dict[str, dict[str, float]] = {}
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, float)))
    for k in keys:
        vals = np.array([r[k] for r in rows if k in r], dtype=np.float64)
        out[k] = {"mean": float(vals.mean()), "sem": float(vals.std(ddof=1) / np.sqrt(len(vals))) if len(vals) > 1
                  else 0.0, "n": int(len(vals))}
    return out


def _mean_offdiag_cosine(x: Tensor) -> float:
    """x (Q, D) -> the mean cosine between two different rows."""
    u = x.double() / x.double().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cos = u @ u.T  # (Q, Q)
    Q = x.shape[0]
    return float((cos.sum() - cos.diagonal().sum()) / max(1, Q * (Q - 1)))


def map_spread(maps) -> dict[str, float]:
    """Three numbers for one image's `explain.CrossAttentionMaps`, each query's map taken
    over the patches only, renormalised (the [CLS] share left out), every cross-attention
    layer and head averaged:

    - `entropy`: the maps' entropy / log(g*g), 1 for a uniform map, 0 for a single patch;
    - `top10_mass`: the mass on the map's most attended 10% of the patches (uniform: 0.10);
    - `query_similarity`: mean cosine between two different queries' maps (1: all the
      queries read the same place; a map has no negative entries, so 0 is its floor).
    """
    m = maps.select()  # (Q, g, g), mean over layers and heads
    Q = m.shape[0]
    p = m.reshape(Q, -1).double()
    p = p / p.sum(-1, keepdim=True)  # (Q, P)
    P = p.shape[1]
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1) / np.log(P)  # (Q,)
    k = max(1, int(round(0.1 * P)))
    top = p.topk(k, dim=-1).values.sum(-1)  # (Q,)
    return {"entropy": float(entropy.mean()), "top10_mass": float(top.mean()),
            "query_similarity": _mean_offdiag_cosine(p)}


@torch.no_grad()
def query_collapse(qformer: nn.Module, image: Tensor) -> dict[str, Any]:
    """How alike the queries are on one image (B = 1; `image` (1, N, D_v) after ln_vision):
    `inputs` the mean cosine between two queries' embeddings after the embedding LayerNorm,
    `self_attention` per layer the cosine between two queries' self-attention rows (heads
    averaged; 1: every query reads the other queries alike), `outputs` between two query
    outputs (1: the LLM is shown one vector Q times)."""
    if image.shape[0] != 1:
        raise ValueError(f"one image at a time, got a batch of {image.shape[0]}")
    inputs = qformer.embed(None, 1, True)[0]  # (Q, D_q)
    out = qformer.encode_queries(image, output_attentions=True)
    rows = [a[0].mean(0) for a in out.self_attentions]  # per layer (Q, Q)
    return {"inputs": _mean_offdiag_cosine(inputs), "self_attention": [_mean_offdiag_cosine(r) for r in rows],
            "outputs": _mean_offdiag_cosine(out.hidden[0])}


# ---------------------------------------------------------------------------------------
# The frozen tower on its own
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def image_neighbours(encoder: nn.Module, scenes: Sequence[world.Scene], k: int = 5,
                     pool: str = "patches") -> tuple[Tensor, Tensor]:
    """Nearest neighbours of every scene among the others by the cosine of the frozen
    tower's tokens: "patches" (all patch tokens in grid order, so where things are counts),
    "mean" (mean over patches: what, not where) or "cls". Returns (indices (n, k), cosines (n, k))."""
    from blip2lab.worlds.shapes.vision_backbone import encode_scenes

    tokens = encode_scenes(encoder, scenes)  # (n, N, D_v)
    if pool not in ("patches", "mean", "cls"):
        raise ValueError(f"pool must be 'patches', 'mean' or 'cls', got {pool!r}")
    feats = {"patches": lambda: tokens[:, 1:].flatten(1),  # (n, (N - 1) D_v)
             "mean": lambda: tokens[:, 1:].mean(dim=1), "cls": lambda: tokens[:, 0]}[pool]()  # (n, D_v)
    feats = torch.nn.functional.normalize(feats.float(), dim=-1)
    sim = feats @ feats.T  # (n, n)
    sim.fill_diagonal_(float("-inf"))
    top = sim.topk(min(k, len(scenes) - 1), dim=1)
    return top.indices, top.values


def shared_attributes(a: world.Scene, b: world.Scene) -> dict[str, float]:
    """How alike two scenes are: the share of cells whose occupancy agrees, and among cells
    occupied in both, the share with the same shape / colour / size."""
    cells = {o.cell: o for o in a.objects}, {o.cell: o for o in b.objects}
    all_cells = [(r, c) for r in range(len(world.ROWS)) for c in range(len(world.COLUMNS))]
    occupancy = np.mean([(c in cells[0]) == (c in cells[1]) for c in all_cells])
    both = [c for c in cells[0] if c in cells[1]]
    out = {"occupancy": float(occupancy)}
    for attr in ("shape", "color", "size"):
        out[attr] = float(np.mean([getattr(cells[0][c], attr) == getattr(cells[1][c], attr) for c in both])) \
            if both else float("nan")
    return out



def altered_scene(scene: world.Scene, rng: random.Random, attribute: Optional[str] = None) -> world.Scene:
    """The scene with one attribute of one object changed (shape, color, size, or position
    to a free cell): a hard negative whose caption differs from the scene's by one fact."""
    attribute = attribute or rng.choice(("shape", "color", "size", "position"))
    objects = list(scene.objects)
    i = rng.randrange(len(objects))
    o = objects[i]
    fields = {"shape": o.shape, "color": o.color, "size": o.size, "row": o.row, "column": o.column}
    if attribute == "position":
        free = [(r, c) for r in world.ROWS for c in world.COLUMNS
                if (world.ROWS.index(r), world.COLUMNS.index(c)) not in {x.cell for x in objects}]
        if not free:
            return altered_scene(scene, rng, "color")
        fields["row"], fields["column"] = rng.choice(free)
    else:
        choices = {"shape": world.SHAPES, "color": tuple(world.COLORS), "size": world.SIZES}[attribute]
        fields[attribute] = rng.choice([v for v in choices if v != fields[attribute]])
    objects[i] = world.place_object(fields["shape"], fields["color"], fields["size"], fields["row"],
                                    fields["column"], image_size=scene.image_size)
    return world.Scene(objects=objects, image_size=scene.image_size)
