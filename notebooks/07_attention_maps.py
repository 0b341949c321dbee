# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 07 · Where do the queries look?
#
# Two estimates of which image patches the Q-Former uses (`blip2lab.explain`):
#
# - **cross-attention maps**: each learned query's attention over the 8x8 patches, per
#   cross-attention layer and head: what the query reads;
# - **ITM Grad-CAM**: attention x its gradient on the ITM "match" logit (the ALBEF / LAVIS
#   recipe), for a text: which patches the evidence for "this text matches" comes from.
#   In the Q-Former only queries see the image, so a word's map is the queries' maps
#   weighted by how much each query attends to that word (see `explain.py`).
#
# The shapes world lets us do more than look: every object's box is known, so we **measure**
# the share of a map's mass inside the box of the object a text names, over many scenes,
# against the share a uniform map would put there (`analysis.localisation`). Both are
# estimates of where evidence comes from, not explanations of a decision.

# %% tags=["parameters"]
import os

SMALL = os.environ.get("BLIP2LAB_SMALL", "1") == "1"  # CI: small and fast; set BLIP2LAB_SMALL=0 for real runs
MODEL = "shapes-opt"  # a shipped model (full mode, when in models/); otherwise a stage 1 is trained here
if SMALL:
    PRESET, OVERRIDES, N_SCENES = "tiny", ["n_train=64", "stage1_steps=4", "stage1_batch=8", "warmup=1"], 4
else:
    PRESET, OVERRIDES, N_SCENES = "default", ["n_train=10000", "stage1_steps=300"], 1000
SEED = 0

# %%
import json
import time
from pathlib import Path

import ipywidgets as widgets
import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import display

import blip2lab
from blip2lab.worlds.shapes import analysis
from blip2lab import explain
from blip2lab.worlds.shapes import world
from blip2lab.pipeline import PRESETS as SHIPPED_MODELS
from blip2lab.worlds.shapes import ablations, recipe

torch.set_num_threads(1)
START = time.perf_counter()
RESULTS = {}

# %% [markdown]
# ## The model
#
# In full mode the shipped `shapes-opt` when it is there (its Q-Former kept the stage-1
# heads that ITM Grad-CAM needs); otherwise, and always in small mode, a stage 1 trained
# here (`recipes.ablations.run_stage1`; in small mode a few steps, so the maps are nearly
# random: small mode checks the mechanics, not the finding).

# %%
if not SMALL and MODEL in SHIPPED_MODELS:
    pipe = blip2lab.load(MODEL)
    RESULTS["model"] = MODEL
else:
    preset = recipe.preset_with(PRESET, OVERRIDES)
    pipe = ablations.run_stage1(preset, SEED).pipe
    RESULTS["model"] = f"stage 1 trained here ({preset.stage1_steps} steps)"
cfg = pipe.model.config.qformer
print(RESULTS["model"], "|", pipe)

# %% [markdown]
# ## One scene, every query
#
# Mean over heads and over the cross-attention layers; the box of each object drawn in.

# %%
scene = next(s for s in world.make_split("test", 50, 3) if len(s.objects) == 3)
image = world.render(scene)
maps = pipe.attention_maps(image)
print(world.caption(scene), "| cross-attention layers:", maps.layers, "| heads:", maps.probs.shape[1])


def draw_boxes(ax, scene, size):
    scale = size / scene.image_size
    for o in scene.objects:
        x0, y0, x1, y1 = (v * scale for v in o.box)
        ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec="white", lw=1))


per_query = maps.select()  # (Q, g, g)
fig, axes = plt.subplots(1, cfg.num_queries + 1, figsize=(2 * (cfg.num_queries + 1), 2.3))
axes[0].imshow(image)
axes[0].set_title("image", fontsize=8)
for i, ax in enumerate(axes[1:]):
    ax.imshow(explain.overlay(image, per_query[i], size=128))
    draw_boxes(ax, scene, 128)
    ax.set_title(f"query {i}", fontsize=8)
for ax in axes:
    ax.axis("off")
if not SMALL:
    Path("results").mkdir(exist_ok=True)
    fig.savefig("results/07_queries.png", dpi=110)
plt.show()

# %% [markdown]
# **Explore** (interactive in Jupyter; a headless run draws the default view): layer, head
# ("mean" over heads) and query.

# %%
def show_query(layer, head, query):
    m = maps.select(layer=None if layer == "all" else layer, head=None if head == "mean" else head)[query]
    fig, ax = plt.subplots(figsize=(2.5, 2.5))
    ax.imshow(explain.overlay(image, m, size=128))
    draw_boxes(ax, scene, 128)
    ax.set_title(f"layer {layer}, head {head}, query {query}", fontsize=8)
    ax.axis("off")
    plt.show()


show_query("all", "mean", 0)
display(widgets.interactive(show_query, layer=["all", *maps.layers], head=["mean", *range(cfg.num_heads)],
                            query=widgets.IntSlider(0, 0, cfg.num_queries - 1)))

# %% [markdown]
# ## Grad-CAM, word by word
#
# For the scene's caption: one map per word (the text's whole map last).

# %%
cam = pipe.gradcam(image, world.caption(scene))
words = cam.words[:11]
fig, axes = plt.subplots(1, len(words) + 1, figsize=(1.7 * (len(words) + 1), 2.2))
for ax, w, m in zip(axes, words, cam.word_maps):
    ax.imshow(explain.overlay(image, m, size=96))
    ax.set_title(w, fontsize=8)
axes[-1].imshow(explain.overlay(image, cam.text_map, size=96))
axes[-1].set_title(f"whole text\nITM p={cam.itm_prob:.2f}", fontsize=8)
for ax in axes:
    ax.axis("off")
plt.show()

# %% [markdown]
# ## Compose a scene
#
# Up to three objects and a text; the Grad-CAM of the text on the composed scene.

# %%
def compose(shape1="circle", color1="red", cell1="top left", shape2="square", color2="blue",
            cell2="bottom right", shape3="none", color3="yellow", cell3="top right", size="large",
            text="a red circle"):
    objects, used = [], set()
    for shape, color, cell in ((shape1, color1, cell1), (shape2, color2, cell2), (shape3, color3, cell3)):
        if shape == "none" or cell in used:
            continue
        used.add(cell)
        row, column = cell.split()
        objects.append(world.place_object(shape, color, size, row, column))
    composed = world.Scene(objects=objects)
    img = world.render(composed)
    c = pipe.gradcam(img, text)
    fig, axes = plt.subplots(1, 2, figsize=(5, 2.5))
    axes[0].imshow(img)
    axes[1].imshow(explain.overlay(img, c.text_map, size=128))
    draw_boxes(axes[1], composed, 128)
    axes[1].set_title(f"{text!r}: ITM p={c.itm_prob:.2f}", fontsize=8)
    for ax in axes:
        ax.axis("off")
    plt.show()


cells = [f"{r} {c}" for r in world.ROWS for c in world.COLUMNS]
compose()
display(widgets.interactive(compose, shape1=list(world.SHAPES), color1=list(world.COLORS), cell1=cells,
                            shape2=["none", *world.SHAPES], color2=list(world.COLORS), cell2=cells,
                            shape3=["none", *world.SHAPES], color3=list(world.COLORS), cell3=cells,
                            size=list(world.SIZES), text="a red circle"))

# %% [markdown]
# ## Measured over many scenes
#
# For every object whose colour-shape pair is unique in its scene, the share of mass inside
# its box:
#
# - `gradcam_name`: Grad-CAM of "a {colour} {shape}" (last cross-attention layer);
# - `gradcam_phrase`: Grad-CAM of the object's full phrase, position words included;
# - `gradcam_*_others`: the same map's mass on the scene's other objects, per unit of area,
#   scaled to this box's area (a map that finds objects but not *the* object scores the same here);
# - `xattn_max_query` / `xattn_mean_query`: cross-attention, the best query / the average one;
# - `chance`: what a uniform map puts in the box (the box's share of the image).

# %%
t0 = time.perf_counter()
test_scenes = world.make_split("test", N_SCENES, 1)
rows = analysis.localisation(pipe, test_scenes)
summary = analysis.summarise_localisation(rows)
print(f"{len(rows)} objects in {len(test_scenes)} scenes ({time.perf_counter() - t0:.0f} s)")
for k, s in summary.items():
    print(f"{k:26s} {s['mean']:.3f} ± {s['sem']:.3f} (sem, n={s['n']})")
RESULTS["localisation"] = summary

# %%
keys = ["chance", "gradcam_name", "gradcam_name_others", "gradcam_phrase", "gradcam_phrase_others",
        "xattn_mean_query", "xattn_max_query"]
keys = [k for k in keys if k in summary]
fig, ax = plt.subplots(figsize=(8, 3))
ax.bar(range(len(keys)), [summary[k]["mean"] for k in keys], yerr=[summary[k]["sem"] for k in keys], capsize=3)
ax.set_xticks(range(len(keys)), keys, rotation=25, ha="right", fontsize=8)
ax.set_ylabel("share of map mass in the box")
ax.set_title("Does the map land on the named object?")
plt.tight_layout()
if not SMALL:
    Path("results").mkdir(exist_ok=True)
    fig.savefig("results/07_localisation.png", dpi=110)
plt.show()

# %% [markdown]
# ## What this notebook measured
#
# The means above (full mode: `results/07_attention_maps.json`). A map "lands on" the named
# object when its mass in the box clearly exceeds both the chance level and the mass on the
# other objects; the README reports the full-mode numbers and whether that holds.

# %%
RESULTS["n_objects"] = len(rows)
RESULTS["seconds"] = round(time.perf_counter() - START, 1)
print(json.dumps(RESULTS, indent=1))
if not SMALL:
    Path("results").mkdir(exist_ok=True)
    Path("results/07_attention_maps.json").write_text(json.dumps(RESULTS, indent=1) + "\n")
